"""Meta-gradients of PerkModel (docs/design.md §3) on tiny random models of every family.

* ``exact`` with T = N is the true gradient: ⟨∇, u⟩ equals a finite difference of ``meta_loss``.
* ``fd`` matches ``exact`` for T ∈ {1, 2, N}; ``first_order`` differs from it.
* With T < N both equal the truncated form, computed here by an independent autograd reference
  (full logits, ``F.cross_entropy``, whole batch at once, its own inner loop).
* Meta-batches give the mean of the per-problem results.

Relative errors are ``‖a − b‖ / ‖b‖`` over all meta-parameters together. Llama and Qwen2 run
RMSNorm and the attention softmax in fp32 even in a float64 model, so float64 checks there carry
fp32 rounding: step sizes below are chosen so that it stays far under the tolerances.
"""

import pytest
import torch
import torch.nn.functional as F

from perk import PerkConfig, PerkModel
from perk.segments import IGNORE_INDEX, context_segments, question_answer_batch
from tests.tiny_models import FAMILIES, tiny_model_and_tokenizer

PROBLEMS = [
    {
        "context": ["Mary went to the kitchen.", "John moved to the garden. " * 3],
        "question": "Where is Mary?",
        "answer": "kitchen",
    },
    {"context": "Sandra took the apple. Then she went back to the office.", "question": "Who?", "answer": "Sandra"},
]


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    monkeypatch.setenv("PERK_KERNELS_BACKEND", "torch")


def make_perk(family, dtype=torch.float64, **overrides):
    """A tiny PerkModel whose meta-parameters are moved off their init (so B ≠ 0, u ≠ 0, ω ≠ 0)."""
    model, tokenizer = tiny_model_and_tokenizer(family, dtype=dtype)
    settings = dict(
        rank=4, alpha=4.0, segment_len=16, inner_steps=3, unroll_steps=3, inner_lr=0.1,
        micro_batch_tokens=48, dtype="float64" if dtype == torch.float64 else "float32",
    )
    settings.update(overrides)
    perk = PerkModel.from_base(model, tokenizer, PerkConfig(**settings))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in perk.meta_parameters().items():
            scale = 0.05 if name == "adapter_init" else 0.3
            tensor.add_(scale * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
    return perk


def gradient_with(perk, mode, **overrides):
    for key, value in dict(meta_grad=mode, **overrides).items():
        setattr(perk.config, key, value)
    loss, grads, _ = perk.meta_gradient(PROBLEMS)
    return loss, grads


def relative_error(got: dict, want: dict) -> float:
    num = sum((got[k] - want[k]).pow(2).sum() for k in want).sqrt()
    return float(num / sum(want[k].pow(2).sum() for k in want).sqrt())


def directional_derivative(perk, direction, h):
    """⟨∇ meta_loss, direction⟩ by the 4-point central stencil (error O(h⁴))."""
    params = perk.meta_parameters()

    def loss_at(step):
        with torch.no_grad():
            for name, tensor in params.items():
                tensor.add_(step * direction[name])
            value, _ = perk.meta_loss(PROBLEMS)
            for name, tensor in params.items():
                tensor.sub_(step * direction[name])
        return value

    return (-loss_at(2 * h) + 8 * loss_at(h) - 8 * loss_at(-h) + loss_at(-2 * h)) / (12 * h)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_full_unroll_matches_finite_difference_of_meta_loss(family):
    perk = make_perk(family, token_weighting=True)
    loss, grads = gradient_with(perk, "exact")
    assert set(grads) == set(perk.meta_parameters()) and any(k.startswith("weighting.") for k in grads)
    torch.testing.assert_close(loss, perk.meta_loss(PROBLEMS)[0], rtol=1e-12, atol=0)
    generator = torch.Generator().manual_seed(2)
    direction = {k: torch.randn(g.shape, generator=generator, dtype=g.dtype) for k, g in grads.items()}
    analytic = sum((grads[k] * direction[k]).sum() for k in grads)
    numeric = directional_derivative(perk, direction, h=1e-3)
    assert abs(float(analytic - numeric)) <= 1e-4 * abs(float(numeric)), (float(analytic), float(numeric))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("unroll", [1, 2, 3])
def test_fd_matches_exact_in_float64(family, unroll):
    perk = make_perk(family, unroll_steps=unroll)
    loss_exact, exact = gradient_with(perk, "exact")
    loss_fd, fd = gradient_with(perk, "fd")
    torch.testing.assert_close(loss_fd, loss_exact, rtol=1e-12, atol=0)
    assert relative_error(fd, exact) <= 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_fd_matches_exact_in_float32(family):
    perk = make_perk(family, dtype=torch.float32, unroll_steps=2)
    _, exact = gradient_with(perk, "exact")
    _, fd = gradient_with(perk, "fd")
    assert relative_error(fd, exact) <= 2e-2


@pytest.mark.parametrize("unroll", [1, 3])
def test_first_order_drops_the_hessian_term(unroll):
    perk = make_perk("llama", unroll_steps=unroll)
    _, exact = gradient_with(perk, "exact")
    _, first_order = gradient_with(perk, "first_order")
    _, fd = gradient_with(perk, "fd")
    error = relative_error(first_order, exact)
    assert error > 1e-2 and error > 20 * relative_error(fd, exact)


@pytest.mark.parametrize(
    "options",
    [
        dict(inner_optimizer="adamw", inner_lr=1e-2, inner_weight_decay=0.1),
        dict(inner_weight_decay=0.5, inner_max_grad_norm=0.05),
        dict(token_weighting=True),
    ],
    ids=["adamw+decay", "sgd+decay+clip", "token-weighting"],
)
def test_fd_matches_exact_for_every_update_rule(options):
    perk = make_perk("qwen2", unroll_steps=2, **options)
    _, exact = gradient_with(perk, "exact")
    _, fd = gradient_with(perk, "fd")
    assert relative_error(fd, exact) <= 1e-3


def reference_truncated_meta_loss(perk):
    """The truncated objective of docs/design.md §3, built independently of the engine's inner loop:
    steps n < N − T use detached gradients, later ones keep their graph (create_graph). SGD
    only, with the engine's per-adapter clipping when ``inner_max_grad_norm`` is set."""
    config, tokenizer = perk.config, perk.tokenizer
    segments = context_segments(tokenizer, [p["context"] for p in PROBLEMS], config.segment_len)
    answers = question_answer_batch(
        tokenizer, [p["question"] for p in PROBLEMS], [p["answer"] for p in PROBLEMS], max_len=1024
    )
    group_of_element = torch.cat(
        [torch.full((size,), k) for k, size in enumerate(perk.layout.sizes)]
    )

    def loss(batch, phi, scale=1.0):
        with perk.adapted.context.active(perk.layout.module_views(phi), batch.row_adapters, backend="torch"):
            logits = perk.model(input_ids=batch.input_ids).logits
        nll = F.cross_entropy(
            logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(batch.labels.shape)
        return scale * (nll * batch.loss_weights.to(nll.dtype)).sum()

    rates = config.base_inner_lr * perk.inner_lr_log.exp()
    phi = perk.adapter_init.expand(len(PROBLEMS), -1)
    for n in range(config.inner_steps):
        if n >= config.inner_steps - config.unroll_steps:
            (grad,) = torch.autograd.grad(loss(segments, phi), phi, create_graph=True)
        else:
            point = phi.detach().requires_grad_()
            (grad,) = torch.autograd.grad(loss(segments, point), point)
        if config.inner_max_grad_norm is not None:  # per-adapter clipping, differentiated by autograd
            grad = grad * (config.inner_max_grad_norm / (grad.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
        phi = phi - rates[n][group_of_element] * grad
    return loss(answers, phi, scale=1.0 / len(PROBLEMS))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_truncated_unroll_matches_independent_reference(family):
    perk = make_perk(family, inner_steps=4, unroll_steps=2)
    params = perk.meta_parameters()
    reference_loss = reference_truncated_meta_loss(perk)
    reference = dict(zip(params, torch.autograd.grad(reference_loss, list(params.values()))))
    loss_exact, exact = gradient_with(perk, "exact")
    _, fd = gradient_with(perk, "fd")
    torch.testing.assert_close(loss_exact, reference_loss.detach(), rtol=1e-9, atol=0)
    assert relative_error(exact, reference) <= 1e-7
    assert relative_error(fd, reference) <= 1e-3
    # and the truncation matters: the full-unroll gradient is another vector
    _, full = gradient_with(perk, "exact", unroll_steps=4)
    assert relative_error(full, reference) > 1e-2


def test_zero_inner_steps_is_the_plain_adapter():
    perk = make_perk("llama", inner_steps=0, unroll_steps=0)
    assert torch.equal(perk.encode(PROBLEMS[1]["context"]).flat[0], perk.adapter_init.detach())
    _, exact = gradient_with(perk, "exact")
    _, fd = gradient_with(perk, "fd")
    assert exact["inner_lr_log"].shape == (0, perk.layout.n_groups)
    assert relative_error(fd, exact) <= 1e-10


@pytest.mark.parametrize("mode", ["fd", "exact"])
def test_meta_batch_gives_the_mean_of_per_problem_results(mode):
    perk = make_perk("gpt2", meta_grad=mode, unroll_steps=2)
    loss, grads, _ = perk.meta_gradient(PROBLEMS)
    singles = [perk.meta_gradient([p])[:2] for p in PROBLEMS]
    torch.testing.assert_close(loss, sum(l for l, _ in singles) / len(PROBLEMS), rtol=1e-10, atol=0)
    mean = {k: sum(g[k] for _, g in singles) / len(PROBLEMS) for k in grads}
    assert relative_error(grads, mean) <= 1e-9


def test_meta_gradient_is_deterministic_and_leaves_meta_parameters_untouched():
    perk = make_perk("llama", dtype=torch.float32, unroll_steps=2)
    before = {k: v.detach().clone() for k, v in perk.meta_parameters().items()}
    loss_a, grads_a, stats = perk.meta_gradient(PROBLEMS)
    loss_b, grads_b, _ = perk.meta_gradient(PROBLEMS)
    assert torch.equal(loss_a, loss_b) and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    assert all(torch.equal(before[k], v) for k, v in perk.meta_parameters().items())
    assert stats.inner_losses.shape == (3, len(PROBLEMS)) and stats.passes == 3 + 2 * 2
    assert stats.outer_loss == pytest.approx(float(loss_a))


@pytest.mark.parametrize("mode", ["fd", "first_order", "exact"])
@pytest.mark.parametrize("rule", [dict(inner_weight_decay=0.1), dict(inner_optimizer="adamw", inner_lr=0.01)],
                         ids=["sgd+decay", "adamw"])
def test_a_skipped_step_gives_its_rates_no_gradient(mode, rule):
    """on_nonfinite="skip": a step skipped for every adapter (its gradient non-finite) sets their
    rates to 0, so the meta-loss does not depend on that step's rates: ∂L/∂u of the step is 0 in
    every mode. (The walk back once added −⟨d_n, v⟩ for a skipped adapter, d_n = λφ_n with weight
    decay or Adam's old moment, a gradient for rates that had no effect.)"""
    perk = make_perk("llama", on_nonfinite="skip", unroll_steps=2, **rule)
    calls = []
    honest = perk.adapted.loss_and_grad

    def second_inner_pass_non_finite(batch, adapter, **kwargs):
        result = honest(batch, adapter, **kwargs)
        calls.append(None)
        if len(calls) == 2:  # the pass of inner step 1 (the inner loop's passes come first)
            result.grad = result.grad + float("nan")
        return result

    perk.adapted.loss_and_grad = second_inner_pass_non_finite
    with pytest.warns(RuntimeWarning, match="step skipped"):
        _, grads = gradient_with(perk, mode)
    assert torch.equal(grads["inner_lr_log"][1], torch.zeros_like(grads["inner_lr_log"][1]))
    assert grads["inner_lr_log"][[0, 2]].abs().min() > 0 and grads["adapter_init"].isfinite().all()
