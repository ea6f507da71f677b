"""Meta-step: one meta-training step (meta-gradient + an Adam update of the meta-parameters).

One problem (a context of L tokens, a question, a short answer) on a random-init Qwen2.5-0.5B
architecture at the paper's LoRA configuration (r = 256, α = 16, rsLoRA, all linear layers,
128-token segments), N = 4 inner SGD steps, the meta-gradient through the last T of them:

* ``fd``          perk, Hessian-vector products by central finite differences (two first-order passes);
* ``exact``       perk, autograd double backward (eager attention, torch kernels for the call);
* ``first_order`` perk, no Hessian term (T plays no part: run once per L, recorded with T = 0);
* ``naive``       PEFT fp32 LoRA + ``torch.autograd.grad(create_graph=True)`` through the unrolled
  steps (``naive_perk.py``, what the official code does with ``higher``), eager attention.

L ∈ {1K, 2K, 8K}, T ∈ {1, 2, 4} on a GPU; on CPU the architecture shrunk to 2 layers at 256 and
512 tokens. ``extra_info`` as every suite (see conftest), plus ``mode`` and ``unroll_steps``. An
OOM at (L, T) is recorded, and the same mode's larger (L, T) are recorded as OOM without running.

    pytest benchmarks/test_meta_step.py --benchmark-only --benchmark-json=out.json
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from benchmarks.conftest import (
    DEVICE,
    ENGINE_BACKEND,
    MODEL_DTYPE,
    build_model,
    byte_tokenizer,
    context_lengths,
    context_text,
    format_length,
    run_benchmark,
)
from benchmarks.naive_perk import NaivePerk

from perk.config import LLAMA_TARGETS, PerkConfig
from perk.engine import PerkModel
from perk.segments import build_prompt
from tools.shapes import QWEN2_5_0_5B

MODEL = QWEN2_5_0_5B.name
LORA = dict(rank=256, alpha=16.0, rslora=True)
SEGMENT_LEN = 128
INNER_STEPS = 4
# Rates do not change speed; small ones keep a random model's inner and outer losses finite.
INNER_LR = 1e-3
META_LR = 1e-5
QUESTION, ANSWER = "Where is the milk?", "kitchen"
MODES = ("fd", "exact", "first_order", "naive")
UNROLL_STEPS = (1, 2, 4)
LENGTHS = context_lengths(full=["1K", "2K", "8K"], small=[256, 512])


@dataclass(frozen=True)
class Case:
    mode: str
    unroll_steps: int
    tokens: int

    def __str__(self) -> str:
        return f"{self.mode}-T{self.unroll_steps}-{format_length(self.tokens)}"


def _cases() -> list[Case]:
    """perk's three modes share one model (reconfigured per case), then naive's; within a mode,
    growing (T, L) so that an OOM predicts the rest."""
    cases = []
    for mode in MODES:
        unrolls = (0,) if mode == "first_order" else UNROLL_STEPS
        cases += [Case(mode, t, n) for t in unrolls for n in LENGTHS]
    return cases


def _adam_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for param, grad in zip(params, grads):
        param.grad = grad
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _perk_runner(case: Case, model_slot):
    def build():
        config = PerkConfig(**LORA, segment_len=SEGMENT_LEN, inner_steps=INNER_STEPS, inner_lr=INNER_LR)
        perk_model = PerkModel.from_base(build_model(MODEL), byte_tokenizer(), config, backend=ENGINE_BACKEND)
        return perk_model, torch.optim.Adam(list(perk_model.meta_parameters().values()), lr=META_LR)

    perk_model, optimizer = model_slot.get((MODEL, "perk-meta"), build)
    # Only the meta-gradient settings change between cases: no rebuild of the model.
    perk_model.config = dataclasses.replace(perk_model.config, meta_grad=case.mode, unroll_steps=case.unroll_steps)
    problems = [{"context": context_text(case.tokens), "question": QUESTION, "answer": ANSWER}]

    def run():
        _, grads, _ = perk_model.meta_gradient(problems)
        params = perk_model.meta_parameters()
        _adam_step(optimizer, list(params.values()), [grads[name] for name in params])

    return run


def _naive_runner(case: Case, model_slot):
    def build():
        naive = NaivePerk(
            build_model(MODEL, attn_implementation="eager"), **LORA, target_modules=LLAMA_TARGETS,
            inner_steps=INNER_STEPS, inner_lr=INNER_LR, optimizer="sgd",
        )
        return naive, torch.optim.Adam(naive.meta_parameters(), lr=META_LR)

    naive, optimizer = model_slot.get((MODEL, "naive-meta"), build)
    tokenizer = byte_tokenizer()
    text = context_text(case.tokens) + "\n"  # perk's document separator: L tokens in all
    prompt = tokenizer(build_prompt(tokenizer, QUESTION), add_special_tokens=False)["input_ids"]
    answer = tokenizer(f" {ANSWER}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    question_ids = torch.tensor([prompt + answer], device=DEVICE)
    question_labels = torch.tensor([[-100] * len(prompt) + answer], device=DEVICE)  # loss on the answer only

    def run():
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        segments = ids.view(-1, SEGMENT_LEN).to(DEVICE)  # (L / 128, 128)
        grads = naive.meta_gradient(segments, question_ids, question_labels, unroll_steps=case.unroll_steps)
        _adam_step(optimizer, naive.meta_parameters(), grads)

    return run


@pytest.mark.parametrize("case", _cases(), ids=str)
def test_meta_step(benchmark, model_slot, case):
    benchmark.group = f"meta-step L={format_length(case.tokens)} T={case.unroll_steps}"
    runner = _naive_runner if case.mode == "naive" else _perk_runner
    run = runner(case, model_slot)
    info = dict(
        suite="meta_step", model=MODEL, provider="naive" if case.mode == "naive" else "perk", mode=case.mode,
        unroll_steps=case.unroll_steps, inner_steps=INNER_STEPS, rank=LORA["rank"], lora_alpha=LORA["alpha"],
        rslora=LORA["rslora"], segment_len=SEGMENT_LEN, inner_optimizer="sgd",
    )
    record = run_benchmark(
        benchmark, run, series=f"meta/{case.mode}", size=(case.tokens, case.unroll_steps),
        tokens=case.tokens, dtype=MODEL_DTYPE, info=info,
    )
    if record is not None and not record.oom:
        assert record.seconds and (record.peak_bytes is None or record.peak_bytes > 0)
