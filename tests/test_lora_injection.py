"""LoRA injection: which layers, plain behaviour without an adapter, merged-weight equivalence,
and one adapter per sequence in a batch."""

import pytest
import torch

from perk.config import DEFAULT_TARGETS
from perk.lora import AdapterContext, AdapterLayout, LoraLinear, inject_lora
from tests.tiny_models import FAMILIES, tiny_model

EXPECTED_PER_LAYER = {"llama": 7, "qwen2": 7, "gpt2": 4}
SCALE = 0.75


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    monkeypatch.setenv("PERK_KERNELS_BACKEND", "torch")


def injected(family):
    model = tiny_model(family)
    context = AdapterContext(SCALE)
    layout = AdapterLayout(inject_lora(model, DEFAULT_TARGETS, context), rank=3)
    return model, context, layout


def random_adapters(layout, n_adapters, seed):
    generator = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(n_adapters, layout.n_params, generator=generator)


def merged_model(family, layout, flat):
    """A fresh model with ``W + scale·B A`` merged into every target weight (the oracle)."""
    model = tiny_model(family)
    with torch.no_grad():
        for spec, (a, b) in zip(layout.modules, layout.module_views(flat)):
            delta = SCALE * b[0] @ a[0]  # (d_out, d_in)
            weight = model.get_submodule(spec.name).weight
            weight += delta.t() if spec.fan_in_fan_out else delta
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_every_attention_and_mlp_projection_is_injected(family):
    model, _, layout = injected(family)
    assert len(layout.modules) == 2 * EXPECTED_PER_LAYER[family]
    assert all(isinstance(model.get_submodule(spec.name), LoraLinear) for spec in layout.modules)
    assert all(spec.fan_in_fan_out == (family == "gpt2") for spec in layout.modules)
    assert not isinstance(model.get_output_embeddings(), LoraLinear)
    assert layout.n_params == sum(3 * (s.d_in + s.d_out) for s in layout.modules)
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, DEFAULT_TARGETS, AdapterContext(1.0))


def test_no_matching_target_is_an_error():
    with pytest.raises(ValueError, match="no module of the model matches"):
        inject_lora(tiny_model("llama"), ("nonexistent_proj",), AdapterContext(1.0))


@pytest.mark.parametrize("family", FAMILIES)
def test_without_an_active_adapter_the_model_is_unchanged(family):
    ids = torch.randint(3, 200, (2, 11))
    reference = tiny_model(family)(ids).logits
    model, _, _ = injected(family)
    torch.testing.assert_close(model(ids).logits, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_active_adapter_equals_merged_weights(family):
    model, context, layout = injected(family)
    flat = random_adapters(layout, 1, seed=0)
    ids = torch.randint(3, 200, (2, 9))
    with context.active(layout.module_views(flat)):
        got = model(ids).logits
    torch.testing.assert_close(got, merged_model(family, layout, flat)(ids).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(ids).logits, tiny_model(family)(ids).logits)  # deactivated after


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_one_adapter_per_sequence(family):
    model, context, layout = injected(family)
    flat = random_adapters(layout, 3, seed=1)
    ids = torch.randint(3, 200, (4, 7))
    row_adapters = torch.tensor([2, 0, 2, 1])
    with context.active(layout.module_views(flat), row_adapters):
        batched = model(ids).logits
    for row, adapter in enumerate(row_adapters.tolist()):
        with context.active(layout.module_views(flat[adapter : adapter + 1])):
            single = model(ids[row : row + 1]).logits
        torch.testing.assert_close(batched[row : row + 1], single, rtol=1e-5, atol=1e-6)


def test_layout_views_share_the_flat_buffer():
    _, _, layout = injected("llama")
    flat = torch.zeros(2, layout.n_params)
    views = layout.tensor_views(flat)
    assert [tuple(v.shape[1:]) for v in views] == layout.shapes and len(views) == layout.n_groups
    views[5][1].fill_(1.0)
    assert flat[1].sum() == layout.sizes[5] and flat[0].sum() == 0
    table = torch.arange(2.0 * layout.n_groups).view(2, -1)  # per (adapter, group), e.g. learning rates
    torch.testing.assert_close(layout.expand(table), table.repeat_interleave(torch.tensor(layout.sizes), dim=1))
    with pytest.raises(ValueError, match="flat must be"):
        layout.tensor_views(torch.zeros(2, 5))
