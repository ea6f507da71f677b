"""Tiny random-init models of every supported family and an offline tokenizer for them.

Every engine test builds its models here: 2 layers, hidden 32, a byte-level tokenizer that needs
no download. Values of random weights do not matter for correctness checks (gradients, equality
of two code paths), only the architecture does.
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config
from transformers import AutoModelForCausalLM

FAMILIES = ("llama", "qwen2", "gpt2")
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|endoftext|>")


@functools.lru_cache(maxsize=1)
def _byte_level_tokenizer() -> Tokenizer:
    # One token per byte (no merges): deterministic, tiny, and covers any text.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(alphabet)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with 259 tokens (3 special + 256 bytes), built offline."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_tokenizer(),
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|endoftext|>",
        model_max_length=1024,
    )


def tiny_config(family: str, vocab_size: int):
    common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, **common,
        )
    if family == "qwen2":
        return Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, **common,
        )
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=1024, **common)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def tiny_model(
    family: str,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
    seed: int = 0,
):
    """A 2-layer, hidden-32 random-init causal LM of ``family``, in eval mode."""
    config = tiny_config(family, vocab_size=len(tiny_tokenizer()))
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.to(dtype).eval()


def tiny_model_and_tokenizer(family: str, **kwargs):
    return tiny_model(family, **kwargs), tiny_tokenizer()


def save_tiny_model(family: str, path):
    """Save a tiny ``family`` model and its tokenizer as a Hugging Face directory (for the CLIs)."""
    model, tokenizer = tiny_model_and_tokenizer(family)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
