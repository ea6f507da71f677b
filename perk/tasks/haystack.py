"""Haystack text: the filler prose between the facts of a needle task.

Two sources: a built-in generator of simple English prose (offline, seeded, no dependency, the
same text on every machine) and any plain-text corpus file (e.g. a PG19 book), split into
sentences. Either way the sentences pass a filter that drops every sentence naming a task
entity (word boundaries, any case), so the haystack never answers or contradicts a question.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from perk.tasks.tokens import TokenCounter

DEFAULT_POOL_SENTENCES = 20_000
MIN_SENTENCE_TOKENS = 4
MAX_SENTENCE_TOKENS = 48

_ADJECTIVES = (
    "old", "quiet", "distant", "narrow", "golden", "heavy", "bright", "ancient", "silent", "broad",
    "pale", "northern", "gentle", "crowded", "forgotten", "wooden", "restless", "steep", "faded",
    "curious", "modest", "famous", "lonely", "careful", "strange", "patient", "humble", "sudden",
)
_NOUNS = (
    "river", "bridge", "village", "mountain", "harbour", "forest", "lantern", "letter", "captain",
    "merchant", "tower", "valley", "road", "ship", "market", "storm", "winter", "painter", "song",
    "festival", "island", "mill", "orchard", "teacher", "poet", "clock", "meadow", "station",
    "library", "traveller", "fisherman", "castle", "chapel", "wind", "lake", "farmer", "stranger",
    "carpenter", "shore", "engine", "map", "candle", "council", "parade", "journey", "rumour",
)
_INTRANSITIVE_VERBS = (
    "stood", "waited", "rested", "slept", "glowed", "trembled", "lingered", "vanished", "appeared",
    "grew", "faded", "shone", "drifted", "remained", "changed", "returned",
)
_TRANSITIVE_VERBS = (
    "remembered", "admired", "described", "followed", "ignored", "praised", "studied", "painted",
    "welcomed", "noticed", "questioned", "repaired", "guarded", "imagined", "carried", "answered",
)
_ADVERBS = (
    "quietly", "slowly", "suddenly", "gently", "patiently", "proudly", "briefly", "rarely",
    "often", "calmly", "openly", "softly", "eagerly", "silently",
)
_PREPOSITIONS = ("beside", "above", "near", "beyond", "across", "behind", "below", "around")
_TIMES = (
    "morning", "evening", "spring", "autumn", "summer", "night", "afternoon", "old days",
    "years that followed", "hour before dawn",
)
_OPENERS = (
    "Long ago", "For many years", "Every season", "At last", "In those days", "Once again",
    "Without a word", "As always", "Before long", "Now and then",
)


def _prose_sentence(rng: random.Random) -> str:
    """One sentence of plain, grammatical filler prose from a few templates."""
    pick = rng.choice
    template = rng.randrange(6)
    if template == 0:
        text = (
            f"the {pick(_ADJECTIVES)} {pick(_NOUNS)} {pick(_INTRANSITIVE_VERBS)} {pick(_ADVERBS)} "
            f"{pick(_PREPOSITIONS)} the {pick(_NOUNS)}."
        )
    elif template == 1:
        text = f"the {pick(_NOUNS)} of the {pick(_NOUNS)} {pick(_TRANSITIVE_VERBS)} the {pick(_ADJECTIVES)} {pick(_NOUNS)}."
    elif template == 2:
        text = f"in the {pick(_TIMES)}, the {pick(_NOUNS)} {pick(_INTRANSITIVE_VERBS)} {pick(_ADVERBS)}."
    elif template == 3:
        text = f"it was said that the {pick(_NOUNS)} had {pick(_TRANSITIVE_VERBS)} a {pick(_ADJECTIVES)} {pick(_NOUNS)}."
    elif template == 4:
        text = (
            f"{pick(_OPENERS)}, a {pick(_ADJECTIVES)} {pick(_NOUNS)} {pick(_TRANSITIVE_VERBS)} the {pick(_NOUNS)} "
            f"{pick(_PREPOSITIONS)} the {pick(_NOUNS)}."
        )
    else:
        text = (
            f"nobody {pick(_TRANSITIVE_VERBS)} the {pick(_NOUNS)} as {pick(_ADVERBS)} as the "
            f"{pick(_ADJECTIVES)} {pick(_NOUNS)} did."
        )
    return text[0].upper() + text[1:]


def prose_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences of the built-in filler prose, the same for the same seed on every machine."""
    rng = random.Random(f"perk-haystack:{seed}")
    return [_prose_sentence(rng) for _ in range(n)]


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def corpus_sentences(path: str | Path) -> list[str]:
    """The sentences of a plain-text file (UTF-8), whitespace collapsed, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {str(path)!r} does not exist")
    text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
    return [sentence for sentence in _SENTENCE_END.split(text) if sentence]


def entity_filter(words: Iterable[str]) -> re.Pattern[str]:
    """A regex that finds any of ``words`` as a whole word, in any case."""
    alternatives = sorted({re.escape(word) for word in words}, key=len, reverse=True)
    if not alternatives:
        raise ValueError("words must name at least one entity")
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class SentencePool:
    """Haystack sentences with their token counts under one tokenizer.

    ``lead_tokens[i]`` counts ``texts[i]`` following other text after a space (inside a document);
    ``bare_tokens[i]`` counts it opening a document (see perk.tasks.tokens).
    """

    texts: tuple[str, ...]
    lead_tokens: tuple[int, ...]
    bare_tokens: tuple[int, ...]


def build_pool(
    sentences: Sequence[str],
    counter: TokenCounter,
    banned: re.Pattern[str],
    *,
    max_sentence_tokens: int = MAX_SENTENCE_TOKENS,
) -> SentencePool:
    """Keep the sentences that name no banned entity and count between MIN_SENTENCE_TOKENS and
    ``max_sentence_tokens`` tokens (so one always fits a document), with their token counts."""
    clean = [sentence for sentence in sentences if not banned.search(sentence)]
    lead = counter.count_many(clean, following=True)
    bare = counter.count_many(clean)
    kept = [i for i, n in enumerate(lead) if MIN_SENTENCE_TOKENS <= n <= max_sentence_tokens]
    if not kept:
        raise ValueError(
            f"no haystack sentence is left after removing task entities and sentences outside "
            f"{MIN_SENTENCE_TOKENS}..{max_sentence_tokens} tokens (half of doc_tokens at most)"
        )
    return SentencePool(
        texts=tuple(clean[i] for i in kept),
        lead_tokens=tuple(lead[i] for i in kept),
        bare_tokens=tuple(bare[i] for i in kept),
    )


@functools.lru_cache(maxsize=8)
def _cached_pool(
    counter: TokenCounter, corpus: str | None, banned: re.Pattern[str], max_sentence_tokens: int
) -> SentencePool:
    sentences = prose_sentences(DEFAULT_POOL_SENTENCES) if corpus is None else corpus_sentences(corpus)
    return build_pool(sentences, counter, banned, max_sentence_tokens=max_sentence_tokens)


def haystack_pool(
    counter: TokenCounter,
    banned: re.Pattern[str],
    *,
    corpus: str | Path | None = None,
    max_sentence_tokens: int = MAX_SENTENCE_TOKENS,
) -> SentencePool:
    """The haystack pool of the built-in prose (``corpus=None``) or of a corpus file, counted with
    ``counter``'s tokenizer; built once per (counter, corpus, filter, limit) and cached."""
    corpus_key = None if corpus is None else str(Path(corpus).resolve())
    return _cached_pool(counter, corpus_key, banned, max_sentence_tokens)
