"""Convergence check: the engine on the Triton kernels (Triton's CPU interpreter on CI, the GPU
elsewhere) gives the same memories, inner losses and meta-gradient as on the torch reference."""

import pytest
import torch

from perk import PerkConfig, PerkModel
from perk_kernels._utils import interpret_mode
from tests.tiny_models import tiny_model_and_tokenizer

# The Triton kernels run on CUDA tensors, or on CPU tensors through the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not interpret_mode(), reason="needs CUDA or TRITON_INTERPRET=1")

PROBLEMS = [
    {"context": "Mary went to the kitchen. John went to the hall.", "question": "Where is Mary?", "answer": "kitchen"},
    {"context": ["Bo has the ball.", "Bo left."], "question": "Who has the ball?", "answer": "Bo"},
]


def perk_on(backend):
    model, tokenizer = tiny_model_and_tokenizer("llama", attn_implementation="sdpa")
    model.to(DEVICE)
    # One inner step, unrolled: every kernel (forward, backward, inner step, meta-gradient
    # accumulation, fused loss) runs on both paths; more steps only repeat them, interpreted.
    config = PerkConfig(rank=4, alpha=8.0, segment_len=16, inner_steps=1, unroll_steps=1)
    perk = PerkModel.from_base(model, tokenizer, config, backend=backend)
    with torch.no_grad():
        noise = torch.randn(perk.adapter_init.shape, generator=torch.Generator().manual_seed(3))
        perk.adapter_init.add_(0.02 * noise.to(perk.adapter_init.device))
    return perk


def test_triton_kernels_match_the_torch_reference_end_to_end(monkeypatch):
    monkeypatch.delenv("PERK_KERNELS_BACKEND", raising=False)
    triton, reference = perk_on("triton"), perk_on("torch")
    contexts = [[PROBLEMS[0]["context"]], PROBLEMS[1]["context"]]
    memory, expected_memory = triton.encode(contexts), reference.encode(contexts)
    torch.testing.assert_close(memory.inner_losses, expected_memory.inner_losses, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(memory.flat, expected_memory.flat, rtol=1e-3, atol=1e-5)
    loss, grads, _ = triton.meta_gradient(PROBLEMS)
    expected_loss, expected, _ = reference.meta_gradient(PROBLEMS)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-4, atol=1e-5)
    for name in expected:
        error = (grads[name] - expected[name]).norm() / expected[name].norm()
        assert error < 2e-2, (name, float(error))
