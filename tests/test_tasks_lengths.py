"""Context lengths, document sizes and depths, checked against full tokenisations.

The generators count tokens by parts (perk.tasks.tokens); these tests tokenise every document
in full with three kinds of tokenizer: the byte-level tiny tokenizer, a byte-level BPE (GPT-2
style) and a Metaspace BPE (SentencePiece style, which prepends a word marker to every text).
"""

from __future__ import annotations

import functools

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from perk.tasks import generate
from perk.tasks.babilong import ACTORS, LOCATIONS, OBJECTS
from perk.tasks.haystack import prose_sentences
from perk.tasks.student_records import random_students
from tests.tiny_models import tiny_tokenizer


@functools.lru_cache(maxsize=None)
def bpe_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A small BPE trained offline on task-like text: ``"byte_level"`` or ``"metaspace"``."""
    import random

    rng = random.Random(0)
    facts = [f"{a} Event {i}: {a} went to the {p}." for a in ACTORS for i in range(1, 9) for p in LOCATIONS]
    facts += [f"{a} picked up the {o} there. doc_{i}:" for a in ACTORS for o in OBJECTS for i in range(50)]
    records = [s.document() for s in random_students(rng, 300, set())]
    corpus = prose_sentences(2000, seed=1) + facts + records
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "byte_level":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>"], initial_alphabet=alphabet)
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", name_or_path=f"bpe-{kind}")


# Cached: the generators build a haystack pool once per tokenizer object.
TOKENIZERS = {
    "byte": functools.cache(tiny_tokenizer),
    "bpe": lambda: bpe_tokenizer("byte_level"),
    "metaspace": lambda: bpe_tokenizer("metaspace"),
}


def real_counts(tokenizer, documents: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]]


# The smallest lengths each tokenizer fits every task's longest story into.
LENGTHS = {"byte": (3000, 5333), "bpe": (1024, 1777), "metaspace": (1024, 1777)}


@pytest.mark.parametrize("doc_index", [True, False])
@pytest.mark.parametrize(
    "task", ["babilong/qa1", "babilong/qa3", "student_records/recall", "student_records/aggregate"]
)
@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_context_length_is_exact_and_within_5_percent(kind, task, doc_index):
    tokenizer = TOKENIZERS[kind]()
    for length in LENGTHS[kind]:
        for problem in generate(task, 3, length, tokenizer, seed=5, doc_index=doc_index):
            real = sum(real_counts(tokenizer, problem.context))
            assert problem.context_tokens == real, (kind, task, length)
            assert abs(real - length) <= 0.05 * length, (kind, task, length, real)


@pytest.mark.parametrize(("kind", "doc_tokens"), [("byte", 96), ("byte", 157), ("metaspace", 24), ("metaspace", 61)])
def test_babilong_documents_fit_their_token_budget(kind, doc_tokens):
    tokenizer = TOKENIZERS[kind]()
    for problem in generate("babilong/qa2", 4, 6000, tokenizer, seed=1, doc_tokens=doc_tokens):
        counts = real_counts(tokenizer, problem.context)
        assert max(counts) <= doc_tokens
        # Greedy packing: no two neighbours could have been one document.
        assert min(a + b for a, b in zip(counts, counts[1:])) > doc_tokens - 20


def real_depth(tokenizer, problem) -> float:
    """Where the first supporting fact starts, by full tokenisation of everything before it."""
    counts = real_counts(tokenizer, problem.context)
    fact = problem.support[0]
    doc = next(i for i, text in enumerate(problem.context) if fact in text)
    before_in_doc = problem.context[doc][: problem.context[doc].index(fact)].rstrip(" ")
    offset = sum(counts[:doc]) + (real_counts(tokenizer, [before_in_doc])[0] if before_in_doc else 0)
    return offset / sum(counts)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.55, 1.0])
@pytest.mark.parametrize("task", ["babilong/qa1", "babilong/qa2", "student_records/recall", "student_records/relation"])
def test_depth_places_the_first_supporting_fact(task, depth):
    tokenizer = TOKENIZERS["bpe"]()
    for problem in generate(task, 3, 8192, tokenizer, seed=3, depth=depth):
        measured = real_depth(tokenizer, problem)
        assert abs(measured - problem.depth) < 1e-3
        assert abs(measured - depth) <= 0.05, (task, depth, measured)


def test_depth_of_a_long_story_is_met_where_its_other_facts_fit():
    tokenizer = TOKENIZERS["bpe"]()
    for problem in generate("babilong/qa3", 5, 8192, tokenizer, seed=4, depth=0.5):
        assert abs(real_depth(tokenizer, problem) - 0.5) <= 0.05


def test_random_placement_spreads_facts_over_the_whole_context():
    depths = [p.depth for p in generate("babilong/qa2", 150, 2048, TOKENIZERS["bpe"](), seed=0)]
    assert min(depths) < 0.15 and max(depths) > 0.9
