"""perk on a CPU, measured fairly: encode and meta-step beside the naive PEFT run at the same precision.

Runs at ``PERK_BENCH_SIZE=cpu`` only (SmolLM2-135M at its real size, random weights: values do not
change speed), one intra-op thread unless a row says otherwise:

* ``roofline``   the model's matmuls alone, for one pass over 1024 tokens: every LoRA-targeted
  projection's forward ``x Wᵀ`` and input gradient ``dy W``, and the LM head's forward and input
  gradient (what an encode's forward and backward must multiply), in fp32 and bf16, torch's
  ``mm`` at those shapes. ``seconds`` is the sum of the best of 5 calls per shape; ``gflops`` the rate.
  An encode of L tokens needs ``inner_steps · L / 1024`` such passes: perk's fraction of the
  roofline is that time over perk's.
* ``encode``     perk's ``encode`` (N = 4 AdamW steps, r = 16 rsLoRA, all linear layers, 128-token
  segments, 1024 tokens per forward/backward) and the same inner loop by ``naive_perk.py``
  (PEFT adapters, autograd, HF's loss on materialised logits) at 1K and 4K tokens, with both base
  models in the same dtype: the one perk picks on this machine (``base_dtype=auto``) and, when
  that is bf16, fp32 as a second pair (``PERK_BENCH_CPU_DTYPES=float32,bfloat16`` names the pairs).
  PEFT keeps its adapters in fp32 over a bf16 base, as perk does. Per dtype: perk and naive at 1K,
  then perk at 4K, then naive at 4K (a model is built once per provider and length group).
* ``encode-threads`` perk's 1K encode on every physical core (``perk.runs.resolve_threads(0)``),
  beside its one-thread row: the scaling of ``threads``.
* ``meta-step``  one meta-training step of ``make run``'s configuration (``TrainConfig()``: fd,
  T = 1 of N = 4 clipped SGD steps, r = 16, 2 problems × 256 tokens; meta-gradient + Adam update),
  perk on one thread and on every core, beside ``naive_perk.py``'s ``create_graph`` meta-gradient
  (eager attention, the 2 problems one after the other) on every core. Both load the embedded
  SmolLM2-135M (its weights and tokenizer, as ``make run``) in the dtype perk picks.

Each row: ``PERK_BENCH_ROUNDS`` rounds (default 3); pytest-benchmark's min and median are the
figures; ``peak_extra_bytes`` is the peak RSS increase over them (see conftest). A row whose model
was just built gets one warm-up call first, except the 4K encodes (a cold first round of ~100 s
costs less than a warm-up call: the min and median of 3 rounds leave it out). ``python -m benchmarks.cpu_report RESULTS.json`` writes the summary.

    PERK_BENCH_SIZE=cpu pytest benchmarks/test_cpu_speed.py --benchmark-only --benchmark-json=out.json
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest
import torch
from benchmarks.conftest import (
    DEVICE_NAME,
    ENGINE_BACKEND,
    MEMORY_METHOD,
    PERK_DTYPE,
    SIZE,
    _read_peak,
    _start_peak,
    build_model,
    byte_tokenizer,
    context_text,
    format_length,
    model_config,
)
from benchmarks.naive_perk import NaivePerk

from perk.config import LLAMA_TARGETS, PerkConfig, TrainConfig
from perk.engine import PerkModel
from perk.models import load_base_model
from perk.runs import resolve_threads
from perk.segments import build_prompt, context_segments
from perk.tasks import generate

MODEL = "smollm2-135m"
ROUNDS = int(os.environ.get("PERK_BENCH_ROUNDS") or 3)
PASS_TOKENS = 1024  # tokens per forward/backward, perk and naive alike
SEGMENT_LEN = 128
INNER_STEPS = 4
ENCODE_LORA = dict(rank=16, alpha=16.0, rslora=True)
INNER_LR = 1e-3  # rates do not change speed; a small one keeps a random model's steps finite
LENGTHS = (1024, 4096)
ALL_CORES = resolve_threads(0)


def _pair_dtypes() -> list[torch.dtype]:
    names = os.environ.get("PERK_BENCH_CPU_DTYPES")
    if names:
        return [getattr(torch, name.strip()) for name in names.split(",") if name.strip()]
    return [PERK_DTYPE] if PERK_DTYPE == torch.float32 else [PERK_DTYPE, torch.float32]


DTYPES = _pair_dtypes()
pytestmark = pytest.mark.skipif(SIZE != "cpu", reason="PERK_BENCH_SIZE=cpu runs this suite")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _measure(benchmark, run, info: dict, *, threads: int = 1, warm_up: bool = True) -> None:
    """ROUNDS timed calls of ``run`` on ``threads`` (after a warm-up call when ``warm_up``), and the
    peak RSS increase over them."""
    cpu_seconds = []

    def timed():
        start_cpu = time.process_time()
        run()
        cpu_seconds.append(time.process_time() - start_cpu)

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if warm_up:
            run()
        start = _start_peak()
        benchmark.pedantic(timed, rounds=ROUNDS, iterations=1)
        peak = _read_peak()
    finally:
        torch.set_num_threads(saved)
    # The process's CPU time per round: on a shared machine wall time also counts waits for a core.
    benchmark.extra_info.update(
        device=DEVICE_NAME, size=SIZE, threads=threads, memory_method=MEMORY_METHOD, warm_up=warm_up,
        peak_extra_bytes=None if peak is None or start is None else peak - start, cpu_seconds=cpu_seconds, **info,
    )


# ----------------------------------------------------------------------------------------------
# Roofline: the model's matmuls alone
# ----------------------------------------------------------------------------------------------


def _matmul_shapes() -> list[tuple[int, int, int, int]]:
    """(count, rows, inner, cols) of every mm of one forward + input-gradient pass over PASS_TOKENS."""
    config = model_config(MODEL)
    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = d * config.num_key_value_heads // config.num_attention_heads
    projections = [(d, d), (d, kv), (d, kv), (d, d), (d, ff), (d, ff), (ff, d)]  # q k v o gate up down
    shapes = []
    for d_in, d_out in projections:
        shapes += [(layers, PASS_TOKENS, d_in, d_out), (layers, PASS_TOKENS, d_out, d_in)]
    shapes += [(1, PASS_TOKENS, d, config.vocab_size), (1, PASS_TOKENS, config.vocab_size, d)]  # LM head
    return shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_name)
def test_roofline(benchmark, dtype):
    benchmark.group = "cpu roofline"
    generator = torch.Generator().manual_seed(0)
    operands = [
        (count, torch.randn(rows, inner, generator=generator).to(dtype), torch.randn(inner, cols, generator=generator).to(dtype))
        for count, rows, inner, cols in _matmul_shapes()
    ]
    flops = sum(2 * count * a.shape[0] * a.shape[1] * b.shape[1] for count, a, b in operands)

    def pass_seconds() -> float:
        return sum(count * min(_timed(torch.mm, a, b) for _ in range(5)) for count, a, b in operands)

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pass_seconds()  # warm-up: oneDNN / MKL kernels
        seconds = pass_seconds()
    finally:
        torch.set_num_threads(saved)
    benchmark.pedantic(lambda: None, rounds=1)  # the figure is pass_seconds, below
    benchmark.extra_info.update(
        suite="cpu_speed", kind="roofline", dtype=_name(dtype), device=DEVICE_NAME, size=SIZE, threads=1,
        tokens=PASS_TOKENS, pass_seconds=seconds, gflops=flops / seconds / 1e9, pass_flops=flops,
    )


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Encode: perk vs naive PEFT, same dtype
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodeCase:
    provider: str
    dtype: torch.dtype
    tokens: int
    threads: int = 1

    def __str__(self) -> str:
        threads = f"-{self.threads}threads" if self.threads > 1 else ""
        return f"{self.provider}-{_name(self.dtype)}-{format_length(self.tokens)}{threads}"


def _encode_cases() -> list[EncodeCase]:
    cases = []
    for dtype in DTYPES:
        cases += [EncodeCase("perk", dtype, LENGTHS[0]), EncodeCase("naive", dtype, LENGTHS[0])]
        if ALL_CORES > 1:
            cases.append(EncodeCase("perk", dtype, LENGTHS[0], ALL_CORES))
        cases += [EncodeCase("perk", dtype, tokens) for tokens in LENGTHS[1:]]
        cases += [EncodeCase("naive", dtype, tokens) for tokens in LENGTHS[1:]]
    return cases


def _perk_encoder(dtype: torch.dtype, model_slot):
    def build():
        config = PerkConfig(
            **ENCODE_LORA, segment_len=SEGMENT_LEN, inner_steps=INNER_STEPS, inner_optimizer="adamw",
            inner_lr=INNER_LR, micro_batch_tokens=PASS_TOKENS,
        )
        return PerkModel.from_base(build_model(MODEL, dtype=dtype), byte_tokenizer(), config, backend=ENGINE_BACKEND)

    return model_slot.get(("perk", dtype), build)


def _naive_encoder(dtype: torch.dtype, model_slot):
    def build():
        return NaivePerk(
            build_model(MODEL, dtype=dtype), **ENCODE_LORA, target_modules=LLAMA_TARGETS,
            inner_steps=INNER_STEPS, inner_lr=INNER_LR, optimizer="adamw",
        )

    return model_slot.get(("naive", dtype), build)


@pytest.mark.parametrize("case", _encode_cases(), ids=str)
def test_encode(benchmark, model_slot, case):
    benchmark.group = f"cpu encode {_name(case.dtype)} L={format_length(case.tokens)}"
    fresh = model_slot.key != (case.provider, case.dtype)
    if case.provider == "perk":
        perk_model = _perk_encoder(case.dtype, model_slot)
        text = context_text(case.tokens)

        def run():
            perk_model.encode(text)
    else:
        naive = _naive_encoder(case.dtype, model_slot)
        text = context_text(case.tokens) + "\n"  # perk's document separator: L tokens in all
        tokenizer = byte_tokenizer()

        def run():
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            naive.encode(ids.view(-1, SEGMENT_LEN), micro_batch=PASS_TOKENS // SEGMENT_LEN)

    adapter_dtype = "float32"
    info = dict(
        suite="cpu_speed", kind="encode", provider=case.provider, model=MODEL, dtype=_name(case.dtype),
        adapter_dtype=adapter_dtype, tokens=case.tokens, inner_steps=INNER_STEPS, rank=ENCODE_LORA["rank"],
        segment_len=SEGMENT_LEN, micro_batch_tokens=PASS_TOKENS, inner_optimizer="adamw",
    )
    _measure(benchmark, run, info, threads=case.threads, warm_up=fresh and case.tokens <= PASS_TOKENS)


def test_naive_adapters_are_fp32_over_a_bf16_base(model_slot):
    """What makes the bf16 pair the same precision: PEFT keeps its LoRA weights in fp32."""
    naive = NaivePerk(
        build_model(MODEL, dtype=torch.bfloat16), **ENCODE_LORA, target_modules=LLAMA_TARGETS,
        inner_steps=1, inner_lr=INNER_LR,
    )
    assert {p.dtype for p in naive.init} == {torch.float32}


# ----------------------------------------------------------------------------------------------
# Meta-step of `make run`
# ----------------------------------------------------------------------------------------------

MAKE_RUN = TrainConfig()


def _problems(tokenizer) -> list[dict]:
    data = MAKE_RUN.data
    problems = generate(data.task, MAKE_RUN.meta_batch, data.context_tokens, tokenizer, seed=data.seed)
    return [p.to_json() for p in problems]


@pytest.mark.parametrize(
    ("provider", "threads"), [("perk", 1), ("perk", ALL_CORES), ("naive", ALL_CORES)], ids=lambda v: str(v)
)
def test_meta_step(benchmark, model_slot, provider, threads):
    benchmark.group = "cpu meta-step (make run)"
    dtype = PERK_DTYPE
    config = MAKE_RUN.perk
    if provider == "perk":
        def build():
            pm = PerkModel.from_base(*load_base_model(MAKE_RUN.model, dtype=dtype), config, backend=ENGINE_BACKEND)
            return pm, torch.optim.Adam(list(pm.meta_parameters().values()), lr=MAKE_RUN.meta_lr)

        pm, optimizer = model_slot.get(("perk-meta", dtype), build)
        problems = _problems(pm.tokenizer)

        def run():
            _, grads, _ = pm.meta_gradient(problems)
            params = pm.meta_parameters()
            _adam_step(optimizer, list(params.values()), [grads[name] for name in params])
    else:
        naive, optimizer, batches, problems = model_slot.get(("naive-meta", dtype), lambda: _naive_meta(config, dtype))

        def run():
            grads = None
            for segments, question_ids, question_labels in batches:
                step = naive.meta_gradient(segments, question_ids, question_labels, unroll_steps=config.unroll_steps)
                grads = step if grads is None else [a + b for a, b in zip(grads, step)]
            _adam_step(optimizer, naive.meta_parameters(), grads)

    info = dict(
        suite="cpu_speed", kind="meta_step", provider=provider, model=MODEL, dtype=_name(dtype),
        mode=config.meta_grad if provider == "perk" else "create_graph", unroll_steps=config.unroll_steps,
        inner_steps=config.inner_steps, rank=config.rank, problems=len(problems),
        tokens=MAKE_RUN.data.context_tokens, inner_optimizer=config.inner_optimizer,
    )
    _measure(benchmark, run, info, threads=threads)  # a fresh model or other threads: warm up


def _naive_meta(config: PerkConfig, dtype: torch.dtype):
    """naive_perk at make run's LoRA and inner loop (SGD; no inner clipping), on perk's token rows of its problems."""
    model, tokenizer = load_base_model(MAKE_RUN.model, dtype=dtype)
    model.set_attn_implementation("eager")
    problems = _problems(tokenizer)
    naive = NaivePerk(
        model, rank=config.rank, alpha=config.alpha,
        rslora=config.rslora, target_modules=LLAMA_TARGETS, inner_steps=config.inner_steps,
        inner_lr=config.inner_lr or 0.7, optimizer=config.inner_optimizer,
    )
    batches = []
    for problem in problems:
        # perk's own token rows, so both do the same arithmetic (the pad positions count in naive's
        # loss; that changes no cost). Whole 128-token rows of the token stream dropped a problem's tail.
        segments = context_segments(tokenizer, [problem["context"]], SEGMENT_LEN).input_ids
        prompt = tokenizer(build_prompt(tokenizer, problem["question"]), add_special_tokens=False)["input_ids"]
        answer = tokenizer(f" {problem['answer']}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        batches.append((segments, torch.tensor([prompt + answer]), torch.tensor([[-100] * len(prompt) + answer])))
    return naive, torch.optim.Adam(naive.meta_parameters(), lr=MAKE_RUN.meta_lr), batches, problems


def _adam_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for param, grad in zip(params, grads):
        param.grad = grad
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

