"""Make Triton's CPU interpreter compute bfloat16 the way a GPU does (test support only).

Why: the tests run perk's Triton kernels on CPU tensors through Triton's interpreter
(``TRITON_INTERPRET=1``), and bf16 is the dtype the GPU path trains in. Triton 3.9's interpreter
keeps bf16 values as their raw uint16 bit patterns, which is right for loads, stores and
selects (they copy bits) but wrong for

* ``tl.dot``: it hands the bit patterns to ``np.matmul`` as integers (a 16×16 dot of randn
  inputs gives ~1e10; triton-lang/triton#11584, closed upstream as "not supported yet");
* fp32 → bf16 casts (``x.to(tl.bfloat16)``, including every ``other=`` constant of a bf16
  load): they truncate the mantissa (1.0041 → 1.0, where the GPU's ``cvt.rn`` and torch give
  1.0078);
* any other arithmetic on bf16 values (``+``, ``*``, ``-x``, comparisons, ``tl.sum``; ``tl.max``
  upcasts to fp32 itself): it runs on the bit patterns.

What :func:`install` patches, on ``triton.runtime.interpreter`` only, once per process:

* ``InterpreterBuilder.create_dot``: bf16 operands are decoded to fp32 (exact) and multiplied with
  fp32 accumulation, as the tensor cores do for bf16 × bf16 → fp32 (``tl.dot`` has no bf16
  accumulator);
* ``InterpreterBuilder.cast_impl`` (every ``fp_trunc``/``fp_ext``/int cast) and
  ``create_fp_to_fp``: casts to bf16 round to nearest even from fp32 (other sources go through
  fp32 first: a second rounding for fp64 and large ints, which perk's kernels never cast to bf16);
  casts from bf16 decode exactly;
* ``InterpreterBuilder.binary_op`` / ``unary_op`` and ``ReduceOps.apply_impl``: refuse bf16
  operands with an error naming this module, instead of computing on bit patterns. They are not
  emulated: perk's kernels upcast to fp32 before any arithmetic, and a GPU's bf16 reductions
  round in a tree order the interpreter would not reproduce anyway.

Loads and stores are left alone: they are already bit-exact (checked by
tests/test_triton_bf16_interpreter.py, with the rest of this module against torch's own bf16 ops).
bf16 atomics are not patched either (perk's kernels have none).

Written against Triton 3.9.0's ``triton/runtime/interpreter.py``. :func:`install` (the conftest
calls it when it is imported) first runs tiny kernels that check each of the three behaviours on
the unpatched interpreter; only the broken ones are patched, and
where the installed Triton already computes bf16 correctly nothing is (:data:`STATUS` says which,
and the conftest prints it in pytest's header). fp16 needs none of this: numpy has a float16 type.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

WRITTEN_AGAINST = "3.9.0"


class Bf16NotEmulated(NotImplementedError):
    """A kernel did arithmetic on bf16 values that the interpreter would compute on bit patterns."""


def refused(error: BaseException | None) -> bool:
    """Whether ``error`` (an InterpreterError, which may wrap another) comes from a refusal of this module."""
    while error is not None:
        if isinstance(error, Bf16NotEmulated):
            return True
        error = error.__cause__
    return False


# What install() found and did, for pytest's header: "patched: ...", "off: ..." or "not installed".
STATUS = "not installed"


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) → the fp32 values they encode (exact: bf16 is fp32's top half)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def fp32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """fp32 values → bf16 bit patterns, rounded to nearest, ties to even (PTX ``cvt.rn.bf16.f32``):
    finite values past bf16's largest round to ±inf, NaNs stay (quiet) NaNs."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    lowest_kept = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = (bits + np.uint32(0x7FFF) + lowest_kept) >> np.uint32(16)  # NaNs could carry: handled below
    is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    quiet_nan = (bits >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(is_nan, quiet_nan, rounded).astype(np.uint16)


def assert_rounded_to_nearest(actual: torch.Tensor, exact: torch.Tensor, what: str = "", slack=0.0) -> None:
    """``actual`` (bf16 or fp16) is ``exact`` (a wider dtype) rounded once to nearest: within half
    a unit in the last place, plus 1/64 ulp and ``slack`` (absolute: a bound on the error of the
    fp32 arithmetic that produced it). A truncating cast, or a second rounding, misses by up to a
    whole ulp."""
    info = torch.finfo(actual.dtype)
    exact = exact.detach().double()
    magnitude = exact.abs().clamp(min=info.smallest_normal)
    ulp = torch.exp2(torch.floor(torch.log2(magnitude))) * info.eps  # spacing of actual's dtype at |exact|
    error = ((actual.detach().double() - exact).abs() - slack).clamp(min=0)
    excess = error / ulp - 0.5 * (1 + 1 / 32)
    if bool((excess > 0).any()):
        worst = int(excess.argmax())
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} of {exact.numel()} values are not {exact.dtype} rounded to "
            f"nearest {actual.dtype}; worst at flat index {worst}: {actual.flatten()[worst].item()!r} for "
            f"{exact.flatten()[worst].item()!r} ({float(error.flatten()[worst] / ulp.flatten()[worst]):.3f} ulp)"
        )


# ---------------------------------------------------------------------------------------------
# The patches
# ---------------------------------------------------------------------------------------------


def _patched_methods():
    """(owner, name, replacement factory) of every patch, by the behaviour it fixes."""
    import triton.language as tl
    from triton.runtime import interpreter

    handle = interpreter.TensorHandle
    bf16, fp32 = tl.bfloat16, tl.float32

    def to_fp32(h):
        return handle(bf16_bits_to_fp32(h.data), fp32) if h.dtype.scalar == bf16 else h

    def dot(original):
        def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            # The accumulator d is fp32 here: tl.dot refuses out_dtype=bfloat16.
            return original(self, to_fp32(a), to_fp32(b), d, input_precision, max_num_imprecise_acc)

        return create_dot

    def to_bf16(src):
        return handle(fp32_to_bf16_bits(to_fp32(src).data.astype(np.float32)), bf16)

    def cast(original):
        def cast_impl(self, src, dst_type):
            src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
            if src_ty == dst_ty or bf16 not in (src_ty, dst_ty):
                return original(self, src, dst_type)
            if dst_ty == bf16:
                return to_bf16(src)
            with np.errstate(over="ignore"):  # bf16 → fp16 past 65504 is inf, as it should be
                return original(self, to_fp32(src), dst_type)  # bf16 → fp32 exactly, then fp32's own cast

        return cast_impl

    def fp_to_fp(original):
        def create_fp_to_fp(self, src, dst_type, rounding_mode):
            src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
            fp8 = 8 in (src_ty.primitive_bitwidth, dst_ty.primitive_bitwidth)
            round_to_zero = rounding_mode == interpreter._ir.ROUNDING_MODE.RTZ  # truncation: already right
            if fp8 or round_to_zero or bf16 not in (src_ty, dst_ty):
                return original(self, src, dst_type, rounding_mode)
            return self.cast_impl(src, dst_type)

        return create_fp_to_fp

    def refuse(original):
        @functools.wraps(original)
        def refusing(self, *args, **kwargs):
            for arg in args:
                tensors = arg if isinstance(arg, tuple) else (arg,)
                if any(getattr(getattr(t, "dtype", None), "scalar", None) == bf16 for t in tensors):
                    raise Bf16NotEmulated(
                        f"Triton's interpreter computes bf16 {original.__name__} on raw bit patterns and "
                        f"{__name__} does not emulate it: convert with .to(tl.float32) first"
                    )
            return original(self, *args, **kwargs)

        return refusing

    builder = interpreter.InterpreterBuilder
    return {
        "dot": [(builder, "create_dot", dot)],
        "cast": [(builder, "cast_impl", cast), (builder, "create_fp_to_fp", fp_to_fp)],
        "arithmetic": [(builder, "binary_op", refuse), (builder, "unary_op", refuse),
                       (interpreter.ReduceOps, "apply_impl", refuse)],
    }  # fmt: skip


_originals: dict[tuple[type, str], object] = {}


def _set_patches(behaviours) -> None:
    for behaviour, patches in _patched_methods().items():
        for owner, name, factory in patches:
            key = (owner, name)
            if behaviour in behaviours and key not in _originals:
                _originals[key] = owner.__dict__[name]
                setattr(owner, name, factory(_originals[key]))
            elif behaviour not in behaviours and key in _originals:
                setattr(owner, name, _originals.pop(key))


# ---------------------------------------------------------------------------------------------
# The probe: does the interpreter at hand get each behaviour wrong?
# ---------------------------------------------------------------------------------------------


@functools.cache
def _probe_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tile = i[:, None] * N + i[None, :]
        tl.store(c_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile)))

    @triton.jit
    def cast_kernel(x_ptr, y_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(y_ptr + i, tl.load(x_ptr + i).to(tl.bfloat16))

    @triton.jit
    def arithmetic_kernel(x_ptr, y_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        x = tl.load(x_ptr + i)
        tl.store(y_ptr + i, x * x - x)

    return dot_kernel, cast_kernel, arithmetic_kernel


def broken_behaviours() -> set[str]:
    """Which of "dot", "cast", "arithmetic" the interpreter as it stands gets wrong in bf16 (run with
    this module's patches removed, or after install() to see what remains)."""
    from triton.runtime.errors import InterpreterError

    dot_kernel, cast_kernel, arithmetic_kernel = _probe_kernels()
    n = 16
    small_ints = (torch.arange(n * n).reshape(n, n) % 5 - 2).to(torch.bfloat16)  # exact in bf16
    product = torch.empty(n, n)
    dot_kernel[(1,)](small_ints, small_ints.t().contiguous(), product, N=n)
    ties = torch.tensor([1.0041, -1.0041, 1.00390625, 1.01171875] * 4)  # to nearest, even, even, up
    rounded = torch.empty(n, dtype=torch.bfloat16)
    cast_kernel[(1,)](ties, rounded, N=n)
    x = ties.to(torch.bfloat16)
    computed = torch.empty_like(x)
    try:
        arithmetic_kernel[(1,)](x, computed, N=n)
        arithmetic_right = torch.equal(computed, x * x - x)
    except InterpreterError as e:
        if not refused(e):
            raise
        arithmetic_right = True  # refused by this module's patch: not computed on bit patterns
    wrong = {
        "dot": not torch.equal(product, small_ints.float() @ small_ints.t().float()),
        "cast": not torch.equal(rounded, ties.to(torch.bfloat16)),
        "arithmetic": not arithmetic_right,
    }
    return {behaviour for behaviour, is_wrong in wrong.items() if is_wrong}


def install() -> str:
    """Patch what the installed interpreter gets wrong in bf16 (idempotent); returns :data:`STATUS`."""
    global STATUS
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("install() needs TRITON_INTERPRET=1, set before triton kernels are defined")
    import triton

    _set_patches(set())  # probe the interpreter itself
    broken = broken_behaviours()
    _set_patches(broken)
    if not broken:
        STATUS = f"off: Triton {triton.__version__}'s interpreter already computes bf16 like a GPU"
    else:
        remaining = broken_behaviours()
        if remaining:
            raise RuntimeError(
                f"{__name__} (written against Triton {WRITTEN_AGAINST}) did not fix bf16 {sorted(remaining)} "
                f"on Triton {triton.__version__}: update it for that interpreter"
            )
        STATUS = f"patched bf16 {', '.join(sorted(broken))} in Triton {triton.__version__}'s interpreter"
    return STATUS


def uninstall() -> None:
    """Restore the interpreter's own methods (the self-test checks it then fails)."""
    _set_patches(set())


def installed() -> set[str]:
    """The behaviours currently patched."""
    return {b for b, patches in _patched_methods().items() if any((o, n) in _originals for o, n, _ in patches)}
