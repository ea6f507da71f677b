"""Answer scoring: exact match after normalisation, and token F1 (SQuAD-style).

Normalisation lower-cases, drops punctuation (but keeps a decimal point or comma between digits,
so "74.3" stays "74.3" and never becomes "743"), drops the articles a/an/the, and collapses
whitespace: "The kitchen." matches "kitchen".
"""

from __future__ import annotations

import re
import string
from collections import Counter

# A "." or "," goes unless it sits between two digits; every other punctuation mark goes.
_PUNCTUATION = re.compile(
    r"(?<!\d)[.,]|[.,](?!\d)|[" + re.escape(string.punctuation.replace(".", "").replace(",", "")) + "]"
)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation (except inside numbers), no articles, single spaces."""
    if not isinstance(text, str):
        raise TypeError(f"answer must be a str, got {type(text).__name__}")
    text = _PUNCTUATION.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> bool:
    """Whether the prediction equals the gold answer after normalize_answer()."""
    return normalize_answer(prediction) == normalize_answer(gold)


def f1(prediction: str, gold: str) -> float:
    """Token F1 between the normalised prediction and gold answer (1.0 when both are empty)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)
