"""Type stub of the optional compiled extension ``perk_kernels._C`` (csrc/, built when PERK_BUILD_CUDA=1).

Call it through :func:`perk_kernels.meta_grad_accumulate.meta_grad_accumulate`, which validates the
arguments and builds the chunk table.
"""

import torch

def meta_grad_accumulate(
    v: torch.Tensor,
    g: torch.Tensor,
    g_plus: torch.Tensor | None,
    g_minus: torch.Tensor | None,
    coef: torch.Tensor | None,
    lr_grad: torch.Tensor,
    chunks: torch.Tensor,
    slots: int,
) -> None:
    """In place, on flat CUDA buffers in two launches: ``lr_grad[a, k] -= <g[a, group k], v[a, group k]>``,
    then ``v[a] -= coef[a] * (g_plus[a] - g_minus[a])`` unless ``g_plus`` and ``g_minus`` are None.
    ``v``, ``g``, ``g_plus``, ``g_minus``: contiguous (n_adapters, P), one dtype (fp16/bf16/fp32/fp64);
    ``coef`` contiguous (n_adapters,) (None allowed without g_plus, g_minus) and ``lr_grad`` contiguous
    (n_adapters, G), each fp32 or the buffers' dtype; ``chunks`` the (n_chunks, 4) int64 device table of
    ``[group, start, end, slot]`` rows from ``perk_kernels._utils.group_chunks`` with ``slots`` slots per
    group. Deterministic: per-chunk partial dot products summed in a fixed order, no atomics."""
