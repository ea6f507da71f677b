"""RMSNorm with a hand-written backward, for passes over segments on a CPU.

Hugging Face's Llama-family RMSNorm (``weight * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype)``)
leaves autograd five saved tensors and as many broadcast kernels in its backward (pow, mean, rsqrt,
two multiplies and their gradients), each a pass through a (tokens, d_model) tensor.
:func:`rms_norm` computes the same function (in fp32, or fp64 for fp64) and its input gradient in
two passes, ``dx = r·(g − x̂·mean(g·x̂))`` with ``x̂ = r·x``, ``g = w·dy`` and ``r`` the
reciprocal RMS: it keeps only x and r.

:func:`fused_rms_norm` switches a model's RMSNorm modules to it for the block, the way
:mod:`perk.attention` switches attention: only modules that compute Hugging Face's function (their
class's ``forward`` is one of :data:`HF_RMS_NORMS`), and only calls it covers (a frozen weight,
the base model's; a bf16, fp16 or fp32 input: Hugging Face normalises even fp64 in fp32, which
:func:`rms_norm` would not); any other call runs the module's own forward. It is once differentiable (the
exact meta-gradient's double backward runs Hugging Face's own modules, see
:class:`~perk.adapted_model.AdaptedModel`).
"""

from __future__ import annotations

import contextlib
import importlib

import torch
from torch import nn
from torch.autograd.function import once_differentiable

# (module, class) of Hugging Face RMSNorms that compute weight * normalize(x.float()).to(x.dtype).
HF_RMS_NORMS = (
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm"),
    ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm"),
)


def _hf_forwards() -> set:
    forwards = set()
    for module_name, class_name in HF_RMS_NORMS:
        with contextlib.suppress(ImportError, AttributeError):
            forwards.add(getattr(importlib.import_module(module_name), class_name).forward)
    return forwards


_FORWARDS = _hf_forwards()


class _RmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        x_c = x.to(compute)
        rstd = torch.rsqrt(x_c.pow(2).mean(-1, keepdim=True) + eps)  # (…, 1)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x_c * rstd).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        compute = rstd.dtype
        g = (grad_out * weight).to(compute)  # ∂L/∂x̂ in the forward's dtype, as autograd rounds it
        x_c = x.to(compute)
        # dx = r·g − x·r³·mean(g·x): one reduction, one fused multiply-add.
        coef = torch.linalg.vecdot(g, x_c).unsqueeze(-1).mul_(rstd.pow(3) / x.shape[-1])
        grad_x = torch.addcmul(g * rstd, x_c, coef, value=-1)
        return grad_x.to(x.dtype), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x·rsqrt(mean(x²) + eps))`` over the last dim, normalised in fp32 (fp64 for fp64)
    and cast back to x's dtype before the weight, as Hugging Face's RMSNorm; ``weight`` is frozen
    (no gradient); once differentiable in x."""
    return _RmsNorm.apply(x, weight.detach(), float(eps))


def _forward(module: nn.Module, original):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        if module.weight.requires_grad or hidden_states.dtype == torch.float64:
            return original(hidden_states)
        return rms_norm(hidden_states, module.weight, module.variance_epsilon)

    return forward


@contextlib.contextmanager
def fused_rms_norm(model: nn.Module):
    """Inside the block, every Hugging Face RMSNorm of ``model`` (see the module docstring) runs
    :func:`rms_norm`; the modules' own forwards come back after."""
    patched = [m for m in model.modules() if type(m).forward in _FORWARDS and hasattr(m, "variance_epsilon")]
    for module in patched:
        module.forward = _forward(module, module.forward)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
