"""Type stub of the optional compiled extension ``perk_kernels._C`` (csrc/, built when PERK_BUILD_CUDA=1).

Call it through :func:`perk_kernels.meta_grad.meta_grad_accumulate`, which validates the arguments.
"""

import torch

def meta_grad_accumulate(
    v: list[torch.Tensor],
    g: list[torch.Tensor],
    g_plus: list[torch.Tensor],
    g_minus: list[torch.Tensor],
    coef: torch.Tensor,
    lr_grad: torch.Tensor,
) -> None:
    """In place, over all CUDA adapter tensors in one launch: ``lr_grad[a, i] -= <g_i[a], v_i[a]>``,
    then ``v_i[a] -= coef[a] * (g_plus_i[a] - g_minus_i[a])`` unless ``g_plus`` and ``g_minus`` are
    empty. Tensors contiguous, one dtype (fp16/bf16/fp32/fp64); ``coef`` fp32 [n_adapters],
    ``lr_grad`` fp32 contiguous [n_adapters, n_tensors]."""
