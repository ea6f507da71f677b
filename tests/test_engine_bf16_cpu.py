"""The engine over a bf16 base model on the CPU path of ``perk_kernels.lora_linear`` (chosen
automatically without the Triton interpreter) against the same engine on the torch reference."""

import pytest
import torch

from perk import PerkConfig, PerkModel
from perk.check_meta_grad import cosine, relative_error
from perk_kernels.lora_linear import _LoraLinearBf16CpuFunction
from tests.tiny_models import tiny_model_and_tokenizer

PROBLEMS = [
    {"context": "Mary went to the kitchen. John went to the hall. Mary took the apple.", "question": "Where is Mary?", "answer": "kitchen"},
    {"context": ["Bo has the ball.", "Bo left for the garden."], "question": "Who has the ball?", "answer": "Bo"},
]


def perk_on(backend):
    model, tokenizer = tiny_model_and_tokenizer("llama")
    config = PerkConfig(rank=4, alpha=8.0, segment_len=16, inner_steps=3, unroll_steps=1)
    perk = PerkModel.from_base(model.to(torch.bfloat16), tokenizer, config, backend=backend)
    with torch.no_grad():
        noise = torch.randn(perk.adapter_init.shape, generator=torch.Generator().manual_seed(3))
        perk.adapter_init.add_(0.02 * noise)
    return perk


@pytest.mark.filterwarnings("ignore:a context of under 128 tokens")  # short on purpose: a fast test
def test_bf16_cpu_path_matches_the_reference_end_to_end(monkeypatch):
    """encode (3 inner SGD steps) and the fd meta-gradient agree to a few bf16 roundings."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("PERK_KERNELS_BACKEND", raising=False)
    fast, reference = perk_on(None), perk_on("torch")
    assert fast.adapter_init.dtype == torch.float32
    calls = []
    monkeypatch.setattr(_LoraLinearBf16CpuFunction, "apply", _counting(_LoraLinearBf16CpuFunction.apply, calls))
    contexts = [[PROBLEMS[0]["context"]], PROBLEMS[1]["context"]]
    memory, expected_memory = fast.encode(contexts), reference.encode(contexts)
    assert calls, "the CPU path did not run"
    torch.testing.assert_close(memory.inner_losses, expected_memory.inner_losses, rtol=5e-3, atol=2e-3)
    assert relative_error(memory.flat, expected_memory.flat) < 5e-3
    loss, grads, _ = fast.meta_gradient(PROBLEMS)
    expected_loss, expected, _ = reference.meta_gradient(PROBLEMS)
    torch.testing.assert_close(loss, expected_loss, rtol=5e-3, atol=2e-3)
    for name in expected:
        assert cosine(grads[name], expected[name]) > 0.999, name


def _counting(apply, calls):
    def counted(*args):
        calls.append(1)
        return apply(*args)

    return counted

