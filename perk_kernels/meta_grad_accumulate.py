"""Meta-gradient accumulation on flat adapter buffers, in place (one step of the walk back, docs/design.md §3).

Semantics, for every adapter a and tensor group k (columns ``[o_k, o_{k+1})`` of the flat
(n_adapters, P) buffers, ``o = group_offsets``), reading v before its update::

    lr_grad[a, k] = lr_grad[a, k] - <g[a, o_k:o_k+1], v[a, o_k:o_k+1]>   (dot and difference in acc, rounded once)
    v[a, :]      -= coef[a] * (g_plus[a, :] - g_minus[a, :])             (skipped when g_plus, g_minus are None)

acc is fp64 for fp64 tensors, fp32 otherwise. The engine passes ``coef[a] = ‖α⊙v‖ / (2ε)`` for the
finite-difference Hessian-vector product, whose two gradients g⁺, g⁻ were taken at φ ± ε·u with
u = α⊙v / ‖α⊙v‖ (``fd`` mode); truncated steps and ``first_order`` pass no g⁺, g⁻ (and no coef).
``lr_grad`` is the learning rates' gradient, one column per group.

Determinism: no atomics. The buffers are cut into chunks that never cross a group border (a
cached table, :func:`perk_kernels._utils.group_chunks`); each program writes the partial dot
product of one (adapter, chunk) to a fixed slot, and a second pass sums every (adapter, group)'s
slots in a fixed order, so for the same shapes and inputs both kernel backends give bitwise-equal
results run after run (they differ from the reference and from each other by summation order only).

Backends (chosen by :func:`perk_kernels.choose_backend`, like every op: argument, then
``PERK_KERNELS_BACKEND``, then automatic):

* ``"cuda"`` — the compiled extension ``perk_kernels._C`` (csrc/, built by setup.py when
  ``PERK_BUILD_CUDA=1``): two launches over the flat buffers, driven by the same chunk table. The
  automatic choice for CUDA tensors when it is importable; ``PERK_NO_CUDA_EXT=1`` turns it off.
* ``"triton"`` — the same two passes as Triton kernels. Automatic for CUDA tensors without the
  extension, and for CPU tensors under ``TRITON_INTERPRET=1``.
* ``"torch"`` — :func:`meta_grad_accumulate_reference`; the default on CPU.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import triton
import triton.language as tl

from perk_kernels._flat_chunk import flat_chunk
from perk_kernels._utils import (
    check_group_offsets,
    check_like,
    check_tensor,
    choose_backend,
    chunk_sizes,
    flat_alignment,
    group_chunks,
    next_power_of_2,
)

NO_CUDA_EXT_ENV = "PERK_NO_CUDA_EXT"
_MAX_PARTIALS_BLOCK = 1024
_MAX_PROGRAMS = 2**31 - 1  # a 1-D grid's limit


@triton.jit
def _meta_grad_chunk_kernel(
    chunks_ptr, n_chunks, P, G, slots, v_ptr, g_ptr, g_plus_ptr, g_minus_ptr, coef_ptr, partials_ptr,
    UPDATE_V: tl.constexpr, ACC: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program (adapter, chunk): partials[adapter, slot] = <g, v> over the chunk; v updated there."""
    adapter, _, base, start, end, slot = flat_chunk(chunks_ptr, n_chunks, P, ALIGN)
    scale = tl.load(coef_ptr + adapter).to(ACC) if UPDATE_V else 0.0
    acc = tl.zeros((BLOCK,), dtype=ACC)
    for s in range(start, end, BLOCK):
        cols = s + tl.arange(0, BLOCK)
        mask = cols < end
        offs = base + cols
        v_old = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
        acc += tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC) * v_old
        if UPDATE_V:
            # Difference in ACC: g_plus and g_minus are close, a low-precision difference would
            # lose most of its digits.
            g_plus = tl.load(g_plus_ptr + offs, mask=mask, other=0.0).to(ACC)
            g_minus = tl.load(g_minus_ptr + offs, mask=mask, other=0.0).to(ACC)
            tl.store(v_ptr + offs, (v_old - scale * (g_plus - g_minus)).to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(partials_ptr + adapter * G * slots + slot, tl.sum(acc, axis=0))


@triton.jit
def _meta_grad_sum_kernel(partials_ptr, lr_grad_ptr, G, slots, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Program (adapter, group): lr_grad[adapter, group] -= its slots' partials, in a fixed order."""
    pid = tl.program_id(0).to(tl.int64)  # = adapter·G + group
    first = pid * slots  # partials is (n_adapters, G·slots): this group's slots are contiguous
    total = tl.zeros((BLOCK,), dtype=ACC)
    for start in range(0, slots, BLOCK):
        index = start + tl.arange(0, BLOCK)
        total += tl.load(partials_ptr + first + index, mask=index < slots, other=0.0)
    lr_new = tl.load(lr_grad_ptr + pid).to(ACC) - tl.sum(total, axis=0)
    tl.store(lr_grad_ptr + pid, lr_new.to(lr_grad_ptr.dtype.element_ty))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch_table(offsets: tuple[int, ...], n_adapters: int, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """(chunk table, slots, chunk) for one call, checked against the 1-D grid's limit."""
    _, chunk = chunk_sizes()
    chunks, slots = group_chunks(offsets, chunk, device)
    if n_adapters * chunks.shape[0] > _MAX_PROGRAMS:
        raise ValueError(
            f"{n_adapters} adapters × {chunks.shape[0]} chunks exceed a grid's {_MAX_PROGRAMS} programs: "
            "split the adapters over several calls"
        )
    return chunks, slots, chunk


def meta_grad_accumulate_triton(v, g, g_plus, g_minus, coef, lr_grad, offsets) -> None:
    """Launcher: two Triton launches (arguments validated, every buffer contiguous)."""
    n_adapters, n_groups = lr_grad.shape
    chunks, slots, chunk = _launch_table(offsets, n_adapters, v.device)
    n_chunks = chunks.shape[0]
    if n_chunks == 0 or n_adapters == 0:
        return  # no element: lr_grad keeps its values
    update_v = g_plus is not None
    g_plus = g_plus if update_v else g  # never read then
    g_minus = g_minus if update_v else g
    block, _ = chunk_sizes()
    acc_dtype = _acc_dtype(v.dtype)
    acc_tl = tl.float64 if acc_dtype == torch.float64 else tl.float32
    partials = torch.zeros(n_adapters, n_groups * slots, dtype=acc_dtype, device=v.device)
    _meta_grad_chunk_kernel[(n_adapters * n_chunks,)](
        chunks, n_chunks, v.shape[1], n_groups, slots, v, g, g_plus, g_minus,
        coef if update_v else lr_grad,  # never read without g_plus, g_minus
        partials,
        UPDATE_V=update_v, ACC=acc_tl, ALIGN=flat_alignment([v, g, g_plus, g_minus], offsets, chunk), BLOCK=block,
    )  # fmt: skip
    _meta_grad_sum_kernel[(n_adapters * n_groups,)](
        partials, lr_grad, n_groups, slots, ACC=acc_tl, BLOCK=min(next_power_of_2(slots), _MAX_PARTIALS_BLOCK)
    )


@functools.lru_cache(maxsize=1)
def _warn_not_built() -> None:
    """Once per process: the install was asked for the extension (PERK_BUILD_CUDA=1) and skipped it."""
    note = Path(__file__).with_name("_C_not_built.txt")
    if note.exists():
        warnings.warn(
            f"perk_kernels._C was not built ({note.read_text().strip()}); using the Triton kernels",
            RuntimeWarning,
            stacklevel=3,
        )


def _extension():
    """The compiled module ``perk_kernels._C``, or None when it is not built or turned off."""
    if os.environ.get(NO_CUDA_EXT_ENV, "0") == "1":
        return None
    try:
        from perk_kernels import _C
    except ImportError:
        _warn_not_built()
        return None
    return _C


def cuda_extension_available() -> bool:
    """True when ``perk_kernels._C`` is importable, not disabled by ``PERK_NO_CUDA_EXT=1``, and CUDA exists."""
    return _extension() is not None and torch.cuda.is_available()


def _check_inputs(v, g, g_plus, g_minus, coef, lr_grad, group_offsets) -> tuple[int, ...]:
    """Validates every argument (host metadata only); returns the offsets as a tuple."""
    check_tensor("v", v, ndim=2)
    if not v.dtype.is_floating_point:
        raise TypeError(f"v must be floating point, got {v.dtype}")
    if not v.is_contiguous():
        raise ValueError(f"v must be contiguous (it is updated in place), got strides {v.stride()}")
    if (g_plus is None) != (g_minus is None):
        raise ValueError("g_plus and g_minus must both be given or both be None")
    named = {"g": g} if g_plus is None else {"g": g, "g_plus": g_plus, "g_minus": g_minus}
    for name, t in named.items():
        check_like(name, t, "v", v)
    offsets = check_group_offsets(group_offsets, v.shape[1])
    n_adapters, n_groups = v.shape[0], len(offsets) - 1
    if coef is None and g_plus is not None:
        raise ValueError("coef is needed with g_plus and g_minus")
    if coef is not None and tuple(check_tensor("coef", coef, ndim=1).shape) != (n_adapters,):
        raise ValueError(f"coef must be [n_adapters] = [{n_adapters}], got {list(coef.shape)}")
    check_tensor("lr_grad", lr_grad, ndim=2)
    for name, t in (("coef", coef), ("lr_grad", lr_grad)):
        if t is not None and t.dtype not in (torch.float32, v.dtype):
            raise TypeError(f"{name} must be float32 or the buffers' dtype {v.dtype}, got {t.dtype}")
        if t is not None and t.device != v.device:
            raise ValueError(f"{name} is on {t.device} but v is on {v.device}")
    if tuple(lr_grad.shape) != (n_adapters, n_groups):
        raise ValueError(f"lr_grad must be [n_adapters, G] = {[n_adapters, n_groups]}, got {list(lr_grad.shape)}")
    if not lr_grad.is_contiguous():
        raise ValueError("lr_grad must be contiguous (it is updated in place)")
    return offsets


def meta_grad_accumulate_reference(
    v: torch.Tensor,
    g: torch.Tensor,
    g_plus: torch.Tensor | None,
    g_minus: torch.Tensor | None,
    coef: torch.Tensor | None,
    lr_grad: torch.Tensor,
    group_offsets: Sequence[int],
) -> None:
    """Plain-torch oracle of :func:`meta_grad_accumulate` (same signature, same in-place effect)."""
    acc_dtype = _acc_dtype(v.dtype)
    with torch.no_grad():
        v_acc = v.to(acc_dtype)
        sizes = [end - start for start, end in zip(group_offsets[:-1], group_offsets[1:])]
        products = (g.to(acc_dtype) * v_acc).split(sizes, dim=1)
        dots = torch.stack([p.sum(1) for p in products], dim=1)  # (n_adapters, G)
        lr_grad.copy_((lr_grad.to(acc_dtype) - dots).to(lr_grad.dtype))
        if g_plus is not None:
            v.copy_(v_acc - coef.to(acc_dtype).unsqueeze(1) * (g_plus.to(acc_dtype) - g_minus.to(acc_dtype)))


def meta_grad_accumulate(
    v: torch.Tensor,
    g: torch.Tensor,
    g_plus: torch.Tensor | None,
    g_minus: torch.Tensor | None,
    coef: torch.Tensor | None,
    lr_grad: torch.Tensor,
    group_offsets: Sequence[int],
    *,
    backend: str | None = None,
) -> None:
    """In place: ``lr_grad[a, k] -= <g[a, group k], v[a, group k]>``, then ``v[a] -= coef[a]·(g⁺[a] − g⁻[a])``.

    Args:
        v: (n_adapters, P) the adjoint, contiguous; updated in place.
        g: (n_adapters, P) the inner step's direction (copied if not contiguous).
        g_plus, g_minus: (n_adapters, P) gradients at φ ± ε·u; both None to leave ``v`` unchanged.
        coef: (n_adapters,), float32 or the buffers' dtype: the factor of each adapter's difference;
            needed with ``g_plus``, ``g_minus``, else may be None.
        lr_grad: (n_adapters, G), contiguous, float32 or the buffers' dtype; accumulated in place.
        group_offsets: G+1 Python ints, 0 first, P last, non-decreasing (the tensor groups).
        backend: ``"cuda"``, ``"triton"``, ``"torch"`` or None (see the module docs).

    ``v``, ``g``, ``g_plus``, ``g_minus`` share one floating dtype and one device. The kernel
    backends are deterministic (no atomics) and never synchronise with the host.
    """
    offsets = _check_inputs(v, g, g_plus, g_minus, coef, lr_grad, group_offsets)
    chosen = choose_backend(backend, v.device, extension=cuda_extension_available)
    if coef is not None:
        coef = coef.contiguous()  # the kernels read coef[a] at offset a
    if chosen == "torch":
        meta_grad_accumulate_reference(v, g, g_plus, g_minus, coef, lr_grad, offsets)
        return
    g = g.contiguous()
    g_plus = None if g_plus is None else g_plus.contiguous()
    g_minus = None if g_minus is None else g_minus.contiguous()
    if chosen == "triton":
        meta_grad_accumulate_triton(v, g, g_plus, g_minus, coef, lr_grad, offsets)
        return
    chunks, slots, _ = _launch_table(offsets, v.shape[0], v.device)
    _extension().meta_grad_accumulate(v, g, g_plus, g_minus, coef, lr_grad, chunks, slots)
