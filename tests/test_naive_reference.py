"""benchmarks/naive_perk.py computes what perk computes, so the benchmarks compare like with like."""

import copy

import pytest
import torch

from benchmarks.naive_perk import NaivePerk
from perk.config import LLAMA_TARGETS, PerkConfig
from perk.engine import PerkModel
from perk.segments import build_prompt
from tests.tiny_models import tiny_model, tiny_tokenizer

SEGMENT, STEPS, LR = 16, 3, 0.05
TEXT = ("mary went to the kitchen and john moved to the garden " * 3)[: SEGMENT * 6 - 1]  # 6 full segments


def _pair(optimizer, **config):
    base, tokenizer = tiny_model("qwen2", dtype=torch.float64), tiny_tokenizer()
    perk_config = PerkConfig(rank=4, alpha=8.0, rslora=True, segment_len=SEGMENT, inner_steps=STEPS, inner_lr=LR,
                             inner_optimizer=optimizer, dtype="float64", **config)
    perk_model = PerkModel.from_base(copy.deepcopy(base), tokenizer, perk_config, backend="torch")
    naive = NaivePerk(base, rank=4, alpha=8.0, rslora=True, target_modules=LLAMA_TARGETS, inner_steps=STEPS,
                      inner_lr=LR, optimizer=optimizer)
    with torch.no_grad():
        perk_model.adapter_init.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        views = perk_model.layout.module_views(perk_model.adapter_init.unsqueeze(0))
        for (a, b), naive_a, naive_b in zip(views, naive.init[0::2], naive.init[1::2], strict=True):
            naive_a.copy_(a[0])
            naive_b.copy_(b[0])
    segments = tokenizer(TEXT + "\n", add_special_tokens=False, return_tensors="pt")["input_ids"].view(-1, SEGMENT)
    return perk_model, naive, tokenizer, segments


def _max_diff(layout, flat, tensors):
    pairs = layout.module_views(flat.unsqueeze(0) if flat.dim() == 1 else flat)
    return max(max((a[0] - na).abs().max().item(), (b[0] - nb).abs().max().item())
               for (a, b), na, nb in zip(pairs, tensors[0::2], tensors[1::2], strict=True))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_naive_encode_matches_perk(optimizer):
    perk_model, naive, _, segments = _pair(optimizer)
    memory = perk_model.encode(TEXT)
    adapted = naive.encode(segments, micro_batch=4)  # 2 micro-batches: accumulation is exercised
    moved = _max_diff(perk_model.layout, perk_model.adapter_init.detach(), adapted)
    assert moved > 1e-3  # the steps did something
    assert _max_diff(perk_model.layout, memory.flat, adapted) < 1e-5 * max(1.0, moved)


def test_naive_meta_gradient_matches_perk_exact():
    perk_model, naive, tokenizer, segments = _pair("sgd", unroll_steps=2, meta_grad="exact")
    question, answer = "Where is mary?", "kitchen"
    _, grads, _ = perk_model.meta_gradient([{"context": TEXT, "question": question, "answer": answer}])
    prompt = tokenizer(build_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
    target = tokenizer(f" {answer}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    naive_grads = naive.meta_gradient(
        segments, torch.tensor([prompt + target]), torch.tensor([[-100] * len(prompt) + target]), unroll_steps=2
    )
    scale = grads["adapter_init"].abs().max().item()
    assert _max_diff(perk_model.layout, grads["adapter_init"], naive_grads[:-1]) < 1e-5 * scale
    torch.testing.assert_close(naive_grads[-1].double(), grads["inner_lr_log"], rtol=1e-4, atol=1e-9)
