"""Fused, chunked LM head + cross-entropy with per-token losses, never materialising the logits.

Semantics (``hidden`` [rows, d], ``weight`` [vocab, d] (tied embeddings allowed), optional ``bias``
[vocab], integer ``labels`` [rows])::

    logits[r] = hidden[r] @ weight.T + bias
    loss[r]   = logsumexp(logits[r]) - logits[r, labels[r]]      (0 where labels[r] == ignore_index)

``loss`` is fp32 (float64 when ``hidden`` is float64, so that ``gradcheck`` can run), one value per
row: token weights, masks and means are the caller's, and the upstream gradient is honoured per row.

How the ``triton`` backend computes it. Rows go in chunks of ``chunk_size``. For each chunk, one GEMM
writes the chunk's logits into a [chunk, vocab] buffer that every chunk reuses; a Triton kernel
reduces each row to its log-sum-exp and loss; a second Triton kernel overwrites the logits in place
with dloss/dlogits = softmax - onehot; a second GEMM turns those into dloss/dhidden for the chunk's
rows. Peak extra memory is that one buffer, whatever the number of rows (Qwen2.5's 151,936-word
vocabulary over 8K rows would be 5 GB of fp32 logits).

Why dloss/dhidden is computed in forward rather than recomputed in backward: it costs two GEMMs
(logits, dhidden), as many as the unfused reference, where a recompute costs three. It stays exact
for any upstream gradient because row r's gradient is linear in that row's upstream value g[r]:
dhidden[r] = g[r] * (softmax(logits[r]) - onehot(labels[r])) @ weight, so backward only scales rows.
The weight and bias gradients mix rows, so they cannot be rescaled afterwards: when ``weight`` or
``bias`` requires grad (the engine keeps the LM head frozen), backward recomputes each chunk's logits
from the saved log-sum-exp and accumulates them in fp32. Either way the backward is built from
values saved in forward, so it is once differentiable (create_graph=True raises): the engine's
``exact`` meta-gradient mode differentiates twice and must use ``backend="torch"``.

The ``torch`` backend (the CPU default) runs the same chunked algorithm, with torch ops in place of
the two row kernels (chunks of about 32 MiB of logits). Its backward serves a first-order request
from the saved values too; a differentiable one (``create_graph=True``) is recomputed through
:func:`fused_linear_cross_entropy_reference`, the oracle that materialises the logits, so the
torch backend stays twice differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from perk_kernels._utils import (
    check_float,
    check_same_device,
    check_tensor,
    choose_backend,
    next_power_of_2,
)

# A chunk's logits buffer is kept near this size: large enough that the chunk GEMMs stay compute
# bound (each chunk re-reads the whole LM head), small enough to be a fraction of the unfused peak.
_LOGITS_CHUNK_BYTES = 512 * 2**20
# The torch backend (CPU) keeps chunks near cache-friendly sizes: its row operations make a
# chunk-sized temporary or two, and 256 rows already keep a CPU GEMM compute bound.
_CHUNK_BYTES = {"triton": _LOGITS_CHUNK_BYTES, "torch": 32 * 2**20}
_MAX_BLOCK_V = 4096
# Rows of a chunk the torch row operations take at a time (see _row_slices).
_ROW_SLICE_BYTES = 4 * 2**20


@triton.jit
def _cross_entropy_lse_loss_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    lse_ptr,
    loss_ptr,
    n_vocab,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    """One program per row: online log-sum-exp over the vocabulary, then the row's loss."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    # Reduce in the loss dtype (fp32, or fp64 for gradcheck), whatever the logits' dtype.
    acc_dtype = lse_ptr.dtype.element_ty
    offsets = tl.arange(0, BLOCK_V)
    running_max = tl.full((), float("-inf"), acc_dtype)
    running_sum = tl.zeros((), acc_dtype)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + offsets
        x = tl.load(row_ptr + cols, mask=cols < n_vocab, other=float("-inf")).to(acc_dtype)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        # Rescale the running sum to the new maximum so no exp() ever overflows.
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)

    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    in_vocab = (label >= 0) & (label < n_vocab)
    target = tl.load(row_ptr + label, mask=valid & in_vocab, other=0.0).to(acc_dtype)
    tl.store(lse_ptr + row, lse)
    # An out-of-range label (not checked on device tensors: that would sync) gives a NaN loss.
    tl.store(loss_ptr + row, tl.where(valid, tl.where(in_vocab, lse - target, float("nan")), 0.0))


@triton.jit
def _cross_entropy_dlogits_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    lse_ptr,
    row_scale_ptr,
    n_vocab,
    ignore_index,
    HAS_ROW_SCALE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row, in place: logits[r] <- scale[r] * (softmax(logits[r]) - onehot(label[r]))."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    acc_dtype = lse_ptr.dtype.element_ty
    lse = tl.load(lse_ptr + row)
    label = tl.load(labels_ptr + row).to(tl.int64)
    scale = tl.full((), 1.0, acc_dtype)
    if HAS_ROW_SCALE:
        scale = tl.load(row_scale_ptr + row).to(acc_dtype)
    # Ignored rows contribute nothing, whatever their upstream gradient.
    scale = tl.where(label != ignore_index, scale, 0.0)
    offsets = tl.arange(0, BLOCK_V)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + offsets
        in_vocab = cols < n_vocab
        x = tl.load(row_ptr + cols, mask=in_vocab, other=0.0).to(acc_dtype)
        dlogits = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
        tl.store(row_ptr + cols, (scale * dlogits).to(logits_ptr.dtype.element_ty), mask=in_vocab)


def _row_launch_config(n_vocab: int) -> tuple[int, int]:
    block_v = min(next_power_of_2(n_vocab), _MAX_BLOCK_V)
    num_warps = 8 if block_v >= 2048 else 4
    return block_v, num_warps


def cross_entropy_lse_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, lse: torch.Tensor, loss: torch.Tensor
) -> None:
    """Write each row's log-sum-exp into ``lse`` and its cross-entropy into ``loss`` (both [rows])."""
    rows, n_vocab = logits.shape
    if rows == 0:
        return
    block_v, num_warps = _row_launch_config(n_vocab)
    _cross_entropy_lse_loss_kernel[(rows,)](
        logits, logits.stride(0), labels, lse, loss, n_vocab, ignore_index, BLOCK_V=block_v, num_warps=num_warps
    )


def cross_entropy_dlogits_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Overwrite ``logits`` with ``row_scale[:, None] * (softmax - onehot)`` (scale 1 if None)."""
    rows, n_vocab = logits.shape
    if rows == 0:
        return logits
    block_v, num_warps = _row_launch_config(n_vocab)
    _cross_entropy_dlogits_kernel[(rows,)](
        logits,
        logits.stride(0),
        labels,
        lse,
        lse if row_scale is None else row_scale,
        n_vocab,
        ignore_index,
        HAS_ROW_SCALE=row_scale is not None,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return logits


def cross_entropy_rows_torch_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    lse: torch.Tensor,
    loss: torch.Tensor,
    want_dlogits: bool,
) -> torch.Tensor:
    """Torch twin of :func:`cross_entropy_rows_`: one exp per logit serves both the log-sum-exp and
    the softmax (``exp(x − max) / Σ``), in the loss dtype, a few rows at a time (see :func:`_row_slices`)."""
    for rows in _row_slices(logits):
        _rows_torch_(logits[rows], labels[rows], ignore_index, lse[rows], loss[rows], want_dlogits)
    return logits


def _rows_torch_(logits, labels, ignore_index, lse, loss, want_dlogits) -> None:
    acc = logits.to(lse.dtype)  # the slice itself for fp32 logits: it is scratch, overwritten here
    valid = labels != ignore_index
    safe_labels = _safe_labels(labels, valid, logits.shape[1])
    target = acc.gather(1, safe_labels).squeeze(1)
    row_max = acc.amax(1, keepdim=True)
    exp_sum = acc.sub_(row_max).exp_().sum(1, keepdim=True)  # acc = exp(x − max)
    lse.copy_((row_max + exp_sum.log()).squeeze(1))
    in_vocab = (labels >= 0) & (labels < logits.shape[1])
    loss.copy_(torch.where(valid, torch.where(in_vocab, lse - target, float("nan")), 0.0))
    if want_dlogits:
        row_scale = valid.to(acc.dtype).unsqueeze(1)
        acc.mul_(row_scale / exp_sum).scatter_add_(1, safe_labels, -row_scale)  # softmax − onehot; 0 if ignored
        if acc is not logits:
            logits.copy_(acc)


def cross_entropy_dlogits_torch_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch twin of :func:`cross_entropy_dlogits_`: ``logits`` ← scale·(softmax − onehot), in place."""
    valid = labels != ignore_index
    scale = valid.to(lse.dtype) if row_scale is None else torch.where(valid, row_scale.to(lse.dtype), 0.0)
    safe_labels = _safe_labels(labels, valid, logits.shape[1])
    for rows in _row_slices(logits):
        view = logits[rows]
        acc = view.to(lse.dtype)  # the view itself for fp32 logits
        acc.sub_(lse[rows].unsqueeze(1)).exp_().mul_(scale[rows].unsqueeze(1))
        acc.scatter_add_(1, safe_labels[rows], -scale[rows].unsqueeze(1))
        if acc is not view:
            view.copy_(acc)
    return logits


def _row_slices(logits: torch.Tensor) -> list[slice]:
    """Row ranges of about ``_ROW_SLICE_BYTES`` of loss-dtype logits. The torch row operations make
    several passes over their rows; on a CPU a cache-sized slice keeps them out of main memory (256
    rows of SmolLM2's 49,152-word vocabulary: 54 ms in one piece, 23 ms in slices of 16 rows)."""
    row_bytes = logits.shape[1] * _loss_dtype(logits.dtype).itemsize
    step = max(1, _ROW_SLICE_BYTES // max(row_bytes, 1))
    return [slice(start, start + step) for start in range(0, logits.shape[0], step)]


def _safe_labels(labels: torch.Tensor, valid: torch.Tensor, n_vocab: int) -> torch.Tensor:
    """(rows, 1) int64 labels that index a logits row: ignored and out-of-range labels read column 0
    (their loss is 0 or NaN; checking the range on a device tensor would sync the host)."""
    usable = valid & (labels >= 0) & (labels < n_vocab)
    return torch.where(usable, labels, 0).long().unsqueeze(1)


def cross_entropy_rows_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    lse: torch.Tensor,
    loss: torch.Tensor,
    want_dlogits: bool,
) -> torch.Tensor:
    """Both row kernels on a chunk: ``lse`` and ``loss``, then (``want_dlogits``) ``logits`` ←
    softmax − onehot in place. Returns ``logits``."""
    cross_entropy_lse_loss(logits, labels, ignore_index, lse, loss)
    return cross_entropy_dlogits_(logits, labels, lse, ignore_index) if want_dlogits else logits


# Each backend's row operations on a chunk's logits: (lse, loss and optionally dlogits; dlogits
# from a saved lse with a row scale, for the head's gradients).
_ROW_OPS = {
    "triton": (cross_entropy_rows_, cross_entropy_dlogits_),
    "torch": (cross_entropy_rows_torch_, cross_entropy_dlogits_torch_),
}


def _chunk_logits(
    hidden_chunk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buffer: torch.Tensor
) -> torch.Tensor:
    """The chunk's logits, written into the first rows of the reused ``buffer``."""
    out = buffer[: hidden_chunk.shape[0]]
    if bias is None:
        return torch.mm(hidden_chunk, weight.t(), out=out)
    return torch.addmm(bias, hidden_chunk, weight.t(), out=out)


def _chunks(n_rows: int, chunk_size: int):
    for start in range(0, n_rows, chunk_size):
        yield start, min(start + chunk_size, n_rows)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def default_chunk_size(
    n_rows: int, n_vocab: int, dtype: torch.dtype, budget_bytes: int = _LOGITS_CHUNK_BYTES
) -> int:
    """Rows per chunk: the largest power of two whose logits fit ``budget_bytes``."""
    fit = max(1, budget_bytes // (n_vocab * dtype.itemsize))
    return max(1, min(1 << (fit.bit_length() - 1), n_rows))


def _recompute_head_grads(
    hidden, weight, bias, labels, lse, grad_loss, ignore_index, chunk_size, need_weight, need_bias, dlogits_
):
    """dloss/dweight and dloss/dbias, recomputing each chunk's logits; summed over chunks in fp32."""
    acc_dtype = lse.dtype
    grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if need_bias else None
    buffer = hidden.new_empty(min(chunk_size, hidden.shape[0]), weight.shape[0])
    for start, stop in _chunks(hidden.shape[0], chunk_size):
        logits = _chunk_logits(hidden[start:stop], weight, bias, buffer)
        dlogits = dlogits_(logits, labels[start:stop], lse[start:stop], ignore_index, row_scale=grad_loss[start:stop])
        if grad_weight is not None:
            grad_weight += (dlogits.t() @ hidden[start:stop]).to(acc_dtype)
        if grad_bias is not None:
            grad_bias += dlogits.sum(0, dtype=acc_dtype)
    return (
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, chunk_size, want_grad_hidden, backend):
        n_rows, n_vocab = hidden.shape[0], weight.shape[0]
        rows_, _ = _ROW_OPS[backend]
        loss_dtype = _loss_dtype(hidden.dtype)
        lse = torch.empty(n_rows, dtype=loss_dtype, device=hidden.device)
        loss = torch.empty(n_rows, dtype=loss_dtype, device=hidden.device)
        # dloss/dhidden for an upstream gradient of 1 per row; backward scales it row by row.
        grad_hidden_unit = torch.empty_like(hidden) if want_grad_hidden else None
        buffer = hidden.new_empty(min(chunk_size, n_rows), n_vocab)
        for start, stop in _chunks(n_rows, chunk_size):
            logits = _chunk_logits(hidden[start:stop], weight, bias, buffer)
            dlogits = rows_(logits, labels[start:stop], ignore_index, lse[start:stop], loss[start:stop], want_grad_hidden)
            if want_grad_hidden:
                torch.mm(dlogits, weight, out=grad_hidden_unit[start:stop])
        ctx.save_for_backward(hidden, weight, bias, labels, lse, grad_hidden_unit)
        ctx.ignore_index = ignore_index
        ctx.chunk_size = chunk_size
        ctx.backend = backend
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, labels, lse, grad_hidden_unit = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        # torch's once_differentiable only fails when the upstream gradient requires grad; a
        # create_graph=True request through this op would otherwise silently lose the second-order
        # term through hidden, so a request for a differentiable backward is never served from the
        # saved values: the torch backend recomputes it through the reference (twice differentiable,
        # with the reference's [rows, vocab] logits), the triton backend refuses.
        if torch.is_grad_enabled():
            if ctx.backend != "torch":
                raise RuntimeError(
                    "fused_linear_cross_entropy's triton backend is once differentiable (its gradient comes "
                    "from values saved in forward); use backend='torch' for double backward"
                )
            return _reference_backward(ctx, hidden, weight, bias, labels, grad_loss)
        grad_loss = grad_loss.contiguous()
        grad_hidden = grad_weight = grad_bias = None
        if need_hidden:
            grad_hidden = (grad_hidden_unit.to(grad_loss.dtype) * grad_loss.unsqueeze(1)).to(hidden.dtype)
        if need_weight or need_bias:
            grad_weight, grad_bias = _recompute_head_grads(
                hidden, weight, bias, labels, lse, grad_loss, ctx.ignore_index, ctx.chunk_size, need_weight,
                need_bias, _ROW_OPS[ctx.backend][1],
            )
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _reference_backward(ctx, hidden, weight, bias, labels, grad_loss):
    """The gradients as differentiable ops of the reference (the torch backend's double backward)."""
    inputs = (hidden, weight, bias)
    wanted = [t for t, need in zip(inputs, ctx.needs_input_grad[:3]) if need]
    loss = fused_linear_cross_entropy_reference(hidden, weight, labels, bias=bias, ignore_index=ctx.ignore_index)
    grads = iter(torch.autograd.grad(loss, wanted, grad_loss, create_graph=True))
    return (*(next(grads) if need else None for need in ctx.needs_input_grad[:3]), None, None, None, None, None)


def _check_inputs(hidden, weight, labels, bias, ignore_index, chunk_size) -> None:
    check_tensor("hidden", hidden, ndim=2)
    check_tensor("weight", weight, ndim=2)
    check_tensor("labels", labels, ndim=1)
    check_float("hidden", hidden)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [vocab, {hidden.shape[1]}] to match hidden, got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels must have {hidden.shape[0]} entries (rows of hidden), got {labels.shape[0]}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have {weight.shape[0]} entries (rows of weight), got {bias.shape[0]}")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    # Checked where it costs nothing (CPU tensors): on a device it would sync the host on every
    # call, so there an out-of-range label gives a NaN loss instead (never a silent wrong value).
    if labels.device.type != "cpu":
        return
    out_of_range = ((labels < 0) | (labels >= weight.shape[0])) & (labels != ignore_index)
    if bool(out_of_range.any()):
        bad = labels[out_of_range][0].item()
        raise ValueError(
            f"labels must lie in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}, found {bad}"
        )


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Plain-torch oracle of :func:`fused_linear_cross_entropy`: materialises the [rows, vocab] logits.

    Twice differentiable (the ``exact`` meta-gradient mode relies on it). ``chunk_size`` is accepted
    for a signature identical to the fused op and ignored.
    """
    logits = (hidden @ weight.t()).to(_loss_dtype(hidden.dtype))
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="none")


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-token cross-entropy of the LM head ``hidden @ weight.T + bias`` against ``labels``.

    Args:
        hidden: [rows, d] floating point (bf16/fp16/fp32 on GPU; fp32/float64 on CPU).
        weight: [vocab, d], same dtype and device as ``hidden``.
        labels: [rows] int64/int32, each in [0, vocab) or equal to ``ignore_index`` (a ValueError
            for CPU tensors; on a GPU, checking would sync the host: such a row's loss is NaN).
        bias: optional [vocab], same dtype as ``hidden``.
        ignore_index: label value whose row gets loss 0 and zero gradient.
        chunk_size: rows per chunk; None picks one so that a chunk's logits take about 512 MiB
            (``triton``) or 32 MiB (``torch``).
        backend: ``"triton"``, ``"torch"`` (the same chunked algorithm in torch ops: the CPU path)
            or None for the automatic choice.

    Returns:
        [rows] per-token losses in fp32 (float64 if ``hidden`` is float64). Differentiable w.r.t.
        ``hidden``, ``weight`` and ``bias``; on the ``triton`` backend only once, on the ``torch``
        backend twice (a double backward goes through the reference; see module docs).
    """
    _check_inputs(hidden, weight, labels, bias, ignore_index, chunk_size)
    backend = choose_backend(backend, hidden.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], weight.shape[0], hidden.dtype, _CHUNK_BYTES[backend])
    want_grad_hidden = torch.is_grad_enabled() and hidden.requires_grad
    return _FusedLinearCrossEntropy.apply(
        hidden.contiguous(), weight, bias, labels.contiguous(), ignore_index, chunk_size, want_grad_hidden, backend
    )
