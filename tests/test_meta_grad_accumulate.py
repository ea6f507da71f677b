"""meta_grad_accumulate on flat (n_adapters, P) buffers split into groups: the reference against the
formula, the Triton and CUDA-extension paths against the reference, and the backend choice."""

import importlib

import pytest
import torch

import perk_kernels._utils as utils
from perk_kernels._utils import choose_backend, flat_alignment
from perk_kernels.meta_grad_accumulate import (
    cuda_extension_available,
    meta_grad_accumulate,
    meta_grad_accumulate_reference,
)

# The module (``perk_kernels.meta_grad_accumulate`` as an attribute is the re-exported function).
meta_module = importlib.import_module("perk_kernels.meta_grad_accumulate")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
N_ADAPTERS = 3
# Odd group sizes; the 4550-element group spans many kernel chunks (36 under the interpreter).
SIZES = [35, 13, 6, 0, 4550, 1]
# Every border a whole number of 16-byte vectors: the kernels' aligned path.
ALIGNED_SIZES = [96, 1100]


def offsets_of(sizes):
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return offsets


def guarded(rows, cols, dtype, device):
    """A contiguous (rows, cols) block in the middle of a NaN-filled buffer: a kernel reading outside
    it turns lr_grad NaN, one writing outside shows in :func:`guard_nans`."""
    buffer = torch.full((rows + 2, cols), float("nan"), dtype=dtype, device=device)
    return buffer[1:-1]


def guard_nans(t):
    return int(t._base.isnan().sum())


def make_problem(sizes=SIZES, *, dtype=torch.float32, device=DEVICE, with_fd=True, lr_dtype=torch.float32):
    n_params = sum(sizes)

    def flat():
        t = guarded(N_ADAPTERS, n_params, dtype, device)
        return t.copy_(torch.randn(N_ADAPTERS, n_params, dtype=dtype, device=device))

    v, g = flat(), flat()
    g_plus, g_minus = (flat(), flat()) if with_fd else (None, None)
    coef = (torch.rand(N_ADAPTERS, device=device) + 0.5).to(lr_dtype) if with_fd else None
    lr_grad = torch.randn(N_ADAPTERS, len(sizes), dtype=lr_dtype, device=device)  # accumulates onto it
    return [v, g, g_plus, g_minus, coef, lr_grad, offsets_of(sizes)]


def clone_problem(problem):
    """A deep copy that keeps v's guard rows."""
    v = guarded(*problem[0].shape, problem[0].dtype, problem[0].device).copy_(problem[0])
    return [v] + [x.clone() if isinstance(x, torch.Tensor) else x for x in problem[1:]]


def formula(v, g, g_plus, g_minus, coef, lr_grad, offsets):
    """The semantics written out per (adapter, group), in float64."""
    lr_expected = lr_grad.double().clone()
    for a in range(v.shape[0]):
        for k, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
            lr_expected[a, k] -= (g[a, start:end].double() * v[a, start:end].double()).sum()
    step = 0 if g_plus is None else coef.double()[:, None] * (g_plus.double() - g_minus.double())
    return v.double() - step, lr_expected


@pytest.mark.parametrize("lr_dtype, lr_tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("with_fd", [True, False])
def test_reference_follows_the_formula(with_fd, lr_dtype, lr_tol):
    problem = make_problem(dtype=torch.float64, device="cpu", with_fd=with_fd, lr_dtype=lr_dtype)
    v_expected, lr_expected = formula(*problem)
    v_before = problem[0].clone()
    meta_grad_accumulate(*problem, backend="torch")
    v, lr_grad = problem[0], problem[5]
    assert lr_grad.dtype == lr_dtype
    torch.testing.assert_close(lr_grad.double(), lr_expected, atol=lr_tol, rtol=lr_tol)
    torch.testing.assert_close(v, v_expected, atol=1e-12, rtol=1e-12)
    assert with_fd or torch.equal(v, v_before)
    assert guard_nans(v) == 2 * sum(SIZES)


def test_reference_rounds_low_precision_v_once():
    # bf16 buffers: the difference and the update are taken in fp32, rounded to bf16 once.
    problem = make_problem(dtype=torch.bfloat16, device="cpu")
    v_expected, _ = formula(*problem)
    meta_grad_accumulate_reference(*problem)
    assert torch.equal(problem[0], v_expected.to(torch.bfloat16))


def test_zero_coef_leaves_v_and_still_accumulates_lr_grad():
    problem = make_problem(device="cpu")
    problem[4].zero_()
    v_before, lr_before = problem[0].clone(), problem[5].clone()
    meta_grad_accumulate(*problem)
    assert torch.equal(problem[0], v_before)
    assert not torch.equal(problem[5], lr_before)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "sizes, dtype, lr_dtype, tol",
    [
        (SIZES, torch.float32, torch.float32, 1e-5),
        (ALIGNED_SIZES, torch.float32, torch.float32, 1e-5),
        (SIZES, torch.float64, torch.float64, 1e-12),  # the engine's gradient checks
        (SIZES, torch.float64, torch.float32, 1e-5),  # lr_grad in fp32 under fp64 buffers
    ],
)
@pytest.mark.parametrize("with_fd", [True, False])
def test_triton_path_matches_reference(with_fd, sizes, dtype, lr_dtype, tol):
    problem = make_problem(sizes, dtype=dtype, with_fd=with_fd, lr_dtype=lr_dtype)
    problem[1] = problem[1].t().contiguous().t()  # a non-contiguous g: copied by the launcher
    expected = clone_problem(problem)
    meta_grad_accumulate_reference(*expected)
    meta_grad_accumulate(*problem, backend="triton")
    torch.testing.assert_close(problem[5], expected[5], atol=tol, rtol=tol)
    torch.testing.assert_close(problem[0], expected[0], atol=tol, rtol=tol)
    assert guard_nans(problem[0]) == 2 * sum(sizes)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("with_fd", [True, False])
def test_triton_path_in_low_precision_rounds_v_once_like_the_reference(with_fd, dtype):
    """The GPU path's low-precision buffers (tests/triton_bf16_interpreter.py makes the interpreter's
    bf16 a GPU's): v's update is taken in fp32 and rounded once, bit for bit the reference's (the
    interpreter, like torch, does not fuse the multiply-add); the lr gradient is summed in fp32."""
    problem = make_problem(dtype=dtype, with_fd=with_fd)
    expected = clone_problem(problem)
    meta_grad_accumulate_reference(*expected)
    meta_grad_accumulate(*problem, backend="triton")
    assert torch.equal(problem[0], expected[0])
    torch.testing.assert_close(problem[5], expected[5], atol=1e-4, rtol=1e-4)
    assert guard_nans(problem[0]) == 2 * sum(SIZES)


def test_vector_alignment_is_assumed_only_where_it_holds():
    aligned = make_problem(ALIGNED_SIZES, device="cpu")
    offsets = tuple(aligned[6])
    assert flat_alignment(aligned[:4], offsets, 128) == 4  # guard rows of 1296 floats keep rows aligned
    assert flat_alignment(aligned[:4], tuple(offsets_of(SIZES[:1] + [sum(ALIGNED_SIZES) - 35])), 128) == 1
    assert flat_alignment([aligned[0].view(-1)[1:]], (0, 1), 128) == 1


@pytest.mark.interpreter
def test_triton_path_is_bitwise_deterministic():
    problem = make_problem()
    runs = [clone_problem(problem) for _ in range(2)]
    for run in runs:
        meta_grad_accumulate(*run, backend="triton")
    assert not torch.equal(runs[0][5], problem[5])
    assert torch.equal(runs[0][5], runs[1][5])
    assert torch.equal(runs[0][0], runs[1][0])


@pytest.mark.interpreter
def test_triton_refuses_more_programs_than_a_grid_holds(monkeypatch):
    monkeypatch.setattr(meta_module, "_MAX_PROGRAMS", 10)
    with pytest.raises(ValueError, match="split the adapters over several calls"):
        meta_grad_accumulate(*make_problem(), backend="triton")


# --- backend choice: one rule for every op (argument > PERK_KERNELS_BACKEND > automatic) ---------


def test_default_backend_on_cpu_follows_choose_backend(monkeypatch):
    monkeypatch.delenv("PERK_KERNELS_BACKEND", raising=False)
    expected = choose_backend(None, torch.device("cpu"))
    assert choose_backend(None, torch.device("cpu"), extension=cuda_extension_available) == expected


def test_backend_rule_with_an_extension(monkeypatch):
    """On CUDA tensors the extension is the automatic choice, and only that: the env var and the argument win."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(utils, "triton_available", lambda: True)
    monkeypatch.delenv("PERK_KERNELS_BACKEND", raising=False)
    assert choose_backend(None, cuda, extension=lambda: True) == "cuda"
    assert choose_backend(None, cuda, extension=lambda: False) == "triton"
    assert choose_backend(None, cuda) == "triton"  # an op without an extension
    monkeypatch.setenv("PERK_KERNELS_BACKEND", "torch")
    assert choose_backend(None, cuda, extension=lambda: True) == "torch"
    assert choose_backend("triton", cuda, extension=lambda: True) == "triton"
    monkeypatch.setenv("PERK_KERNELS_BACKEND", "cuda")
    assert choose_backend(None, cuda, extension=lambda: True) == "cuda"
    with pytest.raises(RuntimeError, match="needs the perk_kernels._C extension"):
        choose_backend(None, cuda, extension=lambda: False)
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend(None, cuda)  # "cuda" for an op without an extension


@pytest.mark.parametrize("how", ["argument", "env"])
def test_meta_grad_accumulate_follows_the_env_var_and_argument(monkeypatch, how):
    calls = []
    monkeypatch.setattr(meta_module, "meta_grad_accumulate_reference", lambda *a: calls.append("torch"))
    monkeypatch.setattr(meta_module, "meta_grad_accumulate_triton", lambda *a: calls.append("triton"))
    monkeypatch.setattr(utils, "interpret_mode", lambda: True)
    for backend in ("torch", "triton"):
        if how == "env":
            monkeypatch.setenv("PERK_KERNELS_BACKEND", backend)
            meta_grad_accumulate(*make_problem(device="cpu"))
        else:
            monkeypatch.setenv("PERK_KERNELS_BACKEND", "torch" if backend == "triton" else "triton")
            meta_grad_accumulate(*make_problem(device="cpu"), backend=backend)
    assert calls == ["torch", "triton"]


def test_no_cuda_ext_env_turns_the_extension_off(monkeypatch):
    monkeypatch.setenv("PERK_NO_CUDA_EXT", "1")
    assert not cuda_extension_available()
    assert meta_module._extension() is None


def _bad(index, value):
    return index, value


P = 9


@pytest.mark.parametrize(
    "change, error, match",
    [
        (_bad(0, [torch.randn(3, P)]), TypeError, "v must be a torch.Tensor"),
        (_bad(0, torch.randn(3 * P)), ValueError, "v must have 2 dimensions"),
        (_bad(0, torch.ones(3, P, dtype=torch.int64)), TypeError, "v must be floating point"),
        (_bad(0, torch.randn(P, 3).t()), ValueError, "v must be contiguous"),
        (_bad(1, "g"), TypeError, "g must be a torch.Tensor"),
        (_bad(1, torch.randn(3, P + 1)), ValueError, "g must have the shape of v"),
        (_bad(1, torch.randn(3, P, dtype=torch.float64)), TypeError, "g must have the dtype of v"),
        (_bad(2, torch.randn(2, P)), ValueError, "g_plus must have the shape of v"),
        (_bad(3, None), ValueError, "g_plus and g_minus must both be given"),
        (_bad(4, torch.ones(3, dtype=torch.float64)), TypeError, "coef must be float32 or the buffers' dtype"),
        (_bad(4, torch.ones(2)), ValueError, "coef must be \\[n_adapters\\] = \\[3\\]"),
        (_bad(4, None), ValueError, "coef is needed with g_plus and g_minus"),
        (_bad(5, torch.zeros(3, 2, dtype=torch.float16)), TypeError, "lr_grad must be float32 or"),
        (_bad(5, torch.zeros(3, 3)), ValueError, "lr_grad must be \\[n_adapters, G\\] = \\[3, 2\\]"),
        (_bad(5, torch.zeros(2, 3).t()), ValueError, "lr_grad must be contiguous"),
        (_bad(6, [0, 4]), ValueError, "end at P=9"),
        (_bad(6, [0, 5, 4, 9]), ValueError, "non-decreasing"),
        (_bad(6, torch.tensor([0, 4, 9])), TypeError, "sequence of Python ints"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, match):
    problem = make_problem([4, 5], device="cpu")
    problem[change[0]] = change[1]
    with pytest.raises(error, match=match):
        meta_grad_accumulate(*problem)


def test_unknown_or_unavailable_backend_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        meta_grad_accumulate(*make_problem(device="cpu"), backend="numpy")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        meta_grad_accumulate(*make_problem(device="cpu"), backend="cuda")


# Many groups, one larger than a kernel chunk (16384 elements).
GPU_SIZES = SIZES * 10 + [100 * 190]
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
def test_gpu_backends_match_reference(backend, dtype, lr_dtype, v_tol, with_fd):
    problem = make_problem(GPU_SIZES, dtype=dtype, with_fd=with_fd, lr_dtype=lr_dtype)
    expected = clone_problem(problem)
    meta_grad_accumulate_reference(*expected)
    meta_grad_accumulate(*problem, backend=backend)
    lr_tol = 1e-12 if lr_dtype == torch.float64 else 1e-4
    torch.testing.assert_close(problem[5], expected[5], atol=lr_tol, rtol=lr_tol)
    torch.testing.assert_close(problem[0].float(), expected[0].float(), atol=v_tol, rtol=v_tol)
    assert guard_nans(problem[0]) == 2 * sum(GPU_SIZES)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backends_are_bitwise_deterministic(backend):
    # Large groups: many chunks per (adapter, group), where atomics would reorder the sum.
    problem = make_problem([256 * 1000, 999 * 257])
    runs = [clone_problem(problem) for _ in range(3)]
    for run in runs:
        meta_grad_accumulate(*run, backend=backend)
    assert all(torch.equal(runs[0][5], run[5]) for run in runs[1:])
