"""One inner SGD step on every adapter tensor: φ' = φ − lr ⊙ (c·g + weight_decay·φ).

Semantics::

    params[i], grads[i]   (n_adapters, ...)     same shape, one dtype for all tensors
    lr                    float | (n_tensors,) | (n_adapters, n_tensors)
    c[a]                  = min(1, max_grad_norm / (‖g[a]‖ + 1e-6)), ‖g[a]‖ the global norm of
                            adapter a's gradients over all tensors (c = 1 without clipping)
    out[i][a]             = params[i][a] − lr[a, i] · (c[a] · grads[i][a] + weight_decay · params[i][a])

Memory layout: every tensor only needs each adapter's slice ``t[a]`` to be contiguous; the
adapter stride ``t.stride(0)`` is free. So params and grads may be views of one flat
(n_adapters, P) buffer, ``flat[:, start:end].unflatten(1, shape)`` (stride(0) = P), and
``inplace=True`` then updates that buffer through the views. Inputs whose slices are not
contiguous are copied (out-of-place) or rejected with a ValueError (``inplace=True``).

The Triton path handles any number of separate tensors in a constant number of launches: a
device table of data pointers (one row per (adapter, tensor) pair: the address of ``t[a]``) and
a table of chunks (pair, adapter, element range within the slice) drive one 1-D grid; kernels
turn the int64 addresses back into typed pointers. Chunks are ordered by adapter, then tensor,
so per-(adapter, tensor) sums are written to fixed slots and reduced in a fixed order
(deterministic, no atomics).

Launches, whatever the number of tensors: forward 1 Triton kernel (+1 norm kernel and a few
tiny (n_adapters,)-sized torch ops when clipping); backward at most 2 Triton kernels.
Out-of-place outputs are contiguous views of one flat buffer (one allocation).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from perk_kernels._utils import (
    check_finite_scalar,
    check_tensor,
    choose_backend,
    interpret_mode,
    slices_contiguous,
    with_contiguous_slices,
)

# Reference and kernels add this to the norm before dividing (no division by zero for zero grads).
CLIP_EPS = 1e-6
_CHUNK_COLUMNS = 5  # pair (= adapter·n_tensors + tensor), adapter, start, end, slot

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _chunk(chunks_ptr, ALIGN: tl.constexpr):
    """(pair, adapter, start, end, slot) of this program's chunk (pair = adapter·n_tensors + tensor)."""
    row = chunks_ptr + tl.program_id(0) * 5
    start = tl.load(row + 2)
    end = tl.load(row + 3)
    if ALIGN > 1:
        # Both ends aligned: lets the compiler use vector loads (the tail mask is then constant per vector).
        start = tl.multiple_of(start, ALIGN)
        end = tl.multiple_of(end, ALIGN)
    return tl.load(row), tl.load(row + 1), start, end, tl.load(row + 4)


@triton.jit
def _tensor_ptr(table_ptr, pair, like_ptr, ALIGN: tl.constexpr):
    """The typed pointer to one adapter's slice of one tensor, from an int64 address table."""
    ptr = tl.load(table_ptr + pair).to(like_ptr.dtype, bitcast=True)
    if ALIGN > 1:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _sq_norm_kernel(
    chunks_ptr, grad_table, like_ptr, partial_ptr, ACC: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr
):
    """partial[slot] = Σ g² over one chunk."""
    pair, adapter, start, end, slot = _chunk(chunks_ptr, ALIGN)
    g_ptr = _tensor_ptr(grad_table, pair, like_ptr, ALIGN)
    acc = tl.zeros((BLOCK,), dtype=ACC)
    for s in range(start, end, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + offs, mask=offs < end, other=0.0).to(ACC)
        acc += g * g
    tl.store(partial_ptr + slot, tl.sum(acc, axis=0))


@triton.jit
def _inner_step_kernel(
    chunks_ptr, param_table, grad_table, out_table, like_ptr, lr_ptr, clip_ptr, weight_decay,
    CLIP: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """out = p − lr[a, i] · (clip[a] · g + weight_decay · p) over one chunk (out may alias p)."""
    pair, adapter, start, end, slot = _chunk(chunks_ptr, ALIGN)
    p_ptr = _tensor_ptr(param_table, pair, like_ptr, ALIGN)
    g_ptr = _tensor_ptr(grad_table, pair, like_ptr, ALIGN)
    out_ptr = _tensor_ptr(out_table, pair, like_ptr, ALIGN)
    lr = tl.load(lr_ptr + pair).to(ACC)  # lr is a contiguous (n_adapters, n_tensors) table
    clip = tl.load(clip_ptr + adapter).to(ACC) if CLIP else 1.0
    for s in range(start, end, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        mask = offs < end
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        # Computed in ACC (fp32 or fp64) and rounded once to the parameters' dtype.
        tl.store(out_ptr + offs, (p - lr * (clip * g + weight_decay * p)).to(like_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _step_dots_kernel(
    chunks_ptr, dout_table, grad_table, param_table, like_ptr, dg_partial_ptr, dp_partial_ptr,
    NEED_DP: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """dg_partial[slot] = ⟨d, g⟩ and dp_partial[slot] = ⟨d, p⟩ over one chunk (d = ∂L/∂out)."""
    pair, adapter, start, end, slot = _chunk(chunks_ptr, ALIGN)
    d_ptr = _tensor_ptr(dout_table, pair, like_ptr, ALIGN)
    g_ptr = _tensor_ptr(grad_table, pair, like_ptr, ALIGN)
    p_ptr = _tensor_ptr(param_table, pair, like_ptr, ALIGN)
    acc_g = tl.zeros((BLOCK,), dtype=ACC)
    acc_p = tl.zeros((BLOCK,), dtype=ACC)
    for s in range(start, end, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        mask = offs < end
        d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(ACC)
        acc_g += d * tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        if NEED_DP:
            acc_p += d * tl.load(p_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(dg_partial_ptr + slot, tl.sum(acc_g, axis=0))
    if NEED_DP:
        tl.store(dp_partial_ptr + slot, tl.sum(acc_p, axis=0))


@triton.jit
def _step_backward_kernel(
    chunks_ptr, dout_table, grad_table, dparam_table, dgrad_table, like_ptr, lr_ptr, clip_ptr, coef_ptr,
    weight_decay,
    NEED_DPARAM: tl.constexpr, NEED_DGRAD: tl.constexpr, CLIP: tl.constexpr,
    ACC: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """dparam = d · (1 − lr·wd);  dgrad = −lr · clip · d + coef[a] · g  (coef: clipping's own term)."""
    pair, adapter, start, end, slot = _chunk(chunks_ptr, ALIGN)
    # Tables of outputs that are not needed hold valid dummy addresses; they are never written.
    d_ptr = _tensor_ptr(dout_table, pair, like_ptr, ALIGN)
    g_ptr = _tensor_ptr(grad_table, pair, like_ptr, ALIGN)
    dparam_ptr = _tensor_ptr(dparam_table, pair, like_ptr, ALIGN)
    dgrad_ptr = _tensor_ptr(dgrad_table, pair, like_ptr, ALIGN)
    lr = tl.load(lr_ptr + pair).to(ACC)  # lr is a contiguous (n_adapters, n_tensors) table
    clip = tl.load(clip_ptr + adapter).to(ACC) if CLIP else 1.0
    coef = tl.load(coef_ptr + adapter).to(ACC) if CLIP else 0.0
    out_ty = like_ptr.dtype.element_ty
    for s in range(start, end, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        mask = offs < end
        d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(ACC)
        if NEED_DPARAM:
            tl.store(dparam_ptr + offs, (d * (1.0 - lr * weight_decay)).to(out_ty), mask=mask)
        if NEED_DGRAD:
            dgrad = -lr * clip * d
            if CLIP:
                dgrad += coef * tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
            tl.store(dgrad_ptr + offs, dgrad.to(out_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch tables
# ----------------------------------------------------------------------------------------------


def _block_sizes() -> tuple[int, int]:
    """(BLOCK, CHUNK): elements per vector op and per program."""
    if interpret_mode():
        return 64, 128  # tiny, so CPU tests cover several chunks per slice and blocks per chunk
    return 1024, 16384


@functools.lru_cache(maxsize=64)
def _chunk_table(
    per_adapter: tuple[int, ...], n_adapters: int, chunk: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """(n_chunks, 5) int64 [pair, adapter, start, end, slot] ordered by adapter then tensor, and
    the number of slots per pair (pair = adapter·n_tensors + tensor, slot = pair·slots + c).

    start and end count elements from the start of the adapter's slice ``t[a]``."""
    n_tensors = len(per_adapter)
    slots = max(1, max(triton.cdiv(n, chunk) for n in per_adapter))
    rows = [
        (a * n_tensors + i, a, c * chunk, min((c + 1) * chunk, n), (a * n_tensors + i) * slots + c)
        for a in range(n_adapters)
        for i, n in enumerate(per_adapter)
        for c in range(triton.cdiv(n, chunk))
    ]
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, _CHUNK_COLUMNS)
    return _to_device(table, device), slots


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned + non_blocking: no host/device sync for the small per-call tables.
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


def _address_table(tensors: list[torch.Tensor], n_adapters: int, device: torch.device) -> torch.Tensor:
    """(n_adapters·n_tensors,) int64: the address of ``tensors[i][a]`` at row a·n_tensors + i."""
    bases = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
    adapter_bytes = torch.tensor([t.stride(0) * t.element_size() for t in tensors], dtype=torch.int64)
    table = bases + torch.arange(n_adapters, dtype=torch.int64)[:, None] * adapter_bytes
    return _to_device(table.reshape(-1), device)


def _aligned(tensors: list[torch.Tensor], per_adapter: tuple[int, ...], chunk: int) -> int:
    """Vector width the kernels may assume (16-byte aligned slice addresses and chunk ends), else 1."""
    elements = 16 // tensors[0].element_size()
    ok = all(
        t.data_ptr() % 16 == 0 and (t.shape[0] <= 1 or t.stride(0) % elements == 0) for t in tensors
    ) and all(n % elements == 0 for n in per_adapter)
    return elements if ok and chunk % elements == 0 else 1


class _StepPlan:
    """Everything one call's launches share: tables, block sizes, dtypes."""

    def __init__(self, params: list[torch.Tensor], extra: list[torch.Tensor]):
        self.device = params[0].device
        self.n_adapters = params[0].shape[0]
        self.n_tensors = len(params)
        self.per_adapter = tuple(math.prod(p.shape[1:]) for p in params)
        self.block, chunk = _block_sizes()
        self.chunks, self.slots = _chunk_table(self.per_adapter, self.n_adapters, chunk, self.device)
        self.n_chunks = self.chunks.shape[0]
        self.like = params[0]
        self.acc = tl.float64 if params[0].dtype == torch.float64 else tl.float32
        self.acc_torch = torch.float64 if params[0].dtype == torch.float64 else torch.float32
        self.align = _aligned(params + extra, self.per_adapter, chunk)

    def table(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return _address_table(tensors, self.n_adapters, self.device)

    def flat_like(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Fresh tensors shaped like ``params``: views of one flat buffer (one allocation, aligned)."""
        per_tensor = [self.n_adapters * n for n in self.per_adapter]
        flat = torch.empty(sum(per_tensor), dtype=params[0].dtype, device=self.device)
        return [v.view(p.shape) for v, p in zip(torch.split(flat, per_tensor), params)]

    def slot_sums(self, kernel_partial: torch.Tensor) -> torch.Tensor:
        """(n_adapters, n_tensors) sums of per-chunk partials, in a fixed order."""
        return kernel_partial.view(self.n_adapters, self.n_tensors, self.slots).sum(-1)

    def zeros_partial(self) -> torch.Tensor:
        return torch.zeros(self.n_adapters * self.n_tensors * self.slots, dtype=self.acc_torch, device=self.device)

    def launch(self, kernel, *args, **meta) -> None:
        if self.n_chunks:
            kernel[(self.n_chunks,)](self.chunks, *args, ACC=self.acc, ALIGN=self.align, BLOCK=self.block, **meta)


def _squared_norms(plan: _StepPlan, grads: list[torch.Tensor], grad_table: torch.Tensor) -> torch.Tensor:
    """(n_adapters,) global squared gradient norm of each adapter."""
    partial = plan.zeros_partial()
    plan.launch(_sq_norm_kernel, grad_table, plan.like, partial)
    return plan.slot_sums(partial).sum(1)


def _clip_factors(sq_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    return (max_grad_norm / (sq_norms.sqrt() + CLIP_EPS)).clamp(max=1.0)


def _step_forward(plan, params, grads, outs, lr_table, weight_decay, max_grad_norm) -> torch.Tensor | None:
    """Launch the step (out may be params); returns the squared norms when clipping."""
    grad_table = plan.table(grads)
    sq_norms = clip = None
    if max_grad_norm is not None:
        sq_norms = _squared_norms(plan, grads, grad_table)
        clip = _clip_factors(sq_norms, max_grad_norm)
    plan.launch(
        _inner_step_kernel,
        plan.table(params), grad_table, plan.table(outs), plan.like, lr_table,
        clip if clip is not None else lr_table, weight_decay,
        CLIP=clip is not None,
    )  # fmt: skip
    return sq_norms


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


class _InnerStepFunction(torch.autograd.Function):
    """Out-of-place step, differentiable w.r.t. params, grads and lr (first order, Triton backward)."""

    @staticmethod
    def forward(ctx, lr_table, weight_decay, max_grad_norm, n_tensors, *tensors):
        params, grads = list(tensors[:n_tensors]), list(tensors[n_tensors:])
        plan = _StepPlan(params, grads)
        outs = plan.flat_like(params)
        sq_norms = _step_forward(plan, params, grads, outs, lr_table, weight_decay, max_grad_norm)
        ctx.save_for_backward(lr_table, sq_norms, *params, *grads)
        ctx.weight_decay, ctx.max_grad_norm, ctx.n_tensors = weight_decay, max_grad_norm, n_tensors
        return tuple(outs)

    @staticmethod
    @once_differentiable  # use backend="torch" where the step itself must be differentiated twice
    def backward(ctx, *douts):
        lr_table, sq_norms, *tensors = ctx.saved_tensors
        n_tensors, weight_decay, max_grad_norm = ctx.n_tensors, ctx.weight_decay, ctx.max_grad_norm
        params, grads = tensors[:n_tensors], tensors[n_tensors:]
        need_lr = ctx.needs_input_grad[0]
        need_dparam = any(ctx.needs_input_grad[4 : 4 + n_tensors])
        need_dgrad = any(ctx.needs_input_grad[4 + n_tensors :])
        douts = [with_contiguous_slices(d) for d in douts]
        plan = _StepPlan(params, grads + douts)
        clipping = max_grad_norm is not None
        clip = _clip_factors(sq_norms, max_grad_norm) if clipping else None
        dout_table, grad_table = plan.table(douts), plan.table(grads)

        d_lr = coef = None
        if need_lr or (need_dgrad and clipping):
            # Per-(adapter, tensor) ⟨d, g⟩ (and ⟨d, p⟩ for the lr gradient with weight decay).
            need_dp = need_lr and weight_decay != 0.0
            dg_partial = plan.zeros_partial()
            dp_partial = plan.zeros_partial() if need_dp else dg_partial
            plan.launch(
                _step_dots_kernel,
                dout_table, grad_table, plan.table(params), plan.like, dg_partial, dp_partial,
                NEED_DP=need_dp,
            )  # fmt: skip
            dot_dg = plan.slot_sums(dg_partial)  # (n_adapters, n_tensors)
            if need_lr:
                d_lr = -(dot_dg * (clip[:, None] if clipping else 1.0))
                if need_dp:
                    d_lr = d_lr - weight_decay * plan.slot_sums(dp_partial)
                d_lr = d_lr.to(lr_table.dtype)
            if clipping:
                # c = M / (‖g‖ + eps) where that is < 1: ∂L/∂g += S · M / ((‖g‖ + eps)² ‖g‖) · g,
                # S = Σ_i lr[a, i] ⟨d, g⟩; zero where c was clamped to 1 (or the norm is zero).
                norm = sq_norms.sqrt()
                s = (lr_table.to(dot_dg.dtype) * dot_dg).sum(1)
                active = (max_grad_norm / (norm + CLIP_EPS) < 1.0) & (norm > 0)
                coef = torch.where(active, s * max_grad_norm / ((norm + CLIP_EPS) ** 2 * norm), 0.0)

        d_params = plan.flat_like(params) if need_dparam else None
        d_grads = plan.flat_like(grads) if need_dgrad else None
        if need_dparam or need_dgrad:
            plan.launch(
                _step_backward_kernel,
                dout_table, grad_table,
                plan.table(d_params) if need_dparam else dout_table,
                plan.table(d_grads) if need_dgrad else dout_table,
                plan.like, lr_table, clip if clipping else lr_table, coef if coef is not None else lr_table,
                weight_decay,
                NEED_DPARAM=need_dparam, NEED_DGRAD=need_dgrad, CLIP=clipping,
            )  # fmt: skip
        return (d_lr, None, None, None, *(d_params or [None] * n_tensors), *(d_grads or [None] * n_tensors))


# ----------------------------------------------------------------------------------------------
# Entry point and reference
# ----------------------------------------------------------------------------------------------


def _lr_table(lr, n_adapters: int, n_tensors: int, like: torch.Tensor) -> torch.Tensor:
    """lr as an (n_adapters, n_tensors) tensor (differentiable w.r.t. a tensor lr)."""
    if not isinstance(lr, torch.Tensor):
        return torch.full((n_adapters, n_tensors), float(lr), dtype=torch.float32, device=like.device)
    if lr.dim() == 1:
        return lr.unsqueeze(0).expand(n_adapters, n_tensors)
    return lr


def _check_inputs(params, grads, lr, weight_decay, max_grad_norm) -> None:
    for name, seq in (("params", params), ("grads", grads)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list of tensors, got {type(seq).__name__}")
    if len(params) != len(grads):
        raise ValueError(f"params and grads must have equal length, got {len(params)} and {len(grads)}")
    if not params:
        raise ValueError("params must not be empty")
    first = check_tensor("params[0]", params[0])
    if first.dim() < 1:
        raise ValueError("params[0] must have a leading adapter dimension, got a 0-d tensor")
    if not first.is_floating_point():
        raise TypeError(f"params[0] must be a floating-point tensor, got {first.dtype}")
    n_adapters = first.shape[0]
    for i, (p, g) in enumerate(zip(params, grads)):
        check_tensor(f"params[{i}]", p)
        check_tensor(f"grads[{i}]", g)
        if p.dim() < 1 or p.shape[0] != n_adapters:
            raise ValueError(f"params[{i}] must have shape (n_adapters={n_adapters}, ...), got {tuple(p.shape)}")
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}] must have params[{i}]'s shape {tuple(p.shape)}, got {tuple(g.shape)}")
        for name, t in ((f"params[{i}]", p), (f"grads[{i}]", g)):
            if t.dtype != first.dtype:
                raise TypeError(f"{name} must have dtype {first.dtype} (all tensors share one), got {t.dtype}")
            if t.device != first.device:
                raise ValueError(f"{name} is on {t.device} but params[0] is on {first.device}")
    if isinstance(lr, torch.Tensor):
        if not lr.is_floating_point():
            raise TypeError(f"lr must be a floating-point tensor, got {lr.dtype}")
        if lr.device != first.device:
            raise ValueError(f"lr is on {lr.device} but params[0] is on {first.device}")
        if tuple(lr.shape) not in ((len(params),), (n_adapters, len(params))):
            raise ValueError(
                f"lr must have shape ({len(params)},) or ({n_adapters}, {len(params)}), got {tuple(lr.shape)}"
            )
        if not bool(torch.isfinite(lr).all()):
            raise ValueError("lr must be finite, got non-finite values")
    else:
        check_finite_scalar("lr", lr)
    check_finite_scalar("weight_decay", weight_decay)
    if max_grad_norm is not None and check_finite_scalar("max_grad_norm", max_grad_norm) <= 0:
        raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")


def _check_inplace_layout(params: list[torch.Tensor]) -> None:
    """The kernel writes params through their adapter slices: each contiguous, none overlapping."""
    for i, p in enumerate(params):
        if not slices_contiguous(p):
            raise ValueError(
                f"params[{i}] must have contiguous adapter slices (params[{i}][a] contiguous) for "
                f"inplace=True, got shape {tuple(p.shape)} and strides {p.stride()}"
            )
        per_adapter = math.prod(p.shape[1:])
        if p.shape[0] > 1 and per_adapter > 0 and p.stride(0) < per_adapter:
            raise ValueError(
                f"params[{i}]'s adapter slices overlap in memory (stride(0)={p.stride(0)} < {per_adapter} "
                "elements per adapter); inplace=True needs each adapter stored separately"
            )


def _memory_spans(tensors: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, owner) byte ranges of the memory ``tensors`` address; owner = index in ``tensors``.

    One range per adapter slice where slices are contiguous (views of a flat buffer interleave
    without overlapping), else one conservative range per tensor (its whole extent). Slots
    without a range (empty tensors, the rest of a one-range tensor) hold empty ranges at the top
    of the address space, which sort last and overlap nothing. Host metadata only, in numpy
    (a few vector ops: the engine steps hundreds of tensors at once).
    """
    n_adapters = max(t.shape[0] for t in tensors)
    rows = []  # (base, adapter step, ranges, length) in bytes
    for t in tensors:
        size = t.element_size()
        if t.numel() == 0:
            rows.append((0, 0, 0, 0))
        elif slices_contiguous(t):
            rows.append((t.data_ptr(), t.stride(0) * size, t.shape[0], math.prod(t.shape[1:]) * size))
        else:
            low = sum(min(0, (n - 1) * s) for n, s in zip(t.shape, t.stride()))
            high = sum(max(0, (n - 1) * s) for n, s in zip(t.shape, t.stride()))
            rows.append((t.data_ptr() + low * size, 0, 1, (high - low + 1) * size))
    base, step, count, length = np.array(rows, dtype=np.int64).reshape(-1, 4).T
    adapter = np.arange(n_adapters, dtype=np.int64)
    starts = base[:, None] + adapter[None, :] * step[:, None]  # (n_tensors, n_adapters)
    ends = starts + length[:, None]
    unused = (adapter[None, :] >= count[:, None]) | (length[:, None] == 0)
    top = np.iinfo(np.int64).max
    starts[unused], ends[unused] = top, top
    owner = np.broadcast_to(np.arange(len(tensors))[:, None], starts.shape)
    return starts.ravel(), ends.ravel(), owner.ravel()


def _check_inplace_overlap(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """An in-place step writes params while reading params and grads: its result would depend
    on the order of the writes (the kernel's program order, the reference's tensor order)
    unless no output overlaps another output or any gradient. A gradient that is its own
    param (read, then written, element by element) is fine."""
    for i, p in enumerate(params):
        if not slices_contiguous(p) and torch._debug_has_internal_overlap(p) == 1:
            raise ValueError(f"params[{i}] overlaps itself in memory; inplace=True needs every element stored once")
    own = [g.data_ptr() == p.data_ptr() and g.shape == p.shape and g.stride() == p.stride() for p, g in zip(params, grads)]
    tensors = list(params) + [g for g, same in zip(grads, own) if not same]
    names = [f"params[{i}]" for i in range(len(params))] + [f"grads[{i}]" for i, same in enumerate(own) if not same]
    starts, ends, owner = _memory_spans(tensors)
    order = np.argsort(starts, kind="stable")
    starts, ends, owner = starts[order], ends[order], owner[order]
    is_param = owner < len(params)
    # A range overlaps an earlier-starting one iff it starts before the largest end so far: any
    # earlier range for a param, an earlier param's range for a gradient (gradients may share memory).
    end_any = np.maximum.accumulate(ends)
    end_param = np.maximum.accumulate(np.where(is_param, ends, np.iinfo(np.int64).min))
    clash = np.where(is_param[1:], starts[1:] < end_any[:-1], starts[1:] < end_param[:-1])
    if clash.any():
        k = int(np.argmax(clash)) + 1
        this = int(owner[k])
        earlier = (ends[:k] > starts[k]) & (is_param[:k] | bool(is_param[k]))
        other = int(owner[:k][earlier][0])
        detail = "its adapter slices overlap" if other == this else f"it overlaps {names[other]}"
        raise ValueError(
            f"inplace=True: {names[this]} shares memory with what the step reads or writes ({detail}); "
            "each param must be stored separately from every other param and gradient"
        )


def lora_inner_step_reference(params, grads, lr, *, weight_decay=0.0, max_grad_norm=None, inplace=False):
    """Plain-torch oracle of :func:`lora_inner_step` (same signature; twice differentiable)."""
    n_adapters = params[0].shape[0]
    lr = _lr_table(lr, n_adapters, len(params), params[0])
    if max_grad_norm is not None:
        # Norms in at least fp32 (bf16 squares would overflow / lose precision), fp64 for fp64.
        norm_dtype = torch.promote_types(params[0].dtype, torch.float32)
        sq = sum(g.to(norm_dtype).reshape(n_adapters, -1).pow(2).sum(1) for g in grads)  # (n_adapters,)
        # √ at 0 has an infinite derivative (0·∞ = NaN through the clamp): take it only where the
        # norm is positive. A zero gradient is not clipped (c = 1), as in the kernels' backward.
        positive = sq > 0
        norm = torch.where(positive, torch.where(positive, sq, 1.0).sqrt(), 0.0)
        clip = (max_grad_norm / (norm + CLIP_EPS)).clamp(max=1.0)
    else:
        clip = None
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        view = (n_adapters,) + (1,) * (p.dim() - 1)
        g_eff = g if clip is None else g * clip.view(view).to(g.dtype)
        update = lr[:, i].reshape(view).to(p.dtype) * (g_eff + weight_decay * p)
        if inplace:
            with torch.no_grad():
                p.sub_(update)
            out.append(p)
        else:
            out.append(p - update)
    return out


def lora_inner_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    lr: float | torch.Tensor,
    *,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    inplace: bool = False,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """One SGD step on all adapter tensors at once: ``φ − lr · (c·g + weight_decay · φ)``.

    Args:
        params: tensors of shape (n_adapters, ...), all of one float dtype and device. Views
            such as ``flat[:, start:end].unflatten(1, shape)`` of one (n_adapters, P) buffer
            work without copies: only each adapter's slice ``params[i][a]`` must be contiguous.
        grads: their gradients, same shapes and dtype (any layout; slices that are not
            contiguous are copied).
        lr: a finite float, a (n_tensors,) tensor (one rate per tensor) or an
            (n_adapters, n_tensors) tensor (per adapter and tensor).
        weight_decay: coupled L2 decay λ (the update uses g + λφ).
        max_grad_norm: if given, each adapter's gradients are scaled by
            c = min(1, max_grad_norm / (‖g_adapter‖ + 1e-6)), the norm taken over all its tensors.
        inplace: update ``params`` in place and return them (not differentiable: truncated steps).
            Views write through to their base buffer. On the Triton backend each params[i][a]
            must be contiguous and the adapters must not overlap (else a ValueError). On
            every backend no param may share memory with another param or with a gradient
            other than its own (the result would depend on the order of writes): a ValueError.
            Otherwise return new tensors, differentiable w.r.t. params, grads and lr (unrolled
            steps; the Triton backward is once-differentiable, the "torch" one twice).
        backend: "triton" or "torch" (see :func:`perk_kernels.choose_backend`).

    The Triton path makes a constant number of launches whatever the number of tensors.
    """
    _check_inputs(params, grads, lr, weight_decay, max_grad_norm)
    max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
    weight_decay = float(weight_decay)
    if choose_backend(backend, params[0].device) == "torch":
        if inplace:
            _check_inplace_overlap(params, grads)
        return lora_inner_step_reference(
            params, grads, lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm, inplace=inplace
        )
    params, grads = list(params), list(grads)
    acc_dtype = torch.promote_types(params[0].dtype, torch.float32)
    lr_table = _lr_table(lr, params[0].shape[0], len(params), params[0]).to(acc_dtype).contiguous()
    grads = [with_contiguous_slices(g) for g in grads]
    if inplace:
        _check_inplace_layout(params)
        _check_inplace_overlap(params, grads)
        with torch.no_grad():
            plan = _StepPlan(params, grads)
            _step_forward(plan, params, grads, params, lr_table, weight_decay, max_grad_norm)
        for p in params:
            torch.autograd.graph.increment_version(p)  # the kernel wrote p: invalidate saved copies
        return params
    params = [with_contiguous_slices(p) for p in params]
    return list(_InnerStepFunction.apply(lr_table, weight_decay, max_grad_norm, len(params), *params, *grads))
