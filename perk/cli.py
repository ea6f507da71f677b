"""What the command-line tools share: dataclass configs on the command line and one-line errors.

A config is a (possibly nested) dataclass with working defaults. Its values come from, in order:
the defaults, a YAML file (``--config FILE``), then ``--key value`` overrides, where nested
fields are dotted (``--perk.rank 8``). ``--help`` lists every key with its default and meaning
(the field's ``metadata["help"]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml



class UsageError(Exception):
    """Bad input from the user: reported as one line and a non-zero exit, no traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with bad arguments reported as one line by :func:`run_main` (no usage dump).

    Every perk flag is spelled like its config key, with underscores (``--max_new_tokens``, as
    in the YAML files); a flag spelled with hyphens where the underscore spelling exists is
    refused with the right spelling, before anything else is parsed."""

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        for arg in argv:
            if arg == "--":
                break
            self._check_spelling(arg)
        return super().parse_known_args(argv, namespace)

    def _check_spelling(self, arg: str) -> None:
        if not arg.startswith("--") or "-" not in arg[2:]:
            return
        flag = arg.split("=", 1)[0]
        if flag in self._option_string_actions:
            return
        underscored = "--" + flag[2:].replace("-", "_")
        if underscored in self._option_string_actions:
            raise UsageError(f"unknown flag {flag}: did you mean {underscored}?")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _walk(cls: type, prefix: str = ""):
    """(dotted key, type, field) for every leaf field of a nested dataclass type."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _walk(kind, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", kind, f


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def convert(kind: Any, value: Any, key: str) -> Any:
    """``value`` (a string from the command line, or a YAML value) as type ``kind``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    try:
        if origin in (typing.Union, types.UnionType):
            if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
                if type(None) in args:
                    return None
            inner = [a for a in args if a is not type(None)]
            return convert(inner[0], value, key)
        if origin is typing.Literal:
            if value not in args:
                raise ValueError(f"expected one of {', '.join(map(str, args))}, got {value!r}")
            return value
        if origin in (tuple, list):
            items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
            if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
                return tuple(convert(args[0], v, key) for v in items)
            if origin is tuple:
                if len(items) != len(args):
                    raise ValueError(f"expected {len(args)} comma-separated values, got {len(items)}")
                return tuple(convert(a, v, key) for a, v in zip(args, items))
            return [convert(args[0], v, key) for v in items]
        if kind is bool:
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            return float(value)
        if kind is str:
            return str(value)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--{key}: {err}") from None
    return value


def _format_default(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


# Where add_config_arguments keeps a config key's value in the parsed namespace (apart from the
# command's other options): read it with set_keys and build_config, never by this prefix.
_KEY_DEST = "cfg:"


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, defaults: Any | None = None) -> None:
    """One ``--key`` option per leaf field of ``cls`` (nested fields dotted)."""
    defaults = defaults if defaults is not None else cls()
    group = parser.add_argument_group(f"{cls.__name__} (also settable in a --config YAML file)")
    for key, kind, f in _walk(cls):
        default = get_key(defaults, key)
        meaning = f.metadata.get("help", "")
        group.add_argument(
            f"--{key}", dest=_KEY_DEST + key, metavar=_metavar(kind), default=argparse.SUPPRESS,
            help=f"{meaning} (default: {_format_default(default)})".replace("%", "%%"),
        )


def _metavar(kind: Any) -> str:
    name = getattr(kind, "__name__", None) or str(kind).replace("typing.", "")
    return name.upper() if isinstance(name, str) and name.isidentifier() else "VALUE"


def get_key(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _set_key(config: Any, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        config = getattr(config, part)
    setattr(config, last, value)


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` → ``{'a.b': 1}``: nested config mappings as dotted keys."""
    flat = {}
    for name, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def set_keys(namespace: argparse.Namespace) -> set[str]:
    """The config keys (dotted) the user set on the command line (``--key value``), of the
    options :func:`add_config_arguments` added; a key left at its default is not in it."""
    return {key for key, _ in _key_values(namespace)}


def _key_values(namespace: argparse.Namespace) -> list[tuple[str, Any]]:
    return [(k[len(_KEY_DEST):], v) for k, v in vars(namespace).items() if k.startswith(_KEY_DEST)]


def build_config(cls: type, namespace: argparse.Namespace, defaults: Any | None = None) -> Any:
    """The config from defaults, then ``namespace.config`` (YAML), then ``--key`` overrides."""
    values: dict[str, Any] = {}
    yaml_path = getattr(namespace, "config", None)
    if yaml_path:
        values.update(flatten(read_yaml(yaml_path)))
    values.update(_key_values(namespace))
    return config_from_mapping(cls, values, defaults)


def config_from_mapping(cls: type, values: dict[str, Any], defaults: Any | None = None) -> Any:
    """The config from defaults, then ``values`` (a nested mapping, as in a YAML file, or dotted
    keys), each converted and checked as on the command line (UsageError otherwise)."""
    config = dataclasses.replace(defaults) if defaults is not None else cls()
    kinds = {key: kind for key, kind, _ in _walk(cls)}
    for key, value in flatten(values).items():
        if key not in kinds:
            raise UsageError(f"unknown config key {key!r} (see --help for the keys)")
        _set_key(config, key, convert(kinds[key], value, key))
    _revalidate(config)
    return config


def _revalidate(config: Any) -> None:
    """Run every dataclass's ``__post_init__`` check again after overrides."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            _revalidate(value)
    post_init = getattr(config, "__post_init__", None)
    if post_init is not None:
        try:
            post_init()
        except (TypeError, ValueError) as err:
            raise UsageError(str(err)) from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config: no such file: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of keys to values")
    return data


def config_to_dict(config: Any) -> dict:
    """A JSON/YAML-friendly dict (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None, *,
             prog: str = "perk") -> int:
    """Call a CLI's ``main``; bad input becomes one line ``<prog>: error: ...`` on stderr and a
    non-zero exit (2 for bad arguments, 1 for bad input found later, 130 when interrupted)."""
    try:
        return int(main(argv) or 0)
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, ImportError, FloatingPointError) as err:
        # Bad input found deeper down (a file that is not a dataset, a checkpoint of another
        # model, a missing optional package, training that diverged to non-finite losses, ...):
        # one line, not a traceback wall.
        if os.environ.get("PERK_DEBUG") == "1":
            raise
        print(f"{prog}: error: {err} (PERK_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
