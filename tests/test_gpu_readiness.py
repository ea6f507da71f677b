"""GPU readiness without a GPU: every Triton kernel compiles for sm_90 / sm_80 without spills and
with tensor cores (``python -m tools.aot``), csrc/ compiles with nvcc, and the limits a GPU would hit
are checked up front."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools.aot.compile import Job, Row
from tools.aot.targets import ARCHS
from tools.aot.verdicts import format_table, launch_failures, summary_by_rank, verdict

ROOT = Path(__file__).resolve().parent.parent


def _tools_missing() -> str | None:
    try:
        from triton.knobs import nvidia

        if nvidia.ptxas.path and nvidia.cuobjdump.path:
            return None
    except Exception as e:  # noqa: BLE001 - any failure to find the tools is a reason to skip
        return f"Triton's CUDA tools are unavailable: {e}"
    return "Triton found no ptxas / cuobjdump"


def test_every_kernel_compiles_for_sm90_and_sm80_without_spills():
    """The whole sweep (cold Triton cache: a few minutes on 2 cores; warm: about a minute)."""
    reason = _tools_missing()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tools.aot"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    print(output)
    assert proc.returncode == 0, output[-6000:]
    assert "GPU readiness: ok" in output


def _row(act="bf16", arch="sm_90", has_dot=True, pickable=True, **result) -> Row:
    job = Job("perk_kernels.lora_linear", "_lora_gemm_expand_kernel", arch, (), {}, "128x128x64 w8 s4", has_dot)
    job.uses = {("lora_linear", "m", 256, act)}
    job.key = repr((arch, act, sorted(result.items())))
    base = {"regs": 200, "spill": 0, "shared": 100_000, "hgmma": 8, "hmma": 0}
    return Row(job, act, {256}, pickable, {**base, **result} if pickable else None)


def test_verdicts():
    assert verdict(_row()) == "ok"
    assert verdict(_row(spill=40)) == "FAIL spill"
    assert verdict(_row(act="fp16", spill=4)) == "FAIL spill"
    assert verdict(_row(act="fp32", spill=4000, hgmma=0)) == "ok"  # no tensor cores: reported only
    assert verdict(_row(act="fp32", has_dot=False, spill=8)) == "FAIL spill"  # elementwise kernels never spill
    assert verdict(_row(hgmma=0, hmma=8)) == "FAIL no HGMMA"
    assert verdict(_row(arch="sm_80", hgmma=0, hmma=8)) == "ok"
    assert verdict(_row(arch="sm_80", hgmma=0, hmma=0)) == "FAIL no HMMA"
    assert verdict(_row(shared=ARCHS["sm_90"].max_shared + 1, spill=500)) == "smem"  # the autotuner skips it
    assert verdict(_row(pickable=False)) == "pruned"
    assert verdict(_row(error="PTXASError: boom")) == "FAIL compile"


def test_a_launch_needs_one_config_within_shared_memory():
    too_big = ARCHS["sm_90"].max_shared + 1
    assert launch_failures([_row(shared=too_big), _row(shared=1000)]) == []
    assert len(launch_failures([_row(shared=too_big)])) == 1


def test_table_and_summary_format():
    rows = [_row(), _row(spill=40), _row(pickable=False)]
    table = format_table(rows)
    assert "FAIL spill" in table and "pruned" in table and "HGMMA 8" in table
    assert "256" in summary_by_rank(rows)


def test_cuda_build_requested_without_cuda_torch_fails_with_the_reason():
    if torch.version.cuda is not None:
        pytest.skip("torch has CUDA here")
    proc = subprocess.run(
        [sys.executable, "setup.py", "--version"],
        cwd=ROOT, env={**os.environ, "PERK_BUILD_CUDA": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "CPU-only build" in proc.stderr and "PERK_BUILD_CUDA=0" in proc.stderr


def test_flags_are_spelled_with_underscores_and_checked(capsys):
    from perk.cli import run_main
    from tools.aot.__main__ import PROG, main

    assert run_main(main, ["--no-csrc"], prog=PROG) == 2
    assert "did you mean --no_csrc?" in capsys.readouterr().err
    assert run_main(main, ["--arch", "sm_70"], prog=PROG) == 2
    assert "choose from sm_90, sm_80" in capsys.readouterr().err
