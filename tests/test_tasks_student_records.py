"""Student records: answers re-derived by an independent solver that parses the documents."""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal

import pytest

from perk.tasks import generate
from perk.tasks.student_records import MAJORS_BY_SCHOOL, YEARS
from tests.test_tasks_lengths import TOKENIZERS

RECORD = re.compile(
    r"Student (?P<id>\d{7}), Name: (?P<name>[A-Za-z]+ [A-Za-z]+), Year: (?P<year>\w+), "
    r"School: (?P<school>[A-Za-z ]+), Major: (?P<major>[A-Za-z ]+), Grade: (?P<grade>\d+)"
)


def parse_records(documents: list[str]) -> list[dict]:
    records = []
    for document in documents:
        match = RECORD.search(document)
        assert match is not None and match.group(0) == re.sub(r"^doc_\d+: ", "", document), document
        records.append(match.groupdict() | {"grade": int(match["grade"])})
    return records


def solve(question: str, records: list[dict]) -> tuple[str, list[dict]]:
    """(answer, the records that support it)."""
    by_id = {r["id"]: r for r in records}
    if match := re.fullmatch(r"What is the (\w+) of student (\d+)\?", question):
        record = by_id[match[2]]
        return str(record[match[1]]), [record]
    if match := re.fullmatch(r"Does student (\d+) have a higher grade than student (\d+)\?", question):
        a, b = by_id[match[1]], by_id[match[2]]
        return ("yes" if a["grade"] > b["grade"] else "no"), [a, b]
    if match := re.fullmatch(r"Do students (\d+) and (\d+) have the same (\w+)\?", question):
        a, b = by_id[match[1]], by_id[match[2]]
        return ("yes" if a[match[3]] == b[match[3]] else "no"), [a, b]
    match = re.fullmatch(r"What is the (highest|lowest|average) grade among (.+)\?", question)
    among = match[2]
    if among == "all students":
        members = records
    elif m := re.fullmatch(r"students in the (.+)", among):
        members = [r for r in records if r["school"] == m[1]]
    elif m := re.fullmatch(r"students majoring in (.+)", among):
        members = [r for r in records if r["major"] == m[1]]
    else:
        year = re.fullmatch(r"(\w+) students", among)[1]
        members = [r for r in records if r["year"] == year]
    grades = [r["grade"] for r in members]
    if match[1] == "average":
        mean = Decimal(sum(grades)) / Decimal(len(grades))
        return str(mean.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)), members
    extreme = max(grades) if match[1] == "highest" else min(grades)
    return str(extreme), [r for r in members if r["grade"] == extreme]


def document_of(record: dict) -> str:
    return (
        f"Student {record['id']}, Name: {record['name']}, Year: {record['year']}, School: {record['school']}, "
        f"Major: {record['major']}, Grade: {record['grade']}"
    )


@pytest.mark.parametrize("doc_index", [True, False])
@pytest.mark.parametrize("kind", ["recall", "relation", "aggregate"])
def test_answers_agree_with_an_independent_solver(kind, doc_index):
    problems = generate(f"student_records/{kind}", 1000, 600, TOKENIZERS["bpe"](), seed=9, doc_index=doc_index)
    for problem in problems:
        records = parse_records(problem.context)
        answer, support = solve(problem.question, records)
        assert answer == problem.answer, problem.question
        in_reading_order = sorted(support, key=lambda r: records.index(r))
        assert problem.support == [document_of(r) for r in in_reading_order]
        assert all(any(fact in document for document in problem.context) for fact in problem.support)
        assert problem.answer in problem.choices or not problem.choices
    if kind == "relation":
        yes = sum(p.answer == "yes" for p in problems) / len(problems)
        assert 0.4 < yes < 0.6
        assert all(p.choices == ["yes", "no"] for p in problems)


def test_records_are_consistent():
    for problem in generate("student_records/recall", 20, 4096, TOKENIZERS["bpe"](), seed=1):
        records = parse_records(problem.context)
        assert len({r["id"] for r in records}) == len(records) > 50
        for record in records:
            assert record["major"] in MAJORS_BY_SCHOOL[record["school"]]
            assert record["year"] in YEARS and 0 <= record["grade"] <= 100


def test_average_is_rounded_half_up_to_one_decimal():
    answers = [p.answer for p in generate("student_records/aggregate", 300, 800, TOKENIZERS["bpe"](), seed=3)]
    averages = [a for a in answers if "." in a]
    assert len(averages) > 50 and all(re.fullmatch(r"\d{1,3}\.\d", a) for a in averages)


def test_depth_is_refused_for_aggregate_questions():
    with pytest.raises(ValueError, match="depth"):
        generate("student_records/aggregate", 1, 2048, TOKENIZERS["bpe"](), depth=0.5)


def test_too_short_a_length_is_refused():
    with pytest.raises(ValueError, match="too short"):
        generate("student_records/relation", 1, 30, TOKENIZERS["bpe"]())
