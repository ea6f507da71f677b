"""Dataclass configs on the command line: defaults, YAML, dotted overrides, --help, errors."""

import argparse
from dataclasses import dataclass

import pytest

from perk.cli import ArgumentParser, UsageError, add_config_arguments, build_config, positive_int, set_keys
from perk.config import field


@dataclass
class Inner:
    rank: int = field(16, "LoRA rank")
    lr: float | None = field(None, "learning rate; none picks a default")
    targets: tuple[str, ...] = field(("q", "v"), "module names")

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError("rank must be >= 1")


@dataclass
class Outer:
    steps: int = field(10, "meta-training steps")
    name: str = field("run", "run name")
    fast: bool = field(False, "skip the slow parts")
    inner: Inner = field(Inner(), "the inner config")


def _parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_config_arguments(parser, Outer)
    return build_config(Outer, parser.parse_args(argv))


def test_defaults_yaml_then_overrides(tmp_path):
    assert _parse([]) == Outer()
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("steps: 5\ninner:\n  rank: 4\n  targets: [a, b, c]\n")
    config = _parse(["--config", str(yaml_file), "--inner.rank", "8", "--fast", "true", "--inner.lr", "0.3"])
    assert config.steps == 5 and config.inner.rank == 8 and config.fast is True
    assert config.inner.lr == 0.3 and config.inner.targets == ("a", "b", "c")
    assert _parse(["--inner.lr", "none", "--inner.targets", "x,y"]).inner == Inner(lr=None, targets=("x", "y"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "ten"], "--steps"),
        (["--steps", "2.5"], "--steps"),
        (["--fast", "maybe"], "--fast"),
        (["--inner.rank", "0"], "rank must be >= 1"),
    ],
)
def test_bad_values_name_the_key(argv, message):
    with pytest.raises(UsageError, match=message):
        _parse(argv)


def test_unknown_yaml_key_and_missing_file(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("inner:\n  rnak: 4\n")
    with pytest.raises(UsageError, match="inner.rnak"):
        _parse(["--config", str(yaml_file)])
    with pytest.raises(UsageError, match="no such file"):
        _parse(["--config", str(tmp_path / "missing.yaml")])


def test_help_lists_every_key_with_default_and_meaning(capsys):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Outer)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key, meaning, default in [
        ("--steps", "meta-training steps", "10"), ("--inner.rank", "LoRA rank", "16"),
        ("--inner.targets", "module names", "q,v"), ("--inner.lr", "learning rate", "None"),
    ]:
        assert key in text and meaning in text and f"(default: {default})" in text


def _parser():
    parser = ArgumentParser(prog="perk.x")
    parser.add_argument("--max_new_tokens", type=positive_int)
    parser.add_argument("--dry-run", action="store_true")  # a flag of its own spelled with a hyphen
    add_config_arguments(parser, Outer)
    return parser


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-new-tokens", "3"], "unknown flag --max-new-tokens: did you mean --max_new_tokens?"),
        (["--max-new-tokens=3"], "unknown flag --max-new-tokens: did you mean --max_new_tokens?"),
        (["--steps", "2", "--inner.rank", "2", "--max-new-tokens", "3"], "did you mean --max_new_tokens?"),
    ],
)
def test_a_hyphenated_flag_names_its_underscore_spelling(argv, message):
    with pytest.raises(UsageError) as error:
        _parser().parse_args(argv)
    assert message in str(error.value)


def test_flags_spelled_as_declared_parse_and_other_unknown_flags_are_plain_errors():
    args = _parser().parse_args(["--max_new_tokens", "3", "--dry-run", "--inner.rank", "2"])
    assert args.max_new_tokens == 3 and args.dry_run and set_keys(args) == {"inner.rank"}
    assert build_config(Outer, args).inner.rank == 2
    with pytest.raises(UsageError, match="unrecognized arguments: --no-such-flag"):
        _parser().parse_args(["--no-such-flag"])
    with pytest.raises(UsageError, match="--max_new_tokens: must be a positive integer, got 0"):
        _parser().parse_args(["--max_new_tokens", "0"])
