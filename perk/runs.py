"""A training run: its config, its directory, and loading what it wrote.

``python -m perk.train`` writes everything of a run into ``<runs_dir>/<name>/``:

* ``config.yaml`` — the resolved :class:`~perk.config.TrainConfig` (written atomically when the run starts;
  ``--resume`` continues with it), after a comment line saying on how many processes it started;
* ``metrics.jsonl`` — one JSON line per optimizer step (:class:`MetricsLog`), with the world size;
* ``checkpoints/step-*/`` — atomic, verified checkpoints (:mod:`perk.checkpoint`);
* ``perk/`` — the trained PERK model (:meth:`perk.engine.PerkModel.save_pretrained`);
* ``ftic_adapter.safetensors`` — the FT-ICR baseline's adapter, when ``ftic`` is a method;
* ``results.{json,md}`` — the final evaluation (:mod:`perk.report`).

The command-line tools (train, eval, encode, check_meta_grad) share this module, not each other.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from safetensors.torch import save

from perk.checkpoint import read_safetensors, write_file_atomic
from perk.cli import UsageError, config_from_mapping, config_to_dict
from perk.config import THREADS_HELP, TrainConfig
from perk.distributed import Launch, from_rank0
from perk.engine import PerkModel, load_tensors, read_pretrained
from perk.models import load_base_model, resolve_base_dtype

RESOLVED_CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
PERK_DIR = "perk"
FTIC_ADAPTER = "ftic_adapter.safetensors"
LOCK = "lock"  # held (flock) by the perk.train writing the run; holds its pid
PHASES = ("perk", "ftic")  # the optimisation phases of a run, in order


# ----------------------------------------------------------------------------------------------
# The run directory
# ----------------------------------------------------------------------------------------------


def run_directory(config: TrainConfig) -> Path:
    """``<runs_dir>/<name>``, refused (UsageError) where it would resolve outside ``runs_dir`` (a
    symlink planted in its place)."""
    runs = Path(config.runs_dir)
    run_dir = runs / config.name
    if run_dir.resolve().parent != runs.resolve():
        raise UsageError(f"{run_dir} resolves to {run_dir.resolve()}, outside runs_dir {runs}: refusing to use it")
    return run_dir


@contextlib.contextmanager
def run_lock(run_dir: Path, launch: Launch) -> Iterator[None]:
    """One writer per run: rank 0 holds an exclusive ``flock`` on ``<run_dir>/lock`` for the life of
    the block; a second perk.train of the same run gets a UsageError naming the holder's pid (every
    rank of it: rank 0's verdict is broadcast). The operating system releases the lock when its
    holder exits, however it ends (a kill included), so a crash never leaves a stale lock behind.
    A run that wrote nothing else leaves no folder behind (its name stays usable)."""
    handle, error, created = None, None, False
    if launch.is_main:
        created = not run_dir.exists()
        handle, error = _take_lock(run_dir)
    error = from_rank0(error, launch)
    if error is not None:
        raise UsageError(error)
    try:
        yield
    finally:
        if handle is not None:
            if [p.name for p in run_dir.iterdir()] == [LOCK]:  # still held: no one else can be using it
                (run_dir / LOCK).unlink()
                if created:
                    run_dir.rmdir()
            handle.close()  # releases the lock


def _take_lock(run_dir: Path):
    """(open lock file holding the lock, None) or (None, why not)."""
    while True:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            return None, (f"{run_dir} is in use by another perk.train (pid {holder}); wait for it to end, or pass "
                          "another --name")
        try:
            same = os.stat(run_dir / LOCK).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its last holder removed (see run_lock) while this one opened it
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            return handle, None
        handle.close()


def resolve_device(requested: str) -> str:
    """``cpu`` or ``cuda`` for a ``device`` setting (``auto``: cuda when available)."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if requested not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or auto, got {requested!r}")
    return requested


def physical_cores(cpus: set[int] | None = None, topology: Path = Path("/sys/devices/system/cpu")) -> int:
    """Physical cores among ``cpus`` (default: the CPUs this process may run on): SMT siblings,
    which share one core's arithmetic units, count once. Without sysfs every CPU counts."""
    if cpus is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        try:
            cores.add((topology / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def resolve_threads(requested: int, *, processes: int = 1, cores: int | None = None,
                    omp_threads: int | None = None) -> int:
    """Intra-op threads for a ``threads`` setting: an explicit count wins; 0 takes ``omp_threads``
    (``OMP_NUM_THREADS``) where one process runs, else shares the physical ``cores``
    (:func:`physical_cores`) among the ``processes`` on this machine, at least one each: more
    threads than cores wait on each other at every OpenMP barrier. (torchrun sets OMP_NUM_THREADS=1
    for its processes itself, so under it the variable is not the user's choice.)"""
    if requested < 0:
        raise UsageError(f"--threads must be >= 0 (0: all physical cores), got {requested}")
    if requested:
        return requested
    if omp_threads and processes <= 1:
        return omp_threads
    cores = physical_cores() if cores is None else cores
    return max(1, cores // max(1, processes))


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads`` of the commands without a TrainConfig (perk.eval, perk.encode): as ``threads``."""
    parser.add_argument("--threads", type=int, default=0, help=f"{THREADS_HELP}; default 0")


def set_threads(requested: int) -> int:
    """Set torch's intra-op threads for a command (:func:`resolve_threads`; torchrun's processes on
    this machine are its ``LOCAL_WORLD_SIZE``); returns the count."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    threads = resolve_threads(requested, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                              omp_threads=int(omp) if omp.isdigit() else None)
    torch.set_num_threads(threads)
    return threads


def read_run_config(run_dir: Path) -> TrainConfig:
    """The resolved config a run saved, validated like the command line (UsageError if damaged)."""
    path = run_dir / RESOLVED_CONFIG
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UsageError(f"{path}: not a readable run config ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: not a run config (expected a mapping of keys to values)")
    try:
        return config_from_mapping(TrainConfig, data)
    except UsageError as err:
        raise UsageError(f"{path}: {err}") from None


def save_resolved_config(run_dir: Path, config: TrainConfig, *, world_size: int = 1) -> None:
    """``config.yaml`` of a run, written atomically; its first line (a YAML comment, so the file
    stays a ``--config`` file) records how many processes started the run (``metrics.jsonl`` has
    the world size of every step: a resumed run may use another)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    launched = f"# launched on {world_size} process{'es' if world_size > 1 else ''}"
    launched += " (torchrun)\n" if world_size > 1 else "\n"
    text = launched + yaml.safe_dump(config_to_dict(config), sort_keys=False)
    write_file_atomic(run_dir / RESOLVED_CONFIG, text.encode())


# ----------------------------------------------------------------------------------------------
# metrics.jsonl
# ----------------------------------------------------------------------------------------------


class MetricsLog:
    """``metrics.jsonl``: one JSON line per step, appended and flushed as it happens."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, phase_index: int, step: int) -> None:
        """Drop the lines a resumed run will redo (after ``step`` of phase ``phase_index``), and
        any line that is not a whole record (a kill mid-write tears the last one)."""
        if not self.path.is_file():
            return
        lines = self.path.read_bytes().decode("utf-8", errors="replace").splitlines()
        records = [_record(line) for line in lines]
        torn = sum(1 for line, r in zip(lines, records) if r is None and line.strip())
        if torn:
            warnings.warn(f"{self.path}: dropping {torn} damaged line(s) (a run killed mid-write)", stacklevel=2)
        kept = [line for line, r in zip(lines, records) if r is not None and _before(r, phase_index, step)]
        write_file_atomic(self.path, "".join(line + "\n" for line in kept).encode())

    def append(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()


def _record(line: str) -> dict | None:
    """One metrics line as a record, or None when it is not one (torn, or not of this format)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("phase") not in PHASES or not isinstance(record.get("step"), int):
        return None
    return record


def _before(record: dict, phase_index: int, step: int) -> bool:
    index = PHASES.index(record["phase"])
    return index < phase_index or (index == phase_index and record["step"] < step)


# ----------------------------------------------------------------------------------------------
# What a finished run leaves: the PERK model and the FT-ICR adapter
# ----------------------------------------------------------------------------------------------


def save_ftic_adapter(run_dir: Path, adapter: torch.Tensor) -> None:
    """``ftic_adapter.safetensors``: the FT-ICR adapter (P,), written atomically."""
    tensors = {"adapter": adapter.detach().contiguous().cpu()}
    write_file_atomic(run_dir / FTIC_ADAPTER, save(tensors))


def load_ftic_adapter(run_dir: Path, pm: PerkModel) -> torch.Tensor:
    """The FT-ICR adapter a run saved, as (1, P), checked against ``pm``'s adapter layout."""
    adapter = torch.zeros(1, pm.layout.n_params, dtype=pm.dtype)
    load_tensors({"adapter": adapter[0]}, read_safetensors(run_dir / FTIC_ADAPTER), source=str(run_dir / FTIC_ADAPTER))
    return adapter


def load_run(run_dir: Path, model_name: str | None, device: str, *,
             launch: Launch | None = None) -> tuple[PerkModel, TrainConfig]:
    """(PerkModel, run config) of a run directory written by perk.train, on ``device``
    (``model_name``: another base model than the run's, which must fit its adapters). With a
    distributed ``launch``, every process loads the base model in rank 0's dtype.

    The run's files are checked (readable, valid, finite) before the base model is loaded."""
    config_file = run_dir / RESOLVED_CONFIG
    if not (run_dir / PERK_DIR).is_dir() or not config_file.is_file():
        raise UsageError(f"--checkpoint {run_dir}: not a finished perk.train run (no {PERK_DIR}/ or {RESOLVED_CONFIG})")
    config = read_run_config(run_dir)
    try:
        read_pretrained(run_dir / PERK_DIR)
    except (OSError, ValueError) as err:
        raise UsageError(f"--checkpoint {run_dir}: damaged {PERK_DIR}/ ({err})") from None
    dtype = resolve_base_dtype(config.base_dtype, device)
    if launch is not None:
        dtype = from_rank0(dtype, launch)  # "auto" on a CPU measures: the processes must agree
    model, tokenizer = load_base_model(model_name or config.model, dtype=dtype, device=device)
    try:
        pm = PerkModel.from_pretrained(run_dir / PERK_DIR, model, tokenizer)
    except ValueError as err:
        raise UsageError(f"--checkpoint {run_dir} does not fit base model {model_name or config.model}: {err}") from None
    return pm, config
