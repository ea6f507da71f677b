"""LongGorilla-style API retrieval: answers re-derived by an independent solver that parses the documents.

The solver reads each API document with its own pattern, and finds the one whose description is
what the instruction asks for (the instruction minus its verb equals the description minus its
verb); it shares no code with the generator (not the verb table, not the pool).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re

import pytest

from perk.tasks import TASKS, generate
from perk.tasks.api_pool import SNAPSHOT, api_pool
from tests.test_tasks_lengths import TOKENIZERS, real_counts

DOCUMENT = re.compile(
    r"(?:doc_\d+: )?(?P<body><api>(?P<call>[^<]*)</api> domain: [^,]+, framework: Python Standard Library, "
    r"functionality: .*?, api_name: (?P<name>[\w.]+), api_arguments: (?P<arguments>\(.*?\)), "
    r"python_environment_requirements: \[(?P<requirement>\w+)\], example_code: .*?, performance: dataset: N/A, "
    r"accuracy: N/A, description: (?P<verb>\S+) (?P<rest>.*))"
)
INSTRUCTION = re.compile(r"Instruction: Write an API implementation that (?P<verb>\S+) (?P<rest>.*)")


def solve(question: str, documents: list[str]) -> tuple[str, str]:
    """(the call of the one API the instruction describes, its document)."""
    asked = INSTRUCTION.fullmatch(question)
    assert asked is not None, question
    parsed = [DOCUMENT.fullmatch(document) for document in documents]
    assert all(parsed), [d for d, p in zip(documents, parsed) if p is None][:1]
    matches = {p["body"]: p for p in parsed if p["rest"] == asked["rest"]}
    assert len(matches) == 1, (question, list(matches))
    (body, match), = matches.items()
    # "Return" -> "returns", "Copy" -> "copies", "Returns" -> "returns": the same word stem.
    assert asked["verb"][:3] == match["verb"].lower()[:3], (asked["verb"], match["verb"])
    assert match["call"].startswith(match["name"] + "("), match["call"]
    return match["call"], body


@pytest.mark.parametrize("doc_index", [True, False])
@pytest.mark.parametrize("kind", ["bpe", "metaspace"])
def test_answers_agree_with_an_independent_solver(kind, doc_index):
    problems = generate("longgorilla/stdlib", 200, 2048, TOKENIZERS[kind](), seed=7, doc_index=doc_index)
    for problem in problems:
        answer, body = solve(problem.question, problem.context)
        assert answer == problem.answer
        assert problem.support == [body] and problem.choices == [] and not problem.order_markers
    assert len({p.answer for p in problems}) > 150, "the answers spread over the pool"


def test_the_task_is_listed():
    assert "longgorilla/stdlib" in TASKS


@pytest.mark.parametrize("doc_index", [True, False])
@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_context_length_is_exact_and_short_by_less_than_one_document(kind, doc_index):
    tokenizer = TOKENIZERS[kind]()
    shortest = min(real_counts(tokenizer, [a.document() for a in api_pool()]))
    for length in (3000, 9000, 70000):
        for problem in generate("longgorilla/stdlib", 2, length, tokenizer, seed=2, doc_index=doc_index):
            counts = real_counts(tokenizer, problem.context)
            assert problem.context_tokens == sum(counts) <= length, (kind, length)
            # Every document left out was longer than the gap (+ a document prefix).
            assert length - sum(counts) < shortest + 8, (kind, length, sum(counts))
    long = generate("longgorilla/stdlib", 1, 70000, tokenizer, seed=2, doc_index=doc_index)[0]
    answers = [DOCUMENT.fullmatch(d)["call"] for d in long.context]
    assert answers.count(long.answer) == 1, "repeated distractors never repeat the answer"


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_the_answer_document_sits_at_the_requested_depth(depth):
    tokenizer = TOKENIZERS["bpe"]()
    for problem in generate("longgorilla/stdlib", 20, 8192, tokenizer, seed=3, depth=depth):
        counts = real_counts(tokenizer, problem.context)
        position = next(i for i, d in enumerate(problem.context) if problem.support[0] in d)
        start = sum(counts[:position]) + len(tokenizer(f"doc_{position}:", add_special_tokens=False)["input_ids"])
        assert problem.depth == pytest.approx(start / problem.context_tokens, abs=1e-4)
        # The nearest document boundary: within one document of the request.
        assert abs(problem.depth - depth) * problem.context_tokens <= max(counts), (depth, problem.depth)


def test_problems_are_seeded_and_independent_of_n():
    tokenizer = TOKENIZERS["byte"]()
    first = generate("longgorilla/stdlib", 4, 3000, tokenizer, seed=11)
    assert generate("longgorilla/stdlib", 2, 3000, tokenizer, seed=11) == first[:2]
    assert generate("longgorilla/stdlib", 4, 3000, tokenizer, seed=12) != first
    # Pinned: the pool is a committed snapshot, so these are the same on every machine and Python.
    assert [p.answer for p in generate("longgorilla/stdlib", 3, 3000, tokenizer, seed=0)] == [
        "tempfile.gettempdirb()", "os.fpathconf(fd, name)", "signal.getitimer(which)",
    ]


def test_too_short_a_length_is_a_clear_error():
    with pytest.raises(ValueError, match="too short for one API document"):
        generate("longgorilla/stdlib", 1, 20, TOKENIZERS["bpe"]())


def test_the_pool_is_real_standard_library_functions():
    data = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    apis = api_pool()
    assert len(apis) == len(data["apis"]) > 500 and data["source"].startswith("Python 3.")
    assert [(a.module, a.name) for a in apis] == sorted({(a.module, a.name) for a in apis}), "sorted, unique"
    resolved = 0
    for api in apis:
        try:
            function = getattr(importlib.import_module(api.module), api.name)
            signature = inspect.signature(function)
        except (ImportError, AttributeError, TypeError, ValueError):
            continue  # not on this platform or Python version: the snapshot still pins it
        required = [
            ("*" if p.kind is p.VAR_POSITIONAL else "") + p.name
            for p in signature.parameters.values()
            if p.kind is p.VAR_POSITIONAL or (p.default is p.empty and p.kind is not p.VAR_KEYWORD)
        ]
        named = re.findall(r"\*?\w+", api.call[len(api.api_name) + 1 : -1].replace("=", " "))
        assert [n for i, n in enumerate(named) if n not in named[:i]] == required, api
        resolved += 1
    assert resolved >= 0.8 * len(apis)
