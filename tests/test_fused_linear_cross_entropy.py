"""fused_linear_cross_entropy (Triton path, interpreter on CPU) against the plain-torch reference."""

import sys

import pytest
import torch

from perk_kernels.fused_linear_cross_entropy import (
    cross_entropy_rows_,
    cross_entropy_rows_torch_,
    default_chunk_size,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)

# The module (the package's attribute of that name is the function).
fle = sys.modules["perk_kernels.fused_linear_cross_entropy"]
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
IGNORE = -100


def make_problem(rows, d, vocab, *, dtype=torch.float32, device=DEVICE, with_bias=False, ignore_every=5):
    hidden = torch.randn(rows, d, dtype=dtype, device=device)
    weight = torch.randn(vocab, d, dtype=dtype, device=device) / d**0.5
    bias = torch.randn(vocab, dtype=dtype, device=device) if with_bias else None
    labels = torch.randint(0, vocab, (rows,), device=device)
    if ignore_every:
        labels[::ignore_every] = IGNORE
    return hidden, weight, bias, labels


def loss_and_grads(fn, hidden, weight, bias, labels, upstream, **kwargs):
    """Per-token losses and the gradients of sum(upstream * loss) w.r.t. every input that requires grad."""
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in (hidden, weight, bias) if t is not None]
    h, w = inputs[0], inputs[1]
    b = inputs[2] if bias is not None else None
    loss = fn(h, w, labels, bias=b, ignore_index=IGNORE, **kwargs)
    differentiable = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(loss, differentiable, upstream) if differentiable else ()
    return loss, grads


@pytest.mark.parametrize(
    "rows, d, vocab, chunk_size, with_bias, head_requires_grad",
    [
        (37, 24, 1000, 16, False, False),  # rows not a multiple of the chunk
        (50, 48, 4099, 64, True, True),  # one chunk larger than rows; vocab spans two kernel blocks
        (100, 32, 4099, 33, False, True),
        (1, 8, 1000, None, True, False),
        (23, 16, 1000, 1, True, True),  # one row per chunk
    ],
)
@pytest.mark.parametrize("backend", [None, "torch"])  # the automatic choice (Triton here) and the chunked torch ops
def test_matches_reference_with_non_uniform_upstream_gradient(
    rows, d, vocab, chunk_size, with_bias, head_requires_grad, backend
):
    hidden, weight, bias, labels = make_problem(rows, d, vocab, with_bias=with_bias)
    hidden.requires_grad_(True)
    weight.requires_grad_(head_requires_grad)
    if bias is not None:
        bias.requires_grad_(head_requires_grad)
    # Token weights of both signs and exact zeros: nothing may assume a plain mean.
    upstream = torch.randn(rows, device=DEVICE)
    upstream[1::3] = 0.0

    loss, grads = loss_and_grads(
        fused_linear_cross_entropy, hidden, weight, bias, labels, upstream, chunk_size=chunk_size, backend=backend
    )
    ref_loss, ref_grads = loss_and_grads(fused_linear_cross_entropy_reference, hidden, weight, bias, labels, upstream)

    assert loss.dtype == torch.float32 and loss.shape == (rows,)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert torch.all(loss[labels == IGNORE] == 0)
    assert len(grads) == len(ref_grads) == (1 + (1 + with_bias) * head_requires_grad)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)


def test_all_rows_ignored_gives_zero_loss_and_zero_gradients():
    hidden, weight, bias, labels = make_problem(9, 8, 1000, with_bias=True, ignore_every=0)
    labels.fill_(IGNORE)
    for t in (hidden, weight, bias):
        t.requires_grad_(True)
    loss, grads = loss_and_grads(
        fused_linear_cross_entropy, hidden, weight, bias, labels, torch.randn(9, device=DEVICE), chunk_size=4
    )
    assert torch.equal(loss, torch.zeros_like(loss))
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("reduce", ["sum", "weighted_mean"])
def test_reduced_losses_backpropagate_like_reference(reduce):
    # loss.sum() hands backward an expanded (stride-0) upstream gradient.
    hidden, weight, _, labels = make_problem(19, 12, 1000)
    token_weight = torch.rand(19, device=DEVICE)
    results = []
    for fn in (fused_linear_cross_entropy, fused_linear_cross_entropy_reference):
        h = hidden.clone().requires_grad_(True)
        kwargs = {"chunk_size": 8} if fn is fused_linear_cross_entropy else {}
        loss = fn(h, weight, labels, ignore_index=IGNORE, **kwargs)
        total = loss.sum() if reduce == "sum" else (loss * token_weight).sum() / token_weight.sum()
        total.backward()
        results.append((total.detach(), h.grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-4)


def test_non_contiguous_hidden_and_no_grad_forward():
    hidden_t = torch.randn(16, 29, device=DEVICE)  # (d, rows): its transpose is non-contiguous
    _, weight, _, labels = make_problem(29, 16, 1000)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden_t.t(), weight, labels, ignore_index=IGNORE, chunk_size=10)
    ref = fused_linear_cross_entropy_reference(hidden_t.t(), weight, labels, ignore_index=IGNORE)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64_through_the_fused_path():
    hidden, weight, bias, labels = make_problem(5, 3, 13, dtype=torch.float64, with_bias=True, ignore_every=4)
    inputs = tuple(t.requires_grad_(True) for t in (hidden, weight, bias))
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused_linear_cross_entropy(h, w, labels, bias=b, ignore_index=IGNORE, chunk_size=2),
        inputs,
    )


def test_fused_backward_refuses_double_backward_but_reference_allows_it():
    hidden, weight, _, labels = make_problem(4, 3, 11, dtype=torch.float64, ignore_every=3)
    hidden.requires_grad_(True)
    # An extra smooth term gives the first-order gradient a grad_fn: without the guard the fused
    # term's second-order contribution would silently vanish from the double backward.
    loss = fused_linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE, chunk_size=3) + hidden.pow(3).sum(1)
    with pytest.raises(RuntimeError, match="once differentiable.*backend='torch'"):
        torch.autograd.grad(loss.sum(), hidden, create_graph=True)
    assert torch.autograd.gradgradcheck(
        lambda h: fused_linear_cross_entropy(h, weight, labels, ignore_index=IGNORE, backend="torch"), (hidden,)
    )


def test_torch_backend_is_chunked_and_twice_differentiable():
    hidden, weight, bias, labels = make_problem(7, 3, 13, dtype=torch.float64, with_bias=True, ignore_every=3)
    inputs = tuple(t.requires_grad_(True) for t in (hidden, weight, bias))

    def loss(h, w, b):
        return fused_linear_cross_entropy(h, w, labels, bias=b, ignore_index=IGNORE, chunk_size=3, backend="torch")

    assert torch.autograd.gradcheck(loss, inputs)
    assert torch.autograd.gradgradcheck(loss, inputs)


def test_torch_backend_in_bf16_matches_the_fp32_reference():
    # The CPU bf16 path: bf16 logits per chunk, log-sum-exp and softmax in fp32, dhidden in bf16.
    hidden, weight, _, labels = make_problem(300, 64, 5000, device="cpu")
    upstream = torch.rand(300)
    h16 = hidden.bfloat16().requires_grad_(True)
    loss = fused_linear_cross_entropy(
        h16, weight.bfloat16(), labels, ignore_index=IGNORE, chunk_size=128, backend="torch"
    )
    (loss * upstream).sum().backward()
    ref_loss, (ref_grad,) = loss_and_grads(
        fused_linear_cross_entropy_reference, hidden.requires_grad_(True), weight, None, labels, upstream
    )
    assert loss.dtype == torch.float32 and h16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(h16.grad.float(), ref_grad, atol=1e-2, rtol=5e-2)


# Max |error| / max |expected| of the Triton path in bf16/fp16, against the fp32 reference on the
# same rounded inputs (losses in fp32, gradients rounded to the inputs' dtype).
LOW_PRECISION_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def assert_close_to_max(actual, expected, rel, what):
    scale = float(expected.detach().abs().max())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=rel * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "rows, d, vocab, chunk_size, with_bias, head_requires_grad",
    [(37, 24, 1000, 16, False, False), (50, 48, 4099, 64, True, True)],  # 4099: two kernel blocks, the second masked
)
def test_triton_row_kernels_in_low_precision(rows, d, vocab, chunk_size, with_bias, head_requires_grad, dtype):
    """bf16/fp16 logits through the Triton row kernels (tests/triton_bf16_interpreter.py makes the
    interpreter's bf16 a GPU's), with ignored rows and token weights of both signs and zeros:
    against the fp32 reference within the dtype's tolerance, and against the torch backend in the
    same dtype (the same GEMMs and fp32 row math) within a tenth of an ulp-sized error, where a
    truncating bf16 cast of dlogits would be off by a whole one."""
    hidden, weight, bias, labels = make_problem(rows, d, vocab, dtype=dtype, device="cpu", with_bias=with_bias)
    hidden.requires_grad_(True)
    for t in (weight, bias):
        if t is not None:
            t.requires_grad_(head_requires_grad)
    upstream = torch.randn(rows)
    upstream[1::3] = 0.0
    inputs = (hidden, weight, bias, labels, upstream)
    fused = fused_linear_cross_entropy
    loss, grads = loss_and_grads(fused, *inputs, chunk_size=chunk_size, backend="triton")
    torch_loss, torch_grads = loss_and_grads(fused, *inputs, chunk_size=chunk_size, backend="torch")
    wide = [None if t is None else t.detach().float().requires_grad_(t.requires_grad) for t in (hidden, weight, bias)]
    ref_loss, ref_grads = loss_and_grads(fused_linear_cross_entropy_reference, *wide, labels, upstream)
    assert loss.dtype == torch.float32 and torch.all(loss[labels == IGNORE] == 0)
    assert [g.dtype for g in grads] == [dtype] * (1 + (1 + with_bias) * head_requires_grad)
    assert_close_to_max(loss, ref_loss, LOW_PRECISION_TOL[dtype], "loss vs fp32 reference")
    torch.testing.assert_close(loss, torch_loss, rtol=1e-6, atol=1e-6)
    for name, grad, ref_grad, torch_grad in zip(("hidden", "weight", "bias"), grads, ref_grads, torch_grads):
        assert_close_to_max(grad, ref_grad, LOW_PRECISION_TOL[dtype], f"d{name} vs fp32 reference")
        assert_close_to_max(grad, torch_grad, 1e-3, f"d{name} vs torch backend")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_row_operations_in_slices_of_a_few_rows(monkeypatch, dtype):
    # The torch row operations take a chunk a few rows at a time (cache-sized on a CPU): a slice
    # size that does not divide the chunk, with head gradients (the recomputed dlogits) too.
    monkeypatch.setattr(fle, "_ROW_SLICE_BYTES", 3 * 1000 * 4)
    assert len(fle._row_slices(torch.empty(10, 1000, dtype=dtype))) == 4
    hidden, weight, bias, labels = make_problem(40, 16, 1000, device="cpu", with_bias=True)
    upstream = torch.randn(40)
    inputs = [t.to(dtype).requires_grad_(True) for t in (hidden, weight, bias)]
    loss = fused_linear_cross_entropy(
        inputs[0], inputs[1], labels, bias=inputs[2], ignore_index=IGNORE, chunk_size=16, backend="torch"
    )
    grads = torch.autograd.grad((loss * upstream).sum(), inputs)
    ref_loss, ref_grads = loss_and_grads(
        fused_linear_cross_entropy_reference, *(t.to(dtype).requires_grad_(True) for t in (hidden, weight)),
        inputs[2].detach().requires_grad_(True), labels, upstream,
    )
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(loss, ref_loss.float(), **tolerance)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad.float(), ref_grad.float(), **tolerance)


def test_default_chunk_size_is_a_power_of_two_bounded_by_rows():
    assert default_chunk_size(8192, 151_936, torch.bfloat16) == 1024
    assert default_chunk_size(8192, 151_936, torch.float32) == 512
    assert default_chunk_size(10, 1000, torch.float32) == 10


def _bad(**changes):
    return changes


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (_bad(hidden=torch.randn(6)), ValueError, "hidden must have 2 dimensions"),
        (_bad(hidden=torch.ones(6, 4, dtype=torch.int64)), TypeError, "hidden must be a floating-point"),
        (_bad(weight=torch.randn(50, 4, dtype=torch.float64)), TypeError, "weight dtype"),
        (_bad(weight=torch.randn(50, 5)), ValueError, "weight must be \\[vocab, 4\\]"),
        (_bad(labels=torch.zeros(5, dtype=torch.int64)), ValueError, "labels must have 6 entries"),
        (_bad(labels=torch.zeros(6)), TypeError, "labels must be int64 or int32"),
        (_bad(labels=torch.tensor([0, 1, 50, 2, 3, 4])), ValueError, "labels must lie in \\[0, 50\\).*found 50"),
        (_bad(labels=torch.tensor([0, -1, 1, 2, 3, 4])), ValueError, "found -1"),
        (_bad(bias=torch.randn(49)), ValueError, "bias must have 50 entries"),
        (_bad(bias=torch.randn(50, dtype=torch.float64)), TypeError, "bias dtype"),
        (_bad(chunk_size=0), ValueError, "chunk_size must be a positive int"),
        (_bad(ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (_bad(backend="cuda"), ValueError, "backend must be one of"),
        (_bad(weight=[[1.0]]), TypeError, "weight must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(changes, error, match):
    args = dict(hidden=torch.randn(6, 4), weight=torch.randn(50, 4), labels=torch.tensor([0, 1, IGNORE, 2, 3, 49]))
    args.update(changes)
    with pytest.raises(error, match=match):
        fused_linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


@pytest.mark.gpu
def test_device_mismatch_raises():
    hidden, weight, _, labels = make_problem(4, 8, 100)
    with pytest.raises(ValueError, match="weight is on cpu"):
        fused_linear_cross_entropy(hidden, weight.cpu(), labels)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-4, 1e-4), (torch.bfloat16, 2e-2, 2e-2)])
def test_gpu_matches_reference(dtype, atol, rtol):
    rows, d, vocab = 1000, 256, 32_003
    hidden, weight, bias, labels = make_problem(rows, d, vocab, dtype=dtype, with_bias=True)
    for t in (hidden, weight, bias):
        t.requires_grad_(True)
    upstream = torch.randn(rows, device=DEVICE)
    loss, grads = loss_and_grads(
        fused_linear_cross_entropy, hidden, weight, bias, labels, upstream, chunk_size=384
    )
    ref_loss, ref_grads = loss_and_grads(fused_linear_cross_entropy_reference, hidden, weight, bias, labels, upstream)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=rtol)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.float(), ref_grad.float(), atol=atol, rtol=rtol)


@pytest.mark.gpu
def test_gpu_peak_memory_is_bounded_by_the_chunk():
    rows, d, vocab, chunk = 4096, 128, 50_000, 256
    hidden, weight, _, labels = make_problem(rows, d, vocab, dtype=torch.bfloat16)
    hidden.requires_grad_(True)

    def forward_backward():
        fused_linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE, chunk_size=chunk).sum().backward()

    # A first call compiles the kernels and creates cuBLAS's workspace (32 MiB on Hopper, kept for
    # the process): neither is the op's memory, and neither should count when this test runs first.
    forward_backward()
    hidden.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    forward_backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    chunk_logits = chunk * vocab * hidden.element_size()
    # Allowance beyond one chunk of logits: dhidden twice, fp32 scaling temporaries, per-row vectors.
    assert extra <= chunk_logits + 4 * hidden.numel() * 4 + 64 * rows


@pytest.mark.parametrize("row_ops", [cross_entropy_rows_, cross_entropy_rows_torch_], ids=["triton", "torch"])
def test_out_of_range_labels_give_nan_losses_in_the_row_ops(row_ops):
    # On a device the range check would sync the host on every call: the row operations make
    # such a row's loss NaN instead (never a silent wrong value), and leave the others exact.
    logits = torch.randn(5, 50)
    labels = torch.tensor([3, 50, IGNORE, -1, 49])
    lse, loss = torch.empty(5), torch.empty(5)
    row_ops(logits.clone(), labels, IGNORE, lse, loss, True)
    assert loss[1].isnan() and loss[3].isnan() and loss[2] == 0
    expected = torch.nn.functional.cross_entropy(logits[[0, 4]], labels[[0, 4]], reduction="none")
    torch.testing.assert_close(loss[[0, 4]], expected)
