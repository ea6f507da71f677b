"""LoRA kernels: batched multi-adapter ``lora_linear`` and the flat-buffer ``lora_inner_step``.

``lora_linear`` (forward, and forward + backward w.r.t. x, A, B) at Qwen2.5-0.5B's MLP shapes
(up: 896 → 4864, down: 4864 → 896), r ∈ {16, 256}, n_adapters ∈ {1, 8}, rows ∈ {8192, 65536},
bf16 activations and fp32 adapters. Providers:

* ``triton``     the fused kernels;
* ``reference``  the plain-torch oracle (a Python loop over the adapters present);
* ``peft_loop``  one PEFT-style model per problem: a base linear + LoRA per adapter's row block;
* ``base``       the frozen linear alone (forward; forward + dx): the floor the targets compare to.

``lora_inner_step``: one step over all LoRA tensors of Qwen2.5-0.5B at r=256 (24 layers × 7
targets × A, B = 336 groups of one flat buffer, 140M fp32 parameters), in place and out of place;
``copy`` is a device copy of the same bytes, the bandwidth ceiling.

``extra_info``: device, size, TFLOP/s (useful flops), GB/s (minimal bytes moved), peak memory
allocated beyond the inputs (GPU), and ``oom`` (recorded as a value; the timing is then a no-op
and meaningless). Small sizes on CPU (Triton interpreter); ``PERK_BENCH_SIZE=small|full`` overrides.

    pytest benchmarks/test_kernels.py --benchmark-only --benchmark-json=out.json
"""

import pytest
import torch
import torch.nn.functional as F

# conftest sets TRITON_INTERPRET=1 without CUDA, before perk_kernels is first imported.
from benchmarks.conftest import CUDA, DEVICE, SIZE, synchronize, time_kernel

from perk_kernels import lora_inner_step, lora_linear, lora_linear_reference
from perk_kernels._utils import interpret_mode
from perk_kernels.lora_linear import adapter_rows
from tools.shapes import QWEN2_5_0_5B

SCALE = 2.0
if SIZE == "full":
    D_MODEL, D_FF, N_LAYERS = QWEN2_5_0_5B.d_model, QWEN2_5_0_5B.d_ff, QWEN2_5_0_5B.n_layers
    LAYERS = {"up": (D_MODEL, D_FF), "down": (D_FF, D_MODEL)}
    RANKS, N_ADAPTERS, ROWS, STEP_RANK = (16, 256), (1, 8), (8192, 65536), 256
    DTYPE, ROUNDS = torch.bfloat16, 10
else:
    D_MODEL, D_FF, N_LAYERS = 24, 40, 1
    LAYERS = {"up": (D_MODEL, D_FF)}
    RANKS, N_ADAPTERS, ROWS, STEP_RANK = (4,), (1, 2), (64,), 4
    DTYPE, ROUNDS = torch.float32, 2


def _measure(benchmark, run, flops: float, n_bytes: float) -> None:
    """Time ``run`` and record throughput; an OOM becomes ``extra_info['oom']``, not a failure."""
    if not time_kernel(benchmark, run, ROUNDS):
        return
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info.update(tflops=flops / seconds / 1e12, gbps=n_bytes / seconds / 1e9)


def _skip_without_kernels(provider: str) -> None:
    if provider == "triton" and not (CUDA or interpret_mode()):
        pytest.skip("the triton provider needs CUDA or TRITON_INTERPRET=1 set before perk_kernels is imported")


# ----------------------------------------------------------------------------------------------
# lora_linear
# ----------------------------------------------------------------------------------------------


def _peft_loop(x, weight, bias, lora_a, lora_b, scale, bounds):
    """One PEFT model per problem: each adapter's block of rows through its own base + LoRA."""
    outs = []
    for a, (start, end) in enumerate(bounds):
        xa = x[start:end]
        lora = F.linear(F.linear(xa, lora_a[a].to(x.dtype)), lora_b[a].to(x.dtype))
        outs.append(F.linear(xa, weight, bias) + scale * lora)
    return torch.cat(outs)


def _linear_provider(provider, bounds, by_adapter):
    return {
        "triton": lambda x, w, b, la, lb: lora_linear(x, w, b, la, lb, SCALE, by_adapter, backend="triton"),
        "reference": lambda x, w, b, la, lb: lora_linear_reference(x, w, b, la, lb, SCALE, by_adapter),
        "peft_loop": lambda x, w, b, la, lb: _peft_loop(x, w, b, la, lb, SCALE, bounds),
        "base": lambda x, w, b, la, lb: F.linear(x, w, b),
    }[provider]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n_adapters", N_ADAPTERS)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("provider", ["triton", "reference", "peft_loop", "base"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_lora_linear(benchmark, mode, provider, layer, rank, n_adapters, rows):
    _skip_without_kernels(provider)
    d_in, d_out = LAYERS[layer]
    benchmark.group = f"lora_linear {mode} {layer} {d_in}->{d_out} r={rank} adapters={n_adapters} rows={rows}"
    x = torch.randn(rows, d_in, device=DEVICE).to(DTYPE)
    weight = (torch.randn(d_out, d_in, device=DEVICE) / d_in**0.5).to(DTYPE)
    bias = torch.randn(d_out, device=DEVICE).to(DTYPE)
    lora_a = (torch.randn(n_adapters, rank, d_in, device=DEVICE) / d_in**0.5).requires_grad_()
    lora_b = (torch.randn(n_adapters, d_out, rank, device=DEVICE) / rank**0.5).requires_grad_()
    # The engine's layout: each problem's rows are one contiguous block.
    per = rows // n_adapters
    bounds = [(a * per, rows if a == n_adapters - 1 else (a + 1) * per) for a in range(n_adapters)]
    ids = torch.cat([torch.full((e - s,), a, dtype=torch.int64) for a, (s, e) in enumerate(bounds)]).to(DEVICE)
    by_adapter = adapter_rows(ids, n_adapters)  # built once per batch, outside the timed region
    fn = _linear_provider(provider, bounds, by_adapter)
    dy = torch.randn(rows, d_out, device=DEVICE).to(DTYPE)

    def run():
        xg = x.detach().requires_grad_(mode == "fwd_bwd")
        y = fn(xg, weight, bias, lora_a, lora_b)
        if mode == "fwd_bwd":
            y.backward(dy)
        synchronize()

    gemm = 2 * rows * d_in * d_out
    lora = 0 if provider == "base" else 2 * rows * rank * (d_in + d_out)
    # Backward: dx for all; dh, dA, dB (and the LoRA part of dx) for adapted providers.
    flops = gemm + lora if mode == "fwd" else 2 * gemm + 3 * lora
    es = x.element_size()
    adapters = 0 if provider == "base" else 4 * n_adapters * rank * (d_in + d_out)
    io = rows * (d_in + d_out) * es + d_in * d_out * es + adapters
    n_bytes = io if mode == "fwd" else 2 * io + rows * d_in * es
    benchmark.extra_info.update(layer=layer, rank=rank, n_adapters=n_adapters, rows=rows, mode=mode)
    _measure(benchmark, run, flops, n_bytes)


# ----------------------------------------------------------------------------------------------
# lora_inner_step
# ----------------------------------------------------------------------------------------------


def _adapter_buffer(rank: int, n_adapters: int = 1) -> tuple[torch.Tensor, list[int]]:
    """The flat (n_adapters, P) buffer of A and B of every attention and MLP projection of
    Qwen2.5-0.5B (GQA: k, v project to 128), and its group offsets (the engine's layout)."""
    d_kv = QWEN2_5_0_5B.d_kv if SIZE == "full" else 8
    projections = [(D_MODEL, D_MODEL), (D_MODEL, d_kv), (D_MODEL, d_kv), (D_MODEL, D_MODEL)]
    projections += [(D_MODEL, D_FF), (D_MODEL, D_FF), (D_FF, D_MODEL)]
    sizes = [s for d_in, d_out in projections for s in (rank * d_in, d_out * rank)] * N_LAYERS
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return torch.randn(n_adapters, offsets[-1], device=DEVICE) * 0.01, offsets


@pytest.mark.parametrize("provider", ["triton_inplace", "triton", "reference", "copy"])
def test_lora_inner_step(benchmark, provider):
    _skip_without_kernels(provider.split("_")[0])
    params, offsets = _adapter_buffer(STEP_RANK)
    grads = torch.randn_like(params)
    n_groups = len(offsets) - 1
    lr = torch.full((n_groups,), 1e-3, device=DEVICE)
    n_params = params.numel()
    benchmark.group = f"lora_inner_step {n_groups} groups {n_params / 1e6:.1f}M fp32 params"
    flat_out = torch.empty_like(params)

    def run():
        if provider == "copy":
            flat_out.copy_(params)
        elif provider == "triton_inplace":
            lora_inner_step(params, grads, lr, offsets, max_grad_norm=1.0, inplace=True, backend="triton")
        else:
            backend = "triton" if provider == "triton" else "torch"
            lora_inner_step(params, grads, lr, offsets, max_grad_norm=1.0, backend=backend)
        synchronize()

    # Step: read p and g (g twice when clipping: the norm pass), write p'. Copy: read + write.
    n_bytes = 4 * n_params * (2 if provider == "copy" else 4)
    benchmark.extra_info.update(n_groups=n_groups, n_params=n_params)
    _measure(benchmark, run, flops=(0 if provider == "copy" else 5 * n_params), n_bytes=n_bytes)
