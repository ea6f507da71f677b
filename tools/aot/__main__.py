"""``python -m tools.aot``: the GPU-readiness compile sweep (see :mod:`tools.aot`); exit 1 on a failure."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence

from perk.cli import ArgumentParser, UsageError, run_main
from tools.aot.compile import compile_all, expand, quiet
from tools.aot.csrc import start_csrc_check
from tools.aot.record import record_launches
from tools.aot.targets import ACTIVATIONS, ARCHS, RANKS
from tools.aot.verdicts import coverage_failures, format_table, launch_failures, row_failures, summary_by_rank

PROG = "python -m tools.aot"


def run(
    archs: list[str], ranks: tuple[int, ...], activations: tuple[str, ...], workers: int, csrc: bool, table: bool
) -> int:
    start = time.perf_counter()
    wait_csrc = start_csrc_check() if csrc else (lambda: ("csrc: skipped (--no_csrc)", []))
    launches = record_launches(ranks, activations)
    jobs, rows = expand(launches, [ARCHS[a] for a in archs])
    targets = ", ".join(archs)
    print(f"{len(launches)} launches recorded -> {len(jobs)} compile jobs ({targets}), {workers} workers", flush=True)

    def progress(done: int, total: int) -> None:
        if done % 50 == 0 or done == total:
            print(f"  compiled {done}/{total} ({time.perf_counter() - start:.0f} s)", flush=True)

    results = compile_all(jobs, workers, progress)
    by_key = {job.key: res for job, res in zip(jobs, results)}
    for row in rows:
        row.result = by_key.get(row.job.key) if row.pickable else None
    if table:
        print(format_table(rows))
    print()
    print(summary_by_rank(rows))
    failures = row_failures(rows) + launch_failures(rows) + coverage_failures(jobs)
    csrc_status, csrc_failures = wait_csrc()
    failures += csrc_failures
    print(csrc_status)
    slowest = max(results, key=lambda r: r.get("seconds", 0), default={})
    elapsed = time.perf_counter() - start
    print(f"{len(jobs)} kernels compiled in {elapsed:.0f} s (slowest {slowest.get('seconds', 0):.1f} s)")
    for failure in failures:
        print("FAIL:", failure)
    print("GPU readiness: " + ("FAILED" if failures else "ok"))
    return 1 if failures else 0


def _choices(flag: str, text: str, allowed: Sequence[str]) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise UsageError(f"{flag}: {', '.join(unknown) or 'nothing given'}; choose from {', '.join(allowed)}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(prog=PROG, description="GPU readiness without a GPU: compile every Triton kernel the "
                            "engine launches for sm_90 / sm_80 and check spills and tensor cores (see tools/aot).")
    parser.add_argument("--arch", default=",".join(ARCHS), help="targets, comma separated (default: %(default)s)")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)), help="LoRA ranks (default: %(default)s)")
    dtypes = "/".join(ACTIVATIONS)
    parser.add_argument("--activations", default="bf16,fp16,fp32", help=f"of {dtypes} (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPUs)")
    parser.add_argument("--no_csrc", action="store_true", help="skip the nvcc compile of csrc/")
    parser.add_argument("--no_table", action="store_true", help="print only the summary and the failures")
    args = parser.parse_args(argv)
    archs = _choices("--arch", args.arch, tuple(ARCHS))
    activations = tuple(_choices("--activations", args.activations, tuple(ACTIVATIONS)))
    try:
        ranks = tuple(int(r) for r in args.ranks.split(","))
    except ValueError:
        raise UsageError(f"--ranks: comma-separated ints, got {args.ranks!r}") from None
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # Kernels decorated for the interpreter cannot be compiled: run in a fresh process without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "tools.aot", *argv], env=env).returncode
    from triton.knobs import nvidia

    if not nvidia.ptxas.path or not nvidia.cuobjdump.path:
        print("GPU readiness: skipped (Triton found no ptxas / cuobjdump)")
        return 0
    quiet()
    return run(archs, ranks, activations, args.workers, not args.no_csrc, not args.no_table)


if __name__ == "__main__":
    sys.exit(run_main(main, prog=PROG))
