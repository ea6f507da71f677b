"""python -m benchmarks.run end to end at the CPU sizes (the product's `pytest benchmarks` entry point),
and what an interrupted run keeps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE_FIELDS = {
    "device", "dtype", "size", "tokens", "seconds", "tokens_per_s", "peak_memory_bytes", "peak_extra_bytes",
    "memory_method", "status", "suite", "model", "provider",
}  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}  # a pytest of its own
    env["PYTHONPATH"] = str(ROOT)
    env.pop("PERK_BENCH_DEADLINE", None)
    env.pop("PERK_BENCH_LENGTHS", None)
    return env


# One small case of every suite and provider, and the two lengths a plot needs: the report is what
# this test checks (the suites themselves are run by `pytest benchmarks --benchmark-only`).
SUBSET = (
    "smollm2-135m-prompt-256 or smollm2-135m-perk-r16-256 or qwen2.5-0.5b-naive-r256-256 or fused-32 "
    "or fwd-triton-up-4-1-64 or triton_inplace or fd-T2"
)


def test_run_writes_json_summary_and_plots_with_every_field(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--sizes", "small", "--out-dir", str(tmp_path), "--", "-k", SUBSET],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (json_path,) = tmp_path.glob("*.json")
    data = json.loads(json_path.read_text())
    assert data["command"].startswith("python -m benchmarks.run --sizes small")
    assert len(data["benchmarks"]) == 8, [b["name"] for b in data["benchmarks"]]
    suites = {}
    for bench in data["benchmarks"]:
        suites.setdefault(bench["fullname"].split("::")[0].removeprefix("benchmarks/test_"), []).append(bench)
    assert {"encode_vs_prompt.py", "meta_step.py", "kernels.py", "fused_linear_cross_entropy.py"} <= set(suites)
    for bench in suites["encode_vs_prompt.py"] + suites["meta_step.py"]:
        info = bench["extra_info"]
        assert ENGINE_FIELDS <= set(info), (bench["name"], ENGINE_FIELDS - set(info))
        assert info["status"] == "ok" and info["seconds"] > 0 and info["tokens_per_s"] > 0, bench["name"]
    providers = {b["extra_info"]["provider"] for b in suites["encode_vs_prompt.py"]}
    assert {"perk", "prompt", "naive"} <= providers
    stem = json_path.with_suffix("")
    assert "## Encode vs prompt" in stem.with_suffix(".md").read_text()
    for plot in ("-encode.png", "-meta-step.png"):
        assert Path(f"{stem}{plot}").read_bytes().startswith(b"\x89PNG")


def _sigint_default() -> None:
    """A shell that starts ``make test`` in the background ignores SIGINT in it, and Python then
    never raises KeyboardInterrupt: the interrupted runs get SIGINT's default back."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


INTERRUPTED_SUITE = """
import os
import signal


def test_finished(benchmark):
    benchmark.pedantic(lambda: None, rounds=1)


def test_interrupted(benchmark):
    benchmark.pedantic(lambda: os.kill(os.getpid(), signal.SIGINT), rounds=1)


def test_never_started(benchmark):
    benchmark.pedantic(lambda: None, rounds=1)
"""


def test_an_interrupted_run_saves_the_benchmarks_that_finished(tmp_path):
    """Ctrl-C (or `timeout -s INT` at the end of a device session) mid-benchmark: without the
    suites' conftest hook, pytest-benchmark fails on the cut-off benchmark and saves nothing."""
    (tmp_path / "test_interrupted_suite.py").write_text(textwrap.dedent(INTERRUPTED_SUITE))
    out = tmp_path / "out.json"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "benchmarks.conftest", str(tmp_path / "test_interrupted_suite.py"),
         "--benchmark-only", f"--benchmark-json={out}", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300, preexec_fn=_sigint_default,
    )  # fmt: skip
    # 2: interrupted (1 where pytest itself fails to format the interrupt's traceback)
    assert result.returncode in (1, 2), result.stdout[-3000:] + result.stderr[-3000:]
    assert [b["name"] for b in json.loads(out.read_text())["benchmarks"]] == ["test_finished"]


def test_run_py_reports_what_finished_when_interrupted(tmp_path):
    """SIGINT to run.py's process group once the first benchmarks are done: run.py waits for pytest
    to save them, then writes the summary."""
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.run", "--only", "kernels", "--sizes", "small", "--out-dir", str(tmp_path)],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=_sigint_default,
    )  # fmt: skip
    output = process.stdout.readline()  # "running: …"
    while "." not in (dots := process.stdout.read(1)):  # pytest -q: one dot per finished benchmark
        assert dots, output
        output += dots
    os.killpg(process.pid, signal.SIGINT)
    output += process.stdout.read()
    assert process.wait(timeout=300) in (1, 2), output[-3000:]  # pytest's code, as above
    (json_path,) = tmp_path.glob("*.json")
    finished = json.loads(json_path.read_text())["benchmarks"]
    assert finished, output[-3000:]
    assert json_path.with_suffix(".md").is_file()
