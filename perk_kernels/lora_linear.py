"""Batched multi-adapter LoRA linear: y = x Wᵀ + b + scale · (x A[id]ᵀ) B[id]ᵀ.

Semantics (rows of ``x`` belong to adapters, in any order)::

    x        (rows, d_in)            activations, fp32 / bf16 / fp16 / fp64
    weight   (d_out, d_in)           frozen base weight, x's dtype; never gets a gradient
    bias     (d_out,) or None        frozen, x's dtype
    lora_a   (n_adapters, r, d_in)   any float dtype (fp32 adapters), cast to x's dtype per tile
    lora_b   (n_adapters, d_out, r)
    y[rows of adapter a] = x Wᵀ + b + scale · (x A[a]ᵀ) B[a]ᵀ        (x's dtype)

Kernels, multi-LoRA-serving style (rows are visited in adapter order through a permutation, so a
tile of ``BLOCK_M`` rows nearly always belongs to one adapter; the rare tiles that straddle two
adapters loop over them with row masks):

* ``_lora_shrink_kernel``          h = scale · x M[a]ᵀ         (rows, r): x→h, and dy→dh with M = Bᵀ
* ``_lora_gemm_expand_kernel``     y = x Wᵀ + b + scale · h E[a]ᵀ: the base GEMM with the LoRA
  expand fused into its epilogue (forward with E = B; dx = dy W + dh A with W → Wᵀ, E = Aᵀ)
* ``_lora_adapter_outer_kernel``   G[a] = scale · Σ_{rows of a} leftᵀ right: dA = dhᵀ x, dB = s·dyᵀ h,
  each adapter's rows split over several programs (partial sums, added in a fixed order).

The rows of each adapter (the permutation, per-adapter offsets: :class:`AdapterRows`) are found
once per batch by :func:`adapter_rows` and reused by every layer of a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from perk_kernels._utils import (
    check_finite_scalar,
    check_float,
    check_same_device,
    check_tensor,
    choose_backend,
    device_capability,
    dot_input_precision,
    interpret_mode,
    next_power_of_2,
    requested_backend,
    target_programs,
)

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


# Autotune configs. Each tile carries the largest BLOCK_R (the adapter chunk of the LoRA part) it
# holds without spilling registers on sm_90 and on sm_80, as `python -m tools.aot`
# measures (0: spills at any rank there): the fused expand keeps a (BLOCK_R, BLOCK_N) fp32 adapter
# tile beside the accumulator, so at ranks >= 64 (BLOCK_R = 64) only tiles with fewer accumulator
# registers per thread remain, and Ampere's mma keeps more of them live than Hopper's wgmma.
# FMA tiles serve dtypes whose tl.dot has no tensor cores (fp32 without TF32, fp64): there the
# tensor-core tiles spill kilobytes and take minutes to compile.
#                 BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, largest BLOCK_R on sm_90, on sm_80
_GEMM_TILES = [
    (128, 256, 64, 8, 3, 16, 0),
    (128, 128, 64, 8, 4, 64, 16),
    (128, 128, 64, 4, 4, 16, 16),
    (128, 64, 64, 4, 4, 64, 16),
    (64, 128, 32, 4, 4, 16, 16),
    (64, 64, 64, 4, 4, 64, 64),
]
_GEMM_FMA_TILES = [(64, 64, 32, 4, 3, 64, 64)]
#                   BLOCK_M, BLOCK_K, warps, stages, largest BLOCK_R on sm_90, on sm_80
_SHRINK_TILES = [
    (64, 128, 4, 3, 16, 16),
    (128, 64, 4, 4, 64, 64),
    (64, 64, 4, 4, 64, 64),
    (128, 128, 8, 3, 64, 64),
]
_SHRINK_FMA_TILES = [(32, 64, 4, 3, 64, 64)]

# id(config) -> ({sm: largest BLOCK_R}, for FMA dots): read by _prune_configs.
_TILE_LIMITS: dict[int, tuple[dict[int, int], bool]] = {}


def _configs(names: tuple[str, ...], tiles: list[tuple], fma_tiles: list[tuple]) -> list[triton.Config]:
    configs = []
    for fma, rows in ((False, tiles), (True, fma_tiles)):
        for *blocks, warps, stages, max_r_sm90, max_r_sm80 in rows:
            kwargs = dict(zip(names, blocks))
            if "BLOCK_N" in kwargs:
                kwargs["GROUP_M"] = 8
            config = triton.Config(kwargs, num_warps=warps, num_stages=stages)
            _TILE_LIMITS[id(config)] = ({90: max_r_sm90, 80: max_r_sm80}, fma)
            configs.append(config)
    return configs


def _gemm_configs() -> list[triton.Config]:
    if interpret_mode():
        # Small tiles so that CPU tests with tiny shapes still cover multi-tile and tail paths.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    return _configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), _GEMM_TILES, _GEMM_FMA_TILES)


def _shrink_configs() -> list[triton.Config]:
    if interpret_mode():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32})]
    return _configs(("BLOCK_M", "BLOCK_K"), _SHRINK_TILES, _SHRINK_FMA_TILES)


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configs the autotuner may try for one call: tensor-core or FMA tiles by dtype, and only
    those that hold the call's BLOCK_R without spilling on this GPU (see _GEMM_TILES)."""
    if not all(id(c) in _TILE_LIMITS for c in configs):
        return configs  # the interpreter's single config
    x = named_args["x_ptr"]
    fma = x.dtype in (torch.float32, torch.float64) and kwargs.get("DOT_PRECISION") != "tf32"
    sm = 90 if device_capability(x.device)[0] >= 9 else 80  # newer GPUs get Hopper's limits
    kept = []
    for config in configs:
        max_block_r, fma_tile = _TILE_LIMITS[id(config)]
        if fma_tile == fma and kwargs.get("BLOCK_R", 0) <= max_block_r[sm]:
            kept.append(config)
    return kept or configs


# Keys hold the layout of the adapter / weight operand, so the forward call and the backward one of
# a square layer (same K, R, dtypes) are tuned apart: stride_mk is 1 for x Aᵀ, r for dy B;
# stride_wk is 1 for x Wᵀ, d_in for dy W.
@triton.autotune(
    configs=_shrink_configs(), key=["K", "R", "stride_mk"], prune_configs_by={"early_config_prune": _prune_configs}
)
@triton.jit(do_not_specialize=["M"])
def _lora_shrink_kernel(
    x_ptr, mat_ptr, h_ptr, row_order_ptr, sorted_ids_ptr,
    M, K, R, scale,
    stride_xm, stride_xk, stride_ma, stride_mr, stride_mk, stride_hm, stride_hr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """h[i] = scale · x[row_order[i]] @ mat[sorted_ids[i]]ᵀ for sorted positions i (h is sorted)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # sorted positions
    m_mask = offs_m < M
    rows = tl.load(row_order_ptr + offs_m, mask=m_mask, other=0)
    ids = tl.load(sorted_ids_ptr + offs_m, mask=m_mask, other=-1)
    a_first = tl.load(sorted_ids_ptr + pid_m * BLOCK_M)
    a_last = tl.load(sorted_ids_ptr + tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    # Sorted rows: the adapters of one tile are a contiguous range, almost always one adapter.
    for a in range(a_first, a_last + 1):
        row_mask = (ids == a)[:, None]
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(
                x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=row_mask & k_mask[None, :],
                other=0.0,
            )
            mat = tl.load(
                mat_ptr + a * stride_ma + offs_r[None, :] * stride_mr + offs_k[:, None] * stride_mk,
                mask=r_mask[None, :] & k_mask[:, None],
                other=0.0,
            )
            # Adapters may be fp32 while x is bf16: multiply in x's dtype (tensor cores), accumulate in ACC.
            acc = tl.dot(x, mat.to(x.dtype), acc, input_precision=DOT_PRECISION)
    acc = acc * scale
    tl.store(  # int64 offsets: rows x r passes 2^31 at r = 256 from 8.4M rows
        h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_r[None, :] * stride_hr,
        acc.to(h_ptr.dtype.element_ty),
        mask=m_mask[:, None] & r_mask[None, :],
    )


@triton.autotune(
    configs=_gemm_configs(),
    key=["N", "K", "R", "stride_wk"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["M"])
def _lora_gemm_expand_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, e_ptr, y_ptr, row_order_ptr, sorted_ids_ptr,
    M, N, K, R, scale,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_hr,
    stride_ea, stride_en, stride_er, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """y[row_order[i]] = x[row_order[i]] Wᵀ + b + scale · h[i] E[sorted_ids[i]]ᵀ (h sorted)."""
    pid = tl.program_id(0)
    # Grouped tile order: GROUP_M row tiles share the same W column tiles while in L2.
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * n_tiles_n
    first_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(n_tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # sorted positions
    m_mask = offs_m < M
    # Out-of-range positions read row 0 / column (n mod N): valid addresses, so the K loop needs
    # no row or column masks; their results are never stored.
    rows = tl.load(row_order_ptr + offs_m, mask=m_mask, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_n_safe = offs_n % N
    x_ptrs = x_ptr + rows[:, None] * stride_xm
    w_ptrs = w_ptr + offs_n_safe[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_ptrs + offs_k[None, :] * stride_xk)
            w = tl.load(w_ptrs + offs_k[:, None] * stride_wk)
        else:
            x = tl.load(x_ptrs + offs_k[None, :] * stride_xk, mask=offs_k[None, :] < K, other=0.0)
            w = tl.load(w_ptrs + offs_k[:, None] * stride_wk, mask=offs_k[:, None] < K, other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n_safe).to(ACC)[None, :]
    if HAS_LORA:
        ids = tl.load(sorted_ids_ptr + offs_m, mask=m_mask, other=-1)
        a_first = tl.load(sorted_ids_ptr + pid_m * BLOCK_M)
        a_last = tl.load(sorted_ids_ptr + tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1)
        for a in range(a_first, a_last + 1):
            row_mask = (ids == a)[:, None]
            for r0 in range(0, R, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                r_mask = offs_r < R
                h = tl.load(
                    h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_r[None, :] * stride_hr,
                    mask=row_mask & r_mask[None, :],
                    other=0.0,
                )
                e = tl.load(
                    e_ptr + a * stride_ea + offs_n_safe[None, :] * stride_en + offs_r[:, None] * stride_er,
                    mask=r_mask[:, None],
                    other=0.0,
                )
                # scale folded into the (BLOCK_R, BLOCK_N) adapter tile: one accumulator, r/d_in extra work.
                e = (e.to(ACC) * scale).to(h.dtype)
                acc = tl.dot(h, e, acc, input_precision=DOT_PRECISION)
    tl.store(
        y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


@triton.jit(do_not_specialize=["n_splits"])
def _lora_adapter_outer_kernel(
    left_ptr, right_ptr, out_ptr, row_order_ptr, starts_ptr,
    P, Q, scale, n_splits,
    stride_lm, stride_lp, stride_rm, stride_rq, stride_os, stride_oa, stride_op, stride_oq,
    LEFT_SORTED: tl.constexpr, RIGHT_SORTED: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):  # fmt: skip
    """out[split, a] = scale · Σ_{sorted positions i of adapter a in this split} left[i]ᵀ right[i].

    ``*_SORTED`` operands are indexed by sorted position, the others by ``row_order[i]``.
    """
    pid_as = tl.program_id(0).to(tl.int64)  # int64: split * stride_os can pass 2^31
    a = pid_as // n_splits
    split = pid_as % n_splits
    seg_start = tl.load(starts_ptr + a)
    seg_end = tl.load(starts_ptr + a + 1)
    # Each split gets a whole number of BLOCK_M row blocks.
    per_split = tl.cdiv(tl.cdiv(seg_end - seg_start, n_splits), BLOCK_M) * BLOCK_M
    lo = seg_start + split * per_split
    hi = tl.minimum(lo + per_split, seg_end)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_mask = offs_p < P
    q_mask = offs_q < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC)
    for i0 in range(lo, hi, BLOCK_M):
        offs_i = i0 + tl.arange(0, BLOCK_M)
        i_mask = offs_i < hi
        rows = tl.load(row_order_ptr + offs_i, mask=i_mask, other=0)
        left_rows = offs_i if LEFT_SORTED else rows
        right_rows = offs_i if RIGHT_SORTED else rows
        left_t = tl.load(  # (BLOCK_P, BLOCK_M): the left operand read transposed
            left_ptr + left_rows[None, :] * stride_lm + offs_p[:, None] * stride_lp,
            mask=i_mask[None, :] & p_mask[:, None],
            other=0.0,
        )
        right = tl.load(
            right_ptr + right_rows[:, None] * stride_rm + offs_q[None, :] * stride_rq,
            mask=i_mask[:, None] & q_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(left_t, right.to(left_t.dtype), acc, input_precision=DOT_PRECISION)
    tl.store(
        out_ptr + split * stride_os + a * stride_oa + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq,
        acc * scale,
        mask=p_mask[:, None] & q_mask[None, :],
    )


# ----------------------------------------------------------------------------------------------
# The rows of each adapter
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AdapterRows:
    """Rows grouped by adapter, computed once per batch and shared by every LoRA layer.

    Attributes:
        row_adapters: (rows,) int64, each row's adapter in the original row order.
        n_adapters: number of adapters the ids index (``lora_a.shape[0]`` of the layers).
        row_order: (rows,) int64, the original row of each sorted position (stable sort by adapter).
        sorted_ids: (rows,) int64, the adapter of each sorted position (non-decreasing).
        starts: (n_adapters + 1,) int64, adapter ``a`` owns sorted positions ``starts[a]:starts[a+1]``.
        max_rows_per_adapter: host int, the most rows of one adapter (sizes the backward's row splits).
        host_counts: host ints, rows per adapter (lets the torch path slice without a sync).
        rows_sorted: host bool, the rows are already grouped by adapter (``row_order`` is the identity).
    """

    row_adapters: torch.Tensor
    n_adapters: int
    row_order: torch.Tensor
    sorted_ids: torch.Tensor
    starts: torch.Tensor
    max_rows_per_adapter: int
    host_counts: tuple[int, ...]
    rows_sorted: bool

    @property
    def n_rows(self) -> int:
        return self.row_adapters.numel()

    @property
    def counts(self) -> torch.Tensor:
        """(n_adapters,) int64, rows per adapter."""
        return self.starts[1:] - self.starts[:-1]


def adapter_rows(row_adapters: torch.Tensor, n_adapters: int) -> AdapterRows:
    """Group rows by adapter once, for reuse by every :func:`lora_linear` call of a forward pass.

    Args:
        row_adapters: integer tensor of any shape (usually ``x.shape[:-1]``), each row's adapter.
        n_adapters: the number of adapters; every id must lie in ``[0, n_adapters)``.

    Validating the ids costs one device→host sync here, and none in the layers that reuse the result.
    """
    check_tensor("row_adapters", row_adapters)
    if row_adapters.dtype.is_floating_point or row_adapters.dtype.is_complex or row_adapters.dtype == torch.bool:
        raise TypeError(f"row_adapters must be an integer tensor, got {row_adapters.dtype}")
    if isinstance(n_adapters, bool) or not isinstance(n_adapters, int) or n_adapters < 1:
        raise ValueError(f"n_adapters must be a positive int, got {n_adapters!r}")
    ids = row_adapters.reshape(-1).to(torch.int64)
    if ids.numel() == 0:
        zeros = torch.zeros(n_adapters + 1, dtype=torch.int64, device=ids.device)
        return AdapterRows(ids, n_adapters, ids.clone(), ids.clone(), zeros, 0, (0,) * n_adapters, True)
    low, high = torch.stack([ids.min(), ids.max()]).tolist()
    if low < 0 or high >= n_adapters:
        raise ValueError(f"row_adapters must lie in [0, {n_adapters}) (n_adapters), got ids in [{low}, {high}]")
    counts = torch.bincount(ids, minlength=n_adapters)
    starts = torch.zeros(n_adapters + 1, dtype=torch.int64, device=ids.device)
    starts[1:] = torch.cumsum(counts, 0)
    row_order = torch.argsort(ids, stable=True)
    host_counts = tuple(counts.tolist())
    rows_sorted = bool((ids[1:] >= ids[:-1]).all())
    return AdapterRows(
        ids, n_adapters, row_order, ids[row_order], starts, max(host_counts), host_counts, rows_sorted
    )


def _single_adapter_rows(n_rows: int, n_adapters: int, device: torch.device) -> AdapterRows:
    """Every row uses adapter 0 (``row_adapters=None``): no sort and no sync needed."""
    row_order = torch.arange(n_rows, dtype=torch.int64, device=device)
    starts = torch.full((n_adapters + 1,), n_rows, dtype=torch.int64, device=device)
    starts[0] = 0
    zeros = torch.zeros(n_rows, dtype=torch.int64, device=device)
    host_counts = (n_rows,) + (0,) * (n_adapters - 1)
    return AdapterRows(zeros, n_adapters, row_order, zeros, starts, n_rows, host_counts, True)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype):
    """Accumulate in fp32, or fp64 for fp64 inputs (gradcheck)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_r(r: int) -> int:
    # tl.dot needs every dimension >= 16 on GPUs; larger ranks are looped over in chunks.
    return max(16, min(next_power_of_2(r), 32 if interpret_mode() else 64))


def lora_shrink(x: torch.Tensor, mat: torch.Tensor, by_adapter: AdapterRows, scale: float = 1.0) -> torch.Tensor:
    """h[i] = scale · x[row_order[i]] @ mat[a_i]ᵀ, (rows, r) in sorted order and x's dtype.

    ``x`` is (rows, K), ``mat`` is (n_adapters, r, K) (any strides: pass ``lora_b.transpose(1, 2)``
    to shrink ``dy`` with B).
    """
    rows, k = x.shape
    r = mat.shape[1]
    h = torch.empty((rows, r), dtype=x.dtype, device=x.device)
    block_r = _block_r(r)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(r, block_r))  # noqa: E731
    _lora_shrink_kernel[grid](
        x, mat, h, by_adapter.row_order, by_adapter.sorted_ids,
        rows, k, r, scale,
        x.stride(0), x.stride(1), mat.stride(0), mat.stride(1), mat.stride(2), h.stride(0), h.stride(1),
        ACC=_acc_dtype(x.dtype), DOT_PRECISION=dot_input_precision(x.dtype), BLOCK_R=block_r,
    )  # fmt: skip
    return h


def lora_gemm_expand(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    h: torch.Tensor | None,
    expand: torch.Tensor | None,
    scale: float,
    by_adapter: AdapterRows,
) -> torch.Tensor:
    """y = x weightᵀ + bias + scale · h[sorted] expand[a]ᵀ, (rows, N) in x's order and dtype.

    ``x`` (rows, K), ``weight`` (N, K), ``h`` (rows, R) in sorted order (from :func:`lora_shrink`),
    ``expand`` (n_adapters, N, R); ``h=None`` computes the base GEMM alone.
    """
    rows, k = x.shape
    n = weight.shape[0]
    has_lora = h is not None
    r = h.shape[1] if has_lora else 0
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    h_args = (h, expand) if has_lora else (x, weight)  # dummies, never read when HAS_LORA is off
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _lora_gemm_expand_kernel[grid](
        x, weight, bias if bias is not None else x, h_args[0], h_args[1], y,
        by_adapter.row_order, by_adapter.sorted_ids,
        rows, n, k, r, scale,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        h.stride(0) if has_lora else 0, h.stride(1) if has_lora else 0,
        expand.stride(0) if has_lora else 0, expand.stride(1) if has_lora else 0,
        expand.stride(2) if has_lora else 0,
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, ACC=_acc_dtype(x.dtype),
        DOT_PRECISION=dot_input_precision(x.dtype), BLOCK_R=_block_r(r),
    )  # fmt: skip
    return y


def lora_adapter_outer(
    left: torch.Tensor,
    right: torch.Tensor,
    by_adapter: AdapterRows,
    scale: float = 1.0,
    *,
    left_sorted: bool,
    right_sorted: bool,
    n_splits: int | None = None,
) -> torch.Tensor:
    """G[a] = scale · Σ_{rows of adapter a} left[row]ᵀ right[row]: (n_adapters, P, Q) in fp32 (fp64 for fp64).

    ``left`` (rows, P), ``right`` (rows, Q); a ``*_sorted`` operand is in sorted order (h, dh),
    the other in the original row order (x, dy). An adapter with no rows gets zeros. Each
    adapter's rows are split over ``n_splits`` programs (default: enough to fill the device);
    their partial sums are added in a fixed order, so the result is deterministic.
    """
    p, q = left.shape[1], right.shape[1]
    n_adapters = by_adapter.n_adapters
    acc_dtype = torch.float64 if left.dtype == torch.float64 else torch.float32
    swap = q > p
    if swap:
        # The wider side goes on the tile's first axis, where Hopper's wgmma needs 64 rows: the
        # rank-16 dA = dhᵀ x runs as (xᵀ dh)ᵀ on HGMMA instead of HMMA. Same sums, stored transposed.
        left, right, left_sorted, right_sorted, p, q = right, left, right_sorted, left_sorted, q, p
    small = interpret_mode()
    block_m = 32 if small else 64
    block_p = max(16, min(next_power_of_2(p), 32 if small else 128))
    block_q = max(16, min(next_power_of_2(q), 32 if small else 64))
    tiles = triton.cdiv(p, block_p) * triton.cdiv(q, block_q)
    if n_splits is None:
        wanted = triton.cdiv(target_programs(left.device), n_adapters * tiles)
        n_splits = max(1, min(wanted, triton.cdiv(by_adapter.max_rows_per_adapter, 4 * block_m)))
    shape = (n_splits, n_adapters, q, p) if swap else (n_splits, n_adapters, p, q)  # the caller's P, Q
    partial = torch.empty(shape, dtype=acc_dtype, device=left.device)
    out = partial.transpose(2, 3) if swap else partial  # indexed by the kernel's p, q
    grid = (n_adapters * n_splits, triton.cdiv(p, block_p), triton.cdiv(q, block_q))
    _lora_adapter_outer_kernel[grid](
        left, right, partial, by_adapter.row_order, by_adapter.starts,
        p, q, scale, n_splits,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        LEFT_SORTED=left_sorted, RIGHT_SORTED=right_sorted, ACC=_acc_dtype(left.dtype),
        DOT_PRECISION=dot_input_precision(left.dtype),
        BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_Q=block_q,
        num_warps=4, num_stages=3,
    )  # fmt: skip
    return partial[0] if n_splits == 1 else partial.sum(0)


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


class _LoraLinearFunction(torch.autograd.Function):
    """Triton forward and first-order backward (dx, dA, dB; the base weight and bias are frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, by_adapter):
        h = lora_shrink(x, lora_a, by_adapter)  # (rows, r), sorted order
        y = lora_gemm_expand(x, weight, bias, h, lora_b, scale, by_adapter)
        ctx.save_for_backward(x, weight, lora_a, lora_b, h)
        ctx.scale = scale
        ctx.by_adapter = by_adapter
        return y

    @staticmethod
    @once_differentiable  # Triton kernels have no double backward: use backend="torch" for that.
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, h = ctx.saved_tensors
        by_adapter, scale = ctx.by_adapter, ctx.scale
        need_dx, need_da, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dx = d_a = d_b = None
        if need_dx or need_da:
            dh = lora_shrink(dy, lora_b.transpose(1, 2), by_adapter, scale)  # (rows, r) = s·dy B, sorted
        if need_dx:
            # dx = dy W + dh A: the same fused GEMM with W → Wᵀ and E = Aᵀ.
            dx = lora_gemm_expand(dy, weight.t(), None, dh, lora_a.transpose(1, 2), 1.0, by_adapter)
        if need_da:
            d_a = lora_adapter_outer(dh, x, by_adapter, left_sorted=True, right_sorted=False).to(lora_a.dtype)
        if need_db:
            d_b = lora_adapter_outer(dy, h, by_adapter, scale, left_sorted=False, right_sorted=True)
            d_b = d_b.to(lora_b.dtype)
        return dx, None, None, d_a, d_b, None, None


# ----------------------------------------------------------------------------------------------
# CPU path: a bf16 base model with fp32 adapters
# ----------------------------------------------------------------------------------------------
# The reference runs the adapter term in fp32: beside a bf16 base that costs an fp32 (rows, d_out)
# product, its cast and a second add (and their transposes in backward), memory-bound work next to a
# fast native bf16 GEMM. Here the fp32 factors enter bf16 GEMMs as (hi, lo) bf16 pairs, so the
# term keeps ~2⁻¹⁶ of its relative precision (fp32 adapters' small updates are not lost under bf16
# spacing) and is added to the base output inside one bf16 addmm (fp32 accumulation, one rounding
# where the reference rounds twice). The rank-r factors (h, dh) and the adapters' gradients stay fp32.


def _bf16_pair(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` in bf16 with ``hi + lo = t`` to ~2⁻¹⁶ relative (t fp32)."""
    hi = t.to(torch.bfloat16)
    return hi, (t - hi.float()).to(torch.bfloat16)


def _add_low_rank_bf16(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """``out += left @ rightᵀ`` in place: out bf16 (m, n), left fp32 (m, r), right fp32 (n, r).

    One bf16 GEMM over K = 3r: hi·hi + hi·lo + lo·hi (lo·lo, ~2⁻¹⁶ of the product, is dropped).
    """
    left_hi, left_lo = _bf16_pair(left)
    right_hi, right_lo = _bf16_pair(right)
    out.addmm_(torch.cat([left_hi, left_hi, left_lo], 1), torch.cat([right_hi, right_lo, right_hi], 1).t())


def _adapter_blocks(by_adapter: AdapterRows):
    """``(adapter, rows slice)`` of each adapter with rows, in sorted row order."""
    start = 0
    for adapter, count in enumerate(by_adapter.host_counts):
        if count:
            yield adapter, slice(start, start + count)
        start += count


def _sorted_rows(t: torch.Tensor, by_adapter: AdapterRows) -> torch.Tensor:
    return t if by_adapter.rows_sorted else t[by_adapter.row_order]


def _original_rows(t: torch.Tensor, by_adapter: AdapterRows) -> torch.Tensor:
    return t if by_adapter.rows_sorted else torch.empty_like(t).index_copy(0, by_adapter.row_order, t)


def _uses_bf16_cpu_path(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and lora_a.dtype == lora_b.dtype == torch.float32


class _LoraLinearBf16CpuFunction(torch.autograd.Function):
    """:func:`lora_linear` on CPU for a bf16 x with fp32 adapters; first-order backward (dx, dA, dB)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, by_adapter):
        y = _sorted_rows(torch.nn.functional.linear(x, weight, bias), by_adapter)
        x_sorted = _sorted_rows(x, by_adapter)
        h = torch.empty((x.shape[0], lora_a.shape[1]), dtype=torch.float32, device=x.device)  # s·x Aᵀ, sorted
        for adapter, rows in _adapter_blocks(by_adapter):
            torch.mm(x_sorted[rows].float(), lora_a[adapter].t(), out=h[rows]).mul_(scale)
            _add_low_rank_bf16(y[rows], h[rows], lora_b[adapter])
        ctx.save_for_backward(x, weight, lora_a, lora_b, h)
        ctx.scale = scale
        ctx.by_adapter = by_adapter
        return _original_rows(y, by_adapter)

    @staticmethod
    @once_differentiable  # use backend="torch" (the reference) for double backward
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, h = ctx.saved_tensors
        by_adapter, scale = ctx.by_adapter, ctx.scale
        need_dx, need_da, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dy_sorted = _sorted_rows(dy, by_adapter)
        x_sorted = _sorted_rows(x, by_adapter) if need_da else None
        dx = _sorted_rows(dy @ weight, by_adapter) if need_dx else None
        d_a = torch.zeros_like(lora_a) if need_da else None
        d_b = torch.zeros_like(lora_b) if need_db else None
        for adapter, rows in _adapter_blocks(by_adapter):
            dy_rows = dy_sorted[rows].float()
            if need_db:
                torch.mm(dy_rows.t(), h[rows], out=d_b[adapter])
            if need_dx or need_da:
                dh = (dy_rows @ lora_b[adapter]).mul_(scale)  # (rows, r) = s·dy B
                if need_da:
                    torch.mm(dh.t(), x_sorted[rows].float(), out=d_a[adapter])
                if need_dx:
                    _add_low_rank_bf16(dx[rows], dh, lora_a[adapter].t())
        return (None if dx is None else _original_rows(dx, by_adapter)), None, None, d_a, d_b, None, None


# ----------------------------------------------------------------------------------------------
# Entry point and reference
# ----------------------------------------------------------------------------------------------


def _check_inputs(x, weight, bias, lora_a, lora_b, scale, row_adapters) -> AdapterRows | None:
    """Validate the arguments of :func:`lora_linear`; returns the rows of each adapter (None for the single-adapter case)."""
    check_tensor("x", x)
    check_float("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., d_in), got shape {tuple(x.shape)}")
    d_in = x.shape[-1]
    if d_in < 1:
        raise ValueError(f"x must have d_in >= 1 features (its last dimension), got shape {tuple(x.shape)}")
    check_tensor("weight", weight, ndim=2)
    check_tensor("lora_a", lora_a, ndim=3)
    check_tensor("lora_b", lora_b, ndim=3)
    check_float("lora_a", lora_a)
    check_float("lora_b", lora_b)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
    check_same_device(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    d_out = weight.shape[0]
    n_adapters, r = lora_a.shape[0], lora_a.shape[1]
    if weight.shape[1] != d_in:
        raise ValueError(f"weight must be (d_out, d_in={d_in}), got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != d_out:
        raise ValueError(f"bias must be (d_out={d_out},), got shape {tuple(bias.shape)}")
    if lora_a.shape[2] != d_in or r < 1 or n_adapters < 1:
        raise ValueError(f"lora_a must be (n_adapters, r, d_in={d_in}), got shape {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (n_adapters, d_out, r):
        raise ValueError(
            f"lora_b must be (n_adapters, d_out, r) = {(n_adapters, d_out, r)}, got shape {tuple(lora_b.shape)}"
        )
    check_finite_scalar("scale", scale)
    if row_adapters is None:
        return None
    n_rows = x.shape[:-1].numel()
    if isinstance(row_adapters, AdapterRows):
        by_adapter = row_adapters
        if by_adapter.n_adapters != n_adapters:
            raise ValueError(
                f"row_adapters' AdapterRows were built for {by_adapter.n_adapters} adapters, lora_a has {n_adapters}"
            )
    else:
        check_tensor("row_adapters", row_adapters)
        if row_adapters.shape not in (x.shape[:-1], torch.Size([n_rows])):
            raise ValueError(
                f"row_adapters must have shape x.shape[:-1]={tuple(x.shape[:-1])} or ({n_rows},), "
                f"got {tuple(row_adapters.shape)}"
            )
        by_adapter = adapter_rows(row_adapters, n_adapters)
    if by_adapter.n_rows != n_rows:
        raise ValueError(f"row_adapters has {by_adapter.n_rows} rows, x has {n_rows}")
    check_same_device(x=x, row_adapters=by_adapter.row_adapters)
    return by_adapter


def _add_adapter_term(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``y + scale·(x Aᵀ) Bᵀ`` for one adapter's rows, the adapter term in the adapters' dtype.

    The scale goes on the (rows, r) intermediate and, when y has the adapters' dtype, the sum is
    the expand's addmm: no (rows, d_out) temporaries for s·(x Aᵀ) Bᵀ nor for the sum (nor in
    backward). Beside a bf16 y the fp32 term is cast once, where it joins the base output.
    """
    h = (x.to(lora_a.dtype) @ lora_a.t()) * scale  # (rows, r)
    if y.dtype == lora_a.dtype:
        return torch.addmm(y, h, lora_b.t())
    return y + (h @ lora_b.t()).to(y.dtype)


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    row_adapters: torch.Tensor | AdapterRows | None = None,
) -> torch.Tensor:
    """Plain-torch oracle of :func:`lora_linear` (same signature; autograd does the backward).

    Twice differentiable w.r.t. x, lora_a and lora_b; weight and bias are treated as frozen (no
    gradient). The adapter term runs in the adapters' dtype (fp32 beside a bf16 base model) and is
    cast to x's dtype only where it joins the base output: cast to bf16 before the matmuls, an fp32
    adapter would lose inner updates under its bf16 spacing (about 1e-4 at LoRA A's 0.02 scale),
    and the finite-difference meta-gradient's ±ε probes with them. The Triton kernels cast adapters
    to x's dtype for tensor-core dots: the same function within bf16 tolerance.
    """
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (rows, d_in)
    y = torch.nn.functional.linear(x2, weight, bias)  # (rows, d_out)
    if row_adapters is None:
        return _add_adapter_term(y, x2, lora_a[0], lora_b[0], scale).reshape(*lead, weight.shape[0])
    by_adapter = row_adapters if isinstance(row_adapters, AdapterRows) else adapter_rows(row_adapters, lora_a.shape[0])
    # Rows grouped by adapter (a gather only when they are not already), one shrink and one
    # expand-add per adapter on its contiguous block, then back to the original row order.
    x_sorted, y_sorted = (x2, y) if by_adapter.rows_sorted else (x2[by_adapter.row_order], y[by_adapter.row_order])
    counts = list(by_adapter.host_counts)
    blocks = [
        _add_adapter_term(y_a, x_a, lora_a[a], lora_b[a], scale)  # (rows_a, d_out)
        for a, (x_a, y_a) in enumerate(zip(x_sorted.split(counts), y_sorted.split(counts)))
    ]
    y = torch.cat(blocks)
    if not by_adapter.rows_sorted:
        y = torch.empty_like(y).index_copy(0, by_adapter.row_order, y)
    return y.reshape(*lead, weight.shape[0])


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    row_adapters: torch.Tensor | AdapterRows | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Frozen linear layer plus one LoRA adapter per row: ``x Wᵀ + b + scale · (x A[id]ᵀ) B[id]ᵀ``.

    Args:
        x: (..., d_in) activations; the output has x's leading shape and dtype.
        weight: (d_out, d_in) frozen base weight in x's dtype; never gets a gradient.
        bias: (d_out,) frozen bias in x's dtype, or None.
        lora_a: (n_adapters, r, d_in) adapter down-projections (fp32 adapters are multiplied in
            x's dtype with fp32 accumulation).
        lora_b: (n_adapters, d_out, r) adapter up-projections.
        scale: LoRA scaling (alpha / r), a finite float.
        row_adapters: int tensor of shape x.shape[:-1] (or (rows,)) with each row's adapter, in any
            order; or the :class:`AdapterRows` of :func:`adapter_rows` (built once, reused by every
            layer); None: every row uses adapter 0.
        backend: "triton" or "torch" (see :func:`perk_kernels.choose_backend`). Chosen
            automatically on CPU, a bf16 x with fp32 adapters takes the mixed-precision CPU path
            (the adapter term as bf16 hi/lo pairs, added inside the base GEMM's rounding).

    Differentiable w.r.t. x, lora_a and lora_b. The Triton backward and the CPU path's are
    once-differentiable (double backward raises); the "torch" backend, named, is twice differentiable.
    """
    by_adapter = _check_inputs(x, weight, bias, lora_a, lora_b, scale, row_adapters)
    scale = float(scale)
    d_in = x.shape[-1]
    rows = x.shape[:-1].numel()
    function = _LoraLinearFunction
    if choose_backend(backend, x.device) == "torch" or rows == 0:
        if rows == 0 or requested_backend(backend) == "torch" or not _uses_bf16_cpu_path(x, lora_a, lora_b):
            return lora_linear_reference(x, weight, bias, lora_a, lora_b, scale, by_adapter)
        function = _LoraLinearBf16CpuFunction
    if by_adapter is None:
        by_adapter = _single_adapter_rows(rows, lora_a.shape[0], x.device)
    x2 = x.reshape(rows, d_in)
    bias = None if bias is None else bias.detach()
    y = function.apply(x2, weight.detach(), bias, lora_a, lora_b, scale, by_adapter)
    return y.reshape(*x.shape[:-1], weight.shape[0])
