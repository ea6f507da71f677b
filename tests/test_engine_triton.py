"""Convergence check: the engine on the Triton kernels (Triton's CPU interpreter on CI, the GPU
elsewhere) gives the same memories, inner losses and meta-gradient as on the torch reference, in
fp32 and in bf16 (the GPU path's dtype)."""

import pytest
import torch

from perk import PerkConfig, PerkModel
from perk_kernels._utils import interpret_mode
from tests import bf16_fidelity
from tests.tiny_models import FAMILIES, tiny_model_and_tokenizer

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


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_through_the_triton_kernels_matches_torch_and_the_fp32_exact_reference(family):
    """encode, answer and the fd meta-gradient with a bf16 base model through the Triton kernels
    (on a CPU, tests/triton_bf16_interpreter.py makes the interpreter's bf16 a GPU's), against the
    torch kernels in bf16 and the fp32 exact reference (tests/bf16_fidelity.py). Adapters on the
    query and value projections only (GPT-2: the fused q, k, v), to keep the interpreted launches
    few: the kernels are the same on every layer. The bounds are several times what this size
    measures (``python benchmarks/bf16_interpreter_fidelity.py --size test`` records it)."""
    result = bf16_fidelity.measure(family, bf16_fidelity.TEST_CONFIG)
    for pair, agreement in result["pairs"].items():
        assert agreement["same_answers"], (pair, result["answers"])
        assert agreement["inner_losses_max_abs"] <= 2e-3, (pair, agreement)
        assert agreement["adapters_rel_error"] <= 1e-2, (pair, agreement)
        assert agreement["meta_loss_abs"] <= 2e-3, (pair, agreement)
        for name in ("adapter_init", "inner_lr_log"):
            assert agreement[f"cosine {name}"] >= 0.99, (pair, agreement)
            assert agreement[f"rel_error {name}"] <= 0.2, (pair, agreement)
