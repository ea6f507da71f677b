"""What every op in `perk_kernels` shares: backend choice, input checks, block sizes.

Backends, chosen per call:

* ``"triton"`` — the fused kernels. Automatic for CUDA tensors, and for CPU tensors when
  ``TRITON_INTERPRET=1`` (Triton's interpreter; that is how CI runs the real kernel code).
* ``"torch"`` — the plain-torch reference of the same function: the test oracle and the CPU
  default. Chosen automatically (not named), ``lora_linear`` over a bf16 base with fp32 adapters
  takes its faster mixed-precision CPU path instead (once differentiable, like the kernels).
* ``"cuda"`` — a compiled extension (``perk_kernels._C``), for the ops that have one
  (``meta_grad_accumulate``): the automatic choice on CUDA tensors when it is importable.

One rule for every op: the ``backend=`` argument wins over the ``PERK_KERNELS_BACKEND``
environment variable, which wins over the automatic choice (``"cuda"`` where the op has an
available extension and the tensors are on CUDA, else ``"triton"`` where Triton can run, else
``"torch"``). Naming ``"cuda"`` for an op without an extension is a ValueError.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Callable, Sequence

import torch

BACKENDS = ("triton", "torch")
BACKEND_ENV = "PERK_KERNELS_BACKEND"


def interpret_mode() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def requested_backend(backend: str | None) -> str | None:
    """The backend asked for: the argument, else ``PERK_KERNELS_BACKEND``, else None (automatic)."""
    return backend or os.environ.get(BACKEND_ENV) or None


def choose_backend(
    backend: str | None, device: torch.device, *, extension: Callable[[], bool] | None = None
) -> str:
    """Resolve the backend for one call on tensors living on ``device``.

    ``extension``: for ops with a compiled extension, a probe telling whether it is usable
    (consulted only for CUDA tensors); None for ops without one.
    """
    backends = BACKENDS + (("cuda",) if extension is not None else ())
    backend = requested_backend(backend)
    if backend is None:
        if device.type == "cuda" and extension is not None and extension():
            return "cuda"
        use_triton = triton_available() and (device.type == "cuda" or interpret_mode())
        return "triton" if use_triton else "torch"
    if backend not in backends:
        raise ValueError(f"backend must be one of {backends}, got {backend!r}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not extension():
            raise RuntimeError(
                "backend='cuda' needs the perk_kernels._C extension (build with PERK_BUILD_CUDA=1; "
                "PERK_NO_CUDA_EXT=1 disables it)"
            )
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the `triton` package")
        if device.type != "cuda" and not interpret_mode():
            raise ValueError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before perk_kernels "
                "is imported; use backend='torch' for the CPU reference"
            )
    return backend


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_tensor(name: str, t: object, *, ndim: int | None = None) -> torch.Tensor:
    """A tensor with ``ndim`` dimensions, else a TypeError/ValueError naming the argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def check_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device; returns it."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
    return first.device


def check_finite_scalar(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


# --- launch sizing shared by the LoRA ops ------------------------------------------------------


def target_programs(device: torch.device) -> int:
    """How many programs a grid should have to fill ``device`` (twice its SM count on CUDA).

    Used to split long reductions (e.g. over the rows of one adapter) into enough programs. On
    CPU (the interpreter runs programs one after another) a small number keeps tests fast while
    still exercising the split path.
    """
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device (what tile limits are measured per)."""
    return torch.cuda.get_device_capability(device)


def dot_input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision matching what torch's matmul does for ``dtype``.

    fp32 GEMMs in torch use full fp32 unless TF32 is enabled; Triton would default to TF32, whose
    10-bit mantissa breaks fp32 tolerances. Other dtypes ignore this setting.
    """
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# --- flat adapter buffers split into tensor groups (lora_inner_step, meta_grad_accumulate) --------


def check_like(name: str, t: object, like_name: str, like: torch.Tensor) -> torch.Tensor:
    """``t`` is a tensor with ``like``'s shape, dtype and device (a flat buffer beside another)."""
    check_tensor(name, t)
    if t.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name}, {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of {like_name}, {like.dtype}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")
    return t


def check_group_offsets(group_offsets: object, n_params: int) -> tuple[int, ...]:
    """``group_offsets`` as a tuple of G+1 ints from 0 to ``n_params``, non-decreasing, else an error.

    Host ints only: a tensor of offsets would need a device sync to read, so it is refused.
    """
    if isinstance(group_offsets, (torch.Tensor, str, bytes)) or not isinstance(group_offsets, Sequence):
        raise TypeError(f"group_offsets must be a sequence of Python ints, got {type(group_offsets).__name__}")
    if any(isinstance(o, bool) or not isinstance(o, numbers.Integral) for o in group_offsets):
        raise TypeError(f"group_offsets must hold ints, got {list(group_offsets)!r}")
    offsets = tuple(int(o) for o in group_offsets)
    if len(offsets) < 2:
        raise ValueError(f"group_offsets must hold G+1 >= 2 ints (0 first, P last), got {list(offsets)}")
    if offsets[0] != 0 or offsets[-1] != n_params:
        raise ValueError(
            f"group_offsets must start at 0 and end at P={n_params} (the buffers' width), got "
            f"{offsets[0]} ... {offsets[-1]}"
        )
    if any(b < a for a, b in zip(offsets[:-1], offsets[1:])):
        raise ValueError(f"group_offsets must be non-decreasing, got {list(offsets)}")
    return offsets


def chunk_sizes() -> tuple[int, int]:
    """(BLOCK, CHUNK): elements per vector op and per program of the flat-buffer kernels."""
    if interpret_mode():
        return 64, 128  # tiny, so CPU tests cover several chunks per group and blocks per chunk
    return 1024, 16384


def to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host table on ``device``; pinned + non_blocking on CUDA, so no host/device sync."""
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


@functools.lru_cache(maxsize=64)
def group_chunks(offsets: tuple[int, ...], chunk: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """The launch table of a flat (n_adapters, P) buffer split into groups at ``offsets``.

    Returns ``(table, slots)``: ``table`` (n_chunks, 4) int64 on ``device``, one row
    ``[group, start, end, slot]`` per chunk of at most ``chunk`` columns; chunks never cross a
    group border. ``slots`` is the most chunks of any group: chunk c of group k writes its partial
    sums to slot ``k·slots + c`` of its adapter's row of ``G·slots`` partials (the rest stay zero),
    so per-(adapter, group) sums are a fixed-order sum over fixed slots: deterministic, no atomics.
    Cached per (offsets, chunk, device): built and copied once per layout.
    """
    sizes = [end - start for start, end in zip(offsets[:-1], offsets[1:])]
    slots = max(1, max(-(-n // chunk) for n in sizes))
    rows = [
        (k, start + c, min(start + c + chunk, end), k * slots + c // chunk)
        for k, (start, end) in enumerate(zip(offsets[:-1], offsets[1:]))
        for c in range(0, end - start, chunk)
    ]
    return to_device(torch.tensor(rows, dtype=torch.int64).reshape(-1, 4), device), slots


def flat_alignment(tensors: list[torch.Tensor], offsets: tuple[int, ...], chunk: int) -> int:
    """Elements per 16 bytes when the kernels may assume 16-byte aligned vectors, else 1.

    Holds when every (contiguous, (n_adapters, P)) buffer starts 16-byte aligned and every row
    start (a multiple of P), group border and chunk border is a whole number of vectors.
    """
    vector = 16 // tensors[0].element_size()
    ok = (
        all(t.data_ptr() % 16 == 0 for t in tensors)
        and all(o % vector == 0 for o in offsets)
        and chunk % vector == 0
    )
    return vector if ok else 1


def memory_overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the address ranges spanned by ``a`` and ``b`` intersect (conservative for strided views)."""

    def span(t: torch.Tensor) -> tuple[int, int] | None:
        if t.numel() == 0:
            return None
        low = sum(min(0, (n - 1) * s) for n, s in zip(t.shape, t.stride()))
        high = sum(max(0, (n - 1) * s) for n, s in zip(t.shape, t.stride()))
        size = t.element_size()
        return t.data_ptr() + low * size, t.data_ptr() + (high + 1) * size

    span_a, span_b = span(a), span(b)
    if span_a is None or span_b is None or a.device != b.device:
        return False
    return span_a[0] < span_b[1] and span_b[0] < span_a[1]
