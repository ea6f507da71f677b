"""Meta-gradient accumulation over every adapter tensor, in place (one step of DESIGN §4's walk back).

Semantics, for every tensor i of the lists (each [n_adapters, ...]) and every adapter a, reading v
before its update::

    lr_grad[a, i] = lr_grad[a, i] - <g_i[a], v_i[a]>           (dot and difference in acc, rounded once)
    v_i[a]       -= coef[a] * (g_plus_i[a] - g_minus_i[a])     (skipped when g_plus, g_minus are None)

acc is fp64 for fp64 tensors, fp32 otherwise. The engine passes ``coef[a] = ‖α⊙v‖ / (2ε)`` for the
finite-difference Hessian-vector product, whose two gradients g⁺, g⁻ were taken at φ ± ε·u with
u = α⊙v / ‖α⊙v‖ (``fd`` mode); truncated steps and ``first_order`` pass no g⁺, g⁻ (and no coef).
``lr_grad`` is the learning rates' gradient, one column per tensor.

Memory layout: only each adapter's slice ``t[a]`` must be contiguous; the adapter stride
``t.stride(0)`` is free. So every list may hold views of one flat (n_adapters, P) buffer,
``flat[:, start:end].unflatten(1, shape)`` (stride(0) = P), and ``v`` is updated through its views.
``g``, ``g_plus``, ``g_minus`` whose slices are not contiguous are copied; such a ``v`` is rejected.

Determinism: no atomics. Each program writes the partial dot product of its chunk to a fixed slot,
and a second pass sums every (adapter, tensor)'s slots in a fixed order, so for the same shapes
and inputs both kernel backends give bitwise-equal results run after run (they differ from the
reference and from each other by summation order only).

Backends:

* ``"cuda"`` — the compiled extension ``perk_kernels._C`` (csrc/, built by setup.py when
  ``PERK_BUILD_CUDA=1``): two launches over all tensors through a pointer table. The default for
  CUDA tensors when it is importable; ``PERK_NO_CUDA_EXT=1`` turns it off.
* ``"triton"`` — the same two passes as Triton kernels, also driven by a pointer table (int64
  addresses turned back into typed pointers), so two launches whatever the number of tensors. The
  default for CUDA tensors without the extension; on CPU tensors only when asked for and
  ``TRITON_INTERPRET=1``.
* ``"torch"`` — :func:`meta_grad_accumulate_reference`; the default on CPU.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import triton
import triton.language as tl

from perk_kernels._utils import (
    check_same_device,
    check_tensor,
    choose_backend,
    interpret_mode,
    next_power_of_2,
    slices_contiguous,
    with_contiguous_slices,
)

NO_CUDA_EXT_ENV = "PERK_NO_CUDA_EXT"
META_GRAD_BACKENDS = ("cuda", "triton", "torch")

# Columns of the Triton launcher's per-tensor table (one int64 row per tensor).
_V_ADDR = tl.constexpr(0)
_G_ADDR = tl.constexpr(1)
_G_PLUS_ADDR = tl.constexpr(2)
_G_MINUS_ADDR = tl.constexpr(3)
_V_STRIDE = tl.constexpr(4)  # adapter strides, in elements
_G_STRIDE = tl.constexpr(5)
_G_PLUS_STRIDE = tl.constexpr(6)
_G_MINUS_STRIDE = tl.constexpr(7)
_PER_ADAPTER = tl.constexpr(8)  # elements of one adapter's slice
_FIRST_CHUNK = tl.constexpr(9)  # the tensor's chunks are [first, stop) of each adapter's partials row
_STOP_CHUNK = tl.constexpr(10)
_TABLE_COLUMNS = tl.constexpr(11)
_MAX_PARTIALS_BLOCK = 1024
_MAX_ADAPTERS = 65535  # both kernels put adapters on the grid's y axis (as csrc/ does)


@triton.jit
def _slice_ptr(row_ptr, ADDR: tl.constexpr, STRIDE: tl.constexpr, adapter, DTYPE: tl.constexpr, ALIGN: tl.constexpr):
    """Typed pointer to one adapter's slice of one tensor, from the table's address and stride."""
    ptr = tl.load(row_ptr + ADDR).to(tl.pointer_type(DTYPE)) + adapter * tl.load(row_ptr + STRIDE)
    if ALIGN > 1:
        ptr = tl.multiple_of(ptr, 16)  # 16-byte aligned: lets the compiler emit vector loads
    return ptr


@triton.jit
def _meta_grad_chunk_kernel(
    table_ptr,
    chunk_tensor_ptr,
    coef_ptr,
    partials_ptr,
    n_chunks,
    UPDATE_V: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (chunk, adapter): partials[adapter, chunk] = <g, v> over one chunk; v updated there."""
    chunk = tl.program_id(0).to(tl.int64)
    adapter = tl.program_id(1).to(tl.int64)
    row_ptr = table_ptr + tl.load(chunk_tensor_ptr + chunk) * _TABLE_COLUMNS
    offsets = (chunk - tl.load(row_ptr + _FIRST_CHUNK)) * BLOCK + tl.arange(0, BLOCK)
    per_adapter = tl.load(row_ptr + _PER_ADAPTER)
    if ALIGN > 1:
        per_adapter = tl.multiple_of(per_adapter, ALIGN)  # the mask is then constant per vector
    mask = offsets < per_adapter
    v_ptr = _slice_ptr(row_ptr, _V_ADDR, _V_STRIDE, adapter, DTYPE, ALIGN) + offsets
    g_ptr = _slice_ptr(row_ptr, _G_ADDR, _G_STRIDE, adapter, DTYPE, ALIGN) + offsets
    v_old = tl.load(v_ptr, mask=mask, other=0.0).to(ACC_DTYPE)
    g = tl.load(g_ptr, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(partials_ptr + adapter * n_chunks + chunk, tl.sum(g * v_old, axis=0))
    if UPDATE_V:
        g_plus_ptr = _slice_ptr(row_ptr, _G_PLUS_ADDR, _G_PLUS_STRIDE, adapter, DTYPE, ALIGN) + offsets
        g_minus_ptr = _slice_ptr(row_ptr, _G_MINUS_ADDR, _G_MINUS_STRIDE, adapter, DTYPE, ALIGN) + offsets
        # Difference in ACC_DTYPE: g_plus and g_minus are close, a low-precision difference would
        # lose most of its digits.
        g_plus = tl.load(g_plus_ptr, mask=mask, other=0.0).to(ACC_DTYPE)
        g_minus = tl.load(g_minus_ptr, mask=mask, other=0.0).to(ACC_DTYPE)
        scale = tl.load(coef_ptr + adapter).to(ACC_DTYPE)
        tl.store(v_ptr, (v_old - scale * (g_plus - g_minus)).to(DTYPE), mask=mask)


@triton.jit
def _meta_grad_sum_kernel(
    table_ptr,
    partials_ptr,
    lr_grad_ptr,
    n_chunks,
    n_tensors,
    ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (tensor, adapter): lr_grad[adapter, tensor] -= its chunks' partials, in a fixed order."""
    tensor = tl.program_id(0).to(tl.int64)
    adapter = tl.program_id(1).to(tl.int64)
    row_ptr = table_ptr + tensor * _TABLE_COLUMNS
    stop = tl.load(row_ptr + _STOP_CHUNK)
    total = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    for start in range(tl.load(row_ptr + _FIRST_CHUNK), stop, BLOCK):
        index = start + tl.arange(0, BLOCK)
        total += tl.load(partials_ptr + adapter * n_chunks + index, mask=index < stop, other=0.0)
    lr_ptr = lr_grad_ptr + adapter * n_tensors + tensor
    lr_new = tl.load(lr_ptr).to(ACC_DTYPE) - tl.sum(total, axis=0)
    tl.store(lr_ptr, lr_new.to(lr_grad_ptr.dtype.element_ty))


_TRITON_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_adapter(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:])


def _chunk_block(per_adapter: list[int]) -> int:
    """Elements per program: small under the interpreter, so CPU tests cover several chunks."""
    cap = 256 if interpret_mode() else 4096
    return min(next_power_of_2(max(per_adapter)), cap)


def _alignment(tensors: list[torch.Tensor], n_adapters: int) -> int:
    """Elements per 16 bytes when every non-empty slice starts 16-byte aligned and spans whole
    16-byte vectors (then so does every chunk, BLOCK being a larger power of two), else 1."""
    vector = 16 // tensors[0].element_size()
    aligned = all(
        t.data_ptr() % 16 == 0 and (n_adapters == 1 or t.stride(0) % vector == 0) and _per_adapter(t) % vector == 0
        for t in tensors
        if _per_adapter(t) > 0
    )
    return vector if aligned else 1


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned + non_blocking: the small per-call table reaches the GPU without a host sync.
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


def meta_grad_accumulate_triton(v, g, g_plus, g_minus, coef, lr_grad) -> None:
    """Launcher: two Triton launches over all tensors (arguments already validated, views allowed)."""
    n_adapters, n_tensors = lr_grad.shape
    device = v[0].device
    if device.type == "cuda" and interpret_mode():
        raise ValueError("backend='triton' cannot run CUDA tensors through TRITON_INTERPRET=1 (pointer tables)")
    if n_adapters > _MAX_ADAPTERS:
        raise ValueError(
            f"backend='triton' handles at most {_MAX_ADAPTERS} adapters per call (the grid's y axis), "
            f"got {n_adapters}: split the adapters over several calls"
        )
    g = [with_contiguous_slices(t) for t in g]
    update_v = g_plus is not None
    g_plus = [with_contiguous_slices(t) for t in g_plus] if update_v else g
    g_minus = [with_contiguous_slices(t) for t in g_minus] if update_v else g
    per_adapter = [_per_adapter(t) for t in v]
    block = _chunk_block(per_adapter)
    rows, chunk_tensor = [], []
    for i, n in enumerate(per_adapter):
        n_chunks_i = triton.cdiv(n, block)
        tensors = (v[i], g[i], g_plus[i], g_minus[i])
        first = len(chunk_tensor)
        rows += [t.data_ptr() for t in tensors] + [t.stride(0) for t in tensors] + [n, first, first + n_chunks_i]
        chunk_tensor += [i] * n_chunks_i
    n_chunks = len(chunk_tensor)
    if n_chunks == 0 or n_adapters == 0:
        return
    table = _to_device(torch.tensor(rows + chunk_tensor, dtype=torch.int64), device)
    tensor_table, chunk_table = table[: len(rows)], table[len(rows) :]
    acc_dtype = _acc_dtype(v[0].dtype)
    partials = torch.empty(n_adapters, n_chunks, dtype=acc_dtype, device=device)
    acc_tl = _TRITON_DTYPES[acc_dtype]
    _meta_grad_chunk_kernel[(n_chunks, n_adapters)](
        tensor_table,
        chunk_table,
        lr_grad if coef is None else coef,  # never read without g_plus, g_minus
        partials,
        n_chunks,
        UPDATE_V=update_v,
        DTYPE=_TRITON_DTYPES[v[0].dtype],
        ACC_DTYPE=acc_tl,
        ALIGN=_alignment([*v, *g, *g_plus, *g_minus], n_adapters),
        BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    max_chunks = max(triton.cdiv(n, block) for n in per_adapter)
    _meta_grad_sum_kernel[(n_tensors, n_adapters)](
        tensor_table,
        partials,
        lr_grad,
        n_chunks,
        n_tensors,
        ACC_DTYPE=acc_tl,
        BLOCK=min(next_power_of_2(max_chunks), _MAX_PARTIALS_BLOCK),
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


def _choose_meta_grad_backend(backend: str | None, device: torch.device) -> str:
    if backend is None:
        if device.type != "cuda":
            return "torch"
        return "cuda" if cuda_extension_available() else choose_backend(None, device)
    if backend not in META_GRAD_BACKENDS:
        raise ValueError(f"backend must be one of {META_GRAD_BACKENDS}, got {backend!r}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not cuda_extension_available():
            raise RuntimeError(
                f"backend='cuda' needs the perk_kernels._C extension (build with PERK_BUILD_CUDA=1; "
                f"{NO_CUDA_EXT_ENV}=1 disables it)"
            )
        return backend
    return choose_backend(backend, device)


def _check_tensor_list(name: str, tensors: object, like: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    if not isinstance(tensors, (list, tuple)) or len(tensors) == 0:
        raise TypeError(f"{name} must be a non-empty list of tensors, got {type(tensors).__name__}")
    if like is not None and len(tensors) != len(like):
        raise ValueError(f"{name} must hold {len(like)} tensors (one per tensor of v), got {len(tensors)}")
    for i, t in enumerate(tensors):
        check_tensor(f"{name}[{i}]", t)
        if like is not None and t.shape != like[i].shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, expected v[{i}]'s {tuple(like[i].shape)}")
    return list(tensors)


def _check_inputs(v, g, g_plus, g_minus, coef, lr_grad) -> None:
    v = _check_tensor_list("v", v, None)
    lists = {"v": v, "g": _check_tensor_list("g", g, v)}
    if (g_plus is None) != (g_minus is None):
        raise ValueError("g_plus and g_minus must both be given or both be None")
    if g_plus is not None:
        lists["g_plus"] = _check_tensor_list("g_plus", g_plus, v)
        lists["g_minus"] = _check_tensor_list("g_minus", g_minus, v)
    dtype = v[0].dtype
    if not dtype.is_floating_point:
        raise TypeError(f"v[0] must be floating point, got {dtype}")
    if v[0].dim() == 0:
        raise ValueError("v[0] must have n_adapters in dim 0, got a 0-d tensor")
    n_adapters = v[0].shape[0]
    for name, tensors in lists.items():
        for i, t in enumerate(tensors):
            if t.dtype != dtype:
                raise TypeError(f"{name}[{i}] has dtype {t.dtype}; every tensor must have v[0]'s {dtype}")
            if t.dim() == 0 or t.shape[0] != n_adapters:
                raise ValueError(f"{name}[{i}] must have n_adapters={n_adapters} in dim 0, got {tuple(t.shape)}")
    for i, t in enumerate(v):
        overlapping = n_adapters > 1 and t.stride(0) < _per_adapter(t)
        if overlapping or not slices_contiguous(t):
            raise ValueError(
                f"v[{i}] must have contiguous, non-overlapping adapter slices v[{i}][a] (it is updated in "
                f"place), got shape {tuple(t.shape)} with strides {t.stride()}"
            )
    if coef is None and g_plus is not None:
        raise ValueError("coef is needed with g_plus and g_minus")
    if coef is not None and tuple(check_tensor("coef", coef, ndim=1).shape) != (n_adapters,):
        raise ValueError(f"coef must be [n_adapters] = [{n_adapters}], got {list(coef.shape)}")
    check_tensor("lr_grad", lr_grad, ndim=2)
    for name, t in (("coef", coef), ("lr_grad", lr_grad)):
        if t is not None and t.dtype not in (torch.float32, dtype):
            raise TypeError(f"{name} must be float32 or the tensors' dtype {dtype}, got {t.dtype}")
    if tuple(lr_grad.shape) != (n_adapters, len(v)):
        raise ValueError(f"lr_grad must be [n_adapters, n_tensors] = {[n_adapters, len(v)]}, got {list(lr_grad.shape)}")
    if not lr_grad.is_contiguous():
        raise ValueError("lr_grad must be contiguous (it is updated in place)")
    named = {f"{name}[{i}]": t for name, tensors in lists.items() for i, t in enumerate(tensors)}
    check_same_device(**named, coef=coef, lr_grad=lr_grad)


def meta_grad_accumulate_reference(
    v: Sequence[torch.Tensor],
    g: Sequence[torch.Tensor],
    g_plus: Sequence[torch.Tensor] | None,
    g_minus: Sequence[torch.Tensor] | None,
    coef: torch.Tensor | None,
    lr_grad: torch.Tensor,
) -> None:
    """Plain-torch oracle of :func:`meta_grad_accumulate` (same signature, same in-place effect, views too)."""
    n_adapters = v[0].shape[0]
    with torch.no_grad():
        for i, (v_i, g_i) in enumerate(zip(v, g)):
            acc_dtype = _acc_dtype(v_i.dtype)
            v_acc, g_acc = (t.reshape(n_adapters, _per_adapter(t)).to(acc_dtype) for t in (v_i, g_i))
            dot = (g_acc * v_acc).sum(1)
            lr_grad[:, i] = (lr_grad[:, i].to(acc_dtype) - dot).to(lr_grad.dtype)
            if g_plus is not None:
                g_plus_acc, g_minus_acc = (
                    t.reshape(n_adapters, _per_adapter(t)).to(acc_dtype) for t in (g_plus[i], g_minus[i])
                )
                v_new = v_acc - coef.to(acc_dtype).unsqueeze(1) * (g_plus_acc - g_minus_acc)
                v_i.copy_(v_new.view(v_i.shape))  # through the view: v_i may be a slice of a flat buffer


def meta_grad_accumulate(
    v: Sequence[torch.Tensor],
    g: Sequence[torch.Tensor],
    g_plus: Sequence[torch.Tensor] | None,
    g_minus: Sequence[torch.Tensor] | None,
    coef: torch.Tensor | None,
    lr_grad: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """In place: ``lr_grad[a, i] -= <g_i[a], v_i[a]>``, then ``v_i[a] -= coef[a]·(g⁺_i[a] − g⁻_i[a])``.

    Args:
        v: the adjoints, one tensor [n_adapters, ...] per adapter tensor, each adapter's slice
            ``v_i[a]`` contiguous and disjoint (views of one flat buffer are fine); updated in place.
        g: the inner-step gradients, shaped like ``v``.
        g_plus, g_minus: gradients at φ ± ε·u, shaped like ``v``; both None to leave ``v`` unchanged.
        coef: [n_adapters], float32 or the tensors' dtype: the factor of each adapter's difference;
            needed with ``g_plus``, ``g_minus``, else may be None.
        lr_grad: [n_adapters, n_tensors], contiguous, float32 or the tensors' dtype; accumulated in place.
        backend: ``"cuda"``, ``"triton"``, ``"torch"`` or None (see the module docs).

    Every tensor of ``v``, ``g``, ``g_plus``, ``g_minus`` shares one floating dtype and one device.
    The kernel backends are deterministic (no atomics).
    """
    _check_inputs(v, g, g_plus, g_minus, coef, lr_grad)
    chosen = _choose_meta_grad_backend(backend, v[0].device)
    if coef is not None:
        coef = coef.contiguous()  # the kernels read coef[a] at offset a
    if chosen == "torch":
        meta_grad_accumulate_reference(v, g, g_plus, g_minus, coef, lr_grad)
    elif chosen == "triton":
        meta_grad_accumulate_triton(v, g, g_plus, g_minus, coef, lr_grad)
    else:
        _extension().meta_grad_accumulate(
            list(v),
            [with_contiguous_slices(t) for t in g],
            [] if g_plus is None else [with_contiguous_slices(t) for t in g_plus],
            [] if g_minus is None else [with_contiguous_slices(t) for t in g_minus],
            coef,
            lr_grad,
        )
