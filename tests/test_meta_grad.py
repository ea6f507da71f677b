"""meta_grad_accumulate: the reference against the formula, the Triton and CUDA-extension paths
against the reference, on separate tensors and on views into one flat (n_adapters, P) buffer."""

import math

import pytest
import torch

from perk_kernels import meta_grad
from perk_kernels.meta_grad import (
    cuda_extension_available,
    meta_grad_accumulate,
    meta_grad_accumulate_reference,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
N_ADAPTERS = 3
# Odd per-adapter sizes; the last spans several kernel chunks (18 under the interpreter).
SHAPES = [(N_ADAPTERS, 5, 7), (N_ADAPTERS, 13), (N_ADAPTERS, 1, 2, 3), (N_ADAPTERS, 70, 65)]
# Every slice a whole number of 16-byte vectors: separate tensors take the kernel's aligned path.
ALIGNED_SHAPES = [(N_ADAPTERS, 8, 12), (N_ADAPTERS, 1100)]
GAP = 3


def flat_views(tensors):
    """Copies of ``tensors`` as views of one flat (n_adapters, P) buffer, like the engine's
    ``flat[:, start:end].unflatten(1, shape)``: each view starts at an odd offset after GAP NaN
    columns, so a kernel reading outside its view turns lr_grad NaN and one writing there shows
    in ``count_gap_nans``."""
    sizes = [math.prod(t.shape[1:]) for t in tensors]
    like = tensors[0]
    width = sum(sizes) + GAP * (len(sizes) + 1)
    flat = torch.full((like.shape[0], width), math.nan, dtype=like.dtype, device=like.device)
    views, start = [], GAP
    for t, size in zip(tensors, sizes):
        views.append(flat[:, start : start + size].unflatten(1, t.shape[1:]))
        views[-1].copy_(t)
        start += size + GAP
    return views


def count_gap_nans(views):
    flat = views[0]._base
    return int(flat.isnan().sum())


def make_problem(
    shapes=SHAPES, *, dtype=torch.float32, device=DEVICE, with_fd=True, views=False, lr_dtype=torch.float32
):
    def tensors():
        made = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
        return flat_views(made) if views else made

    v, g = tensors(), tensors()
    g_plus, g_minus = (tensors(), tensors()) if with_fd else (None, None)
    coef = (torch.rand(shapes[0][0], device=device) + 0.5).to(lr_dtype) if with_fd else None
    lr_grad = torch.randn(shapes[0][0], len(shapes), dtype=lr_dtype, device=device)  # accumulates onto it
    return [v, g, g_plus, g_minus, coef, lr_grad]


def clone_problem(problem):
    """A deep copy that keeps views of one flat buffer as views (of a copy of that buffer)."""

    def clone_list(tensors):
        flat = tensors[0]._base
        if flat is None or any(t._base is not flat for t in tensors):
            return [t.clone() for t in tensors]  # keeps each tensor's strides
        flat = flat.clone()
        return [flat.as_strided(t.shape, t.stride(), t.storage_offset()) for t in tensors]

    return [None if x is None else clone_list(x) if isinstance(x, list) else x.clone() for x in problem]


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


def assert_matches_reference(problem, expected, *, lr_tol, v_tol):
    torch.testing.assert_close(problem[5], expected[5], atol=lr_tol, rtol=lr_tol)
    for v_i, v_ref in zip(problem[0], expected[0]):
        torch.testing.assert_close(v_i, v_ref, atol=v_tol, rtol=v_tol)


@pytest.mark.parametrize("views, lr_dtype, lr_tol", [(False, torch.float32, 1e-5), (True, torch.float64, 1e-12)])
@pytest.mark.parametrize("with_fd", [True, False])
def test_reference_follows_the_formula(with_fd, views, lr_dtype, lr_tol):
    problem = make_problem(dtype=torch.float64, device="cpu", with_fd=with_fd, views=views, lr_dtype=lr_dtype)
    v_expected, lr_expected = formula(*problem)
    v_before = [t.clone() for t in problem[0]]
    gap_nans = count_gap_nans(problem[0]) if views else 0
    meta_grad_accumulate(*problem, backend="torch")
    v, lr_grad = problem[0], problem[5]
    assert lr_grad.dtype == lr_dtype
    torch.testing.assert_close(lr_grad.double(), lr_expected, atol=lr_tol, rtol=lr_tol)
    for v_i, expected, before in zip(v, v_expected, v_before):
        torch.testing.assert_close(v_i, expected, atol=1e-12, rtol=1e-12)
        assert with_fd or torch.equal(v_i, before)
    assert not views or count_gap_nans(v) == gap_nans == N_ADAPTERS * GAP * (len(SHAPES) + 1)


def test_reference_rounds_low_precision_v_once():
    # bf16 tensors: the difference and the update are taken in fp32, rounded to bf16 once.
    problem = make_problem(dtype=torch.bfloat16, device="cpu")
    v_expected, _ = formula(*problem)
    meta_grad_accumulate_reference(*problem)
    for v_i, expected in zip(problem[0], v_expected):
        assert torch.equal(v_i, expected.to(torch.bfloat16))


def test_zero_coef_leaves_v_and_still_accumulates_lr_grad():
    problem = make_problem(device="cpu")
    problem[4].zero_()
    v_before, lr_before = [t.clone() for t in problem[0]], problem[5].clone()
    meta_grad_accumulate(*problem)
    assert all(torch.equal(a, b) for a, b in zip(problem[0], v_before))
    assert not torch.equal(problem[5], lr_before)


@pytest.mark.parametrize(
    "shapes, views, dtype, lr_dtype, tol",
    [
        (SHAPES, False, torch.float32, torch.float32, 1e-5),
        (ALIGNED_SHAPES, False, torch.float32, torch.float32, 1e-5),
        (SHAPES, True, torch.float32, torch.float32, 1e-5),
        (SHAPES, True, torch.float64, torch.float64, 1e-12),  # the engine's gradient checks
    ],
)
@pytest.mark.parametrize("with_fd", [True, False])
def test_triton_path_matches_reference(with_fd, shapes, views, dtype, lr_dtype, tol):
    problem = make_problem(shapes, dtype=dtype, with_fd=with_fd, views=views, lr_dtype=lr_dtype)
    if not views:  # g with non-contiguous adapter slices: copied by the launcher
        problem[1] = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in problem[1]]
    expected = clone_problem(problem)
    meta_grad_accumulate_reference(*expected)
    meta_grad_accumulate(*problem, backend="triton")
    assert_matches_reference(problem, expected, lr_tol=tol, v_tol=tol)
    if views:
        assert count_gap_nans(problem[0]) == N_ADAPTERS * GAP * (len(shapes) + 1)


def test_vector_alignment_is_assumed_only_where_it_holds():
    aligned = make_problem(ALIGNED_SHAPES, device="cpu")[0]
    assert meta_grad._alignment(aligned, N_ADAPTERS) == 4
    assert meta_grad._alignment(make_problem(ALIGNED_SHAPES, device="cpu", views=True)[0], N_ADAPTERS) == 1
    assert meta_grad._alignment(make_problem(SHAPES, device="cpu")[0], N_ADAPTERS) == 1


def test_triton_path_is_bitwise_deterministic():
    problem = make_problem(views=True)
    runs = [clone_problem(problem) for _ in range(2)]
    for run in runs:
        meta_grad_accumulate(*run, backend="triton")
    assert not torch.equal(runs[0][5], problem[5])
    assert torch.equal(runs[0][5], runs[1][5])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))


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
        (_bad(4, torch.ones(3, dtype=torch.float64)), TypeError, "coef must be float32 or the tensors' dtype"),
        (_bad(4, torch.ones(2)), ValueError, "coef must be \\[n_adapters\\] = \\[3\\]"),
        (_bad(4, None), ValueError, "coef is needed with g_plus and g_minus"),
        (_bad(5, torch.zeros(3, 2, dtype=torch.float16)), TypeError, "lr_grad must be float32 or"),
        (_bad(5, torch.zeros(3, 3)), ValueError, "lr_grad must be \\[n_adapters, n_tensors\\]"),
        (_bad(5, torch.zeros(2, 3).t()), ValueError, "lr_grad must be contiguous"),
        (_bad(0, [torch.randn(4, 3).t(), torch.randn(3, 5)]), ValueError, "v\\[0\\] must have contiguous, non-ov"),
        (_bad(0, [torch.randn(1, 4).expand(3, 4), torch.randn(3, 5)]), ValueError, "v\\[0\\] must have contiguous"),
        (_bad(0, [torch.ones(3, 4, dtype=torch.int64), torch.ones(3, 5, dtype=torch.int64)]), TypeError, "floating"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, match):
    problem = make_problem([(3, 4), (3, 5)], device="cpu")
    problem[change[0]] = change[1]
    with pytest.raises(error, match=match):
        meta_grad_accumulate(*problem)


def test_unknown_or_unavailable_backend_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        meta_grad_accumulate(*make_problem(device="cpu"), backend="numpy")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        meta_grad_accumulate(*make_problem(device="cpu"), backend="cuda")


# Many tensors, one larger than the extension's 8192-element chunk.
GPU_SHAPES = SHAPES * 10 + [(N_ADAPTERS, 100, 90)]
GPU_BACKENDS = [
    "triton",
    pytest.param("cuda", marks=pytest.mark.skipif(not cuda_extension_available(), reason="needs perk_kernels._C")),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(
    "dtype, lr_dtype, v_tol",
    [
        (torch.float32, torch.float32, 1e-6),
        (torch.bfloat16, torch.float32, 1e-2),
        (torch.float64, torch.float64, 1e-12),
    ],
)
@pytest.mark.parametrize("with_fd", [True, False])
def test_gpu_backends_match_reference_on_views(backend, dtype, lr_dtype, v_tol, with_fd):
    problem = make_problem(GPU_SHAPES, dtype=dtype, with_fd=with_fd, views=True, lr_dtype=lr_dtype)
    expected = clone_problem(problem)
    meta_grad_accumulate_reference(*expected)
    meta_grad_accumulate(*problem, backend=backend)
    lr_tol = 1e-12 if lr_dtype == torch.float64 else 1e-4
    torch.testing.assert_close(problem[5], expected[5], atol=lr_tol, rtol=lr_tol)
    for v_i, v_ref in zip(problem[0], expected[0]):
        torch.testing.assert_close(v_i.float(), v_ref.float(), atol=v_tol, rtol=v_tol)
    assert count_gap_nans(problem[0]) == N_ADAPTERS * GAP * (len(GPU_SHAPES) + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backends_are_bitwise_deterministic(backend):
    # Large slices: many chunks per (adapter, tensor), where atomics would reorder the sum.
    problem = make_problem([(N_ADAPTERS, 256, 1000), (N_ADAPTERS, 999, 257)], views=True)
    runs = [clone_problem(problem) for _ in range(3)]
    for run in runs:
        meta_grad_accumulate(*run, backend=backend)
    assert all(torch.equal(runs[0][5], run[5]) for run in runs[1:])
