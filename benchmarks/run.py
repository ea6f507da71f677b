"""One command for the benchmark suites: pytest-benchmark JSON, markdown summary and plots.

    python -m benchmarks.run                                   # every suite, sizes for this machine
    python -m benchmarks.run --only encode_vs_prompt --sizes 64K,128K,1M
    python -m benchmarks.run --sizes small                     # the CPU sizes, anywhere

from the repository root (the project need not be installed: the suites' pytest gets the root on
its PYTHONPATH). It writes ``benchmarks/results/<device>-<date>[-<groups>].json`` (pytest-benchmark's
JSON) and, by ``benchmarks/report.py``, ``….md`` with ``…-encode.png`` and ``…-meta-step.png`` beside it.
The engine suites (encode_vs_prompt, meta_step) run first, then the others. With CUDA the run is
given a time budget (default 420 s, ``--budget``): past it no benchmark starts, and a size
predicted to end after it is skipped (see benchmarks/conftest.py), so the whole command fits
one 10-minute session. Arguments after ``--`` go to pytest.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import report

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
FIRST = ("encode_vs_prompt", "meta_step")  # the budget goes to these first
DEFAULT_CUDA_BUDGET_S = 420.0


def suites() -> dict[str, Path]:
    """``{group: file}`` of every ``benchmarks/test_<group>.py``, the engine suites first."""
    found = {path.stem.removeprefix("test_"): path for path in sorted(BENCHMARKS.glob("test_*.py"))}
    return {name: found[name] for name in [*(n for n in FIRST if n in found), *(n for n in found if n not in FIRST)]}


def device_slug() -> str:
    """``nvidia-h100-80gb-hbm3`` for CUDA device 0, ``cpu`` without CUDA."""
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    pytest_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, pytest_args = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated suites (default: all): " + ", ".join(suites()))
    parser.add_argument(
        "--sizes",
        help="'small' or 'full' (default: full with CUDA, small without), or context lengths to keep, e.g. 4K,8K,1M",
    )
    parser.add_argument(
        "--budget", type=float,
        help=f"seconds for the run (default: {DEFAULT_CUDA_BUDGET_S:g} with CUDA, none without; 0: none)",
    )
    parser.add_argument("--out-dir", type=Path, default=BENCHMARKS / "results", help="where results go")
    return parser.parse_args(argv), pytest_args


def selected(only: str | None) -> dict[str, Path]:
    available = suites()
    if not only:
        return available
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SystemExit(f"--only: unknown suite(s) {unknown}; choose from {sorted(available)}")
    return {n: available[n] for n in available if n in names}


def benchmark_env(sizes: str | None, budget: float | None, command: str) -> dict[str, str]:
    """The environment the suites read (see benchmarks/conftest.py)."""
    # The suites' pytest is a session of its own: started from a pytest-xdist worker (the tests do),
    # the worker's variables would make pytest-benchmark believe it runs under xdist and refuse.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PERK_BENCH_COMMAND"] = command
    if sizes in ("small", "full"):
        env["PERK_BENCH_SIZE"] = sizes
    elif sizes:
        env["PERK_BENCH_LENGTHS"] = sizes
    if budget:
        env["PERK_BENCH_DEADLINE"] = str(time.time() + budget)
    return env


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, pytest_args = parse_args(argv)
    chosen = selected(args.only)
    import torch

    budget = args.budget if args.budget is not None else (DEFAULT_CUDA_BUDGET_S if torch.cuda.is_available() else None)
    date = datetime.date.today().isoformat()
    suffix = f"-{'+'.join(chosen)}" if args.only else ""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / f"{device_slug()}-{date}{suffix}.json"
    command = shlex.join(["python", "-m", "benchmarks.run", *argv])
    pytest_command = [
        sys.executable, "-m", "pytest", *(str(p) for p in chosen.values()), "--benchmark-only",
        f"--benchmark-json={json_path}", "-q", "-p", "no:cacheprovider",
        # A suite that cannot be imported here (a missing optional package) must not stop the others.
        "--continue-on-collection-errors", *pytest_args,
    ]
    print("running:", shlex.join(pytest_command), flush=True)
    with subprocess.Popen(pytest_command, cwd=ROOT, env=benchmark_env(args.sizes, budget, command)) as pytest:
        try:
            code = pytest.wait()
        except KeyboardInterrupt:
            # Ctrl-C and `timeout -s INT` reach pytest too: it stops and saves the benchmarks that
            # finished. Wait for that, then report them.
            code = pytest.wait()
    if json_path.is_file():
        for path in report.write_report([json_path]):
            print("wrote", path)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
