"""One inner SGD step on a flat adapter buffer: φ' = φ − lr ⊙ (c·g + weight_decay·φ), per tensor group.

Semantics::

    params, grads   (n_adapters, P)        one float dtype and device; P = group_offsets[-1]
    group_offsets   G+1 Python ints        0 = o_0 ≤ o_1 ≤ … ≤ o_G = P: group k is columns [o_k, o_{k+1})
    lr              float | (G,) | (n_adapters, G)
    c[a]            = min(1, max_grad_norm / (‖g[a]‖ + 1e-6)), ‖g[a]‖ the global norm of adapter a's
                      gradient row (c = 1 without clipping)
    out[a, j]       = params[a, j] − lr[a, k] · (c[a] · grads[a, j] + weight_decay · params[a, j])
                      for every column j of group k

This is the engine's layout (:class:`perk.lora.AdapterLayout`) and its inner SGD rule
(docs/design.md §2): all adapter tensors of a batch live in one flat buffer, each LoRA module's A
then B a group of columns, with one learned rate per (adapter, group). The rule's pieces live here
once, for the engine too: the clip factor and its derivative (:func:`inner_step_clip`,
:func:`inner_step_clip_jvp`: what the meta-gradient walk back differentiates) and the direction
c·g + λφ (:func:`inner_step_direction`).

The Triton path indexes the flat buffers directly (row a starts at a·P, int64 offsets). One
1-D grid of ``n_adapters × n_chunks`` programs is driven by a small cached table of chunks
``(group, start, end, slot)`` that never cross a group border (:func:`perk_kernels._utils.group_chunks`),
built on the host once per ``group_offsets``. The clipping norms' per-chunk sums are written to
fixed slots and reduced in a fixed order: deterministic, no atomics.

Launches: 1 Triton kernel (+1 norm kernel and a few tiny (n_adapters,)-sized torch ops when
clipping). The kernels serve steps without a graph; a differentiated step is the torch reference
(twice differentiable, what the exact meta-gradient needs). No host/device synchronisation: a
float lr is checked on the host, a tensor lr is not read (its values are not checked for finiteness).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from perk_kernels._flat_chunk import flat_chunk
from perk_kernels._utils import (
    check_finite_scalar,
    check_group_offsets,
    check_like,
    check_tensor,
    choose_backend,
    chunk_sizes,
    flat_alignment,
    group_chunks,
    memory_overlaps,
)

# ----------------------------------------------------------------------------------------------
# Triton kernels. Every kernel starts with the same launch arguments: the chunk table, the number
# of chunks, P (the row length), G and the slots per group; program p handles chunk p mod n_chunks
# of adapter p div n_chunks.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _sq_norm_kernel(
    chunks_ptr, n_chunks, P, G, slots, g_ptr, partial_ptr,
    ACC: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """partial[adapter, slot] = Σ g² over one chunk."""
    adapter, group, base, start, end, slot = flat_chunk(chunks_ptr, n_chunks, P, ALIGN)
    acc = tl.zeros((BLOCK,), dtype=ACC)
    for s in range(start, end, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + base + offs, mask=offs < end, other=0.0).to(ACC)
        acc += g * g
    tl.store(partial_ptr + adapter * G * slots + slot, tl.sum(acc, axis=0))


@triton.jit
def _inner_step_kernel(
    chunks_ptr, n_chunks, P, G, slots, p_ptr, g_ptr, out_ptr, lr_ptr, clip_ptr, weight_decay,
    CLIP: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """out = p − lr[a, k] · (clip[a] · g + weight_decay · p) over one chunk (out may be p)."""
    adapter, group, base, start, end, slot = flat_chunk(chunks_ptr, n_chunks, P, ALIGN)
    lr = tl.load(lr_ptr + adapter * G + group).to(ACC)  # lr is a contiguous (n_adapters, G) table
    clip = tl.load(clip_ptr + adapter).to(ACC) if CLIP else 1.0
    for s in range(start, end, BLOCK):
        offs = base + s + tl.arange(0, BLOCK)
        mask = s + tl.arange(0, BLOCK) < end
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        # Computed in ACC (fp32 or fp64) and rounded once to the output's dtype.
        tl.store(out_ptr + offs, (p - lr * (clip * g + weight_decay * p)).to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_MAX_PROGRAMS = 2**31 - 1  # a 1-D grid's limit


class _StepPlan:
    """What one call's launches share: the chunk table, block sizes, dtypes, alignment."""

    def __init__(self, offsets: tuple[int, ...], tensors: list[torch.Tensor]):
        like = tensors[0]
        self.device = like.device
        self.n_adapters, self.n_params = like.shape
        self.n_groups = len(offsets) - 1
        self.block, chunk = chunk_sizes()
        self.chunks, self.slots = group_chunks(offsets, chunk, self.device)
        self.n_chunks = self.chunks.shape[0]
        if self.n_adapters * self.n_chunks > _MAX_PROGRAMS:
            raise ValueError(
                f"{self.n_adapters} adapters × {self.n_chunks} chunks exceed a grid's {_MAX_PROGRAMS} programs: "
                "split the adapters over several calls"
            )
        self.acc = tl.float64 if like.dtype == torch.float64 else tl.float32
        self.acc_torch = torch.float64 if like.dtype == torch.float64 else torch.float32
        self.align = flat_alignment(tensors, offsets, chunk)

    def zeros_partial(self) -> torch.Tensor:
        return torch.zeros(self.n_adapters, self.n_groups * self.slots, dtype=self.acc_torch, device=self.device)

    def slot_sums(self, partial: torch.Tensor) -> torch.Tensor:
        """(n_adapters, G) sums of per-chunk partials, in a fixed order."""
        return partial.view(self.n_adapters, self.n_groups, self.slots).sum(-1)

    def launch(self, kernel, *args, **meta) -> None:
        programs = self.n_adapters * self.n_chunks
        if programs:
            kernel[(programs,)](
                self.chunks, self.n_chunks, self.n_params, self.n_groups, self.slots, *args,
                ACC=self.acc, ALIGN=self.align, BLOCK=self.block, **meta,
            )  # fmt: skip


def _step_forward(plan, params, grads, out, lr_table, weight_decay, max_grad_norm) -> None:
    """Launch the step (``out`` may be ``params``): the squared norms first when clipping."""
    clip = None
    if max_grad_norm is not None:
        partial = plan.zeros_partial()
        plan.launch(_sq_norm_kernel, grads, partial)
        clip = _clip_factor(plan.slot_sums(partial).sum(1).sqrt(), max_grad_norm)  # (n_adapters,)
    plan.launch(
        _inner_step_kernel, params, grads, out, lr_table, clip if clip is not None else lr_table, weight_decay,
        CLIP=clip is not None,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The update rule and its derivative: the one home of both (the engine's inner loop and its
# meta-gradient walk back use these; the reference and the kernels compute the same clip factor)
# ----------------------------------------------------------------------------------------------

# Added to the norm before dividing: the clip factor stays finite for an all-zero gradient.
CLIP_EPS = 1e-6


def _clip_factor(norm: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """c = min(1, M / (‖g‖ + CLIP_EPS)) from the norms; where c = 1 it carries no derivative."""
    factor = max_grad_norm / (norm + CLIP_EPS)
    return torch.where(factor < 1, factor, torch.ones_like(factor))


def inner_step_clip(grads: torch.Tensor, max_grad_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, k), each (n_adapters, 1), of the clipped direction D(g) = c(g)·g:

    * c = min(1, M / (‖g‖ + 1e-6)) per adapter (its gradient row's global norm, taken in at least
      fp32), with its graph when ``grads`` has one;
    * k = c / ((‖g‖ + 1e-6)·‖g‖) where it clips, 0 elsewhere (detached): the coefficient of the
      derivative ∂D/∂g = c·I − k·g gᵀ (:func:`inner_step_clip_jvp`).

    Where it does not clip (c = 1, an all-zero gradient included) nothing flows through c, so
    the derivatives stay finite at ‖g‖ = 0."""
    norm = grads.to(torch.promote_types(grads.dtype, torch.float32)).norm(dim=1, keepdim=True)
    clip = _clip_factor(norm, max_grad_norm)
    norm = norm.detach()
    coef = torch.where(clip < 1, clip.detach() / ((norm + CLIP_EPS) * norm.clamp_min(CLIP_EPS)), 0.0)
    return clip, coef


def inner_step_clip_jvp(grads: torch.Tensor, clip: torch.Tensor, coef: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(∂D/∂g) w = c·w − k·⟨g, w⟩·g per adapter for D(g) = c(g)·g, with (c, k) of
    :func:`inner_step_clip` at ``grads``; ∂D/∂g is symmetric, so this is also its transpose's
    product (what the meta-gradient walk back needs). All (n_adapters, P) but c, k (n_adapters, 1)."""
    return clip * w - coef * (grads * w).sum(1, keepdim=True) * grads


def inner_step_direction(params: torch.Tensor, grads: torch.Tensor, *, weight_decay: float = 0.0,
                         clip: torch.Tensor | None = None) -> torch.Tensor:
    """d = c·g + weight_decay·φ, the step's direction before the rates (:func:`lora_inner_step`
    takes φ − lr ⊙ d); ``clip``: the (n_adapters, 1) factors c of :func:`inner_step_clip`, None for 1."""
    direction = grads if clip is None else grads * clip.to(grads.dtype)
    if weight_decay:
        direction = direction + weight_decay * params
    return direction


# ----------------------------------------------------------------------------------------------
# Entry point and reference
# ----------------------------------------------------------------------------------------------


def expand_group_table(table: torch.Tensor, group_offsets: Sequence[int]) -> torch.Tensor:
    """(n, G) per-group values → (n, P) per column: column j of group k gets ``table[:, k]``.

    Differentiable (twice) w.r.t. ``table``; no index tensor and no host/device sync (one
    concatenation of per-group broadcast views).
    """
    check_tensor("table", table, ndim=2)
    offsets = tuple(group_offsets)
    if table.shape[1] != len(offsets) - 1:
        raise ValueError(f"table must have one column per group ({len(offsets) - 1}), got shape {tuple(table.shape)}")
    n = table.shape[0]
    pieces = [table[:, k : k + 1].expand(n, end - start) for k, (start, end) in enumerate(zip(offsets[:-1], offsets[1:]))]
    return torch.cat(pieces, dim=1)


def _lr_table(lr, n_adapters: int, n_groups: int, like: torch.Tensor) -> torch.Tensor:
    """lr as an (n_adapters, G) tensor (differentiable w.r.t. a tensor lr)."""
    if not isinstance(lr, torch.Tensor):
        dtype = torch.promote_types(like.dtype, torch.float32)  # fp64 steps keep a float lr's digits
        return torch.full((n_adapters, n_groups), float(lr), dtype=dtype, device=like.device)
    if lr.dim() == 1:
        return lr.unsqueeze(0).expand(n_adapters, n_groups)
    return lr


def _check_inputs(params, grads, lr, group_offsets, weight_decay, max_grad_norm, inplace) -> tuple[int, ...]:
    """Validates every argument (host metadata only, no device sync); returns the offsets as a tuple."""
    check_tensor("params", params, ndim=2)
    if not params.is_floating_point():
        raise TypeError(f"params must be a floating-point tensor, got {params.dtype}")
    check_like("grads", grads, "params", params)
    offsets = check_group_offsets(group_offsets, params.shape[1])
    n_adapters, n_groups = params.shape[0], len(offsets) - 1
    if isinstance(lr, torch.Tensor):
        if not lr.is_floating_point():
            raise TypeError(f"lr must be a floating-point tensor, got {lr.dtype}")
        if lr.device != params.device:
            raise ValueError(f"lr is on {lr.device} but params is on {params.device}")
        if tuple(lr.shape) not in ((n_groups,), (n_adapters, n_groups)):
            raise ValueError(
                f"lr must have shape (G,) = ({n_groups},) or (n_adapters, G) = ({n_adapters}, {n_groups}), "
                f"got {tuple(lr.shape)}"
            )
    else:
        check_finite_scalar("lr", lr)
    check_finite_scalar("weight_decay", weight_decay)
    if max_grad_norm is not None and check_finite_scalar("max_grad_norm", max_grad_norm) <= 0:
        raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
    if inplace:
        if not params.is_contiguous():
            raise ValueError(
                f"params must be contiguous for inplace=True (it is updated through its flat layout), got "
                f"shape {tuple(params.shape)} with strides {params.stride()}"
            )
        if memory_overlaps(params, grads):
            raise ValueError(
                "inplace=True: params shares memory with grads (the result would depend on the order of "
                "writes); pass a separate gradient buffer"
            )
    return offsets


def lora_inner_step_reference(
    params, grads, lr, group_offsets, *, weight_decay=0.0, max_grad_norm=None, inplace=False
) -> torch.Tensor:
    """Plain-torch oracle of :func:`lora_inner_step` (same signature; twice differentiable; no sync)."""
    n_adapters = params.shape[0]
    if isinstance(lr, torch.Tensor):
        lr_full = expand_group_table(_lr_table(lr, n_adapters, len(group_offsets) - 1, params), group_offsets)
        lr_full = lr_full.to(params.dtype)
    else:
        lr_full = params.new_full((), float(lr))  # a fill, not a host-to-device copy
    clip = None if max_grad_norm is None else inner_step_clip(grads, max_grad_norm)[0]
    direction = inner_step_direction(params, grads, weight_decay=weight_decay, clip=clip)
    if inplace:
        with torch.no_grad():
            return params.addcmul_(lr_full, direction, value=-1)
    return torch.addcmul(params, lr_full, direction, value=-1)


def lora_inner_step(
    params: torch.Tensor,
    grads: torch.Tensor,
    lr: float | torch.Tensor,
    group_offsets: Sequence[int],
    *,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    inplace: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """One SGD step on a flat adapter buffer: ``φ − lr · (c·g + weight_decay · φ)`` per tensor group.

    Args:
        params: (n_adapters, P) adapters, floating point.
        grads: (n_adapters, P) their gradients, same dtype and device (copied if not contiguous).
        lr: a finite float, a (G,) tensor (one rate per group) or an (n_adapters, G) tensor. A
            tensor lr is not checked for finite values (that would synchronise with the device).
        group_offsets: G+1 Python ints, 0 first, P last, non-decreasing: group k is the columns
            ``[group_offsets[k], group_offsets[k+1])`` (``perk.lora.AdapterLayout.offsets``).
        weight_decay: coupled L2 decay λ (the update uses g + λφ).
        max_grad_norm: if given, each adapter's gradient row is scaled by
            c = min(1, max_grad_norm / (‖g_adapter‖ + 1e-6)).
        inplace: update ``params`` in place and return it (not differentiable: truncated steps).
            ``params`` must then be contiguous and must not share memory with ``grads`` (else a
            ValueError). Otherwise return a new tensor, differentiable w.r.t. params, grads and lr.
        backend: "triton" or "torch" (see :func:`perk_kernels.choose_backend`) for a step without
            a graph. A step that builds one (out of place, grad mode on, an input requiring grad:
            the exact meta-gradient's unrolled steps) is the torch reference on every backend,
            twice differentiable; the Triton kernels have no backward.

    The Triton path makes a constant number of launches whatever the number of groups.
    """
    offsets = _check_inputs(params, grads, lr, group_offsets, weight_decay, max_grad_norm, inplace)
    max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
    weight_decay = float(weight_decay)
    differentiated = not inplace and torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (params, grads, lr)
    )
    if differentiated or choose_backend(backend, params.device) == "torch":
        return lora_inner_step_reference(
            params, grads, lr, offsets, weight_decay=weight_decay, max_grad_norm=max_grad_norm, inplace=inplace
        )
    acc_dtype = torch.promote_types(params.dtype, torch.float32)
    lr_table = _lr_table(lr, params.shape[0], len(offsets) - 1, params).to(acc_dtype).contiguous()
    grads = grads.contiguous()
    if not inplace:
        params = params.contiguous()
    out = params if inplace else torch.empty_like(params, memory_format=torch.contiguous_format)
    with torch.no_grad():
        _step_forward(_StepPlan(offsets, [params, grads]), params, grads, out, lr_table, weight_decay, max_grad_norm)
    if inplace:
        torch.autograd.graph.increment_version(params)  # the kernel wrote params: invalidate saved copies
    return out
