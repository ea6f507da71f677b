"""Damaged or wrong input to the API gives a clear error, never a silent wrong result (issue 17):
saved meta-parameters of the wrong shape or not finite, partial saves, answers past the window,
empty questions, odd configs, and kernel inputs the backends would otherwise disagree on."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import perk.engine
import perk_kernels
from perk import PerkConfig, PerkModel
from perk.engine import CONFIG_NAME, WEIGHTS_NAME
from tests.tiny_models import tiny_model_and_tokenizer, tiny_tokenizer


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    monkeypatch.setenv("PERK_KERNELS_BACKEND", "torch")


def make_perk(family="llama", model=None, **overrides):
    if model is None:
        model, tokenizer = tiny_model_and_tokenizer(family)
    else:
        tokenizer = tiny_tokenizer()
    settings = dict(rank=2, segment_len=16, inner_steps=2, unroll_steps=1, micro_batch_tokens=64)
    settings.update(overrides)
    return PerkModel.from_base(model, tokenizer, PerkConfig(**settings))


@pytest.fixture
def saved(tmp_path):
    make_perk().save_pretrained(tmp_path / "perk")
    return tmp_path / "perk"


def load(directory):
    model, tokenizer = tiny_model_and_tokenizer("llama")
    return PerkModel.from_pretrained(directory, model, tokenizer)


# --- 1. saved meta-parameters are checked for shape (copy_ would broadcast) and finiteness --------


@pytest.mark.parametrize(
    "name, make",
    [
        ("inner_lr_log", lambda t: t[:1].clone()),  # (1, G) would fill every step's rates
        ("adapter_init", lambda t: t[:1].clone()),  # one element would fill the whole adapter
        ("adapter_init", lambda t: t.unsqueeze(0).clone()),  # (1, P): same numbers, other shape
    ],
)
def test_meta_parameters_of_another_shape_are_refused(saved, name, make):
    tensors = load_file(saved / WEIGHTS_NAME)
    tensors[name] = make(tensors[name])
    save_file(tensors, saved / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=rf"{name}.*shape"):
        load(saved)


def test_non_finite_meta_parameters_are_refused(saved):
    tensors = load_file(saved / WEIGHTS_NAME)
    tensors["adapter_init"][3] = float("nan")
    save_file(tensors, saved / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="adapter_init.*not finite"):
        load(saved)


# --- 4. damaged perk/ folders: clear ValueErrors, and saves that are whole or absent --------------


@pytest.mark.parametrize(
    "damage, error, match",
    [
        (lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:100]), ValueError,
         "not a readable safetensors"),
        (lambda d: (d / WEIGHTS_NAME).write_bytes(b"\x00garbage" * 20), ValueError, "not a readable safetensors"),
        (lambda d: (d / WEIGHTS_NAME).unlink(), FileNotFoundError, "perk_meta.safetensors: no such file"),
        (lambda d: (d / CONFIG_NAME).write_text("{not json"), ValueError, "not valid JSON"),
        (lambda d: (d / CONFIG_NAME).write_text("[1, 2]"), ValueError, "lacks"),
        (lambda d: _edit_json(d / CONFIG_NAME, lambda c: c.pop("layout")), ValueError, "lacks.*layout"),
        (lambda d: _edit_json(d / CONFIG_NAME, lambda c: c["config"].update(rank="big")), ValueError, "rank"),
    ],
    ids=["truncated", "garbage", "no weights", "bad json", "not a mapping", "no layout", "bad config"],
)
def test_damaged_saves_raise_clear_errors(saved, damage, error, match):
    damage(saved)
    with pytest.raises(error, match=match):
        load(saved)


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_a_save_that_fails_midway_leaves_no_folder(tmp_path, monkeypatch):
    perk_model = make_perk()

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(perk.engine, "save", fail)
    with pytest.raises(OSError, match="No space left"):
        perk_model.save_pretrained(tmp_path / "perk")
    assert not (tmp_path / "perk").exists(), "a partial save must not look like a saved model"
    assert list(tmp_path.iterdir()) == [], "no staging leftovers"
    monkeypatch.undo()
    perk_model.save_pretrained(tmp_path / "perk")
    perk_model.save_pretrained(tmp_path / "perk")  # saving over an existing save works too
    assert sorted(p.name for p in (tmp_path / "perk").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    load(tmp_path / "perk")


# --- 5. answers must fit the window: prompt + max_new_tokens ---------------------------------------


def _short_window_model(family):
    common = dict(vocab_size=len(tiny_tokenizer()), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=48, **common)
    else:
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=48, **common)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_answer_refuses_prompt_plus_new_tokens_past_the_window(family):
    perk_model = make_perk(model=_short_window_model(family))
    memory = perk_model.encode("Mary went home.")
    prompt = len(perk_model.adapted.question_prompt("Where?"))  # "Question: Where?\nAnswer:" = 24 byte tokens
    with pytest.raises(ValueError, match=r"max_new_tokens.*window \(48\)"):
        perk_model.answer(memory, "Where?", max_new_tokens=48 - prompt + 1)
    assert isinstance(perk_model.answer(memory, "Where?", max_new_tokens=48 - prompt), str)


# --- 7. empty questions, odd configs, lm_head targets -----------------------------------------------


@pytest.mark.parametrize("question", ["", "  \n", ["fine?", ""]])
def test_empty_questions_are_refused(question):
    perk_model = make_perk()
    memory = perk_model.encode("Mary went home.")
    with pytest.raises(ValueError, match="question.*empty"):
        perk_model.answer(memory, question, max_new_tokens=2)


def test_empty_question_in_a_problem_is_refused():
    with pytest.raises(ValueError, match="question.*empty"):
        make_perk().meta_gradient([{"context": "Mary went home.", "question": " ", "answer": "home"}])


def test_a_single_target_module_name_is_one_name():
    assert PerkConfig(target_modules="q_proj").target_modules == ("q_proj",)
    assert PerkConfig(target_modules="q_proj, v_proj").target_modules == ("q_proj", "v_proj")
    assert make_perk(target_modules="q_proj").layout.n_groups == 2 * 2  # A and B of 2 layers


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -0.1])
def test_inner_weight_decay_must_be_finite_and_non_negative(value):
    with pytest.raises(ValueError, match="inner_weight_decay"):
        PerkConfig(inner_weight_decay=value)


@pytest.mark.parametrize("targets", [("lm_head",), ("q_proj", "lm_head")])
def test_the_output_layer_cannot_be_a_target(targets):
    """The losses read the LM head's weight directly (no adapter): one there would never be trained."""
    with pytest.raises(ValueError, match="lm_head.*output layer"):
        make_perk(target_modules=targets)


# --- 7. kernels: empty feature dimensions get the same clear error on both backends ----------------


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_lora_linear_refuses_zero_input_features(backend):
    x = torch.randn(3, 0, requires_grad=True)
    weight, lora_a, lora_b = torch.randn(4, 0), torch.randn(1, 2, 0), torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match="d_in"):
        perk_kernels.lora_linear(x, weight, None, lora_a, lora_b, 1.0, backend=backend)
