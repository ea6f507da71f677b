"""lora_inner_step: the multi-tensor Triton step (interpreter on CPU) against the plain-torch reference."""

import importlib
import math
import types

import pytest
import torch

import perk_kernels
import perk_kernels.lora_inner_step  # noqa: F401  (the statement form must work)
from perk_kernels import lora_inner_step, lora_inner_step_reference
from perk_kernels._utils import slices_contiguous
from perk_kernels.lora_inner_step import _StepPlan

# Odd per-adapter sizes against the interpreter's 64-element blocks and 128-element chunks,
# including a tensor smaller than a block and one spanning several chunks.
SHAPES = [(5, 7), (300,), (64,), (1,), (3, 43)]
N_ADAPTERS = 3


def make_tensors(shapes=SHAPES, n_adapters=N_ADAPTERS, dtype=torch.float32, device="cpu", seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)

    def rand(shape):
        t = torch.randn((n_adapters, *shape), generator=gen, dtype=torch.float64).to(dtype).to(device)
        return t.requires_grad_(requires_grad)

    return [rand(s) for s in shapes], [rand(s) for s in shapes]


def make_lr(kind, n_tensors=len(SHAPES), n_adapters=N_ADAPTERS, dtype=torch.float32, requires_grad=False):
    if kind == "float":
        return 0.3
    gen = torch.Generator().manual_seed(7)
    shape = (n_tensors,) if kind == "per_tensor" else (n_adapters, n_tensors)
    return (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.1).to(dtype).requires_grad_(requires_grad)


def assert_all_close(actual, expected, what, rtol=1e-6, atol=1e-6):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, f"{what}[{i}]"
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m, i=i: f"{what}[{i}]: {m}")


def test_both_import_forms():
    module = importlib.import_module("perk_kernels.lora_inner_step")
    assert isinstance(module, types.ModuleType)
    assert module.lora_inner_step is lora_inner_step is perk_kernels.lora_inner_step
    assert module.lora_inner_step_reference is lora_inner_step_reference


# Clipping thresholds: total grad norm per adapter is ~20, so 2.0 clips and 1e3 does not.
@pytest.mark.interpreter
@pytest.mark.parametrize("max_grad_norm", [None, 2.0, 1e3])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("lr_kind", ["float", "per_tensor", "per_adapter_tensor"])
def test_matches_reference(lr_kind, weight_decay, max_grad_norm):
    params, grads = make_tensors()
    lr = make_lr(lr_kind)
    kwargs = dict(weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    out = lora_inner_step(params, grads, lr, backend="triton", **kwargs)
    assert_all_close(out, lora_inner_step_reference(params, grads, lr, **kwargs), "out")


@pytest.mark.interpreter
def test_clipping_is_per_adapter():
    """Only the adapter whose global norm (over all its tensors) exceeds the bound is scaled, to the bound."""
    params, grads = make_tensors()
    for g in grads:
        g[0] *= 100.0  # adapter 0: norm ~2000
        g[1] *= 1e-3  # adapter 1: norm ~0.02, under the bound
    out = lora_inner_step(params, grads, 1.0, max_grad_norm=1.5, backend="triton")
    steps = [p - o for p, o in zip(params, out)]  # = clip[a] · g with lr 1, no decay

    def norm(ts, a):
        return torch.cat([t[a].reshape(-1) for t in ts]).norm().item()

    assert norm(steps, 0) == pytest.approx(1.5, rel=1e-5)
    assert norm(steps, 1) == pytest.approx(norm(grads, 1), rel=1e-6)
    assert_all_close([s[1] for s in steps], [g[1] for g in grads], "unclipped adapter")


@pytest.mark.interpreter
@pytest.mark.parametrize("max_grad_norm", [None, 2.0])
def test_inplace_equals_out_of_place(max_grad_norm):
    params, grads = make_tensors()
    lr = make_lr("per_adapter_tensor")
    kwargs = dict(weight_decay=0.05, max_grad_norm=max_grad_norm, backend="triton")
    expected = lora_inner_step(params, grads, lr, **kwargs)
    versions = [p._version for p in params]
    out = lora_inner_step(params, grads, lr, inplace=True, **kwargs)
    assert all(o is p for o, p in zip(out, params))
    assert all(p._version > v for p, v in zip(params, versions))
    assert_all_close(params, expected, "inplace", rtol=0, atol=0)


@pytest.mark.interpreter
def test_inplace_invalidates_tensors_saved_for_backward():
    """The kernel writes params directly; autograd still notices (version counter)."""
    params, grads = make_tensors()
    weight = torch.randn(N_ADAPTERS, requires_grad=True)
    loss = (weight[:, None] * params[1]).sum()  # saves params[1]
    lora_inner_step(params, grads, 0.1, inplace=True, backend="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.interpreter
def test_views_of_one_flat_buffer_at_unaligned_offsets():
    """The engine's layout: all tensors views of one buffer (here starting 1 element in, so unaligned)."""
    sizes = [N_ADAPTERS * torch.Size(s).numel() for s in SHAPES]
    flat = torch.randn(sum(sizes) + 1)
    params = [v.view(N_ADAPTERS, *s) for v, s in zip(torch.split(flat[1:], sizes), SHAPES)]
    grads = [torch.randn_like(p) for p in params]
    expected = lora_inner_step_reference(params, grads, 0.2, max_grad_norm=2.0)
    lora_inner_step(params, grads, 0.2, max_grad_norm=2.0, inplace=True, backend="triton")
    assert_all_close(params, expected, "flat views")


@pytest.mark.interpreter
def test_non_contiguous_tensors():
    params, grads = make_tensors(shapes=[(6, 5)])
    params_t, grads_t = [params[0].transpose(1, 2)], [grads[0].transpose(1, 2)]
    out = lora_inner_step(params_t, grads_t, 0.1, backend="triton")
    assert_all_close(out, lora_inner_step_reference(params_t, grads_t, 0.1), "transposed")
    with pytest.raises(ValueError, match=r"params\[0\] must have contiguous adapter slices"):
        lora_inner_step(params_t, grads_t, 0.1, inplace=True, backend="triton")


# The engine's layout: each tensor group a view flat[:, start:end].unflatten(1, shape) of one
# (n_adapters, P) buffer, so stride(0) = P. "odd": unaligned offsets and sizes, with untouched
# columns before and after; "aligned": 16-byte aligned slices, so the kernels' vector path runs.
FLAT_LAYOUTS = {
    "odd": dict(shapes=[(5, 7), (300,), (1,), (3, 43)], lead=1, tail=2),
    "aligned": dict(shapes=[(4, 9), (2, 64), (8,)], lead=0, tail=0),
}


def flat_views(flat, shapes, lead, tail):
    """Views of ``flat`` laid out like perk.lora.AdapterLayout.tensor_views (after ``lead`` columns)."""
    ends = [lead + sum(math.prod(s) for s in shapes[: i + 1]) for i in range(len(shapes))]
    assert flat.shape[1] == ends[-1] + tail
    return [flat[:, end - math.prod(s) : end].unflatten(1, s) for s, end in zip(shapes, ends)]


def make_flat(layout, seed, dtype=torch.float32):
    width = layout["lead"] + sum(math.prod(s) for s in layout["shapes"]) + layout["tail"]
    return torch.randn(N_ADAPTERS, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("max_grad_norm", [None, 2.0])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout_name", FLAT_LAYOUTS)
def test_inplace_through_views_of_a_flat_buffer(layout_name, backend, max_grad_norm):
    layout = FLAT_LAYOUTS[layout_name]
    flat, direction = make_flat(layout, seed=1), make_flat(layout, seed=2)
    params = flat_views(flat, **layout)
    grads = flat_views(direction, **layout)
    assert N_ADAPTERS > 1 and not any(p.is_contiguous() for p in params)  # really strided views
    lr = make_lr("per_adapter_tensor", n_tensors=len(params))
    kwargs = dict(weight_decay=0.05, max_grad_norm=max_grad_norm)
    expected_flat = flat.clone()
    for view, out in zip(flat_views(expected_flat, **layout), lora_inner_step_reference(params, grads, lr, **kwargs)):
        view.copy_(out)
    assert not torch.equal(expected_flat, flat)
    version = flat._version

    out = lora_inner_step(params, grads, lr, inplace=True, backend=backend, **kwargs)

    assert all(o is p for o, p in zip(out, params))
    assert flat._version > version  # the base's saved copies are invalidated too
    torch.testing.assert_close(flat, expected_flat, rtol=1e-6, atol=1e-6)  # padding columns untouched too


def test_aligned_flat_layout_takes_the_vector_path():
    """Guards the "aligned" case above: strided views must still allow vector loads."""
    layout = FLAT_LAYOUTS["aligned"]
    params = flat_views(make_flat(layout, seed=1), **layout)
    assert _StepPlan(params, []).align == 4
    odd = FLAT_LAYOUTS["odd"]
    assert _StepPlan(flat_views(make_flat(odd, seed=1), **odd), []).align == 1


@pytest.mark.interpreter
@pytest.mark.parametrize("max_grad_norm", [None, 2.0])
@pytest.mark.parametrize("layout_name", FLAT_LAYOUTS)
def test_out_of_place_and_gradients_through_views_of_a_flat_buffer(layout_name, max_grad_norm):
    layout = FLAT_LAYOUTS[layout_name]
    flat = make_flat(layout, seed=1).requires_grad_()
    direction = make_flat(layout, seed=2).requires_grad_()
    lr = make_lr("per_adapter_tensor", n_tensors=len(layout["shapes"]), requires_grad=True)
    kwargs = dict(weight_decay=0.1, max_grad_norm=max_grad_norm)
    params, grads = flat_views(flat, **layout), flat_views(direction, **layout)
    out = lora_inner_step(params, grads, lr, backend="triton", **kwargs)
    out_ref = lora_inner_step_reference(params, grads, lr, **kwargs)
    assert all(o.is_contiguous() for o in out)
    assert_all_close([o.detach() for o in out], [o.detach() for o in out_ref], "out")
    d_out = flat_views(make_flat(layout, seed=3), **layout)  # strided upstream gradients as well
    got = torch.autograd.grad(out, [flat, direction, lr], d_out)
    want = torch.autograd.grad(out_ref, [flat, direction, lr], d_out)
    assert_all_close(got, want, "d flat, d direction, d lr", rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_broadcast_params_out_of_place_and_overlapping_params_in_place():
    """An expanded initialisation (stride(0) = 0) is read without a copy but cannot be written."""
    init = torch.randn(4, 5)
    params, grads = [init.expand(N_ADAPTERS, 4, 5)], [torch.randn(N_ADAPTERS, 4, 5)]
    out = lora_inner_step(params, grads, 0.3, backend="triton")
    assert_all_close(out, lora_inner_step_reference(params, grads, 0.3), "broadcast")
    with pytest.raises(ValueError, match=r"params\[0\]'s adapter slices overlap"):
        lora_inner_step(params, grads, 0.3, inplace=True, backend="triton")


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda: torch.zeros(3, 10)[:, 1:7].unflatten(1, (2, 3)), True),  # flat-buffer view
        (lambda: torch.zeros(4, 5).expand(3, 4, 5), True),  # adapter stride 0
        (lambda: torch.zeros(3, 1, 5).transpose(1, 2), True),  # size-1 dim with stride 5
        (lambda: torch.zeros(3, 0, 4).transpose(1, 2), True),  # empty slices
        (lambda: torch.zeros(3, 6, 5).transpose(1, 2), False),
        (lambda: torch.zeros(3, 8)[:, ::2], False),
        (lambda: torch.zeros(3, 1, 5).expand(3, 4, 5), False),  # repeated rows within an adapter
    ],
)
def test_slice_layout_predicate(make, expected):
    assert slices_contiguous(make()) is expected


@pytest.mark.interpreter
@pytest.mark.parametrize("max_grad_norm", [None, 2.0])
@pytest.mark.parametrize("lr_kind", ["per_tensor", "per_adapter_tensor"])
def test_gradients_match_reference(lr_kind, max_grad_norm):
    params, grads = make_tensors(requires_grad=True)
    lr = make_lr(lr_kind, requires_grad=True)
    kwargs = dict(weight_decay=0.1, max_grad_norm=max_grad_norm)
    out = lora_inner_step(params, grads, lr, backend="triton", **kwargs)
    out_ref = lora_inner_step_reference(params, grads, lr, **kwargs)
    d_out = [torch.randn_like(o) for o in out]
    inputs = [*params, *grads, lr]
    got = torch.autograd.grad(out, inputs, d_out)
    want = torch.autograd.grad(out_ref, inputs, d_out)
    assert_all_close(got[:-1], want[:-1], "d params, grads", rtol=1e-5, atol=1e-6)
    assert_all_close(got[-1:], want[-1:], "d lr", rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_gradient_of_lr_only():
    """Only lr requires grad (meta-learned rates with detached params): d lr = −⟨d, g + λp⟩."""
    params, grads = make_tensors()
    lr = make_lr("per_tensor", requires_grad=True)
    out = lora_inner_step(params, grads, lr, weight_decay=0.2, backend="triton")
    (d_lr,) = torch.autograd.grad(sum(o.sum() for o in out), lr)
    expected = torch.stack([-(g + 0.2 * p).sum() for p, g in zip(params, grads)])
    torch.testing.assert_close(d_lr, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_gradcheck_float64(max_grad_norm):
    shapes = [(2, 3), (5,)]
    params, grads = make_tensors(shapes=shapes, n_adapters=2, dtype=torch.float64, requires_grad=True)
    lr = make_lr("per_adapter_tensor", n_tensors=2, n_adapters=2, dtype=torch.float64, requires_grad=True)

    def step(lr, *tensors):
        kwargs = dict(weight_decay=0.1, max_grad_norm=max_grad_norm, backend="triton")
        return tuple(lora_inner_step(list(tensors[:2]), list(tensors[2:]), lr, **kwargs))

    assert torch.autograd.gradcheck(step, (lr, *params, *grads), fast_mode=True)


@pytest.mark.interpreter
def test_triton_backward_refuses_double_backward_and_reference_allows_it():
    params, grads = make_tensors(shapes=[(4,)], requires_grad=True)
    lr = make_lr("per_tensor", n_tensors=1, requires_grad=True)
    for backend, fails in (("triton", True), ("torch", False)):
        (out,) = lora_inner_step(params, grads, lr, max_grad_norm=1.0, backend=backend)
        (d_lr,) = torch.autograd.grad((out**2).sum(), lr, create_graph=True)
        if fails:
            with pytest.raises(RuntimeError, match="once_differentiable"):
                d_lr.sum().backward()
        else:
            d_lr.sum().backward()
            assert grads[0].grad is not None and torch.isfinite(grads[0].grad).all()


@pytest.mark.interpreter
@pytest.mark.parametrize("max_grad_norm,launches", [(None, 1), (1.0, 2)])
def test_constant_number_of_launches(monkeypatch, max_grad_norm, launches):
    counted = []
    original = _StepPlan.launch

    def counting(self, kernel, *args, **meta):
        counted.append(kernel)
        original(self, kernel, *args, **meta)

    monkeypatch.setattr(_StepPlan, "launch", counting)
    for n_tensors in (2, 40):
        counted.clear()
        params, grads = make_tensors(shapes=[(3,)] * n_tensors)
        lora_inner_step(params, grads, 0.1, max_grad_norm=max_grad_norm, backend="triton")
        assert len(counted) == launches, n_tensors


BAD_INPUTS = [
    ("params not list", dict(params=torch.zeros(3, 2)), TypeError, "params"),
    ("length mismatch", dict(grads=[torch.zeros(3, 2)] * 2), ValueError, "equal length"),
    ("empty", dict(params=[], grads=[]), ValueError, "params"),
    ("grad shape", dict(grads=[torch.zeros(3, 4)]), ValueError, r"grads\[0\]"),
    ("adapters", dict(params=[torch.zeros(2, 2)], grads=[torch.zeros(2, 2)], lr=0.1), ValueError, None),
    ("grad dtype", dict(grads=[torch.zeros(3, 2, dtype=torch.float64)]), TypeError, r"grads\[0\]"),
    ("integer params", dict(params=[torch.zeros(3, 2, dtype=torch.int64)]), TypeError, r"params\[0\]"),
    ("lr nan", dict(lr=float("nan")), ValueError, "lr"),
    ("lr tensor inf", dict(lr=torch.tensor([float("inf")])), ValueError, "lr"),
    ("lr shape", dict(lr=torch.ones(2)), ValueError, "lr"),
    ("lr int tensor", dict(lr=torch.ones(1, dtype=torch.int64)), TypeError, "lr"),
    ("lr string", dict(lr="0.1"), TypeError, "lr"),
    ("weight_decay inf", dict(weight_decay=float("inf")), ValueError, "weight_decay"),
    ("max_grad_norm zero", dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
    ("max_grad_norm nan", dict(max_grad_norm=float("nan")), ValueError, "max_grad_norm"),
]  # fmt: skip


@pytest.mark.parametrize("what,changes,error,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_inputs_raise_naming_the_argument(what, changes, error, match, backend):
    args = dict(params=[torch.zeros(3, 2)], grads=[torch.zeros(3, 2)], lr=0.1)
    args.update(changes)
    if what == "adapters":  # second tensor with a different adapter count
        args["params"] = [torch.zeros(3, 2), torch.zeros(2, 2)]
        args["grads"] = [torch.zeros(3, 2), torch.zeros(2, 2)]
        match = r"params\[1\]"
    with pytest.raises(error, match=match):
        lora_inner_step(**args, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_gpu_matches_reference(dtype, tol):
    shapes = [(16, 896), (4864, 16), (7,), (256, 4864)]
    params, grads = make_tensors(shapes=shapes, n_adapters=8, dtype=dtype, device="cuda", requires_grad=True)
    lr = make_lr("per_adapter_tensor", n_tensors=4, n_adapters=8).cuda().requires_grad_()
    kwargs = dict(weight_decay=0.01, max_grad_norm=50.0)
    out = lora_inner_step(params, grads, lr, backend="triton", **kwargs)
    # The reference in float64: the lr gradient sums ~1.2M products, and two fp32 summation orders
    # differ by more than fp32 tolerances allow; against float64 only the kernel's own error counts.
    wide = [[t.detach().double().requires_grad_() for t in ts] for ts in (params, grads)]
    lr_wide = lr.detach().double().requires_grad_()
    out_ref = lora_inner_step_reference(*wide, lr_wide, **kwargs)
    assert_all_close([o.double() for o in out], [o.detach() for o in out_ref], "out", rtol=tol, atol=tol)
    d_out = [torch.randn_like(o).to(dtype) for o in out]  # rounded once, the same upstream for both
    got = torch.autograd.grad(out, [*params, *grads, lr], d_out)
    want = torch.autograd.grad(out_ref, [*wide[0], *wide[1], lr_wide], [d.double() for d in d_out])
    assert_all_close([g.double() for g in got], list(want), "grads", rtol=tol, atol=tol * 10)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_clipped_step_of_an_all_zero_gradient_has_finite_gradients(backend):
    """‖g‖ = 0 with clipping: c = 1 (no clipping), so ∂out/∂g = −lr (not NaN from √0's derivative)."""
    params, grads = make_tensors(requires_grad=True)
    with torch.no_grad():
        for g in grads:
            g[1] = 0.0  # adapter 1 has an all-zero gradient, the others are clipped
    lr = make_lr("per_tensor", requires_grad=True)
    out = lora_inner_step(params, grads, lr, max_grad_norm=2.0, backend=backend)
    d_out = [torch.randn_like(o) for o in out]
    got = torch.autograd.grad(out, [*grads, lr], d_out)
    assert all(bool(t.isfinite().all()) for t in got)
    for i, (d_grad, d) in enumerate(zip(got, d_out)):
        torch.testing.assert_close(d_grad[1], -lr[i].detach() * d[1], msg=f"d grads[{i}] of the zero adapter")
    want = torch.autograd.grad(lora_inner_step_reference(params, grads, lr, max_grad_norm=2.0), [*grads, lr], d_out)
    assert_all_close(got, want, "d grads, d lr", rtol=1e-5, atol=1e-5)


def _overlapping_cases():
    buf = torch.zeros(N_ADAPTERS, 10)
    shared = torch.zeros(N_ADAPTERS, 4)
    return {
        "two params share memory": ([buf[:, 0:6], buf[:, 4:10]], None),
        "the same tensor twice": ([shared, shared], None),
        "a param is another tensor's grad": ([shared, torch.zeros(N_ADAPTERS, 4)], [torch.ones(N_ADAPTERS, 4), shared]),
        "adapter slices overlap": ([torch.zeros(4).expand(N_ADAPTERS, 4)], None),
        "transposed views share memory": ([buf[:, 0:6].unflatten(1, (2, 3)).transpose(1, 2), buf[:, 5:7]], None),
    }


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", list(_overlapping_cases()))
def test_inplace_refuses_overlapping_outputs_on_both_backends(case, backend):
    """An in-place step whose outputs overlap each other or a gradient has no single right answer
    (it depends on the order of writes): both backends refuse it with the same ValueError."""
    params, grads = _overlapping_cases()[case]
    grads = grads or [torch.ones_like(p) for p in params]
    if case == "transposed views share memory" and backend == "triton":
        pytest.skip("the Triton path refuses non-contiguous slices for inplace=True first")
    with pytest.raises(ValueError, match="overlap"):
        lora_inner_step(params, grads, 0.5, inplace=True, backend=backend)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_inplace_with_disjoint_views_and_a_gradient_of_itself(backend):
    """Views of one buffer that interleave but do not overlap are fine, and so is a gradient that is its own param
    (every element is read before it is written)."""
    flat = torch.randn(N_ADAPTERS, 12)
    params = [flat[:, 0:5], flat[:, 5:12]]
    expected = lora_inner_step_reference(params, [p.clone() for p in params], 0.25, weight_decay=0.1)
    lora_inner_step(params, params, 0.25, weight_decay=0.1, inplace=True, backend=backend)
    assert_all_close(params, expected, "self-gradient")
