"""bf16 matrix products at fp32 speed on CPUs without native bf16 dot products.

Without AVX512-BF16 or AMX, torch multiplies bf16 matrices on a CPU through a generic kernel that
can be tens of times slower than its fp32 GEMM (``benchmarks/results/bf16-emulation.md``), which
puts any study of bf16 *numerics* on the embedded model (``benchmarks.meta_grad_fidelity``,
``perk.check_meta_grad``, the bf16 fidelity tests) out of reach there. A native bf16 GEMM — oneDNN's
with AVX512-BF16, a GPU's tensor cores — multiplies bf16 operands exactly, accumulates in fp32 and
rounds the result to bf16 once. :func:`emulate_bf16_matmuls` computes the same thing with fp32
kernels: it upcasts the bf16 operands (exact), runs the fp32 product (each product of two bf16
numbers is exact in fp32) and rounds the result to bf16. Only the order of the fp32 sums differs
from a native kernel, as it differs between any two GEMM implementations.

Every other op (norms, softmax, elementwise arithmetic) keeps running in bf16 as it would without
the context; only the matrix products listed in :data:`EMULATED_OPS` (and the in-place ones of
:data:`EMULATED_INPLACE_OPS`) are redirected, on CPU tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten

# The products that nn.Linear, torch.matmul and the attention functions reach on a CPU, forward and backward.
EMULATED_OPS = frozenset({
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten.mv.default,
    aten.addmv.default,
    aten.dot.default,
})
# In-place products (lora_linear's CPU path adds its adapter term with addmm_): the out-of-place op, copied back.
EMULATED_INPLACE_OPS = {aten.addmm_.default: aten.addmm.default}


def _is_cpu_bf16(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16 and value.device.type == "cpu"


class _Bf16MatmulsInFloat32(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in EMULATED_OPS or func in EMULATED_INPLACE_OPS) and any(_is_cpu_bf16(a) for a in args):
            upcast = tree_map(lambda a: a.float() if _is_cpu_bf16(a) else a, (args, kwargs))
            if func in EMULATED_INPLACE_OPS:
                return args[0].copy_(EMULATED_INPLACE_OPS[func](*upcast[0], **upcast[1]))
            return func(*upcast[0], **upcast[1]).to(torch.bfloat16)
        return func(*args, **kwargs)


@contextlib.contextmanager
def emulate_bf16_matmuls(enabled: bool = True) -> Iterator[None]:
    """Within the context, bf16 matrix products on CPU tensors run as fp32 GEMMs on the exactly
    upcast operands, rounded to bf16: a native bf16 GEMM's numerics (exact products, fp32
    accumulation, one rounding) at fp32 speed. ``enabled=False`` makes it a no-op, so callers can
    write ``with emulate_bf16_matmuls(not cpu_has_native_bf16()):``."""
    if not enabled:
        yield
        return
    with _Bf16MatmulsInFloat32():
        yield
