"""Encode vs prompt: answering about a context of L tokens, from text to 16 answer tokens.

Providers, on random-init base models of the real architectures (values do not change speed):

* ``perk``   — ``PerkModel.encode(context)`` (segments of 128 tokens, N = 4 inner AdamW steps)
  then ``answer(memory, question, max_new_tokens=16)``: the context is not in the prompt.
* ``prompt`` — Hugging Face ``generate`` with the context in the prompt (SDPA attention, KV cache,
  exactly 16 new tokens): prompt-based inference.
* ``naive``  — the straightforward PERK of ``naive_perk.py`` (PEFT fp32 LoRA, autograd inner
  steps over micro-batches of 8K tokens) then 16 new tokens from the PEFT model.

LoRA: the paper's configuration (r = 256, α = 16, rsLoRA, all linear layers) and r = 16 (α = 16,
rsLoRA). Models: Qwen2.5-0.5B (both ranks, naive at r = 256) and SmolLM2-135M (r = 16).
Lengths: 4K … 128K for every provider on a GPU, plus 1M for perk; naive up to 32K (it grows
linearly; the anchors give its larger sizes). On CPU (``PERK_BENCH_SIZE=small``) the same families
shrunk to 2 layers, at 256 and 1K tokens (4K for perk).

``PERK_BENCH_SIZE=cpu`` (opt-in; about 20 minutes on a 2-core machine): SmolLM2-135M at its real
size on a CPU, r = 16, the three providers side by side at 512, 1K, 2K and 4K tokens (interleaved
per length, so a busy neighbour slows them alike). perk's base model is in the dtype the product
picks there (``base_dtype=auto``: bf16 where the CPU's bf16 matmul measures fast), naive's and the
prompt's in fp32; perk and naive both hold 1K tokens per forward/backward (``micro_batch_tokens``),
so their memory should stay flat from 1K to 4K.

Every call starts from text, so each provider's time includes its tokenisation (perk's inside
``encode``; ``tokenize_seconds`` gives its share, measured once outside the timing). ``tokens`` is
the context length L; ``encode_seconds`` is the encoding part of perk's and naive's calls. perk's
answer stops early only at an eos token (never seen in practice with random weights), the other
two always generate 16 tokens.

    pytest benchmarks/test_encode_vs_prompt.py --benchmark-only --benchmark-json=out.json
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch
from benchmarks.conftest import (
    DEVICE,
    ENGINE_BACKEND,
    MODEL_DTYPE,
    PERK_DTYPE,
    SIZE,
    PhaseTimer,
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
from tools.shapes import QWEN2_5_0_5B, SMOLLM2_135M

QUESTION = "Where is the milk?"
NEW_TOKENS = 16
GENERATE = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
SEGMENT_LEN = 128
INNER_STEPS = 4
INNER_OPTIMIZER = "adamw"
# Rates do not change speed; small ones keep 4 steps on a random model finite.
INNER_LR = 1e-3
NAIVE_MICRO_BATCH_TOKENS = 8192
LORA = {
    "r256": dict(rank=256, alpha=16.0, rslora=True),
    "r16": dict(rank=16, alpha=16.0, rslora=True),
}

CPU_LENGTHS = ["512", "1K", "2K", "4K"]
LENGTHS = context_lengths(full=["4K", "8K", "16K", "32K", "64K", "128K"], small=[256, 1024], cpu=CPU_LENGTHS)
PERK_ONLY_LENGTHS = context_lengths(full=["1M"], small=[4096], cpu=[])
NAIVE_LENGTHS = context_lengths(full=["4K", "8K", "16K", "32K"], small=[256, 1024], cpu=CPU_LENGTHS)
# Tokens per forward/backward at the cpu size, for perk and naive alike.
CPU_MICRO_BATCH_TOKENS = 1024
DTYPES = {"perk": PERK_DTYPE, "naive": MODEL_DTYPE, "prompt": MODEL_DTYPE}


@dataclass(frozen=True)
class Case:
    model: str
    provider: str
    lora: str | None
    tokens: int

    def __str__(self) -> str:
        lora = f"-{self.lora}" if self.lora else ""
        return f"{self.model}-{self.provider}{lora}-{format_length(self.tokens)}"


def _cases() -> list[Case]:
    """In the order they run: one model per (model, provider, lora), all its lengths in a row."""
    qwen, smollm = QWEN2_5_0_5B.name, SMOLLM2_135M.name
    if SIZE == "cpu":  # SmolLM2-135M only, the providers side by side at each length
        return [
            Case(smollm, provider, lora, n)
            for n in LENGTHS
            for provider, lora in (("perk", "r16"), ("prompt", None), ("naive", "r16"))
        ]
    cases = [Case(qwen, "prompt", None, n) for n in LENGTHS]
    for lora in ("r256", "r16"):
        cases += [Case(qwen, "perk", lora, n) for n in LENGTHS + PERK_ONLY_LENGTHS]
    cases += [Case(qwen, "naive", "r256", n) for n in NAIVE_LENGTHS]
    cases += [Case(smollm, "prompt", None, n) for n in LENGTHS]
    cases += [Case(smollm, "perk", "r16", n) for n in LENGTHS + PERK_ONLY_LENGTHS]
    return cases


def _prompt_runner(case: Case, model_slot, phases: PhaseTimer):
    # Room for the longest prompt: the context plus the question's few tokens and the answer.
    positions = max(LENGTHS, default=0) + 256
    model = model_slot.get((case.model, "prompt"), lambda: build_model(case.model, min_positions=positions))
    tokenizer = byte_tokenizer()
    prompt = build_prompt(tokenizer, QUESTION, context_text(case.tokens))

    def run():
        input_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(DEVICE)
        with torch.no_grad():
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **GENERATE)

    return run, {"inner_steps": None, "micro_batch_tokens": None}


def _perk_runner(case: Case, model_slot, phases: PhaseTimer):
    def build():
        config = PerkConfig(
            **LORA[case.lora], segment_len=SEGMENT_LEN, inner_steps=INNER_STEPS, inner_optimizer=INNER_OPTIMIZER,
            inner_lr=INNER_LR, answer_stop_at_newline=False,
            **({"micro_batch_tokens": CPU_MICRO_BATCH_TOKENS} if SIZE == "cpu" else {}),
        )
        model = build_model(case.model, dtype=PERK_DTYPE)
        return PerkModel.from_base(model, byte_tokenizer(), config, backend=ENGINE_BACKEND)

    perk_model = model_slot.get((case.model, "perk", case.lora), build)
    text = context_text(case.tokens)

    def run():
        with phases("encode"):
            memory = perk_model.encode(text)
        perk_model.answer(memory, QUESTION, max_new_tokens=NEW_TOKENS)

    start = time.perf_counter()
    byte_tokenizer()(text, add_special_tokens=False)
    info = {"micro_batch_tokens": perk_model.config.micro_batch_tokens, "inner_steps": INNER_STEPS,
            "tokenize_seconds": time.perf_counter() - start}
    return run, info


def _naive_runner(case: Case, model_slot, phases: PhaseTimer):
    def build():
        return NaivePerk(
            build_model(case.model), **LORA[case.lora], target_modules=LLAMA_TARGETS, inner_steps=INNER_STEPS,
            inner_lr=INNER_LR, optimizer=INNER_OPTIMIZER,
        )

    naive = model_slot.get((case.model, "naive", case.lora), build)
    micro_batch_tokens = CPU_MICRO_BATCH_TOKENS if SIZE == "cpu" else NAIVE_MICRO_BATCH_TOKENS
    tokenizer = byte_tokenizer()
    text = context_text(case.tokens) + "\n"  # perk's document separator: L tokens in all
    question_ids = tokenizer(build_prompt(tokenizer, QUESTION), add_special_tokens=False, return_tensors="pt")
    question_ids = question_ids["input_ids"].to(DEVICE)

    def run():
        with phases("encode"):
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            segments = ids.view(-1, SEGMENT_LEN).to(DEVICE)  # (L / 128, 128)
            adapters = naive.encode(segments, micro_batch=micro_batch_tokens // SEGMENT_LEN)
        naive.generate(adapters, question_ids, **GENERATE)

    return run, {"micro_batch_tokens": micro_batch_tokens, "inner_steps": INNER_STEPS}


RUNNERS = {"prompt": _prompt_runner, "perk": _perk_runner, "naive": _naive_runner}


@pytest.mark.parametrize("case", _cases(), ids=str)
def test_encode_vs_prompt(benchmark, model_slot, case):
    benchmark.group = f"encode-vs-prompt {case.model} L={format_length(case.tokens)}"
    phases = PhaseTimer()
    run, info = RUNNERS[case.provider](case, model_slot, phases)
    lora = LORA.get(case.lora, {})
    info.update(
        suite="encode_vs_prompt", model=case.model, provider=case.provider, rank=lora.get("rank"),
        lora_alpha=lora.get("alpha"), rslora=lora.get("rslora"), segment_len=SEGMENT_LEN,
        inner_optimizer=INNER_OPTIMIZER if case.provider != "prompt" else None, new_tokens=NEW_TOKENS,
    )
    record = run_benchmark(
        benchmark, run, series=f"{case.model}/{case.provider}/{case.lora}", size=(case.tokens,),
        tokens=case.tokens, dtype=DTYPES[case.provider], info=info, phases=phases,
    )
    if record is not None and not record.oom:
        assert record.seconds and (record.peak_bytes is None or record.peak_bytes > 0)
