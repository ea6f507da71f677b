"""The engine in bf16 through the Triton kernels, against the torch kernels in bf16 and the fp32
exact reference, on the tiny models: what the GPU path computes, measured where the kernels run
(a GPU, or Triton's interpreter with tests/triton_bf16_interpreter.py making its bf16 a GPU's).

tests/test_engine_triton.py asserts it at a small size; benchmarks/bf16_interpreter_fidelity.py
records it. The three engines share the base model's bf16-rounded weights and the meta-parameters:

* ``triton-bf16``: bf16 base model, the Triton kernels (they round fp32 adapters to bf16 for the
  tensor-core dots), ``fd`` meta-gradient;
* ``torch-bf16``: bf16 base model, the torch kernels (the adapter term in fp32 beside the bf16 base
  output), ``fd``;
* ``exact-fp32``: the same weights in fp32, eager attention, ``exact`` double backward (torch).
"""

from __future__ import annotations

import dataclasses

import torch

from perk import PerkConfig, PerkModel
from tests.tiny_models import tiny_model_and_tokenizer

ENGINES = {  # name: (base dtype, kernels backend, attention, meta_grad)
    "triton-bf16": (torch.bfloat16, "triton", "sdpa", "fd"),
    "torch-bf16": (torch.bfloat16, "torch", "sdpa", "fd"),
    "exact-fp32": (torch.float32, "torch", "eager", "exact"),
}
# The pairs compared: (engine, against).
PAIRS = [("triton-bf16", "exact-fp32"), ("torch-bf16", "exact-fp32"), ("triton-bf16", "torch-bf16")]

# Two adapters, short contexts: every launch is interpreted on a CPU.
PROBLEMS = [
    {"context": ["Mary went to the kitchen.", "John left."], "question": "Where is Mary?", "answer": "kitchen"},
    {"context": "Bo took the apple.", "question": "Who?", "answer": "Bo"},
]
# inner_lr 1.0 makes the Hessian term of the meta-gradient large (first_order is far off here).
CONFIG = PerkConfig(rank=4, alpha=8.0, segment_len=16, inner_steps=3, unroll_steps=2, inner_lr=1.0)
# What make test runs: one inner step, unrolled, adapters on the query and value projections only.
TEST_CONFIG = dataclasses.replace(CONFIG, inner_steps=1, unroll_steps=1, target_modules=("q_proj", "v_proj", "c_attn"))


def engine(name: str, family: str, config: PerkConfig) -> PerkModel:
    """One of :data:`ENGINES` on the tiny ``family`` model, meta-parameters moved off their init
    (B ≠ 0, rates ≠ lr0) the same way for every engine."""
    dtype, backend, attention, meta_grad = ENGINES[name]
    model, tokenizer = tiny_model_and_tokenizer(family, dtype=torch.bfloat16, attn_implementation=attention)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    perk = PerkModel.from_base(
        model.to(device, dtype), tokenizer, dataclasses.replace(config, meta_grad=meta_grad), backend=backend
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, tensor in perk.meta_parameters().items():
            scale = 0.05 if key == "adapter_init" else 0.3
            tensor.add_(scale * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype).to(tensor.device))
    return perk


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run(perk: PerkModel, problems: list[dict], max_new_tokens: int) -> dict:
    """encode (inner losses, adapters), answer, meta-gradient of one engine."""
    memory = perk.encode([p["context"] for p in problems])
    answers = perk.answer(memory, [p["question"] for p in problems], max_new_tokens=max_new_tokens)
    loss, grads, _ = perk.meta_gradient(problems)
    return dict(
        inner_losses=memory.inner_losses.detach().cpu().double(), adapters=memory.flat.detach().cpu().double(),
        answers=answers, meta_loss=float(loss), grads={k: v.detach().cpu().double() for k, v in grads.items()},
    )  # fmt: skip


def measure(family: str, config: PerkConfig = CONFIG, problems=PROBLEMS, max_new_tokens: int = 3) -> dict:
    """Every engine's results on ``family``, and each pair's agreement: inner losses (max abs
    difference, nats), adapters and meta-gradients (relative error, cosine), answers (equal?)."""
    results = {name: run(engine(name, family, config), problems, max_new_tokens) for name in ENGINES}
    pairs = {}
    for name, against in PAIRS:
        got, want = results[name], results[against]
        pairs[f"{name} vs {against}"] = dict(
            inner_losses_max_abs=float((got["inner_losses"] - want["inner_losses"]).abs().max()),
            adapters_rel_error=relative_error(got["adapters"], want["adapters"]),
            meta_loss_abs=abs(got["meta_loss"] - want["meta_loss"]),
            same_answers=got["answers"] == want["answers"],
            **{f"cosine {k}": cosine(got["grads"][k], want["grads"][k]) for k in want["grads"]},
            **{f"rel_error {k}": relative_error(got["grads"][k], want["grads"][k]) for k in want["grads"]},
        )
    return dict(answers={name: r["answers"] for name, r in results.items()}, pairs=pairs)
