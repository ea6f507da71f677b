"""Checkpoints that survive a crash: written atomically, verified on load.

A checkpoint is a folder ``<run>/checkpoints/step-00000120/`` holding

* ``tensors.safetensors`` — the trained tensors (meta-parameters, baseline adapters),
* ``state.json`` + ``state.safetensors`` — optimizer and scheduler states, RNG states, data
  position, step: plain values as JSON, their tensors in safetensors (see :func:`encode_state`),
* ``manifest.json`` — the SHA-256 of the other three, written last.

Nothing in a checkpoint is a pickle: whoever can write a run directory can also write a matching
manifest, so a checkpoint must be data that cannot run code when read. A folder holding a pickled
``state.pt`` (perk before 2026-12-06) is refused with one line, never unpickled.

It is assembled in a hidden temporary folder, every file fsynced, then renamed into place: a
crash at any moment leaves either the complete checkpoint or none. On load, a checkpoint whose
manifest is missing or whose files do not match it is reported and skipped for the previous
good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

TENSORS = "tensors.safetensors"
STATE = "state.json"
STATE_TENSORS = "state.safetensors"
MANIFEST = "manifest.json"
LEGACY_PICKLE = "state.pt"  # what perk wrote before checkpoints became pickle-free


@dataclass
class Checkpoint:
    step: int
    path: Path
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_folder_atomic(path: str | Path, files: dict[str, bytes]) -> None:
    """Make ``path`` a folder of exactly ``files`` (name → bytes) that appears whole or not at all.

    The folder is assembled next to it (every file fsynced), then renamed into place. A folder
    already there is first renamed aside and removed after: a crash in between leaves no
    ``path`` (the old folder survives as a hidden ``.<name>-old-*`` sibling), never a mix.

    Only a folder this function could have written is replaced (plain files, all named in
    ``files``): anything else at ``path`` is refused with FileExistsError, never deleted.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        _check_replaceable(path, set(files))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-new-", dir=path.parent))
    old = None
    try:
        for name, data in files.items():
            with open(staging / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        _fsync_dir(staging)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}-old-", dir=path.parent))
            os.replace(path, old)
        os.rename(staging, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_replaceable(path: Path, names: set[str]) -> None:
    if path.is_symlink() or not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder perk wrote; refusing to replace it")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in names or p.is_symlink() or not p.is_file())
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise FileExistsError(f"{path} holds {shown}, which perk did not write there; refusing to replace it")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; FileNotFoundError, or ValueError for a damaged file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return load_safetensors(path.read_bytes())
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file, truncated or damaged ({err})") from None


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch RNG states as plain values and tensors (no NumPy arrays)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = {**state["numpy"], "state": dict(state["numpy"]["state"])}
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])


# ----------------------------------------------------------------------------------------------
# Checkpoint state without pickle: JSON for the structure, safetensors for its tensors
# ----------------------------------------------------------------------------------------------


def encode_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON value, tensors) of a state made of None, bool, int, float, str, lists, tuples, dicts
    and tensors: tuples, dicts (whose keys may be ints, as in optimizer states) and tensors become
    tagged objects ``{"tuple": [...]}``, ``{"dict": [[key, value], ...]}``, ``{"tensor": "3"}``, so
    :func:`decode_state` gives back exactly the same types. Anything else is a TypeError."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.Tensor):
            name = str(len(tensors))
            tensors[name] = value.detach().contiguous().cpu()
            return {"tensor": name}
        if isinstance(value, list):
            return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {"tuple": [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, dict):
            for key in value:
                if not (key is None or isinstance(key, (bool, int, float, str))):
                    raise TypeError(f"checkpoint state {where}: key {key!r} is not a plain value")
            return {"dict": [[k, encode(v, f"{where}[{k!r}]")] for k, v in value.items()]}
        raise TypeError(f"checkpoint state {where}: {type(value).__name__} is not storable without pickle")

    return encode(state, "state"), tensors


def decode_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The state :func:`encode_state` encoded; ValueError for anything it cannot have written."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [decode_state(v, tensors) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        (tag, body), = value.items()
        if tag == "tensor" and isinstance(body, str) and body in tensors:
            return tensors[body]
        if tag == "tuple" and isinstance(body, list):
            return tuple(decode_state(v, tensors) for v in body)
        if tag == "dict" and isinstance(body, list) and all(isinstance(kv, list) and len(kv) == 2 for kv in body):
            return {key: decode_state(v, tensors) for key, v in body}
    raise ValueError(f"not a perk checkpoint state value: {json.dumps(value)[:80]}")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any], *, keep: int = 2
) -> Path:
    """Write checkpoint ``step`` atomically; keep only the newest ``keep`` checkpoints."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    state_json, state_tensors = encode_state({**state, "step": step})
    blobs = {
        TENSORS: save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}),
        STATE: json.dumps(state_json).encode(),
        STATE_TENSORS: save_safetensors(state_tensors),
    }
    manifest = {"step": step, "sha256": {name: hashlib.sha256(b).hexdigest() for name, b in blobs.items()}}
    blobs[MANIFEST] = json.dumps(manifest, indent=1).encode()
    write_folder_atomic(final, blobs)  # a re-run of the same step after a resume replaces it whole
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


class CorruptCheckpoint(Exception):
    """A checkpoint that is incomplete or damaged: skipped for the previous good one."""


class UnsafeCheckpoint(ValueError):
    """A checkpoint in a format perk refuses to read (a pickle): the run stops, with one line."""


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load and verify one checkpoint folder; :class:`CorruptCheckpoint` if it does not check out."""
    path = Path(path)
    if (path / LEGACY_PICKLE).exists():
        raise UnsafeCheckpoint(
            f"{path} holds {LEGACY_PICKLE}, a pickle (perk before 2026-12-06, or planted): perk does not unpickle "
            "checkpoints, since a crafted pickle runs code when loaded; start a new run (--name) instead of --resume"
        )
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        blobs = {name: (path / name).read_bytes() for name in (TENSORS, STATE, STATE_TENSORS)}
        checksums = manifest["sha256"]
        step = manifest["step"]
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CorruptCheckpoint(f"{path}: incomplete ({type(err).__name__}: {err})") from None
    for name, blob in blobs.items():
        if hashlib.sha256(blob).hexdigest() != checksums.get(name):
            raise CorruptCheckpoint(f"{path}: {name} does not match its checksum (corrupt or partial)")
    try:
        tensors = load_safetensors(blobs[TENSORS])
        state = decode_state(json.loads(blobs[STATE]), load_safetensors(blobs[STATE_TENSORS]))
    except (ValueError, SafetensorError) as err:
        raise CorruptCheckpoint(f"{path}: matches its checksums but cannot be read ({err})") from None
    if not isinstance(state, dict) or not isinstance(step, int) or state.get("step") != step:
        raise CorruptCheckpoint(f"{path}: matches its checksums but its state is not a step-{step} checkpoint")
    return Checkpoint(step=step, path=path, tensors=tensors, state=state)


def load_latest_checkpoint(run_dir: str | Path, check_state: Callable[[dict], None] | None = None) -> Checkpoint | None:
    """The newest checkpoint that verifies, warning about every newer one that does not;
    ``check_state`` (a ValueError for a state the caller cannot resume from, e.g. one missing
    keys) is part of verifying."""
    for path in sorted(checkpoint_dir(run_dir).glob("step-*"), reverse=True):
        try:
            checkpoint = read_checkpoint(path)
            if check_state is not None:
                try:
                    check_state(checkpoint.state)
                except ValueError as err:
                    raise CorruptCheckpoint(f"{path}: matches its checksums but its state {err}") from None
            return checkpoint
        except CorruptCheckpoint as err:
            warnings.warn(f"skipping checkpoint {err}; falling back to the previous one", stacklevel=2)
    return None
