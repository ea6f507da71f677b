"""lora_linear: Triton kernels (through the interpreter on CPU) against the plain-torch reference."""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perk_kernels import lora_linear, lora_linear_reference
from perk_kernels.lora_linear import (
    AdapterRows,
    _LoraLinearBf16CpuFunction,
    _LoraLinearFunction,
    lora_adapter_outer,
    adapter_rows,
)
from tools.shapes import QWEN2_5_0_5B

# The module itself: `perk_kernels.lora_linear` is also the name of the function it exports.
lora_linear_module = importlib.import_module("perk_kernels.lora_linear")

# Max error relative to the largest reference magnitude, by activation dtype.
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """Elementwise |a - e| <= rel · (|e| + max|e|); failures list the mismatch count and first indices."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.to(expected.dtype), expected, rtol=rel, atol=rel * max(scale, 1e-30), msg=lambda m: f"{what}: {m}"
    )


def make_problem(rows, d_in, d_out, r, n_adapters, *, dtype=torch.float32, bias=True, device="cpu", lead=None):
    """Random layer with adapters of realistic magnitude (the LoRA term is not negligible)."""
    gen = torch.Generator().manual_seed(rows * 1000 + d_in * 10 + r)
    shape = (rows, d_in) if lead is None else (*lead, d_in)

    def rand(*s, dt=dtype, std=1.0):
        return (torch.randn(*s, generator=gen, dtype=torch.float64) * std).to(dt).to(device)

    return dict(
        x=rand(*shape).requires_grad_(),
        weight=rand(d_out, d_in, std=d_in**-0.5),
        bias=rand(d_out) if bias else None,
        lora_a=rand(n_adapters, r, d_in, dt=torch.float32, std=d_in**-0.5).requires_grad_(),
        lora_b=rand(n_adapters, d_out, r, dt=torch.float32, std=r**-0.5).requires_grad_(),
        scale=0.75,
    )


def check_against_reference(problem, row_adapters, rel, *, backend="triton"):
    """Forward and dx, dA, dB of the kernels equal the reference's."""
    y = lora_linear(**problem, row_adapters=row_adapters, backend=backend)
    y_ref = lora_linear_reference(**problem, row_adapters=row_adapters)
    assert y.shape == y_ref.shape and y.dtype == problem["x"].dtype
    assert_rel_close(y, y_ref, rel, "y")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y)
    inputs = [problem["x"], problem["lora_a"], problem["lora_b"]]
    grads = torch.autograd.grad(y, inputs, dy)
    grads_ref = torch.autograd.grad(y_ref, inputs, dy)
    for name, g, g_ref, t in zip(("dx", "dA", "dB"), grads, grads_ref, inputs):
        assert g.dtype == t.dtype, name
        assert_rel_close(g, g_ref, rel, name)


def check_low_precision_against_fp32_reference(problem, row_adapters):
    """bf16/fp16 kernels against the reference run in fp32 on the same (rounded) inputs: only the
    kernels' own rounding counts (adapters cast to x's dtype for the dots, h and y rounded)."""
    dtype = problem["x"].dtype
    wide = {
        k: (v.detach().float().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v) for k, v in problem.items()
    }
    y = lora_linear(**problem, row_adapters=row_adapters, backend="triton")
    y_ref = lora_linear_reference(**wide, row_adapters=row_adapters)
    assert y.dtype == dtype
    assert_rel_close(y, y_ref, REL_TOL[dtype], "y")
    # Rounded once, the same upstream for both.
    dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1)).to(y_ref.device, dtype)
    inputs = [problem["x"], problem["lora_a"], problem["lora_b"]]
    grads = torch.autograd.grad(y, inputs, dy)
    grads_ref = torch.autograd.grad(y_ref, [wide["x"], wide["lora_a"], wide["lora_b"]], dy.float())
    for name, g, g_ref, t in zip(("dx", "dA", "dB"), grads, grads_ref, inputs):
        assert g.dtype == t.dtype, name
        assert_rel_close(g, g_ref, REL_TOL[dtype], name)


def ids_unsorted_with_empty_adapter(rows, n_adapters):
    """Random order; the last adapter gets no rows."""
    gen = torch.Generator().manual_seed(rows)
    return torch.randint(0, max(n_adapters - 1, 1), (rows,), generator=gen)


# (rows, d_in, d_out, r, n_adapters): tails in every dimension against 32-wide interpreter tiles.
SHAPES = [
    (1, 7, 5, 1, 1),
    (33, 45, 70, 8, 3),
    (70, 64, 33, 16, 4),
    (97, 19, 66, 64, 2),
    (50, 70, 17, 1, 5),
    (64, 32, 64, 16, 2),
    (100, 65, 70, 16, 8),
    (99, 33, 40, 64, 3),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("rows,d_in,d_out,r,n_adapters", SHAPES)
def test_matches_reference_unsorted_ids_and_empty_adapter(rows, d_in, d_out, r, n_adapters):
    problem = make_problem(rows, d_in, d_out, r, n_adapters)
    check_against_reference(problem, ids_unsorted_with_empty_adapter(rows, n_adapters), REL_TOL[torch.float32])


# Many adapters: about 5 rows each, so every 32-row tile straddles several (row masks).
MANY_ADAPTERS = (120, 24, 40, 4, 24)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "dtype,shape",
    [(torch.bfloat16, shape) for shape in [*SHAPES, MANY_ADAPTERS]]
    + [(torch.float16, shape) for shape in [SHAPES[1], SHAPES[3], MANY_ADAPTERS]],
    ids=lambda v: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else "x".join(map(str, v)),
)
def test_low_precision_matches_the_fp32_reference(dtype, shape):
    """The GPU path's dtypes on the interpreter (tests/triton_bf16_interpreter.py makes its bf16 a GPU's)."""
    rows, d_in, d_out, r, n_adapters = shape
    problem = make_problem(rows, d_in, d_out, r, n_adapters, dtype=dtype)
    check_low_precision_against_fp32_reference(problem, ids_unsorted_with_empty_adapter(rows, n_adapters))


@pytest.mark.interpreter
@pytest.mark.parametrize("bias", [True, False])
def test_no_adapter_ids_means_adapter_zero(bias):
    problem = make_problem(40, 36, 35, 8, 3, bias=bias)
    check_against_reference(problem, None, REL_TOL[torch.float32])
    y = lora_linear(**problem, backend="triton")
    zeros = torch.zeros(40, dtype=torch.int64)
    assert_rel_close(y, lora_linear_reference(**problem, row_adapters=zeros), REL_TOL[torch.float32], "y")


@pytest.mark.interpreter
def test_leading_dims_and_adapter_rows_reuse():
    """x (sequences, seq, d_in) with ids (sequences, seq); an AdapterRows gives the same result as raw ids."""
    problem = make_problem(0, 24, 40, 16, 3, lead=(6, 11))
    ids = torch.tensor([2, 0, 2, 1, 0, 2]).repeat_interleave(11).view(6, 11)
    check_against_reference(problem, ids, REL_TOL[torch.float32])
    by_adapter = adapter_rows(ids, 3)
    y_rows = lora_linear(**problem, row_adapters=by_adapter, backend="triton")
    y_ids = lora_linear(**problem, row_adapters=ids, backend="triton")
    assert y_rows.shape == (6, 11, 40)
    torch.testing.assert_close(y_rows, y_ids, rtol=0, atol=0)


def test_adapter_rows():
    by_adapter = adapter_rows(torch.tensor([[2, 0], [2, 2]]), 4)
    assert by_adapter.row_order.tolist() == [1, 0, 2, 3]
    assert by_adapter.sorted_ids.tolist() == [0, 2, 2, 2]
    assert by_adapter.starts.tolist() == [0, 1, 1, 4, 4]
    assert by_adapter.counts.tolist() == [1, 0, 3, 0]
    assert by_adapter.max_rows_per_adapter == 3 and by_adapter.n_rows == 4


@pytest.mark.interpreter
def test_zero_rows():
    problem = make_problem(0, 9, 5, 4, 2)
    y = lora_linear(**problem, row_adapters=torch.zeros(0, dtype=torch.int64), backend="triton")
    assert y.shape == (0, 5)


@pytest.mark.interpreter
def test_backward_row_splits_agree():
    """dA/dB summed over several programs per adapter equal the one-program sum."""
    rows, n_adapters = 90, 3
    by_adapter = adapter_rows(ids_unsorted_with_empty_adapter(rows, 4) % n_adapters, n_adapters)
    left, right = torch.randn(rows, 20), torch.randn(rows, 37)
    one = lora_adapter_outer(left, right, by_adapter, 0.5, left_sorted=True, right_sorted=False, n_splits=1)
    many = lora_adapter_outer(left, right, by_adapter, 0.5, left_sorted=True, right_sorted=False, n_splits=3)
    assert_rel_close(many, one, 1e-6, "split sums")
    expected = torch.stack(
        [0.5 * left[by_adapter.starts[a] : by_adapter.starts[a + 1]].t() @ right[by_adapter.row_order][
            by_adapter.starts[a] : by_adapter.starts[a + 1]
        ] for a in range(n_adapters)]
    )  # fmt: skip
    assert_rel_close(one, expected, 1e-5, "per-adapter outer")


@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 48),
    d_in=st.integers(1, 40),
    d_out=st.integers(1, 40),
    r=st.sampled_from([1, 8, 16]),
    n_adapters=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
@pytest.mark.interpreter
def test_hypothesis_random_layers(rows, d_in, d_out, r, n_adapters, seed):
    problem = make_problem(rows, d_in, d_out, r, n_adapters)
    ids = torch.randint(0, n_adapters, (rows,), generator=torch.Generator().manual_seed(seed))
    check_against_reference(problem, ids, REL_TOL[torch.float32])


@pytest.mark.interpreter
def test_gradcheck_float64_through_kernels():
    problem = make_problem(6, 5, 4, 2, 2, dtype=torch.float64)
    problem["lora_a"] = problem["lora_a"].detach().double().requires_grad_()
    problem["lora_b"] = problem["lora_b"].detach().double().requires_grad_()
    ids = torch.tensor([1, 0, 1, 1, 0, 1])

    def fn(x, lora_a, lora_b):
        return lora_linear(x, problem["weight"], problem["bias"], lora_a, lora_b, 0.75, ids, backend="triton")

    assert torch.autograd.gradcheck(fn, (problem["x"], problem["lora_a"], problem["lora_b"]), fast_mode=True)


@pytest.mark.interpreter
def test_reference_is_twice_differentiable_and_kernels_refuse_double_backward():
    problem = make_problem(5, 4, 3, 2, 2, dtype=torch.float64)
    a = problem["lora_a"].detach().double().requires_grad_()
    b = problem["lora_b"].detach().double().requires_grad_()
    ids = torch.tensor([1, 0, 1, 1, 0])

    def ref(lora_a, lora_b):
        return lora_linear(problem["x"], problem["weight"], None, lora_a, lora_b, 0.5, ids, backend="torch")

    assert torch.autograd.gradgradcheck(ref, (a, b))
    y = lora_linear(problem["x"], problem["weight"], None, a, b, 0.5, ids, backend="triton")
    (da,) = torch.autograd.grad(y.pow(2).sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        da.sum().backward()


@pytest.mark.interpreter
def test_broadcast_upstream_gradient():
    """y.sum() hands the backward a stride-0 gradient; the kernels read it through its strides."""
    problem = make_problem(37, 20, 33, 8, 2)
    ids = ids_unsorted_with_empty_adapter(37, 3)
    inputs = [problem["x"], problem["lora_a"], problem["lora_b"]]
    got = torch.autograd.grad(lora_linear(**problem, row_adapters=ids, backend="triton").sum(), inputs)
    want = torch.autograd.grad(lora_linear_reference(**problem, row_adapters=ids).sum(), inputs)
    for name, g, g_ref in zip(("dx", "dA", "dB"), got, want):
        assert_rel_close(g, g_ref, REL_TOL[torch.float32], name)


@pytest.mark.interpreter
def test_weight_and_bias_get_no_gradient():
    problem = make_problem(8, 6, 5, 2, 1)
    problem["weight"].requires_grad_()
    problem["bias"].requires_grad_()
    for backend in ("triton", "torch"):
        y = lora_linear(**problem, backend=backend)
        assert torch.autograd.grad(y.sum(), [problem["weight"], problem["bias"]], allow_unused=True) == (None, None)


def autograd_node_names(t: torch.Tensor) -> set[str]:
    names, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            stack.extend(fn for fn, _ in node.next_functions)
    return names


@pytest.mark.interpreter
def test_backend_choice(monkeypatch):
    """Interpreter mode picks the kernels for CPU tensors; the environment variable overrides that."""
    problem = make_problem(10, 6, 5, 2, 1)
    kernel_node = _LoraLinearFunction.__name__ + "Backward"
    assert kernel_node in autograd_node_names(lora_linear(**problem))
    monkeypatch.setenv("PERK_KERNELS_BACKEND", "torch")
    y = lora_linear(**problem)
    assert kernel_node not in autograd_node_names(y)
    torch.testing.assert_close(y, lora_linear_reference(**problem), rtol=0, atol=0)


def _bad(**changes):
    problem = make_problem(6, 5, 4, 2, 2)
    ids = changes.pop("row_adapters", torch.zeros(6, dtype=torch.int64))
    problem.update(changes)
    return problem, ids


BAD_INPUTS = [
    ("x not a tensor", dict(x=[[1.0]]), TypeError, "x must"),
    ("integer x", dict(x=torch.ones(6, 5, dtype=torch.int64)), TypeError, "x must"),
    ("weight d_in", dict(weight=torch.randn(4, 6)), ValueError, "weight"),
    ("weight dtype", dict(weight=torch.randn(4, 5, dtype=torch.float64)), TypeError, "weight"),
    ("bias shape", dict(bias=torch.randn(5)), ValueError, "bias"),
    ("lora_a d_in", dict(lora_a=torch.randn(2, 2, 6)), ValueError, "lora_a"),
    ("lora_a ndim", dict(lora_a=torch.randn(2, 5)), ValueError, "lora_a"),
    ("lora_b rank", dict(lora_b=torch.randn(2, 4, 3)), ValueError, "lora_b"),
    ("lora_b adapters", dict(lora_b=torch.randn(3, 4, 2)), ValueError, "lora_b"),
    ("scale nan", dict(scale=float("nan")), ValueError, "scale"),
    ("scale tensor", dict(scale=torch.tensor(1.0)), TypeError, "scale"),
    ("ids too large", dict(row_adapters=torch.tensor([0, 1, 2, 0, 0, 0])), ValueError, "row_adapters"),
    ("ids negative", dict(row_adapters=torch.tensor([0, -1, 0, 0, 0, 0])), ValueError, "row_adapters"),
    ("ids shape", dict(row_adapters=torch.zeros(5, dtype=torch.int64)), ValueError, "row_adapters"),
    ("ids float", dict(row_adapters=torch.zeros(6)), TypeError, "row_adapters"),
    ("adapter rows adapters", dict(row_adapters=adapter_rows(torch.zeros(6, dtype=torch.int64), 3)), ValueError, "adapter"),
    ("adapter rows rows", dict(row_adapters=adapter_rows(torch.zeros(7, dtype=torch.int64), 2)), ValueError, "rows"),
]  # fmt: skip


@pytest.mark.parametrize("what,changes,error,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_inputs_raise_naming_the_argument(what, changes, error, match, backend):
    problem, ids = _bad(**changes)
    with pytest.raises(error, match=match):
        lora_linear(**problem, row_adapters=ids, backend=backend)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend"):
        lora_linear(**make_problem(2, 3, 4, 1, 1), backend="cuda")


def test_adapter_rows_type_is_public():
    assert isinstance(adapter_rows(torch.tensor([0]), 1), AdapterRows)


@pytest.mark.parametrize("configs_fn", ["_gemm_configs", "_shrink_configs"])
@pytest.mark.parametrize("sm", [90, 80])
@pytest.mark.parametrize("block_r", [16, 64])
@pytest.mark.parametrize(
    "dtype,precision,fma",
    [(torch.bfloat16, "ieee", False), (torch.float32, "tf32", False), (torch.float32, "ieee", True), (torch.float64, "ieee", True)],
)
def test_autotuning_keeps_tiles_that_fit_the_dtype_and_rank(
    monkeypatch, configs_fn, sm, block_r, dtype, precision, fma
):
    """The GPU config lists (read without the interpreter), pruned per call as the autotuner does:
    FMA tiles where tl.dot has no tensor cores, and only tiles that hold BLOCK_R without spilling
    on the GPU at hand."""
    monkeypatch.setattr(lora_linear_module, "interpret_mode", lambda: False)
    monkeypatch.setattr(lora_linear_module, "device_capability", lambda device: (sm // 10, 0))
    configs = getattr(lora_linear_module, configs_fn)()
    kept = lora_linear_module._prune_configs(
        configs, {"x_ptr": torch.empty(1, dtype=dtype)}, DOT_PRECISION=precision, BLOCK_R=block_r
    )
    assert 0 < len(kept) < len(configs)
    limits = [lora_linear_module._TILE_LIMITS[id(c)] for c in kept]
    assert all(is_fma == fma and block_r <= max_block_r[sm] for max_block_r, is_fma in limits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # bf16, the engine's GPU dtype, first
@pytest.mark.parametrize(
    "rows,d_in,d_out,r,n_adapters", [(1000, QWEN2_5_0_5B.d_model, QWEN2_5_0_5B.d_ff, 16, 8), (333, 200, 130, 64, 3)]
)
def test_gpu_matches_reference(dtype, rows, d_in, d_out, r, n_adapters):
    """On CUDA: fp32 against the fp32 reference, bf16 against the reference run in fp32 on the same inputs."""
    problem = make_problem(rows, d_in, d_out, r, n_adapters, dtype=dtype, device="cuda")
    ids = ids_unsorted_with_empty_adapter(rows, n_adapters).cuda()
    if dtype == torch.float32:
        check_against_reference(problem, ids, REL_TOL[dtype])
    else:
        check_low_precision_against_fp32_reference(problem, ids)


# ----------------------------------------------------------------------------------------------
# CPU path: bf16 base, fp32 adapters (chosen automatically when the Triton interpreter is off)
# ----------------------------------------------------------------------------------------------

CPU_NODE = _LoraLinearBf16CpuFunction.__name__ + "Backward"


def _bf16_problem(shape):
    rows, d_in, d_out, r, n_adapters = shape
    return make_problem(rows, d_in, d_out, r, n_adapters, dtype=torch.bfloat16), ids_unsorted_with_empty_adapter(rows, n_adapters)


def _relative_errors(problem, ids, backend):
    """Norm-relative errors of y, dx, dA, dB against float64 on the same (bf16-rounded) inputs."""
    wide = {k: (v.detach().double().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v) for k, v in problem.items()}
    y = lora_linear(**problem, row_adapters=ids, backend=backend)
    y_wide = lora_linear_reference(**wide, row_adapters=ids)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    grads = torch.autograd.grad(y, [problem[k] for k in ("x", "lora_a", "lora_b")], dy)
    grads_wide = torch.autograd.grad(y_wide, [wide[k] for k in ("x", "lora_a", "lora_b")], dy.double())
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    return [((a.double() - b).norm() / b.norm()).item() for a, b in zip((y, *grads), (y_wide, *grads_wide))]


@pytest.mark.parametrize("shape", [*SHAPES, MANY_ADAPTERS], ids=lambda v: "x".join(map(str, v)))
def test_bf16_cpu_path_is_as_accurate_as_the_reference(monkeypatch, shape):
    """Against float64: y and dx at least as close as the reference's (one bf16 rounding where it has
    two), dA and dB at fp32 precision like the reference's (not bf16's ~1e-3)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    problem, ids = _bf16_problem(shape)
    assert CPU_NODE in autograd_node_names(lora_linear(**problem, row_adapters=ids))
    got = _relative_errors(problem, ids, None)
    want = _relative_errors(problem, ids, "torch")
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        assert g <= 1.05 * w + 1e-6, (name, g, w)
    assert max(got[2:]) < 1e-5


def test_bf16_pairs_keep_fp32_adapters_below_bf16_spacing():
    """hi + lo holds an fp32 value to ~2⁻¹⁶: an inner update under bf16's spacing (2⁻⁸) survives."""
    t = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    hi, lo = lora_linear_module._bf16_pair(t)
    assert hi.dtype == lo.dtype == torch.bfloat16
    pair_error = ((hi.double() + lo.double() - t.double()).abs() / t.abs().double()).max().item()
    bf16_error = ((hi.double() - t.double()).abs() / t.abs().double()).max().item()
    assert pair_error < 2**-15 and bf16_error > 2**-10
    out = torch.zeros(64, 48, dtype=torch.bfloat16)
    left, right = torch.randn(64, 8, dtype=torch.float64), torch.randn(48, 8, dtype=torch.float64)
    lora_linear_module._add_low_rank_bf16(out, left.float(), right.float())
    torch.testing.assert_close(out.double(), left @ right.t(), rtol=2**-8, atol=1e-3)


def test_bf16_cpu_path_choice_and_double_backward(monkeypatch):
    """Automatic on CPU for a bf16 x with fp32 adapters; `backend="torch"` (argument or environment),
    an fp32 x or bf16 adapters take the reference, which alone is twice differentiable."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    problem, ids = _bf16_problem((37, 20, 33, 8, 3))
    y = lora_linear(**problem, row_adapters=ids)
    assert CPU_NODE in autograd_node_names(y)
    (da,) = torch.autograd.grad(y.float().pow(2).sum(), problem["lora_a"], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        da.sum().backward()
    assert CPU_NODE not in autograd_node_names(lora_linear(**problem, row_adapters=ids, backend="torch"))
    fp32 = make_problem(37, 20, 33, 8, 3)
    assert CPU_NODE not in autograd_node_names(lora_linear(**fp32, row_adapters=ids))
    bf16_adapters = dict(problem, lora_a=problem["lora_a"].detach().bfloat16(), lora_b=problem["lora_b"].detach().bfloat16())
    assert CPU_NODE not in autograd_node_names(lora_linear(**bf16_adapters, row_adapters=ids))
    monkeypatch.setenv("PERK_KERNELS_BACKEND", "torch")
    assert CPU_NODE not in autograd_node_names(lora_linear(**problem, row_adapters=ids))


def test_bf16_cpu_path_broadcast_gradient_and_frozen_weight(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    problem, ids = _bf16_problem((37, 20, 33, 8, 3))
    problem["weight"].requires_grad_()
    inputs = [problem["x"], problem["lora_a"], problem["lora_b"], problem["weight"]]
    got = torch.autograd.grad(lora_linear(**problem, row_adapters=ids).sum(), inputs, allow_unused=True)
    want = torch.autograd.grad(lora_linear(**problem, row_adapters=ids, backend="torch").sum(), inputs, allow_unused=True)
    assert got[3] is None and want[3] is None
    for name, g, w in zip(("dx", "dA", "dB"), got, want):
        assert_rel_close(g, w, REL_TOL[torch.bfloat16] if name == "dx" else 1e-5, name)
