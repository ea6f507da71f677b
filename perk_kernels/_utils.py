"""What every op in `perk_kernels` shares: backend choice, input checks, block sizes.

Backends, chosen per call:

* ``"triton"`` — the fused kernels. Automatic for CUDA tensors, and for CPU tensors when
  ``TRITON_INTERPRET=1`` (Triton's interpreter; that is how CI runs the real kernel code).
* ``"torch"`` — the plain-torch reference of the same function: the test oracle and the CPU
  default.

The ``backend=`` argument of an op wins over the ``PERK_KERNELS_BACKEND`` environment variable,
which wins over the automatic choice.
"""

from __future__ import annotations

import math
import os

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


def choose_backend(backend: str | None, device: torch.device) -> str:
    """Resolve the backend for one call on tensors living on ``device``."""
    if backend is None:
        backend = os.environ.get(BACKEND_ENV) or None
    if backend is None:
        use_triton = triton_available() and (device.type == "cuda" or interpret_mode())
        return "triton" if use_triton else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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


def slices_contiguous(t: torch.Tensor) -> bool:
    """Whether every adapter slice ``t[a]`` is contiguous (the adapter stride ``t.stride(0)`` is
    free): true of views ``flat[:, start:end].unflatten(1, shape)`` into a flat adapter buffer."""
    if 0 in t.shape[1:]:
        return True  # nothing to address
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def with_contiguous_slices(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself where the kernels can address it (views of a flat buffer included), else a copy."""
    return t if slices_contiguous(t) else t.contiguous()
