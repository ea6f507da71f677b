"""lora_inner_step on a flat (n_adapters, P) buffer split into groups: the Triton step (interpreter on
CPU) against the plain-torch reference, and the reference against the formula."""

import importlib
import types

import pytest
import torch

import perk_kernels
import perk_kernels.lora_inner_step  # noqa: F401  (the statement form must work)
from perk_kernels import expand_group_table, lora_inner_step, lora_inner_step_reference
from perk_kernels._utils import flat_alignment, group_chunks
from perk_kernels.lora_inner_step import _StepPlan
from tests.triton_bf16_interpreter import assert_rounded_to_nearest
from tools.shapes import QWEN2_5_0_5B

# Odd group sizes against the interpreter's 64-element blocks and 128-element chunks: one smaller
# than a block, one spanning several chunks, a single element and an empty group.
SIZES = [35, 300, 64, 1, 0, 129]
N_ADAPTERS = 3
# Every border a whole number of 16-byte vectors: the kernels' vector path.
ALIGNED_SIZES = [36, 128, 8]
# (dtype, rtol, atol) of the Triton path against the reference.
TOLERANCES = {torch.float32: (1e-6, 1e-6), torch.float64: (1e-12, 1e-12)}


def offsets_of(sizes):
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return offsets


OFFSETS = offsets_of(SIZES)
G = len(SIZES)


def make_flat(sizes=SIZES, n_adapters=N_ADAPTERS, dtype=torch.float32, seed=0, requires_grad=False):
    """(params, grads) of shape (n_adapters, P), random normal."""
    gen = torch.Generator().manual_seed(seed)
    n_params = sum(sizes)

    def rand():
        t = torch.randn(n_adapters, n_params, generator=gen, dtype=torch.float64).to(dtype)
        return t.requires_grad_(requires_grad)

    return rand(), rand()


def make_lr(kind, n_groups=G, n_adapters=N_ADAPTERS, dtype=torch.float32, requires_grad=False):
    if kind == "float":
        return 0.3
    gen = torch.Generator().manual_seed(7)
    shape = (n_groups,) if kind == "per_group" else (n_adapters, n_groups)
    return (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.1).to(dtype).requires_grad_(requires_grad)


def assert_close(actual, expected, what, dtype=torch.float32, scale=1.0):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol * scale, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def formula(params, grads, lr, offsets, weight_decay=0.0, max_grad_norm=None):
    """The semantics written out per adapter and group, in float64."""
    p, g = params.double(), grads.double()
    out = torch.empty_like(p)
    for a in range(p.shape[0]):
        c = 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / (g[a].norm().item() + 1e-6))
        for k, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
            rate = lr if not isinstance(lr, torch.Tensor) else (lr[k] if lr.dim() == 1 else lr[a, k]).item()
            out[a, start:end] = p[a, start:end] - rate * (c * g[a, start:end] + weight_decay * p[a, start:end])
    return out


def test_both_import_forms():
    module = importlib.import_module("perk_kernels.lora_inner_step")
    assert isinstance(module, types.ModuleType)
    assert module.lora_inner_step is lora_inner_step is perk_kernels.lora_inner_step
    assert module.lora_inner_step_reference is lora_inner_step_reference


@pytest.mark.parametrize("max_grad_norm", [None, 2.0])
@pytest.mark.parametrize("lr_kind", ["float", "per_group", "per_adapter_group"])
def test_reference_follows_the_formula(lr_kind, max_grad_norm):
    params, grads = make_flat(dtype=torch.float64)
    lr = make_lr(lr_kind, dtype=torch.float64)
    out = lora_inner_step(params, grads, lr, OFFSETS, weight_decay=0.1, max_grad_norm=max_grad_norm, backend="torch")
    assert_close(out, formula(params, grads, lr, OFFSETS, 0.1, max_grad_norm), "reference", torch.float64)


# Clipping thresholds: the grad norm per adapter is ~24, so 2.0 clips and 1e3 does not.
@pytest.mark.interpreter
@pytest.mark.parametrize("max_grad_norm", [None, 2.0, 1e3])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("lr_kind", ["float", "per_group", "per_adapter_group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_matches_reference(dtype, lr_kind, weight_decay, max_grad_norm):
    params, grads = make_flat(dtype=dtype)
    lr = make_lr(lr_kind)
    kwargs = dict(weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    out = lora_inner_step(params, grads, lr, OFFSETS, backend="triton", **kwargs)
    assert out.shape == params.shape and out.dtype == dtype and out.is_contiguous()
    assert_close(out, lora_inner_step_reference(params, grads, lr, OFFSETS, **kwargs), "out", dtype)


@pytest.mark.interpreter
def test_clipping_is_per_adapter():
    """Only the adapter whose global norm exceeds the bound is scaled, to the bound."""
    params, grads = make_flat()
    grads[0] *= 100.0  # adapter 0: norm ~2400
    grads[1] *= 1e-3  # adapter 1: norm ~0.02, under the bound
    out = lora_inner_step(params, grads, 1.0, OFFSETS, max_grad_norm=1.5, backend="triton")
    steps = params - out  # = clip[a] · g with lr 1, no decay
    assert steps[0].norm().item() == pytest.approx(1.5, rel=1e-5)
    assert_close(steps[1], grads[1], "unclipped adapter")


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("max_grad_norm", [None, 2.0])
def test_inplace_equals_out_of_place(max_grad_norm, backend):
    params, grads = make_flat()
    lr = make_lr("per_adapter_group")
    kwargs = dict(weight_decay=0.05, max_grad_norm=max_grad_norm, backend=backend)
    expected = lora_inner_step(params, grads, lr, OFFSETS, **kwargs)
    version = params._version
    out = lora_inner_step(params, grads, lr, OFFSETS, inplace=True, **kwargs)
    assert out is params and params._version > version
    torch.testing.assert_close(params, expected, rtol=0, atol=0)


@pytest.mark.interpreter
def test_inplace_invalidates_tensors_saved_for_backward():
    """The kernel writes params directly; autograd still notices (version counter)."""
    params, grads = make_flat()
    weight = torch.randn(N_ADAPTERS, requires_grad=True)
    loss = (weight[:, None] * params).sum()  # saves params
    lora_inner_step(params, grads, 0.1, OFFSETS, inplace=True, backend="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_inplace_on_an_unaligned_row_block_of_a_larger_buffer(backend):
    """params a contiguous block of rows of a bigger buffer, one element off 16-byte alignment: the
    rows around it are left untouched (the kernels never address outside (n_adapters, P))."""
    n_params = sum(SIZES)
    storage = torch.randn(N_ADAPTERS + 2, n_params).view(-1)
    buffer = storage[1 : 1 + (N_ADAPTERS + 1) * n_params].view(N_ADAPTERS + 1, n_params)
    params = buffer[1:]
    assert params.is_contiguous() and params.data_ptr() % 16 != 0
    grads = torch.randn(N_ADAPTERS, n_params)
    before = storage.clone()
    expected = lora_inner_step_reference(params, grads, 0.2, OFFSETS, max_grad_norm=2.0)
    lora_inner_step(params, grads, 0.2, OFFSETS, max_grad_norm=2.0, inplace=True, backend=backend)
    assert_close(params, expected, "params")
    inside = torch.zeros_like(storage, dtype=torch.bool)
    inside[1 + n_params : 1 + (N_ADAPTERS + 1) * n_params] = True
    assert torch.equal(storage[~inside], before[~inside])


def test_vector_alignment_is_assumed_only_where_it_holds():
    aligned = offsets_of(ALIGNED_SIZES)
    params, grads = make_flat(ALIGNED_SIZES)
    assert _StepPlan(tuple(aligned), [params, grads]).align == 4
    assert _StepPlan(tuple(OFFSETS), make_flat()).align == 1  # odd group borders
    shifted = torch.randn(N_ADAPTERS * sum(ALIGNED_SIZES) + 1)[1:].view(N_ADAPTERS, -1)
    assert flat_alignment([params, shifted], tuple(aligned), 128) == 1  # a buffer off alignment
    assert flat_alignment([params.double()], tuple(aligned), 128) == 2


def test_chunk_table_never_crosses_a_group_border():
    table, slots = group_chunks(tuple(OFFSETS), 128, torch.device("cpu"))
    assert slots == 3  # the 300-element group
    covered = torch.zeros(OFFSETS[-1], dtype=torch.int64)
    for group, start, end, slot in table.tolist():
        assert OFFSETS[group] <= start < end <= OFFSETS[group + 1] and end - start <= 128
        assert group * slots <= slot < (group + 1) * slots
        covered[start:end] += 1
    assert bool((covered == 1).all())
    assert len({row[3] for row in table.tolist()}) == table.shape[0]  # one slot per chunk


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_non_contiguous_inputs(backend):
    """Non-contiguous grads are copied (in place too), non-contiguous params are read out of place."""
    params, grads = make_flat()
    params_t = params.t().contiguous().t()
    grads_t = grads.t().contiguous().t()
    assert not params_t.is_contiguous() and not grads_t.is_contiguous()
    expected = lora_inner_step_reference(params, grads, 0.1, OFFSETS)
    assert_close(lora_inner_step(params_t, grads_t, 0.1, OFFSETS, backend=backend), expected, "out of place")
    lora_inner_step(params, grads_t, 0.1, OFFSETS, inplace=True, backend=backend)
    assert_close(params, expected, "in place")
    with pytest.raises(ValueError, match="params must be contiguous for inplace=True"):
        lora_inner_step(params_t, grads, 0.1, OFFSETS, inplace=True, backend=backend)


@pytest.mark.interpreter
def test_broadcast_params_out_of_place():
    """An expanded initialisation (stride(0) = 0) is stepped out of place."""
    init = torch.randn(1, sum(SIZES))
    params, grads = init.expand(N_ADAPTERS, -1), torch.randn(N_ADAPTERS, sum(SIZES))
    out = lora_inner_step(params, grads, 0.3, OFFSETS, backend="triton")
    assert_close(out, lora_inner_step_reference(params, grads, 0.3, OFFSETS), "broadcast")


@pytest.mark.interpreter
@pytest.mark.parametrize("max_grad_norm", [None, 2.0])
def test_a_differentiated_step_is_the_reference_on_every_backend(max_grad_norm):
    """The Triton kernels have no backward: a step that builds a graph runs the torch reference."""
    params, grads = make_flat(requires_grad=True)
    lr = make_lr("per_adapter_group", requires_grad=True)
    kwargs = dict(weight_decay=0.1, max_grad_norm=max_grad_norm)
    out = lora_inner_step(params, grads, lr, OFFSETS, backend="triton", **kwargs)
    out_ref = lora_inner_step_reference(params, grads, lr, OFFSETS, **kwargs)
    assert out.grad_fn is not None and torch.equal(out, out_ref)
    d_out = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [params, grads, lr], d_out),
                    torch.autograd.grad(out_ref, [params, grads, lr], d_out)):
        assert torch.equal(a, b)
    with torch.no_grad():  # without a graph, the kernel
        assert_close(lora_inner_step(params, grads, lr, OFFSETS, backend="triton", **kwargs), out_ref, "no graph")


@pytest.mark.parametrize("max_grad_norm", [2.0, 1e3])
def test_the_clip_derivative_is_autograds(max_grad_norm):
    """inner_step_clip_jvp, the derivative the meta-gradient walk back uses, is autograd's of the
    rule D(g) = c(g)·g (float64; 2.0 clips every adapter, 1e3 none)."""
    _, grads = make_flat(dtype=torch.float64)
    grads[1] = 0.0  # an all-zero gradient: not clipped, finite derivative
    w = torch.randn_like(grads)

    def direction(g):
        clip = perk_kernels.inner_step_clip(g, max_grad_norm)[0]
        return perk_kernels.inner_step_direction(torch.zeros_like(g), g, clip=clip)

    _, want = torch.autograd.functional.jvp(direction, grads, w)
    clip, coef = perk_kernels.inner_step_clip(grads, max_grad_norm)
    got = perk_kernels.inner_step_clip_jvp(grads, clip, coef, w)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    want_clip = torch.clamp(max_grad_norm / (grads.norm(dim=1, keepdim=True) + 1e-6), max=1.0)  # the documented c
    torch.testing.assert_close(clip, want_clip, rtol=1e-15, atol=0)


@pytest.mark.interpreter
def test_gradient_of_lr_only():
    """Only lr requires grad (meta-learned rates with detached params): d lr = −⟨d, g + λp⟩ per group."""
    params, grads = make_flat()
    lr = make_lr("per_group", requires_grad=True)
    out = lora_inner_step(params, grads, lr, OFFSETS, weight_decay=0.2, backend="triton")
    (d_lr,) = torch.autograd.grad(out.sum(), lr)
    expected = torch.stack([-(grads + 0.2 * params)[:, s:e].sum() for s, e in zip(OFFSETS[:-1], OFFSETS[1:])])
    torch.testing.assert_close(d_lr, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_gradcheck_float64(max_grad_norm, backend):
    offsets = [0, 6, 6, 11]
    params, grads = make_flat([6, 0, 5], n_adapters=2, dtype=torch.float64, requires_grad=True)
    lr = make_lr("per_adapter_group", n_groups=3, n_adapters=2, dtype=torch.float64, requires_grad=True)

    def step(lr, params, grads):
        kwargs = dict(weight_decay=0.1, max_grad_norm=max_grad_norm, backend=backend)
        return lora_inner_step(params, grads, lr, offsets, **kwargs)

    assert torch.autograd.gradcheck(step, (lr, params, grads), fast_mode=True)
    # The exact meta-gradient differentiates the step twice (on every backend: the reference).
    assert torch.autograd.gradgradcheck(step, (lr, params, grads), fast_mode=True)


@pytest.mark.interpreter
@pytest.mark.parametrize("max_grad_norm,launches", [(None, 1), (1.0, 2)])
def test_constant_number_of_launches(monkeypatch, max_grad_norm, launches):
    counted = []
    original = _StepPlan.launch

    def counting(self, kernel, *args, **meta):
        counted.append(kernel)
        original(self, kernel, *args, **meta)

    monkeypatch.setattr(_StepPlan, "launch", counting)
    for n_groups in (2, 40):
        counted.clear()
        params, grads = make_flat([3] * n_groups)
        lora_inner_step(params, grads, 0.1, offsets_of([3] * n_groups), max_grad_norm=max_grad_norm, backend="triton")
        assert len(counted) == launches, n_groups


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_host_sync(monkeypatch, backend):
    """Neither path reads a device value on the host (``.item()``, ``bool(tensor)``, ``.tolist()``)."""
    params, grads = make_flat(requires_grad=True)
    lr = make_lr("per_adapter_group", requires_grad=True)

    def sync(*args, **kwargs):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    out = lora_inner_step(params, grads, lr, OFFSETS, max_grad_norm=2.0, weight_decay=0.1, backend=backend)
    torch.autograd.grad(out, [params, grads, lr], torch.ones_like(out))
    with torch.no_grad():
        lora_inner_step(params, grads, lr, OFFSETS, max_grad_norm=2.0, inplace=True, backend=backend)


def test_expand_group_table():
    table = torch.arange(2.0 * G).view(2, G).requires_grad_()
    full = expand_group_table(table, OFFSETS)
    sizes = torch.tensor(SIZES)
    torch.testing.assert_close(full, table.repeat_interleave(sizes, dim=1))
    (d_table,) = torch.autograd.grad(full.sum(), table)
    torch.testing.assert_close(d_table, sizes.to(table.dtype).expand(2, G))
    with pytest.raises(ValueError, match="one column per group"):
        expand_group_table(table, OFFSETS[:-1])


P = sum(SIZES)
BAD_INPUTS = [
    ("params not a tensor", dict(params=[torch.zeros(3, P)]), TypeError, "params must be a torch.Tensor"),
    ("params 1-d", dict(params=torch.zeros(P), grads=torch.zeros(P)), ValueError, "params must have 2 dimensions"),
    ("grad shape", dict(grads=torch.zeros(3, P + 1)), ValueError, "grads must have the shape of params"),
    ("grad dtype", dict(grads=torch.zeros(3, P, dtype=torch.float64)), TypeError, "grads must have the dtype of params"),
    ("integer params", dict(params=torch.zeros(3, P, dtype=torch.int64)), TypeError, "params must be a floating"),
    ("offsets not ending at P", dict(group_offsets=OFFSETS[:-1]), ValueError, "end at P=529"),
    ("offsets not starting at 0", dict(group_offsets=[1, *OFFSETS[1:]]), ValueError, "start at 0"),
    ("offsets decreasing", dict(group_offsets=[0, 40, 30, P]), ValueError, "non-decreasing"),
    ("offsets too short", dict(group_offsets=[P]), ValueError, "G\\+1 >= 2"),
    ("offsets a tensor", dict(group_offsets=torch.tensor(OFFSETS)), TypeError, "sequence of Python ints"),
    ("offsets floats", dict(group_offsets=[0.0, float(P)]), TypeError, "must hold ints"),
    ("lr nan", dict(lr=float("nan")), ValueError, "lr must be finite"),
    ("lr shape", dict(lr=torch.ones(G + 1)), ValueError, "lr must have shape \\(G,\\)"),
    ("lr adapters", dict(lr=torch.ones(2, G)), ValueError, "lr must have shape"),
    ("lr int tensor", dict(lr=torch.ones(G, dtype=torch.int64)), TypeError, "lr must be a floating"),
    ("lr string", dict(lr="0.1"), TypeError, "lr must be a float"),
    ("weight_decay inf", dict(weight_decay=float("inf")), ValueError, "weight_decay"),
    ("max_grad_norm zero", dict(max_grad_norm=0.0), ValueError, "max_grad_norm must be positive"),
    ("max_grad_norm nan", dict(max_grad_norm=float("nan")), ValueError, "max_grad_norm"),
    ("inplace non-contiguous", dict(params=torch.zeros(P, 3).t(), inplace=True), ValueError, "must be contiguous"),
]  # fmt: skip


@pytest.mark.parametrize("what,changes,error,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_inputs_raise_naming_the_argument(what, changes, error, match, backend):
    args = dict(params=torch.zeros(3, P), grads=torch.zeros(3, P), lr=0.1, group_offsets=OFFSETS)
    args.update(changes)
    with pytest.raises(error, match=match):
        lora_inner_step(**args, backend=backend)


def _overlapping_cases():
    buf = torch.zeros(2 * N_ADAPTERS, P)
    params = torch.zeros(N_ADAPTERS, P)
    return {
        "grads is params": (params, params),
        "grads a shifted view": (buf[:N_ADAPTERS], buf[1 : N_ADAPTERS + 1]),
        "grads a strided view": (buf[:N_ADAPTERS], buf[::2]),
    }


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", list(_overlapping_cases()))
def test_inplace_refuses_params_sharing_memory_with_grads(case, backend):
    params, grads = _overlapping_cases()[case]
    with pytest.raises(ValueError, match="params shares memory with grads"):
        lora_inner_step(params, grads, 0.5, OFFSETS, inplace=True, backend=backend)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_inplace_with_params_and_grads_in_one_buffer_without_overlap(backend):
    buf = torch.randn(2 * N_ADAPTERS, P)
    params, grads = buf[:N_ADAPTERS], buf[N_ADAPTERS:]
    expected = lora_inner_step_reference(params, grads, 0.25, OFFSETS, weight_decay=0.1)
    lora_inner_step(params, grads, 0.25, OFFSETS, weight_decay=0.1, inplace=True, backend=backend)
    assert_close(params, expected, "params")


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_clipped_step_of_an_all_zero_gradient_has_finite_gradients(backend):
    """‖g‖ = 0 with clipping: c = 1 (no clipping), so ∂out/∂g = −lr (not NaN from √0's derivative)."""
    params, grads = make_flat(requires_grad=True)
    with torch.no_grad():
        grads[1] = 0.0  # adapter 1 has an all-zero gradient, the others are clipped
    lr = make_lr("per_group", requires_grad=True)
    out = lora_inner_step(params, grads, lr, OFFSETS, max_grad_norm=2.0, backend=backend)
    d_out = torch.randn_like(out)
    got = torch.autograd.grad(out, [grads, lr], d_out)
    assert all(bool(t.isfinite().all()) for t in got)
    torch.testing.assert_close(got[0][1], -expand_group_table(lr.detach()[None], OFFSETS)[0] * d_out[1])
    want = torch.autograd.grad(lora_inner_step_reference(params, grads, lr, OFFSETS, max_grad_norm=2.0), [grads, lr], d_out)
    for a, b in zip(got, want):
        assert_close(a, b, "d grads, d lr", scale=10)


def check_against_float64_reference(sizes, n_adapters, dtype, tol, device, max_grad_norm):
    """The Triton step in ``dtype`` (params, grads; lr in fp32) against the reference in float64 on
    the same values, and in place equal to out of place."""
    offsets = offsets_of(sizes)
    params, grads = (t.to(device) for t in make_flat(sizes, n_adapters=n_adapters, dtype=dtype))
    lr = make_lr("per_adapter_group", n_groups=len(sizes), n_adapters=n_adapters).to(device)
    kwargs = dict(weight_decay=0.01, max_grad_norm=max_grad_norm)
    out = lora_inner_step(params, grads, lr, offsets, backend="triton", **kwargs)
    assert out.dtype == dtype
    wide = [t.double() for t in (params, grads, lr)]
    out_ref = lora_inner_step_reference(wide[0], wide[1], wide[2], offsets, **kwargs)
    torch.testing.assert_close(out.double(), out_ref, rtol=tol, atol=tol)
    if dtype in (torch.bfloat16, torch.float16):
        # Computed in fp32 and rounded once to nearest, as the kernel promises (and a GPU rounds):
        # the slack bounds the fp32 arithmetic's error, a few of its ulps of the largest term.
        p, g, rate = wide[0], wide[1], expand_group_table(wide[2], offsets)
        largest_term = p.abs() + rate * (g.abs() + 0.01 * p.abs())
        assert_rounded_to_nearest(out, out_ref, "out", slack=2**-20 * largest_term)
    inplace = params.clone()
    lora_inner_step(inplace, grads, lr, offsets, inplace=True, backend="triton", **kwargs)
    torch.testing.assert_close(inplace, out, rtol=0, atol=0)


# (dtype, tolerance against float64) of the low-precision steps (computed in fp32, rounded to dtype).
LOW_PRECISION = [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)]


@pytest.mark.interpreter
@pytest.mark.parametrize("max_grad_norm", [None, 2.0])
@pytest.mark.parametrize("dtype,tol", LOW_PRECISION, ids=["bf16", "fp16"])
def test_low_precision_matches_the_float64_reference(dtype, tol, max_grad_norm):
    """The GPU path's dtypes on the interpreter (tests/triton_bf16_interpreter.py makes its bf16 a GPU's)."""
    check_against_float64_reference(SIZES, N_ADAPTERS, dtype, tol, "cpu", max_grad_norm)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), *LOW_PRECISION])
def test_gpu_matches_reference(dtype, tol):
    d_model, d_ff = QWEN2_5_0_5B.d_model, QWEN2_5_0_5B.d_ff
    sizes = [16 * d_model, d_ff * 16, 7, 256 * d_ff, 0, 4]
    check_against_float64_reference(sizes, 8, dtype, tol, "cuda", max_grad_norm=50.0)
