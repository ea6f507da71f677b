"""Memory.save_peft: the files load in ``peft.PeftModel`` and give the engine's adapted logits."""

import json

import pytest
import torch
from peft import PeftModel

from perk import PerkConfig, PerkModel
from tests.tiny_models import FAMILIES, tiny_model, tiny_model_and_tokenizer

CONTEXTS = ["Mary went to the kitchen. John went to the garden.", ["The apple is red.", "Bo ate it."]]


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    monkeypatch.setenv("PERK_KERNELS_BACKEND", "torch")


def encoded(family, rslora):
    model, tokenizer = tiny_model_and_tokenizer(family)
    config = PerkConfig(rank=4, alpha=8.0, rslora=rslora, segment_len=16, inner_steps=2, unroll_steps=1)
    perk = PerkModel.from_base(model, tokenizer, config)
    return perk, perk.encode([[c] if isinstance(c, str) else c for c in CONTEXTS])


def engine_logits(perk, memory, index, ids):
    flat = memory.flat[index : index + 1]
    with torch.no_grad(), perk.adapted.context.active(perk.layout.module_views(flat)):
        return perk.model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_the_export_and_matches_the_engine(family, rslora, tmp_path):
    perk, memory = encoded(family, rslora)
    written = memory.save_peft(tmp_path)
    assert written == [tmp_path / "adapter_0", tmp_path / "adapter_1"]
    config = json.loads((written[0] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is rslora
    assert config["fan_in_fan_out"] is (family == "gpt2")
    ids = torch.randint(3, 200, (2, 10))
    base_logits = tiny_model(family)(ids).logits
    for index, directory in enumerate(written):
        peft_model = PeftModel.from_pretrained(tiny_model(family), directory).eval()
        with torch.no_grad():
            got = peft_model(ids).logits
        want = engine_logits(perk, memory, index, ids)
        assert (want - base_logits).abs().max() > 1e-4  # the adapter changes the output
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_single_memory_writes_into_the_directory(tmp_path):
    perk, memory = encoded("llama", rslora=False)
    assert memory.select(1).save_peft(tmp_path) == [tmp_path]
    assert memory.save_peft(tmp_path / "chosen", index=0) == [tmp_path / "chosen"]
    assert {p.name for p in tmp_path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    with pytest.raises(ValueError, match="index must lie in"):
        memory.save_peft(tmp_path, index=2)
