"""perk.rms_norm: Hugging Face's RMSNorm with a hand-written backward, and where it applies."""

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from perk.rms_norm import fused_rms_norm, rms_norm


def _hf_math(x: torch.Tensor, weight: torch.Tensor, eps: float, compute: torch.dtype) -> torch.Tensor:
    """Hugging Face's RMSNorm formula with its fp32 island in ``compute``."""
    h = x.to(compute)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _inputs(dtype, shape=(3, 5, 24)):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=generator, dtype=torch.float64)).to(dtype)
    return x, weight, torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def test_matches_the_formula_to_fp64_rounding():
    x, weight, dy = _inputs(torch.float64)
    got = rms_norm(x, weight, 1e-5)
    (dx,) = torch.autograd.grad(got, x, dy)
    x2 = x.detach().requires_grad_()
    want = _hf_math(x2, weight, 1e-5, torch.float64)
    (want_dx,) = torch.autograd.grad(want, x2, dy)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(dx, want_dx, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: rms_norm(t, weight, 1e-5), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_hugging_face_module(dtype):
    x, weight, dy = _inputs(dtype)
    module = LlamaRMSNorm(x.shape[-1], eps=1e-6).to(dtype).requires_grad_(False)
    module.weight.copy_(weight)
    want = module(x)
    (want_dx,) = torch.autograd.grad(want, x, dy)
    with fused_rms_norm(module):
        got = module(x)
        assert got.grad_fn.name().endswith("_RmsNormBackward")
    (dx,) = torch.autograd.grad(got, x, dy)
    assert torch.equal(got, want)  # the same forward operations
    x64 = x.detach().double().requires_grad_()
    (exact,) = torch.autograd.grad(_hf_math(x64, weight.double(), 1e-6, torch.float64), x64, dy.double())
    # Both gradients round the exact one at x's precision (bf16: the last cast of each).
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(dx.double(), exact, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(dx.double(), want_dx.double(), rtol=tolerance, atol=tolerance)


def test_falls_back_where_it_does_not_apply():
    x, weight, _ = _inputs(torch.float32)
    trainable = LlamaRMSNorm(x.shape[-1])  # a weight with a gradient: the module's own forward
    other = nn.LayerNorm(x.shape[-1])
    model = nn.ModuleList([trainable, other])
    with fused_rms_norm(model):
        assert trainable(x).grad_fn.name() == "MulBackward0"
        assert "forward" not in vars(other)
        frozen = trainable.requires_grad_(False)
        assert frozen(x.double()).grad_fn.name() == "MulBackward0"  # fp64: HF's fp32 island, kept
    assert "forward" not in vars(trainable)  # restored after the block


def test_once_differentiable():
    x, weight, _ = _inputs(torch.float64)
    (dx,) = torch.autograd.grad(rms_norm(x, weight, 1e-5).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(dx.sum(), x)
