"""bf16 matmuls on a CPU: torch's kernel, :mod:`perk.bf16_emulation`'s fp32 GEMM with bf16 rounding, and fp32.

One product of a decoder segment pass (a 128-token segment through SmolLM2-135M's MLP up
projection, 576 → 1536), one intra-op thread. On a CPU without native bf16 dot products torch's
bf16 kernel is the slow one; the emulation is what the bf16 numerics studies run there.

    pytest benchmarks/test_bf16_emulation.py --benchmark-only --benchmark-json=OUT.json
"""

from __future__ import annotations

import pytest
import torch
from benchmarks.conftest import DEVICE_NAME

from perk.bf16_emulation import emulate_bf16_matmuls
from perk.models import cpu_has_native_bf16

ROWS, INNER, COLS = 128, 576, 1536
PROVIDERS = ("float32", "bfloat16", "bfloat16-emulated")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU question")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bf16_matmul(benchmark, provider):
    benchmark.group = "cpu bf16 matmul"
    dtype = torch.float32 if provider == "float32" else torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(ROWS, INNER, generator=generator).to(dtype)
    b = torch.randn(INNER, COLS, generator=generator).to(dtype)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with emulate_bf16_matmuls(provider == "bfloat16-emulated"):
            benchmark.pedantic(torch.mm, args=(a, b), rounds=5, iterations=2, warmup_rounds=1)
    finally:
        torch.set_num_threads(saved)
    benchmark.extra_info.update(
        suite="bf16_emulation", provider=provider, device=DEVICE_NAME, native_bf16=cpu_has_native_bf16(),
        shape=[ROWS, INNER, COLS], tflops=2 * ROWS * INNER * COLS / benchmark.stats.stats.min / 1e12,
    )
