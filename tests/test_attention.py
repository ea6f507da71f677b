"""segment_attention (perk.attention) against SDPA, and its use by AdaptedModel's segment passes."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from perk.adapted_model import AdaptedModel
from perk.attention import SEGMENT_ATTENTION, segment_attention, supports_segment_attention
from perk.config import LLAMA_TARGETS
from tests.tiny_models import FAMILIES, tiny_model_and_tokenizer


class _Attention(torch.nn.Module):
    """What transformers' attention functions read of their module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _qkv(batch, heads, kv_heads, seq, dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # query contiguous in (batch, heads, seq, dim), as rotary leaves it; value a transposed view, as
    # the models' (batch, seq, heads, dim) projections give it.
    query = torch.randn(batch, heads, seq, dim, generator=generator, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, seq, dim, generator=generator, dtype=torch.float64)
    value = torch.randn(batch, seq, kv_heads, dim, generator=generator, dtype=torch.float64).transpose(1, 2)
    return [t.to(dtype).requires_grad_(True) for t in (query, key, value)]


def _sdpa(module, query, key, value, **kwargs):
    with sdpa_kernel([SDPBackend.MATH]):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)[0]


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (9, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_equals_sdpa_forward_and_backward(heads, kv_heads, dtype):
    module = _Attention(heads // kv_heads)
    inputs = _qkv(3, heads, kv_heads, 17, 8, dtype)
    reference_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    out, weights = segment_attention(module, *inputs, None, scaling=0.3)
    expected = _sdpa(module, *reference_inputs, scaling=0.3)
    assert weights is None and out.shape == (3, 17, heads, 8) and out.dtype == dtype
    upstream = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, upstream.to(dtype))
    expected_grads = torch.autograd.grad(expected, reference_inputs, upstream)
    # bf16: the scores are rounded once (as in transformers' eager attention), the softmax is fp32.
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected_grad, atol=tolerance, rtol=tolerance)


def test_twice_differentiable():
    inputs = _qkv(1, 2, 1, 5, 3, torch.float64)
    assert torch.autograd.gradgradcheck(lambda q, k, v: segment_attention(_Attention(2), q, k, v, None)[0], inputs)


@pytest.mark.parametrize(
    "case",
    ["padding_mask", "kv_cache", "dropout", "softcap", "short_window", "not_causal"],
)
def test_other_cases_go_to_sdpa_unchanged(case):
    module = _Attention(2)
    query, key, value = _qkv(2, 4, 2, 6, 8, torch.float32)
    mask, kwargs = None, {}
    if case == "padding_mask":
        mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
        mask[0, :, :, :2] = False
        mask[0, :, :2, 0] = True  # every row keeps a position
    elif case == "kv_cache":
        query = query[:, :, -1:]
    elif case == "dropout":
        kwargs = {"dropout": 0.5}
    elif case == "softcap":
        kwargs = {"softcap": 30.0}
    elif case == "short_window":
        kwargs = {"sliding_window": 3}
    elif case == "not_causal":
        module.is_causal = False
    seen = []

    def spy(*args, **spy_kwargs):
        seen.append(True)
        return "sdpa's answer", None

    import perk.attention

    original = perk.attention.sdpa_attention_forward
    perk.attention.sdpa_attention_forward = spy
    try:
        out, _ = segment_attention(module, query, key, value, mask, **kwargs)
    finally:
        perk.attention.sdpa_attention_forward = original
    assert seen and out == "sdpa's answer"


@pytest.mark.parametrize("family", FAMILIES)
def test_segment_passes_of_an_sdpa_model_use_it_and_equal_sdpa(family):
    model, tokenizer = tiny_model_and_tokenizer(family, dtype=torch.float64, attn_implementation="sdpa")
    ids = torch.randint(3, 200, (3, 24), generator=torch.Generator().manual_seed(1))
    with sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
        expected = model.base_model(input_ids=ids, use_cache=False)[0]
    targets = ("c_attn", "c_proj", "c_fc") if family == "gpt2" else LLAMA_TARGETS
    adapted = AdaptedModel(
        model, tokenizer, rank=2, scale=1.0, target_modules=targets, dtype=torch.float64,
        micro_batch_tokens=64, stop_at_newline=True,
    )
    seen = []
    attention = next(m for name, m in model.named_modules() if name.endswith(("self_attn", "attn")))
    attention.register_forward_pre_hook(lambda module, args: seen.append(module.config._attn_implementation))
    with torch.no_grad():
        hidden = adapted.hidden(ids)
    torch.testing.assert_close(hidden, expected, atol=1e-10, rtol=1e-10)
    # The models transformers can switch run it; the implementation is restored after the pass.
    assert seen == [SEGMENT_ATTENTION if supports_segment_attention(model) else "sdpa"]
    assert model.config._attn_implementation == "sdpa"
    if family != "gpt2":
        assert supports_segment_attention(model)
