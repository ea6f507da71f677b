"""The task names and the one entry point that generates problems of any of them."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from perk.tasks.babilong import babilong_problem
from perk.tasks.embed import DEFAULT_DOC_TOKENS
from perk.tasks.longgorilla import VARIANTS as LONGGORILLA_VARIANTS
from perk.tasks.longgorilla import longgorilla_problem
from perk.tasks.problem import Problem
from perk.tasks.student_records import KINDS, student_records_problem
from perk.tasks.tokens import TokenCounter

BABILONG_TASKS = tuple(f"babilong/qa{qa}" for qa in (1, 2, 3))
STUDENT_RECORDS_TASKS = tuple(f"student_records/{kind}" for kind in KINDS)
LONGGORILLA_TASKS = tuple(f"longgorilla/{variant}" for variant in LONGGORILLA_VARIANTS)
TASKS = BABILONG_TASKS + STUDENT_RECORDS_TASKS + LONGGORILLA_TASKS
_MIN_DOC_TOKENS = 16


@functools.lru_cache(maxsize=8)
def _counter(tokenizer: PreTrainedTokenizerBase) -> TokenCounter:
    # One counter per tokenizer, so its memo and the haystack pools built with it are reused.
    return TokenCounter(tokenizer)


def _check_options(
    task: str, n: int, length_tokens: int, depth: float | None, corpus: str | Path | None, doc_tokens: int
) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    for name, value in (("n", n), ("length_tokens", length_tokens), ("doc_tokens", doc_tokens)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if length_tokens <= 0:
        raise ValueError(f"length_tokens must be positive, got {length_tokens}")
    if doc_tokens < _MIN_DOC_TOKENS:
        raise ValueError(f"doc_tokens must be >= {_MIN_DOC_TOKENS}, got {doc_tokens}")
    if depth is not None and not (isinstance(depth, (int, float)) and math.isfinite(depth) and 0 <= depth <= 1):
        raise ValueError(f"depth must be None or a number in [0, 1], got {depth!r}")
    if corpus is not None and task not in BABILONG_TASKS:
        raise ValueError(f"corpus applies to the babilong tasks only, not {task!r}")
    if corpus is not None and not Path(corpus).is_file():
        raise FileNotFoundError(f"corpus file {str(corpus)!r} does not exist")


def iter_problems(
    task: str,
    n: int,
    length_tokens: int,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 0,
    depth: float | None = None,
    order_markers: bool = True,
    doc_index: bool = True,
    corpus: str | Path | None = None,
    doc_tokens: int = DEFAULT_DOC_TOKENS,
) -> Iterator[Problem]:
    """Yield ``n`` problems of ``task`` one at a time (for streaming to a file); see generate()."""
    _check_options(task, n, length_tokens, depth, corpus, doc_tokens)
    counter = _counter(tokenizer)
    family, variant = task.split("/")
    for index in range(n):
        if family == "babilong":
            yield babilong_problem(
                int(variant.removeprefix("qa")), counter, length_tokens, seed=seed, index=index, depth=depth,
                order_markers=order_markers, doc_index=doc_index,
                corpus=None if corpus is None else str(corpus), doc_tokens=doc_tokens,
            )
        elif family == "student_records":
            yield student_records_problem(
                variant, counter, length_tokens, seed=seed, index=index, depth=depth, doc_index=doc_index
            )
        else:
            yield longgorilla_problem(
                variant, counter, length_tokens, seed=seed, index=index, depth=depth, doc_index=doc_index
            )


def generate(
    task: str,
    n: int,
    length_tokens: int,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 0,
    depth: float | None = None,
    order_markers: bool = True,
    doc_index: bool = True,
    corpus: str | Path | None = None,
    doc_tokens: int = DEFAULT_DOC_TOKENS,
) -> list[Problem]:
    """Generate ``n`` problems of ``task`` (one of TASKS) with contexts of ``length_tokens`` tokens.

    Args:
        task: ``babilong/qa1`` … ``qa3``, ``student_records/{recall,relation,aggregate}`` or
            ``longgorilla/stdlib`` (API retrieval).
        n: number of problems.
        length_tokens: target context length, counted with ``tokenizer`` (no special tokens) as
            the sum over documents; met to within one haystack sentence, student record or API
            document.
        tokenizer: any Hugging Face tokenizer.
        seed: run seed; problem ``i`` depends only on (task, seed, i, options), not on ``n``.
        depth: None to place facts at random; else where the first supporting fact (the answer's
            API document) starts, as a fraction of the context (0 = start, 1 = end). Not for
            student_records/aggregate.
        order_markers: prefix every bAbI fact with a per-actor event counter (babilong only).
        doc_index: prefix every document with ``doc_<i>:``.
        corpus: a plain-text file whose sentences replace the built-in haystack prose (babilong).
        doc_tokens: most tokens per babilong document (prefix included).
    """
    return list(
        iter_problems(
            task, n, length_tokens, tokenizer, seed=seed, depth=depth, order_markers=order_markers,
            doc_index=doc_index, corpus=corpus, doc_tokens=doc_tokens,
        )
    )
