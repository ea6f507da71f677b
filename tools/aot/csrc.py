"""csrc/ compiled with nvcc (compile only, sm_90), in the background while the kernels compile."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tools.aot.targets import cache_dir

CSRC = Path(__file__).resolve().parents[2] / "csrc"


def _csrc_commands(out_dir: Path) -> list[list[str]] | str:
    """The compile-only commands for csrc/, or why they cannot run here."""
    from torch.utils.cpp_extension import include_paths

    nvcc = shutil.which("nvcc") or next(
        (str(p) for p in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc",) if p.exists()), None
    )
    if nvcc is None:
        return "nvcc not found"
    if not CSRC.is_dir():
        return f"no {CSRC}"
    includes = [f"-I{p}" for p in include_paths()]
    # The CPU wheel of torch lacks this generated header, which the CUDA headers include.
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in include_paths()):
        stub = out_dir / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        includes.append(f"-I{out_dir / 'stub'}")
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    defines = ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    sources = sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp"))
    return [
        [nvcc, "-c", str(src), "-o", str(out_dir / f"{src.name}.o"), "-std=c++20", "-O0",
         "-gencode", "arch=compute_90,code=sm_90", *includes, *defines]  # fmt: skip
        for src in sources
    ]


def _csrc_key(commands: list[list[str]]) -> str:
    h = hashlib.sha256(torch.__version__.encode())
    h.update(subprocess.run([commands[0][0], "--version"], capture_output=True, text=True).stdout.encode())
    for path in sorted(CSRC.iterdir()):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:32]


def start_csrc_check() -> Callable[[], tuple[str, list[str]]]:
    """Start compiling csrc/ in the background; the returned function waits: (status line, failures)."""
    out_dir = Path(tempfile.mkdtemp(prefix="perk_csrc_"))
    commands = _csrc_commands(out_dir)
    if isinstance(commands, str):
        shutil.rmtree(out_dir, ignore_errors=True)
        return lambda: (f"csrc: skipped ({commands})", [])
    cached = cache_dir() / f"csrc-{_csrc_key(commands)}.json"
    if cached.exists():
        shutil.rmtree(out_dir, ignore_errors=True)
        return lambda: (json.loads(cached.read_text())["status"] + " (cached)", [])
    start = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in commands]

    def wait() -> tuple[str, list[str]]:
        failures, notes = [], []
        for cmd, proc in zip(commands, procs):
            output = proc.communicate()[0]
            if proc.returncode == 0:
                continue
            ours = [line for line in output.splitlines() if "error" in line and str(CSRC) in line]
            name = Path(cmd[2]).name
            if ours:
                failures += [f"csrc {name}: {line}" for line in ours[:10]]
            else:
                first = next((line for line in output.splitlines() if "error" in line), output[-300:])
                notes.append(f"{name} not checked (errors outside csrc/ only: {first.strip()})")
        shutil.rmtree(out_dir, ignore_errors=True)
        seconds = time.perf_counter() - start
        if failures:
            return f"csrc: FAIL ({len(failures)} errors in csrc/)", failures
        status = f"csrc: compiles with nvcc for sm_90 (done {seconds:.0f} s in)"
        if notes:
            status = f"csrc: {'; '.join(notes)}"
        if not notes:
            cached.write_text(json.dumps({"status": "csrc: compiles with nvcc for sm_90"}))
        return status, []

    return wait
