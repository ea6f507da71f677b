"""BabiLong-style embedding: hide facts, in order, in haystack prose up to a target length.

The context is a list of short documents. PERK cuts a context into ~128-token segments and a
document that fits a segment is never split, so documents are packed greedily from whole
sentences up to ``doc_tokens`` tokens (default 96, prefix included): a fact is never cut
across segments. With ``doc_index`` each document starts with ``doc_<i>:`` (i from 0), which
keeps the documents' order recoverable after PERK encodes them as an unordered batch.

Facts go, in order, at token offsets drawn uniformly at random over the context, or, with
``depth``, the first supporting fact at ``depth`` × length (facts before it in the story
somewhere before it, the rest somewhere after it). A fact is inserted at the first sentence
boundary past its offset, so its start lands within one haystack sentence of the request,
except where the facts that must come before (or after) it do not fit in front of (behind) it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from perk.tasks.haystack import SentencePool
from perk.tasks.tokens import TokenCounter

DEFAULT_DOC_TOKENS = 96
# Near the end the next haystack sentence often overshoots the target; try this many more
# (shorter) ones before stopping, which fills the context to within a few tokens of the target.
_MAX_MISFITS = 32


class _DocumentPacker:
    """Packs pieces (sentences) into documents of at most ``doc_tokens`` tokens, counting exactly
    by parts (see perk.tasks.tokens): a document costs its prefix, its first piece bare (or with a
    leading space after a prefix), and every further piece with its leading space."""

    def __init__(self, counter: TokenCounter, doc_tokens: int, doc_index: bool) -> None:
        self.counter = counter
        self.doc_tokens = doc_tokens
        self.doc_index = doc_index
        self.documents: list[list[str]] = []
        self.doc_used = 0
        self.total = 0

    def _prefix(self, index: int) -> str:
        return f"doc_{index}:"

    def cost(self, lead: int, bare: int) -> tuple[int, bool]:
        """(tokens the piece would add, whether it would open a new document)."""
        if self.documents and self.doc_used + lead <= self.doc_tokens:
            return lead, False
        if self.doc_index:
            return self.counter.count(self._prefix(len(self.documents))) + lead, True
        return bare, True

    def add(self, text: str, lead: int, bare: int) -> int:
        """Append a piece; returns the token offset where the piece's text starts."""
        cost, opens_document = self.cost(lead, bare)
        if opens_document:
            self.documents.append([self._prefix(len(self.documents))] if self.doc_index else [])
            self.doc_used = 0
        start = self.total + cost - (lead if self.documents[-1] else bare)
        self.documents[-1].append(text)
        self.doc_used += cost
        self.total += cost
        return start

    def texts(self) -> list[str]:
        return [" ".join(pieces) for pieces in self.documents]


def fact_offsets(
    n_facts: int, first_support: int, depth: float | None, rng: random.Random
) -> list[float]:
    """Sorted fractions of the context at which the facts go (see the module docstring)."""
    if depth is None:
        return sorted(rng.random() for _ in range(n_facts))
    before = sorted(rng.uniform(0.0, depth) for _ in range(first_support))
    after = sorted(rng.uniform(depth, 1.0) for _ in range(n_facts - first_support - 1))
    return before + [depth] + after


def embed_facts(
    facts: Sequence[str],
    first_support: int,
    pool: SentencePool,
    counter: TokenCounter,
    length_tokens: int,
    rng: random.Random,
    *,
    depth: float | None = None,
    doc_index: bool = True,
    doc_tokens: int = DEFAULT_DOC_TOKENS,
) -> tuple[list[str], int, float]:
    """Hide ``facts`` in order among haystack sentences until the context has ``length_tokens``.

    Args:
        facts: the story's facts, rendered, in story order.
        first_support: index in ``facts`` of the first supporting fact (the one ``depth`` places).
        pool: haystack sentences and their token counts; read contiguously from a random start.
        counter: the token counter the pool was counted with.
        length_tokens: target context length (sum of the documents' token counts).
        rng: the problem's random source.
        depth: None for uniformly random offsets, else the first supporting fact's offset in [0, 1].
        doc_index: prefix each document with ``doc_<i>:``.
        doc_tokens: most tokens per document.

    Returns:
        (documents, context tokens, depth of the first supporting fact's start).
    """
    fact_lead = [counter.count(fact, following=True) for fact in facts]
    fact_bare = [counter.count(fact) for fact in facts]
    packer = _DocumentPacker(counter, doc_tokens, doc_index)
    # Tokens to keep free for the facts still to come: each may open a new document.
    worst_prefix = counter.count(f"doc_{length_tokens}:") if doc_index else 0
    reserve = [0] * (len(facts) + 1)
    for i in range(len(facts) - 1, -1, -1):
        reserve[i] = reserve[i + 1] + max(fact_lead[i], fact_bare[i]) + worst_prefix
    if max(fact_lead) + worst_prefix > doc_tokens:
        raise ValueError(f"doc_tokens={doc_tokens} is too small for the facts (up to {max(fact_lead)} tokens)")
    if reserve[0] > length_tokens:
        raise ValueError(
            f"length_tokens={length_tokens} is too short for the story's {len(facts)} facts "
            f"(about {reserve[0]} tokens)"
        )
    targets = [offset * length_tokens for offset in fact_offsets(len(facts), first_support, depth, rng)]

    starts: list[int] = []
    next_fact = 0

    def add_facts(until: float) -> None:
        nonlocal next_fact
        while next_fact < len(facts) and targets[next_fact] <= until:
            starts.append(packer.add(facts[next_fact], fact_lead[next_fact], fact_bare[next_fact]))
            next_fact += 1

    sentence = rng.randrange(len(pool.texts))
    misfits = 0
    while True:
        if misfits == _MAX_MISFITS:
            if next_fact == len(facts):
                break
            # Full up to the room kept for the facts still due: they go here, then haystack fills
            # whatever room the reserve over-estimated.
            add_facts(float("inf"))
            misfits = 0
        add_facts(packer.total)
        lead, bare = pool.lead_tokens[sentence], pool.bare_tokens[sentence]
        if packer.total + packer.cost(lead, bare)[0] + reserve[next_fact] <= length_tokens:
            packer.add(pool.texts[sentence], lead, bare)
        else:
            misfits += 1
        sentence = (sentence + 1) % len(pool.texts)
    return packer.texts(), packer.total, starts[first_support] / packer.total
