"""meta_grad_accumulate: the reference against the formula, the Triton and CUDA-extension paths
against the reference."""

import pytest
import torch

from perk_kernels import meta_grad
from perk_kernels.meta_grad import (
    cuda_extension_available,
    meta_grad_accumulate,
    meta_grad_accumulate_reference,
)

CUDA = torch.cuda.is_available()
N_ADAPTERS = 3
# Odd per-adapter sizes; the last spans two Triton blocks of 4096 elements.
SHAPES = [(N_ADAPTERS, 5, 7), (N_ADAPTERS, 13), (N_ADAPTERS, 1, 2, 3), (N_ADAPTERS, 70, 65)]


def make_problem(shapes=SHAPES, *, dtype=torch.float32, device="cpu", with_fd=True):
    v = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    g = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    g_plus = [torch.randn(s, dtype=dtype, device=device) for s in shapes] if with_fd else None
    g_minus = [torch.randn(s, dtype=dtype, device=device) for s in shapes] if with_fd else None
    coef = torch.rand(shapes[0][0], device=device) + 0.5
    lr_grad = torch.randn(shapes[0][0], len(shapes), device=device)  # accumulates onto what is there
    return [v, g, g_plus, g_minus, coef, lr_grad]


def clone_problem(problem):
    return [None if x is None else [t.clone() for t in x] if isinstance(x, list) else x.clone() for x in problem]


def formula(v, g, g_plus, g_minus, coef, lr_grad):
    """The semantics written out per (tensor, adapter), in float64."""
    lr_expected = lr_grad.double().clone()
    v_expected = []
    for i, (v_i, g_i) in enumerate(zip(v, g)):
        rows = []
        for a in range(v_i.shape[0]):
            lr_expected[a, i] -= (g_i[a].double() * v_i[a].double()).sum()
            step = 0 if g_plus is None else coef[a].double() * (g_plus[i][a].double() - g_minus[i][a].double())
            rows.append(v_i[a].double() - step)
        v_expected.append(torch.stack(rows))
    return v_expected, lr_expected


@pytest.mark.parametrize("with_fd", [True, False])
def test_reference_follows_the_formula(with_fd):
    problem = make_problem(dtype=torch.float64, with_fd=with_fd)
    v_expected, lr_expected = formula(*problem)
    v_before = [t.clone() for t in problem[0]]
    meta_grad_accumulate(*problem, backend="torch")
    v, lr_grad = problem[0], problem[5]
    torch.testing.assert_close(lr_grad.double(), lr_expected, atol=1e-5, rtol=1e-6)
    for v_i, expected, before in zip(v, v_expected, v_before):
        torch.testing.assert_close(v_i, expected, atol=1e-12, rtol=1e-12)
        assert with_fd or torch.equal(v_i, before)


def test_reference_rounds_low_precision_v_once():
    # bf16 tensors: the difference and the update are taken in fp32, rounded to bf16 once.
    problem = make_problem(dtype=torch.bfloat16)
    v_expected, _ = formula(*problem)
    meta_grad_accumulate_reference(*problem)
    for v_i, expected in zip(problem[0], v_expected):
        assert torch.equal(v_i, expected.to(torch.bfloat16))


def test_zero_coef_leaves_v_and_still_accumulates_lr_grad():
    problem = make_problem()
    problem[4].zero_()
    v_before, lr_before = [t.clone() for t in problem[0]], problem[5].clone()
    meta_grad_accumulate(*problem)
    assert all(torch.equal(a, b) for a, b in zip(problem[0], v_before))
    assert not torch.equal(problem[5], lr_before)


@pytest.mark.parametrize("with_fd", [True, False])
def test_triton_path_matches_reference(with_fd):
    device = "cuda" if CUDA else "cpu"
    problem = make_problem(device=device, with_fd=with_fd)
    expected = clone_problem(problem)
    meta_grad_accumulate_reference(*expected)
    g_non_contiguous = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in problem[1]]
    meta_grad_accumulate(problem[0], g_non_contiguous, *problem[2:], backend="triton")
    torch.testing.assert_close(problem[5], expected[5], atol=1e-4, rtol=1e-5)
    for v_i, v_ref in zip(problem[0], expected[0]):
        torch.testing.assert_close(v_i, v_ref, atol=1e-6, rtol=1e-6)


def test_default_backend_on_cpu_is_the_reference():
    assert meta_grad._choose_meta_grad_backend(None, torch.device("cpu")) == "torch"


def test_no_cuda_ext_env_turns_the_extension_off(monkeypatch):
    monkeypatch.setenv("PERK_NO_CUDA_EXT", "1")
    assert not cuda_extension_available()
    assert meta_grad._extension() is None


def _bad(index, value):
    return index, value


@pytest.mark.parametrize(
    "change, error, match",
    [
        (_bad(0, []), TypeError, "v must be a non-empty list"),
        (_bad(1, "g"), TypeError, "g must be a non-empty list"),
        (_bad(1, [torch.randn(3, 4)]), ValueError, "g must hold 2 tensors"),
        (_bad(1, [torch.randn(3, 4), torch.randn(3, 6)]), ValueError, "g\\[1\\] has shape"),
        (_bad(1, [torch.randn(3, 4), torch.randn(3, 5, dtype=torch.float64)]), TypeError, "g\\[1\\] has dtype"),
        (_bad(3, None), ValueError, "g_plus and g_minus must both be given"),
        (_bad(4, torch.ones(3, dtype=torch.float64)), TypeError, "coef must be float32"),
        (_bad(4, torch.ones(2)), ValueError, "n_adapters=2"),
        (_bad(5, torch.zeros(3, 3)), ValueError, "lr_grad must be \\[n_adapters, n_tensors\\]"),
        (_bad(5, torch.zeros(2, 3).t()), ValueError, "lr_grad must be contiguous"),
        (_bad(0, [torch.randn(4, 3).t(), torch.randn(3, 5)]), ValueError, "v\\[0\\] must be contiguous"),
        (_bad(0, [torch.ones(3, 4, dtype=torch.int64), torch.ones(3, 5, dtype=torch.int64)]), TypeError, "floating"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, match):
    problem = make_problem([(3, 4), (3, 5)])
    problem[change[0]] = change[1]
    with pytest.raises(error, match=match):
        meta_grad_accumulate(*problem)


def test_unknown_or_unavailable_backend_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        meta_grad_accumulate(*make_problem(), backend="numpy")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        meta_grad_accumulate(*make_problem(), backend="cuda")


@pytest.mark.skipif(not cuda_extension_available(), reason="needs CUDA and the perk_kernels._C extension")
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("with_fd", [True, False])
def test_cuda_extension_matches_reference(dtype, atol, with_fd):
    # Many tensors, one larger than the extension's 8192-element chunk.
    shapes = SHAPES * 10 + [(N_ADAPTERS, 100, 90)]
    problem = make_problem(shapes, dtype=dtype, device="cuda", with_fd=with_fd)
    expected = clone_problem(problem)
    meta_grad_accumulate_reference(*expected)
    meta_grad_accumulate(*problem, backend="cuda")
    torch.testing.assert_close(problem[5], expected[5], atol=1e-3, rtol=1e-4)
    for v_i, v_ref in zip(problem[0], expected[0]):
        torch.testing.assert_close(v_i.float(), v_ref.float(), atol=atol, rtol=atol)
