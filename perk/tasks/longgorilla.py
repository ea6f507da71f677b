"""LongGorilla-style API retrieval: find the one API document that does what an instruction asks.

The context is a haystack of API documents in the official LongGorilla layout, one document per
API ("<api>textwrap.dedent(text)</api> domain: ..., framework: ..., functionality: ...,
api_name: ..., api_arguments: ..., python_environment_requirements: ..., example_code: ...,
performance: ..., description: ..."), built from the pinned pool of real standard-library
functions (perk.tasks.api_pool). The question is an instruction derived from one API's
description ("Instruction: Write an API implementation that returns ..."); the answer is that
API's call, as between its ``<api>`` tags; the supporting fact is its document.

Distractor documents are the rest of the pool in random order, each added while it fits the
target length (so the context ends short of it by less than the shortest document left out); only
a context longer than the whole pool repeats documents. The answer's document goes at a random
position, or, with ``depth``, at the document boundary nearest ``depth`` × length.

Documents are 88-173 SmolLM2 tokens (median 111): the longest do not fit one 128-token segment and
are split across two by the encoder, as the official LongGorilla documents (often longer) are.
"""

from __future__ import annotations

import dataclasses
import functools
import random

from perk.tasks.api_pool import Api, api_pool
from perk.tasks.problem import Problem
from perk.tasks.tokens import TokenCounter

VARIANTS = ("stdlib",)


@dataclasses.dataclass(frozen=True)
class _CountedPool:
    """The pool's documents and their token counts under one tokenizer: ``bare`` opening a text,
    ``following`` after a ``doc_<i>:`` prefix and a space (see perk.tasks.tokens)."""

    apis: tuple[Api, ...]
    documents: tuple[str, ...]
    bare: tuple[int, ...]
    following: tuple[int, ...]


@functools.lru_cache(maxsize=8)
def _counted_pool(counter: TokenCounter) -> _CountedPool:
    apis = api_pool()
    documents = [api.document() for api in apis]
    return _CountedPool(
        apis, tuple(documents), tuple(counter.count_many(documents)), tuple(counter.count_many(documents, following=True))
    )


def _prefix(position: int, doc_index: bool) -> str:
    return f"doc_{position}: " if doc_index else ""


def longgorilla_problem(
    variant: str,
    counter: TokenCounter,
    length_tokens: int,
    *,
    seed: int,
    index: int,
    depth: float | None = None,
    doc_index: bool = True,
) -> Problem:
    """Problem ``index`` of the run ``seed`` of ``longgorilla/<variant>``; see generate()."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown longgorilla variant {variant!r}; choose from {', '.join(VARIANTS)}")
    task = f"longgorilla/{variant}"
    pool = _counted_pool(counter)
    costs = pool.following if doc_index else pool.bare

    def prefix_cost(position: int) -> int:
        return counter.count(f"doc_{position}:") if doc_index else 0

    fitting = [i for i, cost in enumerate(costs) if prefix_cost(0) + cost <= length_tokens]
    if not fitting:
        raise ValueError(
            f"length_tokens={length_tokens} is too short for one API document (at least {min(costs)} tokens)"
        )
    rng = random.Random(f"{task}:{seed}:{index}")
    answer = rng.choice(fitting)

    # Fill: the answer's document, then passes over the other APIs in random order, each added
    # while it fits; a further pass (repeating documents) only when one took them all. The prefix
    # costs depend only on how many documents there are, not on which goes where, so placing the
    # answer afterwards keeps the total.
    chosen = [answer]
    total = prefix_cost(0) + costs[answer]
    candidates = [i for i in range(len(pool.apis)) if i != answer]
    while True:
        added = 0
        for candidate in rng.sample(candidates, len(candidates)):
            cost = prefix_cost(len(chosen)) + costs[candidate]
            if total + cost <= length_tokens:
                chosen.append(candidate)
                total += cost
                added += 1
        if added < len(candidates):
            break
    others = chosen[1:]

    # starts[p]: where the answer's document starts (its prefix counted) if it goes at position p.
    starts, offset = [], 0
    for position, other in enumerate(others + [None]):
        starts.append(offset + prefix_cost(position))
        if other is not None:
            offset += prefix_cost(position) + costs[other]
    if depth is None:
        position = rng.randint(0, len(others))
    else:
        position = min(range(len(starts)), key=lambda p: abs(starts[p] - depth * total))
    order = others[:position] + [answer] + others[position:]
    api = pool.apis[answer]
    return Problem(
        task=task,
        context=[_prefix(i, doc_index) + pool.documents[j] for i, j in enumerate(order)],
        question=api.instruction(),
        answer=api.call,
        choices=[],
        support=[pool.documents[answer]],
        length_tokens=length_tokens,
        context_tokens=total,
        depth=round(starts[position] / total, 4),
        seed=seed,
        index=index,
        order_markers=False,
        doc_index=doc_index,
        tokenizer=counter.name,
    )
