"""BabiLong tasks: answers re-derived by an independent solver that reads only the context.

The solver parses the facts out of the documents with its own patterns and replays them; it
shares no code with the generator's world simulation (only the vocabulary lists).
"""

from __future__ import annotations

import json
import math
import re

import pytest

from perk.tasks import generate, write_jsonl
from perk.tasks.babilong import ACTORS, LOCATIONS, OBJECTS
from tests.test_tasks_lengths import TOKENIZERS

FACT = re.compile(
    r"(?:(?P<marked>[A-Z]\w+) Event (?P<event>\d+): )?(?P<actor>[A-Z]\w+) "
    r"(?P<verb>went back to|went to|journeyed to|travelled to|moved to|grabbed|took|got|picked up|"
    r"dropped|put down|discarded|left) the (?P<thing>\w+)(?: there)?\."
)
DROPS = {"dropped", "put down", "discarded", "left"}
ENTITY = re.compile(r"\b(?:" + "|".join(ACTORS + LOCATIONS + OBJECTS) + r")\b", re.IGNORECASE)


def parse_facts(documents: list[str]) -> list[re.Match]:
    return [match for document in documents for match in FACT.finditer(document)]


def solve(question: str, facts: list[re.Match], *, strict: bool) -> str | None:
    """Replay the facts; ``strict`` also checks the world rules (grab where the object lies, drop
    only what one holds), which only the full story satisfies, not its supporting facts alone."""
    actor_at, object_at, holder, history = {}, {}, {}, {}

    def put(obj, place):
        if place is not None:
            object_at[obj] = place
            if history.setdefault(obj, [])[-1:] != [place]:
                history[obj].append(place)

    for fact in facts:
        actor, verb, thing = fact["actor"], fact["verb"], fact["thing"]
        if thing in LOCATIONS:
            actor_at[actor] = thing
            for obj, who in holder.items():
                if who == actor:
                    put(obj, thing)
        elif verb in DROPS:
            if strict:
                assert holder.get(thing) == actor, fact.group(0)
            holder.pop(thing, None)
            put(thing, actor_at.get(actor))
        else:
            if strict:
                assert thing not in holder and object_at.get(thing, actor_at[actor]) == actor_at[actor], fact.group(0)
            holder[thing] = actor
            put(thing, actor_at.get(actor))
    if match := re.fullmatch(r"Where is (\w+)\?", question):
        return actor_at.get(match[1])
    if match := re.fullmatch(r"Where is the (\w+)\?", question):
        return object_at.get(match[1])
    match = re.fullmatch(r"Where was the (\w+) before the (\w+)\?", question)
    places = history.get(match[1], [])
    assert places.count(match[2]) == 1, "ambiguous question"
    index = places.index(match[2])
    return places[index - 1] if index > 0 else None


@pytest.mark.parametrize("order_markers", [True, False])
@pytest.mark.parametrize(("qa", "n_support"), [(1, 1), (2, 2), (3, 3)])
def test_answers_agree_with_an_independent_solver(qa, n_support, order_markers):
    problems = generate(f"babilong/qa{qa}", 1500, 1024, TOKENIZERS["bpe"](), seed=11, order_markers=order_markers)
    for problem in problems:
        facts = parse_facts(problem.context)
        assert solve(problem.question, facts, strict=True) == problem.answer, problem.question
        assert len(problem.support) == n_support
        assert all(any(fact in document for document in problem.context) for fact in problem.support)
        assert solve(problem.question, parse_facts(problem.support), strict=False) == problem.answer
        assert problem.answer in problem.choices and problem.choices == list(LOCATIONS)
        assert all((fact["marked"] is not None) == order_markers for fact in facts)
        if order_markers:  # per-actor counters run 1, 2, 3, ... in reading order
            seen: dict[str, int] = {}
            for fact in facts:
                assert fact["marked"] == fact["actor"]
                seen[fact["actor"]] = seen.get(fact["actor"], 0) + 1
                assert int(fact["event"]) == seen[fact["actor"]]
    assert len({p.answer for p in problems}) == len(LOCATIONS)


def haystack_of(documents: list[str]) -> str:
    text = " ".join(re.sub(r"^doc_\d+: ", "", document) for document in documents)
    return " ".join(FACT.sub("", text).split())


@pytest.mark.parametrize("qa", [1, 2, 3])
def test_haystack_never_mentions_a_task_entity(qa):
    for problem in generate(f"babilong/qa{qa}", 20, 4096, TOKENIZERS["bpe"](), seed=2):
        assert ENTITY.search(haystack_of(problem.context)) is None


def test_corpus_haystack_drops_every_sentence_naming_an_entity(tmp_path):
    clean = [f"The ship number {i} sailed past the lighthouse at dawn." for i in range(200)]
    tainted = ["MARY was late.", "A kitchen-knife lay there.", "They ate an Apple pie.", "The Football club won."]
    corpus = tmp_path / "book.txt"
    corpus.write_text("  ".join(clean[:100] + tainted + clean[100:]) + "\n", encoding="utf-8")
    for problem in generate("babilong/qa2", 10, 2048, TOKENIZERS["bpe"](), corpus=corpus):
        haystack = haystack_of(problem.context)
        assert ENTITY.search(haystack) is None
        sentences = re.findall(r"The ship number \d+ sailed past the lighthouse at dawn\.", haystack)
        assert len(sentences) > 20 and haystack == " ".join(sentences)


@pytest.mark.parametrize(("order_markers", "doc_index"), [(True, True), (False, False), (True, False)])
def test_markers_and_document_indices_switch(order_markers, doc_index):
    tokenizer = TOKENIZERS["bpe"]()
    for problem in generate("babilong/qa1", 5, 2048, tokenizer, order_markers=order_markers, doc_index=doc_index):
        assert (problem.order_markers, problem.doc_index) == (order_markers, doc_index)
        assert all(("Event" in fact) == order_markers for fact in problem.support)
        prefixes = [re.match(r"doc_(\d+): ", document) for document in problem.context]
        if doc_index:
            assert [int(m[1]) for m in prefixes] == list(range(len(problem.context)))
        else:
            assert not any(prefixes)


def test_generation_is_deterministic_by_seed(tmp_path):
    tokenizer = TOKENIZERS["bpe"]()
    paths = []
    for name, seed, n in (("a", 7, 12), ("b", 7, 12), ("c", 8, 12), ("d", 7, 5)):
        paths.append(tmp_path / f"{name}.jsonl")
        write_jsonl(paths[-1], generate("babilong/qa3", n, 1500, tokenizer, seed=seed))
    a, b, c, d = (path.read_bytes() for path in paths)
    assert a == b
    assert a != c
    assert a.splitlines()[:5] == d.splitlines()  # problem i does not depend on n
    assert len({json.loads(line)["question"] + json.loads(line)["context"][0] for line in a.splitlines()}) == 12


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"task": "babilong/qa4"}, ValueError, "unknown task"),
        ({"depth": 1.5}, ValueError, "depth"),
        ({"depth": math.nan}, ValueError, "depth"),
        ({"length_tokens": 100}, ValueError, "too short"),
        ({"length_tokens": 0}, ValueError, "length_tokens"),
        ({"n": -1}, ValueError, "n must"),
        ({"n": 2.0}, TypeError, "n must"),
        ({"doc_tokens": 8}, ValueError, "doc_tokens"),
        ({"doc_tokens": 20}, ValueError, "doc_tokens"),
        ({"tokenizer": "gpt2"}, TypeError, "tokenizer"),
        ({"corpus": "/no/such/book.txt"}, FileNotFoundError, "corpus"),
        ({"task": "student_records/recall", "corpus": __file__}, ValueError, "corpus"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    arguments = {"task": "babilong/qa1", "n": 1, "length_tokens": 2048, "tokenizer": TOKENIZERS["bpe"]()} | kwargs
    with pytest.raises(error, match=message):
        generate(**arguments)
