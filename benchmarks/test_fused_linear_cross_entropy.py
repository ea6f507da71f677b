"""Fused linear cross-entropy vs the unfused reference: forward + backward w.r.t. hidden.

Sizes: the issue's (rows in {8192, 65536}, d = 896, Qwen2.5's vocabulary of 151,936, bf16) on a GPU,
tiny ones on CPU (Triton interpreter); ``PERK_BENCH_SIZE=small|full`` overrides. ``extra_info``
holds the peak memory allocated beyond the inputs during one forward + backward (GPU only), the
achieved TFLOP/s of the 4·rows·vocab·d useful GEMM flops, and ``oom`` when a provider ran out of
memory (recorded as a value; its timing is then a no-op and meaningless).

    pytest benchmarks/test_fused_linear_cross_entropy.py --benchmark-only --benchmark-json=out.json
"""

import pytest
import torch

# conftest sets TRITON_INTERPRET=1 without CUDA, before perk_kernels is first imported.
from benchmarks.conftest import CUDA, DEVICE, SIZE, synchronize, time_kernel

from perk_kernels._utils import interpret_mode
from perk_kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from tools.shapes import QWEN2_5_0_5B

if SIZE == "full":
    ROWS, DTYPE, CHUNK, ROUNDS = (8192, 65536), torch.bfloat16, None, 10
    D, VOCAB = QWEN2_5_0_5B.d_model, QWEN2_5_0_5B.vocab
else:
    ROWS, D, VOCAB, DTYPE, CHUNK, ROUNDS = (32, 100), 48, 4099, torch.float32, 32, 3
PROVIDERS = {
    "reference": lambda h, w, y: fused_linear_cross_entropy_reference(h, w, y),
    "fused": lambda h, w, y: fused_linear_cross_entropy(h, w, y, chunk_size=CHUNK, backend="triton"),
}


def _forward_backward(provider, hidden, weight, labels, upstream):
    h = hidden.detach().requires_grad_(True)
    PROVIDERS[provider](h, weight, labels).backward(upstream)
    synchronize()
    return h.grad


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_fused_linear_cross_entropy(benchmark, provider, rows):
    if provider == "fused" and not (CUDA or interpret_mode()):
        pytest.skip("the fused provider needs CUDA or TRITON_INTERPRET=1 set before perk_kernels is imported")
    benchmark.group = f"fused_linear_cross_entropy rows={rows} d={D} vocab={VOCAB} {str(DTYPE).split('.')[-1]}"
    hidden = torch.randn(rows, D, dtype=DTYPE, device=DEVICE)
    weight = (torch.randn(VOCAB, D, device=DEVICE) / D**0.5).to(DTYPE)
    labels = torch.randint(0, VOCAB, (rows,), device=DEVICE)
    labels[::7] = -100
    upstream = torch.rand(rows, device=DEVICE)  # per-token weights, as the engine passes them

    def run():
        return _forward_backward(provider, hidden, weight, labels, upstream)

    if time_kernel(benchmark, run, ROUNDS):
        benchmark.extra_info["tflops"] = 4 * rows * VOCAB * D / benchmark.stats.stats.mean / 1e12
