"""What a base model's prompts must respect: its window, its special token ids, left padding.

The facts :class:`~perk.adapted_model.AdaptedModel` and the methods need to build prompts and
generate from them, as functions of the model's config and tokenizer: the context window, the ids
that pad (for generation), fill (right padding of loss batches) and stop (eos, and a newline when
answers stop at one), and the check that a prompt plus its generated tokens fit the window.
The prompt text itself is built by :mod:`perk.segments` (``build_prompt``, ``prompt_ids``).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from perk.segments import prompt_ids


def model_window(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The model's context window in tokens."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, name, None)
        if value:
            return int(value)
    return int(tokenizer.model_max_length)


def filler_id(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """Token id for right padding of loss batches. Causal attention never lets a real token see
    right padding, so any id works; one other than the model's pad id keeps transformers from
    warning that an attention mask is missing (none is needed, and SDPA stays causal)."""
    pad = model.config.pad_token_id
    candidates = (tokenizer.eos_token_id, tokenizer.bos_token_id, 0, 1)
    return next(c for c in candidates if c is not None and c != pad)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Left-padding id for generation (the tokenizer's pad, else eos)."""
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, stop_at_newline: bool) -> list[int]:
    """eos, plus the newline token when answers stop at a newline and it is a single token."""
    stops = [tokenizer.eos_token_id]
    if stop_at_newline:
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        if len(newline) == 1:
            stops += newline
    return stops


def left_pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (len(rows), longest row): ``rows`` left-padded with ``pad``."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def check_fits_window(prompt_tokens: int, max_new_tokens: int, window: int) -> None:
    """ValueError unless a prompt of ``prompt_tokens`` plus ``max_new_tokens`` generated tokens fit
    ``window`` (positions past it do not exist)."""
    if prompt_tokens + max_new_tokens > window:
        raise ValueError(
            f"a prompt of {prompt_tokens} tokens plus max_new_tokens={max_new_tokens} exceed the model window "
            f"({window}): ask for at most {window - prompt_tokens} new tokens"
        )


def question_prompt(tokenizer: PreTrainedTokenizerBase, question: str, window: int, max_new_tokens: int = 0) -> list[int]:
    """Token ids of the prompt that asks ``question`` (no context), as answers are trained.

    A ValueError when the question is empty, or when the prompt plus ``max_new_tokens``
    generated tokens would not fit the model window (positions past it do not exist).
    """
    ids = prompt_ids(tokenizer, question, window)
    check_fits_window(len(ids), max_new_tokens, window)
    return ids
