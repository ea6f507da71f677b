"""Checkpoints that survive a crash: written atomically, verified on load.

A checkpoint is a folder ``<run>/checkpoints/step-00000120/`` holding

* ``tensors.safetensors`` — the trained tensors (meta-parameters, baseline adapters),
* ``state.pt`` — optimizer and scheduler states, RNG states, data position, step,
* ``manifest.json`` — the SHA-256 of both, written last.

It is assembled in a hidden temporary folder, every file fsynced, then renamed into place: a
crash at any moment leaves either the complete checkpoint or none. On load, a checkpoint whose
manifest is missing or whose files do not match it is reported and skipped for the previous
good one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

TENSORS = "tensors.safetensors"
STATE = "state.pt"
MANIFEST = "manifest.json"


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
    """
    path = Path(path)
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
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any], *, keep: int = 2
) -> Path:
    """Write checkpoint ``step`` atomically; keep only the newest ``keep`` checkpoints."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    blobs = {
        TENSORS: save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}),
        STATE: _torch_bytes({**state, "step": step}),
    }
    manifest = {"step": step, "sha256": {name: hashlib.sha256(b).hexdigest() for name, b in blobs.items()}}
    blobs[MANIFEST] = json.dumps(manifest, indent=1).encode()
    write_folder_atomic(final, blobs)  # a re-run of the same step after a resume replaces it whole
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class CorruptCheckpoint(Exception):
    pass


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load and verify one checkpoint folder; :class:`CorruptCheckpoint` if it does not check out."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        blobs = {name: (path / name).read_bytes() for name in (TENSORS, STATE)}
    except (OSError, ValueError) as err:
        raise CorruptCheckpoint(f"{path}: incomplete ({type(err).__name__}: {err})") from None
    for name, blob in blobs.items():
        if hashlib.sha256(blob).hexdigest() != manifest.get("sha256", {}).get(name):
            raise CorruptCheckpoint(f"{path}: {name} does not match its checksum (corrupt or partial)")
    state = torch.load(io.BytesIO(blobs[STATE]), weights_only=False)
    return Checkpoint(step=manifest["step"], path=path, tensors=load_safetensors(blobs[TENSORS]), state=state)


def load_latest_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The newest checkpoint that verifies, warning about every newer one that does not."""
    for path in sorted(checkpoint_dir(run_dir).glob("step-*"), reverse=True):
        try:
            return read_checkpoint(path)
        except CorruptCheckpoint as err:
            warnings.warn(f"skipping checkpoint {err}; falling back to the previous one", stacklevel=2)
    return None
