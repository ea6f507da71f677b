"""Type stub of the optional compiled extension ``perk_kernels._C`` (csrc/, built when PERK_BUILD_CUDA=1).

Call it through :func:`perk_kernels.meta_grad.meta_grad_accumulate`, which validates the arguments.
"""

import torch

def meta_grad_accumulate(
    v: list[torch.Tensor],
    g: list[torch.Tensor],
    g_plus: list[torch.Tensor],
    g_minus: list[torch.Tensor],
    coef: torch.Tensor | None,
    lr_grad: torch.Tensor,
) -> None:
    """In place, over all CUDA adapter tensors in two launches: ``lr_grad[a, i] -= <g_i[a], v_i[a]>``,
    then ``v_i[a] -= coef[a] * (g_plus_i[a] - g_minus_i[a])`` unless ``g_plus`` and ``g_minus`` are
    empty. Every tensor [n_adapters, ...] with contiguous adapter slices ``t[a]`` (any adapter stride,
    e.g. views of one flat (n_adapters, P) buffer; ``v``'s slices disjoint), one dtype
    (fp16/bf16/fp32/fp64); ``coef`` contiguous [n_adapters] (None allowed without g_plus, g_minus)
    and ``lr_grad`` contiguous [n_adapters, n_tensors], each fp32 or the tensors' dtype. Deterministic: per-chunk partial dot
    products summed in a fixed order, no atomics."""
