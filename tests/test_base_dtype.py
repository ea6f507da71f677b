"""The base model's dtype: ``base_dtype=auto`` picks bf16 on a CPU only where the probe says its bf16
matmuls pay, explicit choices win, and a bf16 base model (fp32 adapters) encodes and answers like fp32."""

import math

import pytest
import torch

from perk import PerkConfig, PerkModel, models
from perk.models import resolve_base_dtype
from tests.tiny_models import tiny_model_and_tokenizer

# bf16 against fp32, same weights (rounded), same context: the stated tolerance of the CPU bf16 path.
# Inner losses are means of token NLLs (nats); bf16 rounds the base model's activations (8 bits of
# mantissa), while the adapters, the accumulation of their gradients and the loss stay fp32. Measured
# here: at most 1e-3 over 3 SGD steps. (On the real SmolLM2-135M, 4 × 256-token qa1 contexts, 2 AdamW
# steps: 0.006 at step 0 and 0.04 after the first AdamW step, whose sign-like update amplifies the
# rounding of near-zero gradients; the greedy answers were identical.)
INNER_LOSS_ATOL = 0.01
ANSWER_NLL_ATOL = 0.02
CONTEXT = ["Mary went to the kitchen. John moved to the garden.", "Sandra took the apple to the office."]
QUESTIONS = ["Where is Mary?", "Who took the apple?"]
ANSWERS = ["kitchen", "Sandra"]


@pytest.fixture
def probe(monkeypatch):
    """Replace the machine probe: ``probe(native, speedup)`` returns the list of timed probes."""

    def set_probe(native: bool, speedup: float) -> list:
        timed = []
        monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
        monkeypatch.setattr(models, "cpu_bf16_matmul_speedup", lambda: timed.append(speedup) or speedup)
        return timed

    return set_probe


@pytest.mark.parametrize(
    "native, speedup, expected",
    [(True, 2.5, torch.bfloat16), (True, 1.2, torch.float32), (False, 3.0, torch.float32)],
)
def test_auto_on_cpu_follows_the_probe(probe, native, speedup, expected):
    timed = probe(native, speedup)
    assert resolve_base_dtype("auto", "cpu") == expected
    assert len(timed) == (1 if native else 0)  # no timing where the CPU has no native bf16


@pytest.mark.parametrize(
    "name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)]
)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_explicit_dtype_wins(probe, name, dtype, device):
    timed = probe(True, 10.0)
    assert resolve_base_dtype(name, device) == dtype
    assert not timed


def test_auto_on_cuda_is_bf16_without_probing(probe):
    timed = probe(False, 0.5)
    assert resolve_base_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert not timed


def test_unknown_name_raises():
    with pytest.raises(ValueError, match="base_dtype must be one of auto, float32, bfloat16, float16"):
        resolve_base_dtype("fp8", "cpu")


def test_the_probe_is_measured_once_per_process_and_restores_threads():
    threads = torch.get_num_threads()
    first = models.cpu_bf16_matmul_speedup()
    assert math.isfinite(first) and first > 0
    assert models.cpu_bf16_matmul_speedup() == first
    assert models.cpu_bf16_matmul_speedup.cache_info().hits >= 1
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_base_encodes_and_answers_like_fp32(family):
    problems = [{"context": c, "question": q, "answer": a} for c, q, a in zip(CONTEXT, QUESTIONS, ANSWERS)]
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer = tiny_model_and_tokenizer(family, dtype=dtype, attn_implementation="sdpa")
        config = PerkConfig(rank=4, segment_len=16, inner_steps=3, unroll_steps=0, inner_lr=0.3, micro_batch_tokens=40)
        pm = PerkModel.from_base(model, tokenizer, config, backend="torch")
        memory = pm.encode([[c] for c in CONTEXT])
        results[dtype] = memory, float(pm.meta_loss(problems)[0])
    (fp32, fp32_answer_nll), (bf16, bf16_answer_nll) = results.values()
    assert bf16.flat.dtype == bf16.inner_losses.dtype == torch.float32  # adapters and losses stay fp32
    torch.testing.assert_close(bf16.inner_losses, fp32.inner_losses, atol=INNER_LOSS_ATOL, rtol=0)
    # The inner steps lowered the loss by much more than the tolerance, in both dtypes.
    for memory in (fp32, bf16):
        assert (memory.inner_losses[0] - memory.inner_losses[-1] > 10 * INNER_LOSS_ATOL).all()
    # Answers: the NLL of the reference answers after the inner loop. (Greedy answers of a random
    # tiny model sit on near-ties that bf16 rounding flips; the real model's agreed, see above.)
    assert abs(bf16_answer_nll - fp32_answer_nll) <= ANSWER_NLL_ATOL
