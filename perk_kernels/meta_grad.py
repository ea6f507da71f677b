"""Meta-gradient accumulation over every adapter tensor, in place (one step of DESIGN §4's walk back).

Semantics, for every tensor i of the lists (each [n_adapters, ...]) and every adapter a, reading v
before its update::

    lr_grad[a, i] += -<g_i[a], v_i[a]>                         (accumulated in fp32, fp64 for fp64)
    v_i[a]        -= coef[a] * (g_plus_i[a] - g_minus_i[a])    (skipped when g_plus, g_minus are None)

The engine passes ``coef[a] = ‖α⊙v‖ / (2ε)`` for the finite-difference Hessian-vector product, whose
two gradients g⁺, g⁻ were taken at φ ± ε·u with u = α⊙v / ‖α⊙v‖ (``fd`` mode); ``first_order`` passes
zeros or no g⁺, g⁻. ``lr_grad`` is the learning rates' gradient, one column per tensor.

Backends:

* ``"cuda"`` — the compiled extension ``perk_kernels._C`` (csrc/, built by setup.py when
  ``PERK_BUILD_CUDA=1``): one launch over all tensors through a pointer table. The default for CUDA
  tensors when it is importable; ``PERK_NO_CUDA_EXT=1`` turns it off.
* ``"triton"`` — one Triton launch per tensor. The default for CUDA tensors without the extension;
  on CPU tensors only when asked for and ``TRITON_INTERPRET=1``.
* ``"torch"`` — :func:`meta_grad_accumulate_reference`; the default on CPU.

Both kernel backends add per-block partial dot products into ``lr_grad`` with atomics, so their
``lr_grad`` matches the reference to fp32 rounding, not bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from perk_kernels._utils import check_same_device, check_tensor, choose_backend, next_power_of_2

NO_CUDA_EXT_ENV = "PERK_NO_CUDA_EXT"
META_GRAD_BACKENDS = ("cuda", "triton", "torch")
_MAX_BLOCK = 4096


@triton.jit
def _meta_grad_accumulate_kernel(
    v_ptr,
    g_ptr,
    g_plus_ptr,
    g_minus_ptr,
    coef_ptr,
    lr_grad_ptr,
    per_adapter,
    n_tensors,
    tensor_index,
    UPDATE_V: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (adapter, block): one block of one adapter's slice of one tensor."""
    adapter = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < per_adapter
    flat = adapter * per_adapter + offsets
    v_old = tl.load(v_ptr + flat, mask=mask, other=0.0).to(ACC_DTYPE)
    g = tl.load(g_ptr + flat, mask=mask, other=0.0).to(ACC_DTYPE)
    partial_dot = tl.sum(g * v_old, axis=0)
    tl.atomic_add(lr_grad_ptr + adapter * n_tensors + tensor_index, -partial_dot.to(tl.float32))
    if UPDATE_V:
        # Difference in ACC_DTYPE: g_plus and g_minus are close, a low-precision difference would
        # lose most of its digits.
        g_plus = tl.load(g_plus_ptr + flat, mask=mask, other=0.0).to(ACC_DTYPE)
        g_minus = tl.load(g_minus_ptr + flat, mask=mask, other=0.0).to(ACC_DTYPE)
        scale = tl.load(coef_ptr + adapter).to(ACC_DTYPE)
        v_new = v_old - scale * (g_plus - g_minus)
        tl.store(v_ptr + flat, v_new.to(v_ptr.dtype.element_ty), mask=mask)


def meta_grad_accumulate_triton(v, g, g_plus, g_minus, coef, lr_grad) -> None:
    """Launcher: one Triton launch per tensor (arguments already validated)."""
    n_adapters, n_tensors = lr_grad.shape
    acc_dtype = tl.float64 if v[0].dtype == torch.float64 else tl.float32
    for i, (v_i, g_i) in enumerate(zip(v, g)):
        per_adapter = v_i.numel() // n_adapters
        if per_adapter == 0:
            continue
        block = min(next_power_of_2(per_adapter), _MAX_BLOCK)
        update_v = g_plus is not None
        _meta_grad_accumulate_kernel[(n_adapters, triton.cdiv(per_adapter, block))](
            v_i,
            g_i.contiguous(),
            g_plus[i].contiguous() if update_v else g_i,
            g_minus[i].contiguous() if update_v else g_i,
            coef,
            lr_grad,
            per_adapter,
            n_tensors,
            i,
            UPDATE_V=update_v,
            ACC_DTYPE=acc_dtype,
            BLOCK=block,
            num_warps=8 if block >= 2048 else 4,
        )


def _extension():
    """The compiled module ``perk_kernels._C``, or None when it is not built or turned off."""
    if os.environ.get(NO_CUDA_EXT_ENV, "0") == "1":
        return None
    try:
        from perk_kernels import _C
    except ImportError:
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
    check_tensor("coef", coef, ndim=1)
    check_tensor("lr_grad", lr_grad, ndim=2)
    n_adapters = coef.shape[0]
    dtype = v[0].dtype
    if not dtype.is_floating_point:
        raise TypeError(f"v[0] must be floating point, got {dtype}")
    for name, tensors in lists.items():
        for i, t in enumerate(tensors):
            if t.dtype != dtype:
                raise TypeError(f"{name}[{i}] has dtype {t.dtype}; every tensor must have v[0]'s {dtype}")
            if t.dim() == 0 or t.shape[0] != n_adapters:
                raise ValueError(f"{name}[{i}] must have n_adapters={n_adapters} in dim 0, got {tuple(t.shape)}")
    for i, t in enumerate(v):
        if not t.is_contiguous():
            raise ValueError(f"v[{i}] must be contiguous (it is updated in place)")
    for name, t in (("coef", coef), ("lr_grad", lr_grad)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
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
    coef: torch.Tensor,
    lr_grad: torch.Tensor,
) -> None:
    """Plain-torch oracle of :func:`meta_grad_accumulate` (same signature, same in-place effect)."""
    n_adapters = coef.shape[0]
    with torch.no_grad():
        for i, (v_i, g_i) in enumerate(zip(v, g)):
            acc_dtype = torch.promote_types(v_i.dtype, torch.float32)
            v_flat, g_flat = (t.reshape(n_adapters, -1).to(acc_dtype) for t in (v_i, g_i))
            lr_grad[:, i] -= (g_flat * v_flat).sum(1).to(lr_grad.dtype)
            if g_plus is not None:
                g_plus_flat, g_minus_flat = (t.reshape(n_adapters, -1).to(acc_dtype) for t in (g_plus[i], g_minus[i]))
                v_i.copy_((v_flat - coef.to(acc_dtype).unsqueeze(1) * (g_plus_flat - g_minus_flat)).view_as(v_i))


def meta_grad_accumulate(
    v: Sequence[torch.Tensor],
    g: Sequence[torch.Tensor],
    g_plus: Sequence[torch.Tensor] | None,
    g_minus: Sequence[torch.Tensor] | None,
    coef: torch.Tensor,
    lr_grad: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """In place: ``lr_grad[a, i] -= <g_i[a], v_i[a]>``, then ``v_i[a] -= coef[a]·(g⁺_i[a] − g⁻_i[a])``.

    Args:
        v: the adjoints, one contiguous tensor [n_adapters, ...] per adapter tensor; updated in place.
        g: the inner-step gradients, shaped like ``v``.
        g_plus, g_minus: gradients at φ ± ε·u, shaped like ``v``; both None to leave ``v`` unchanged.
        coef: float32 [n_adapters], the factor of each adapter's finite difference.
        lr_grad: float32 [n_adapters, n_tensors], contiguous; accumulated in place.
        backend: ``"cuda"``, ``"triton"``, ``"torch"`` or None (see the module docs).

    Every tensor of ``v``, ``g``, ``g_plus``, ``g_minus`` shares one floating dtype and one device.
    """
    _check_inputs(v, g, g_plus, g_minus, coef, lr_grad)
    chosen = _choose_meta_grad_backend(backend, v[0].device)
    if chosen == "torch":
        meta_grad_accumulate_reference(v, g, g_plus, g_minus, coef, lr_grad)
    elif chosen == "triton":
        meta_grad_accumulate_triton(v, g, g_plus, g_minus, coef.contiguous(), lr_grad)
    else:
        _extension().meta_grad_accumulate(
            list(v),
            [t.contiguous() for t in g],
            [] if g_plus is None else [t.contiguous() for t in g_plus],
            [] if g_minus is None else [t.contiguous() for t in g_minus],
            coef.contiguous(),
            lr_grad,
        )
