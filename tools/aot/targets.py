"""What the sweep covers: targets, ranks, activation dtypes, the engine's calls; and its cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tools.shapes import QWEN2_5_0_5B, SMOLLM2_135M

KERNEL_MODULES = (
    "perk_kernels.lora_linear",
    "perk_kernels.lora_inner_step",
    "perk_kernels.fused_linear_cross_entropy",
    "perk_kernels.meta_grad_accumulate",
)
MODELS = (QWEN2_5_0_5B, SMOLLM2_135M)
RANKS = (16, 64, 256)
SMS = 132  # H100 / H200: sizes the launchers' row splits as on the real device
# Activation dtypes; "tf32" is fp32 with torch.backends.cuda.matmul.allow_tf32 (tl.dot in TF32).
ACTIVATIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
TENSOR_CORE_DTYPES = ("bf16", "fp16")  # must use tensor cores and must not spill


@dataclass(frozen=True)
class Arch:
    name: str
    capability: int
    max_shared: int  # bytes of shared memory one block may use (dynamic, opt-in)
    tensor_op: str  # the SASS instruction a bf16 tl.dot must become


ARCHS = {
    "sm_90": Arch("sm_90", 90, 232448, "HGMMA"),
    "sm_80": Arch("sm_80", 80, 166912, "HMMA"),
}


@dataclass(frozen=True)
class Scenario:
    """How the engine calls a LoRA layer: adapters, rows per adapter, and whether it backpropagates."""

    name: str
    n_adapters: int
    rows_per_adapter: int
    backward: bool


SCENARIOS = (
    Scenario("meta-batch", 8, 512, True),  # meta-training: 8 problems x 4 segments of 128 tokens
    Scenario("encode", 1, 2048, True),  # test-time encoding of one context
    Scenario("prefill", 1, 37, False),  # answering: the question's tokens (any count)
    Scenario("decode", 1, 1, False),  # answering: one token per step
)


def cache_dir() -> Path:
    """``<triton cache>/perk_aot``: SASS summaries and the csrc result, beside Triton's compiles."""
    import triton

    path = Path(triton.knobs.cache.dir) / "perk_aot"
    path.mkdir(parents=True, exist_ok=True)
    return path
