"""tests/triton_bf16_interpreter.py against torch's own bf16 ops: dots on random shapes, casts of
every kind of fp32 value, bit-exact loads and stores; and its checks fail without it."""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.errors import InterpreterError

from tests import triton_bf16_interpreter as shim

pytestmark = pytest.mark.interpreter


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, c16_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """c = a @ b with fp32 accumulation over K tiles; c16 = the same rounded to c16's dtype."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
            other=0.0,
        )
        b = tl.load(
            b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=(offs_k[:, None] < K) & (offs_n[None, :] < N),
            other=0.0,
        )
        acc = tl.dot(a, b, acc)
    offs = offs_m[:, None] * N + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptr + offs, acc, mask=mask)
    tl.store(c16_ptr + offs, acc.to(c16_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _masked_copy_kernel(x_ptr, y_ptr, n, OTHER: tl.constexpr, BLOCK: tl.constexpr):
    """y[i] = x[i] for even i < n, OTHER (a Python float) for odd i < n."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=(offs < n) & (offs % 2 == 0), other=OTHER)
    tl.store(y_ptr + offs, x, mask=offs < n)


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=dtype)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    return y


def every_bf16() -> torch.Tensor:
    """All 65,536 bf16 bit patterns: zeros, subnormals, normals, infinities, NaNs with payloads."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def fp32_cases() -> torch.Tensor:
    """fp32 values that exercise every rounding case of fp32 → bf16: random bit patterns (every
    exponent, NaNs, subnormals), exact ties with an even and an odd kept bit, one below and above
    a tie, carries into the next binade and into infinity, and the specials."""
    gen = torch.Generator().manual_seed(11)
    random_bits = torch.randint(-(2**31), 2**31 - 1, (1 << 14,), generator=gen, dtype=torch.int64)
    kept = torch.randint(0, 1 << 16, (512,), generator=gen, dtype=torch.int64) << 16
    near_ties = torch.cat([kept | 0x8000, kept | 0x7FFF, kept | 0x8001, kept | 0xFFFF, kept | 0x0001])
    edges = torch.tensor([0x3F7FFFFF, 0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x007FFFFF, 0x00008000, 0x00018000])
    bits = torch.cat([random_bits, near_ties, edges, edges | (1 << 31)])
    values = bits.to(torch.int32).view(torch.float32)
    specials = torch.tensor([0.0, -0.0, 1.0041, -1.0041, float("inf"), -float("inf"), float("nan"), 3.4e38, 1e-40])
    return torch.cat([values, specials])


def check_dot(m, n, k, transposed_b):
    """The kernel's fp32 dot of bf16 tiles equals torch's fp32 product of the same values; its
    bf16 rounding is the exact product rounded to nearest, within an ulp of torch's bf16 matmul."""
    gen = torch.Generator().manual_seed(m * 10_000 + n * 100 + k)
    a = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, k, generator=gen).t() if transposed_b else torch.randn(k, n, generator=gen)
    b = b.to(torch.bfloat16)  # keeps the transposed strides
    c, c16 = torch.empty(m, n), torch.empty(m, n, dtype=torch.bfloat16)
    grid = (triton.cdiv(m, 32), triton.cdiv(n, 32))
    _matmul_kernel[grid](a, b, c, c16, m, n, k, *a.stride(), *b.stride(), BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)
    exact = a.double() @ b.double()
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-5, atol=1e-5 * k**0.5)
    shim.assert_rounded_to_nearest(c16, exact, "bf16 dot rounded")
    torch.testing.assert_close(c16, torch.matmul(a, b), rtol=2**-7, atol=1e-30)  # torch's own bf16 matmul


def check_casts():
    """fp32 → bf16 as torch rounds (bit for bit, NaN for NaN); every bf16 → fp32 and fp16 as torch
    widens and rounds; fp16 → bf16 as torch does."""
    values = fp32_cases()
    for got, want, what in [
        (cast(values, torch.bfloat16), values.to(torch.bfloat16), "fp32 -> bf16"),
        (cast(every_bf16(), torch.float32), every_bf16().float(), "bf16 -> fp32"),
        (cast(every_bf16(), torch.float16), every_bf16().to(torch.float16), "bf16 -> fp16"),
        (cast(values.half(), torch.bfloat16), values.half().to(torch.bfloat16), "fp16 -> bf16"),
    ]:
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan), what
        int_view = {2: torch.int16, 4: torch.int32}[got.element_size()]
        mismatched = (got.view(int_view) != want.view(int_view)) & ~nan
        assert not bool(mismatched.any()), f"{what}: {int(mismatched.sum())} values differ"


# (m, n, k): random sizes from 1 to 80 against 32-wide tiles (tails in every dimension), and two
# whole tiles.
DOT_SHAPES = [tuple(torch.randint(1, 81, (3,), generator=torch.Generator().manual_seed(i)).tolist()) for i in range(5)]
DOT_SHAPES += [(32, 32, 32), (64, 16, 96)]


def test_the_shim_is_installed_where_the_interpreter_needs_it():
    assert shim.broken_behaviours() == set()
    assert shim.STATUS.startswith("patched bf16" if shim.installed() else "off:")


@pytest.mark.parametrize("transposed_b", [False, True])
@pytest.mark.parametrize("m,n,k", DOT_SHAPES)
def test_bf16_dot_is_fp32_accumulation_of_the_decoded_values(m, n, k, transposed_b):
    check_dot(m, n, k, transposed_b)


def test_fp16_dot_needs_no_shim():
    a, b = torch.randn(20, 40).half(), torch.randn(40, 24).half()
    c, c16 = torch.empty(20, 24), torch.empty(20, 24, dtype=torch.float16)
    _matmul_kernel[(1, 1)](a, b, c, c16, 20, 24, 40, *a.stride(), *b.stride(), BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-5, atol=1e-5)
    shim.assert_rounded_to_nearest(c16, a.double() @ b.double(), "fp16 dot rounded")


def test_casts_round_like_torch():
    check_casts()


def test_loads_and_stores_are_bit_exact_and_other_constants_are_rounded():
    x = every_bf16()
    for other, other_bf16 in [(1.0041, 1.0078125), (float("-inf"), float("-inf")), (0.0, 0.0)]:
        y = torch.full_like(x, 7.0)
        _masked_copy_kernel[(triton.cdiv(x.numel() - 3, 1024),)](x, y, x.numel() - 3, OTHER=other, BLOCK=1024)
        assert torch.equal(y[:-3:2].view(torch.int16), x[:-3:2].view(torch.int16))  # NaN payloads too
        assert bool((y[1:-3:2] == other_bf16).all()), other
        assert bool((y[-3:] == 7.0).all())  # masked stores write nothing


@triton.jit
def _bf16_arithmetic_kernel(x_ptr, y_ptr, OP: tl.constexpr, N: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, N))
    if OP == "mul":
        tl.store(y_ptr + tl.arange(0, N), x * x)
    elif OP == "neg":
        tl.store(y_ptr + tl.arange(0, N), -x)
    else:  # tl.max and tl.min upcast bf16 themselves; tl.sum does not
        tl.store(y_ptr, tl.sum(x, axis=0))


@pytest.mark.parametrize("op", ["mul", "neg", "sum"])
def test_other_bf16_arithmetic_is_refused_not_computed_on_bit_patterns(op):
    if "arithmetic" not in shim.installed():
        pytest.skip(shim.STATUS)
    x = torch.randn(16).to(torch.bfloat16)
    with pytest.raises(InterpreterError) as raised:
        _bf16_arithmetic_kernel[(1,)](x, torch.empty_like(x), OP=op, N=16)
    assert shim.refused(raised.value)
    assert "convert with .to(tl.float32) first" in str(raised.value)


def test_rounding_check_accepts_round_to_nearest_and_rejects_truncation():
    exact = torch.randn(4096, dtype=torch.float64) * torch.logspace(-30, 30, 4096, dtype=torch.float64)
    for dtype in (torch.bfloat16, torch.float16):
        within = exact.clamp(-6e4, 6e4) if dtype == torch.float16 else exact
        shim.assert_rounded_to_nearest(within.to(dtype), within, str(dtype))
    truncated = torch.from_numpy((exact.float().numpy().view(np.uint32) >> 16).astype(np.uint16).view(np.int16))
    with pytest.raises(AssertionError, match="not torch.float64 rounded to nearest torch.bfloat16"):
        shim.assert_rounded_to_nearest(truncated.view(torch.bfloat16), exact, "truncated")


# --- a wrong shim fails these checks --------------------------------------------------------------


@pytest.fixture
def interpreter_as_installed():
    """The interpreter without this module's patches for the test; restored afterwards."""
    patched = shim.installed()
    if not patched:
        pytest.skip(shim.STATUS)
    shim.uninstall()
    yield
    shim._set_patches(patched)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's own cast
@pytest.mark.usefixtures("interpreter_as_installed")
def test_without_the_shim_the_checks_fail():
    assert shim.broken_behaviours()
    with pytest.raises(AssertionError):
        check_dot(33, 20, 45, False)
    with pytest.raises(AssertionError):
        check_casts()


def test_a_truncating_shim_fails_the_cast_check(monkeypatch):
    if "cast" not in shim.installed():
        pytest.skip(shim.STATUS)
    def truncate(values):
        return (np.asarray(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)

    monkeypatch.setattr(shim, "fp32_to_bf16_bits", truncate)
    with pytest.raises(AssertionError, match="fp32 -> bf16"):
        check_casts()
    with pytest.raises(AssertionError, match="bf16 dot rounded"):
        check_dot(33, 20, 45, False)
