"""perk.bf16_emulation: bf16 matrix products as fp32 GEMMs with a native bf16 GEMM's rounding."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode

from perk.bf16_emulation import emulate_bf16_matmuls


def bf16(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()



PRODUCTS = {
    "linear": (lambda x, w, b: torch.nn.functional.linear(x, w, b), ((3, 24, 40), (16, 40), (16,))),
    "linear-2d": (lambda x, w, b: torch.nn.functional.linear(x, w, b), ((24, 40), (16, 40), (16,))),
    "matmul-batched": (lambda a, b: a @ b, ((2, 3, 24, 40), (2, 3, 40, 8))),
    "baddbmm": (lambda c, a, b: torch.baddbmm(c, a, b, alpha=0.5), ((4, 24, 8), (4, 24, 40), (4, 40, 8))),
    "mv": (lambda a, v: a @ v, ((24, 40), (40,))),
    "dot": (lambda a, b: a @ b, ((40,), (40,))),
    "addmm_-in-place": (lambda c, a, b: c.clone().addmm_(a, b), ((24, 8), (24, 40), (40, 8))),
}


@pytest.mark.parametrize("name", PRODUCTS)
def test_products_are_the_exact_product_rounded_once_to_bf16(name):
    op, shapes = PRODUCTS[name]
    operands = [bf16(*shape, seed=i) for i, shape in enumerate(shapes)]
    with emulate_bf16_matmuls():
        got = op(*operands)
    assert got.dtype == torch.bfloat16
    exact = op(*(o.double() for o in operands))
    # one rounding to bf16 (half an ulp: at most 2^-8 relative) of a sum of exact products accumulated in fp32
    fp32_accumulation = 2 ** -20 * op(*(o.double().abs() for o in operands))
    assert ((got.double() - exact).abs() <= 2 ** -8 * exact.abs() + fp32_accumulation).all()
    torch.testing.assert_close(got, op(*operands), rtol=2 ** -7, atol=1e-2)  # torch's own bf16 kernel


def test_float32_products_pass_through_unchanged():
    a, b = torch.randn(24, 40), torch.randn(40, 8)
    with emulate_bf16_matmuls():
        got = a @ b
    assert got.dtype == torch.float32 and torch.equal(got, a @ b)


def test_gradients_and_second_derivatives_flow_through_emulated_products():
    # the exact meta-gradient differentiates through the products twice
    x, w = bf16(6, 40, seed=1).requires_grad_(), bf16(16, 40, seed=2).requires_grad_()

    def grads():
        loss = torch.nn.functional.linear(x, w).float().pow(2).sum()
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        (gw,) = torch.autograd.grad(gx.float().pow(2).sum(), w)
        return gx, gw

    with emulate_bf16_matmuls():
        gx, gw = grads()
    want_gx, want_gw = grads()
    assert gx.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(gx, want_gx, rtol=2 ** -7, atol=1e-1)
    torch.testing.assert_close(gw, want_gw, rtol=2 ** -6, atol=1.0)


def test_disabled_context_installs_nothing():
    with emulate_bf16_matmuls(False):
        assert _get_current_dispatch_mode() is None
    with emulate_bf16_matmuls():
        assert _get_current_dispatch_mode() is not None
    assert _get_current_dispatch_mode() is None


class RecordProducts(TorchDispatchMode):
    """Below the emulation: records the dtype of the first operand of every mm and addmm it runs."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default):
            self.dtypes.append((func.__name__, args[1 if "addmm" in func.__name__ else 0].dtype))
        return func(*args, **(kwargs or {}))


def test_bf16_products_reach_the_float32_kernels():
    with RecordProducts() as record, emulate_bf16_matmuls():
        bf16(8, 40) @ bf16(40, 8, seed=1)
    assert record.dtypes == [("mm.default", torch.float32)]


def test_in_place_products_write_the_rounded_result_into_their_bf16_tensor():
    out = bf16(24, 8, seed=2)
    before = out.clone()
    with RecordProducts() as record, emulate_bf16_matmuls():
        returned = out.addmm_(bf16(24, 40), bf16(40, 8, seed=1))
    assert record.dtypes == [("addmm.default", torch.float32)]  # not torch's bf16 addmm_
    assert returned is out and out.dtype == torch.bfloat16
    want = torch.addmm(before.float(), bf16(24, 40).float(), bf16(40, 8, seed=1).float()).bfloat16()
    assert torch.equal(out, want)
