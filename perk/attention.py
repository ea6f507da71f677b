"""Causal self-attention for passes over segments on a CPU, and switching a model's attention.

PERK's inner steps run forward and backward over many short segments (128 tokens by default). At
that size torch's CPU SDPA kernels are mostly overhead: the math path upcasts a bf16 model's q, k
and v to fp32, copies every key/value head once per query head that reads it (grouped-query
attention), and masks through a (batch, heads, seq, seq) tensor; the CPU flash kernel is slower
still at these lengths. :func:`segment_attention` computes the same function with three batched
matmuls in the model's dtype: the query heads that share a key/value head are stacked along the
rows (a view, no copy), the causal mask and the 1/√d scale ride in ``baddbmm``, and the softmax is
taken in fp32 (fp64 for fp64). In bf16 it rounds the scores once, as Hugging Face's eager attention does.

It is registered with transformers under :data:`SEGMENT_ATTENTION` and used only by
:class:`~perk.adapted_model.AdaptedModel`'s segment passes on a CPU (:func:`cpu_segment_attention`);
every call outside its case (a padding mask, a KV cache, dropout, soft-capping, a window shorter
than the segment, attention sinks) goes to transformers' SDPA function unchanged.
:func:`eager_attention` switches a model to eager attention, the twice-differentiable one that the
exact meta-gradient needs. Measurements: ``benchmarks/results/cpu-encode*.md``.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SEGMENT_ATTENTION = "perk_segments"

# Keyword arguments some architectures pass to their attention function; any of them set means a
# variant of attention this module does not compute.
_VARIANTS = ("softcap", "position_bias", "s_aux", "sinks")


@functools.lru_cache(maxsize=8)
def _causal_bias(seq: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(groups·seq, seq) additive mask: 0 where row i mod seq may attend column j (j ≤ i mod seq), -inf elsewhere."""
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    bias = torch.zeros(seq, seq, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    return bias.repeat(groups, 1)


def _is_plain_causal(module: torch.nn.Module, query, key, attention_mask, dropout: float, kwargs: dict) -> bool:
    sliding_window = kwargs.get("sliding_window")
    return (
        attention_mask is None
        and not dropout
        and getattr(module, "is_causal", True)
        and kwargs.get("is_causal", True) is not False
        and query.shape[2] == key.shape[2]  # no KV cache: every query sees the segment's own keys
        and query.shape[1] % key.shape[1] == 0
        and (sliding_window is None or sliding_window >= query.shape[2])
        and not kwargs.get("output_attentions", False)
        and all(kwargs.get(name) is None for name in _VARIANTS)
    )


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention of transformers' attention-function signature.

    query: (batch, heads, seq, d); key, value: (batch, kv_heads, seq, d), query head i reading
    key/value head i // (heads / kv_heads) (transformers' ``repeat_kv`` order). Returns the
    (batch, seq, heads, d) output and no attention weights.
    """
    if not _is_plain_causal(module, query, key, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    batch, heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scaling = dim**-0.5 if scaling is None else scaling
    q = query.reshape(batch * kv_heads, groups * seq, dim)  # a view when query is contiguous (after rotary)
    k = key.reshape(batch * kv_heads, seq, dim)
    v = value.reshape(batch * kv_heads, seq, dim)
    bias = _causal_bias(seq, groups, query.dtype, query.device).expand(batch * kv_heads, -1, -1)
    scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scaling)  # (batch·kv_heads, groups·seq, seq)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(value.dtype)
    out = torch.bmm(probs, v).view(batch, heads, seq, dim)
    return out.transpose(1, 2), None


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)


# ----------------------------------------------------------------------------------------------
# Switching a model's attention implementation
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def attention_implementation(model: PreTrainedModel, name: str):
    """Run the block with the model's attention implementation ``name``; restore the current one after."""
    current = model.config._attn_implementation
    if current == name:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(current)


def eager_attention(model: PreTrainedModel) -> contextlib.AbstractContextManager:
    """Run the block with eager (twice-differentiable) attention; restore the model's choice after."""
    current = model.config._attn_implementation
    if current != "eager" and not hasattr(model, "set_attn_implementation"):
        raise RuntimeError(
            f"meta_grad='exact' needs eager attention and this transformers version cannot switch "
            f"{type(model).__name__} from {current!r}; load the model with attn_implementation='eager'"
        )
    return attention_implementation(model, "eager")


_SEGMENT_ATTENTION_SUPPORTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def supports_segment_attention(model: PreTrainedModel) -> bool:
    """Whether transformers lets ``model`` switch to :data:`SEGMENT_ATTENTION` (an architecture
    without attention-function support, or an older transformers, keeps SDPA); asked once per model."""
    if model not in _SEGMENT_ATTENTION_SUPPORTED:
        try:
            with attention_implementation(model, SEGMENT_ATTENTION):
                supported = True
        except (AttributeError, ValueError):
            supported = False
        _SEGMENT_ATTENTION_SUPPORTED[model] = supported
    return _SEGMENT_ATTENTION_SUPPORTED[model]


def cpu_segment_attention(model: PreTrainedModel) -> contextlib.AbstractContextManager:
    """For passes over segments: on a CPU an SDPA model runs :func:`segment_attention`, and SDPA's
    math path for whatever that hands back to SDPA (at segment lengths torch's CPU flash-attention
    kernel is the slower one). Elsewhere, and for eager attention (the exact meta-gradient),
    nothing changes."""
    if model.device.type != "cpu" or model.config._attn_implementation != "sdpa":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    if supports_segment_attention(model):
        stack.enter_context(attention_implementation(model, SEGMENT_ATTENTION))
    return stack
