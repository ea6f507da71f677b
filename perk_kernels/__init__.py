"""perk_kernels: fused Triton kernels for PERK (LoRA linear, inner SGD step, linear cross-entropy,
meta-gradient accumulation).

Every op has a plain-torch reference of the same function beside it (``*_reference``): the
oracle for tests and the CPU fallback. See ``perk_kernels._utils`` for how a backend is chosen.
"""

from perk_kernels._utils import BACKENDS, choose_backend
from perk_kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from perk_kernels.lora_inner_step import (
    expand_group_table,
    inner_step_clip,
    inner_step_clip_jvp,
    inner_step_direction,
    lora_inner_step,
    lora_inner_step_reference,
)
from perk_kernels.lora_linear import AdapterRows, lora_linear, lora_linear_reference, adapter_rows
from perk_kernels.meta_grad_accumulate import cuda_extension_available, meta_grad_accumulate, meta_grad_accumulate_reference

__all__ = [
    "BACKENDS",
    "choose_backend",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "expand_group_table",
    "inner_step_clip",
    "inner_step_clip_jvp",
    "inner_step_direction",
    "lora_inner_step",
    "lora_inner_step_reference",
    "AdapterRows",
    "lora_linear",
    "lora_linear_reference",
    "adapter_rows",
    "cuda_extension_available",
    "meta_grad_accumulate",
    "meta_grad_accumulate_reference",
]
