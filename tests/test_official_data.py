"""The official PERK data as it comes: every file form read by one reader, support-then-answer
targets, and ``perk.data stats`` on each form.

tests/data/official/ holds small files written in the official samples' forms (eric11eca/perk,
data_samples/): a pretty-printed BabiLong object, a JSON array, JSONL, a Student Records database
with its questions (grades as strings, a "..." marking elided questions) and a LongGorilla object
(with its extra "location" field).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perk.cli import run_main
from perk.data import main as data_main
from perk.methods import _scored
from perk.tasks import answer_part, read_problems, support_target, with_support_target
from perk.tasks.student_records import record_document

OFFICIAL = Path(__file__).parent / "data" / "official"


@pytest.mark.parametrize(
    ("name", "count", "answers"),
    [
        ("babilong_qa1.json", 1, ["garden"]),
        ("babilong_array.json", 2, ["garden", "office"]),
        ("babilong.jsonl", 3, ["garden", "office", "bathroom"]),
        ("student_records_recall.json", 4, ["Alma Reyes", "Drama & Theatre Arts", "28", "Junior"]),
        ("longgorilla.json", 1, ["pipeline('text-classification', model='example/sentiment-tiny')"]),
    ],
)
def test_every_official_form_reads_as_it_is(name, count, answers):
    problems = read_problems(OFFICIAL / name)
    assert len(problems) == count and [p["answer"] for p in problems] == answers
    assert all(p["task"] == Path(name).stem for p in problems), "a read problem is named after its file"
    assert all(p["context"] and all(isinstance(d, str) for d in p["context"]) for p in problems)
    assert read_problems(OFFICIAL / name, task="mine")[0]["task"] == "mine"


def test_a_student_records_database_is_one_problem_per_question():
    raw = json.loads((OFFICIAL / "student_records_recall.json").read_text())
    problems = read_problems(OFFICIAL / "student_records_recall.json")
    rows = raw["database"]
    expected_context = [
        record_document(r["Student Id"], r["Student Name"], r["Year"], r["School"], r["Major"], r["Grade"]) for r in rows
    ]
    assert expected_context[0] == (
        "Student 3109998, Name: Alma Reyes, Year: Sophomore, School: School of Engineering, "
        "Major: Computer Science, Grade: 72"
    )
    assert all(p["context"] == expected_context and p["support"] == [] for p in problems)
    assert [p["question"] for p in problems] == [q["question"] for q in raw["questions"] if q != "..."]


def test_extra_fields_are_kept_and_numeric_answers_become_text(tmp_path):
    assert read_problems(OFFICIAL / "longgorilla.json")[0]["location"] == "pre"
    path = tmp_path / "numbers.json"
    path.write_text(json.dumps({"database": [dict.fromkeys(["Student Id", "Student Name", "Year", "School", "Major"], "x")
                                             | {"Grade": 81}],
                                "questions": [{"question": "What is the highest grade?", "answer": 81,
                                               "support": "Student x, Name: x"}]}))
    (problem,) = read_problems(path)
    assert problem["answer"] == "81" and problem["context"][0].endswith("Grade: 81")
    assert problem["support"] == ["Student x, Name: x"]


GOOD = {"context": ["doc"], "question": "Q?", "answer": "a"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{\n    "context": ["a"],\n    "question": "Q?"\n    "answer": "a"\n}\n',
         r"bad\.json: not valid JSON: Expecting ',' delimiter: line 4 column 5"),
        (json.dumps([GOOD, {k: v for k, v in GOOD.items() if k != "answer"}], indent=2),
         r"bad\.json: record 2: missing field 'answer'"),
        (json.dumps(GOOD) + "\n" + json.dumps(GOOD | {"context": []}) + "\n",
         r"bad\.json:2: field 'context' must hold at least one document"),
        (json.dumps({"database": [{"Student Id": "1"}], "questions": []}),
         r"bad\.json: database entry 1 lacks 'Student Name', 'Year', 'School', 'Major', 'Grade'"),
        (json.dumps([{"database": [dict.fromkeys(["Student Id", "Student Name", "Year", "School", "Major", "Grade"], "1")],
                      "questions": [{"question": "Q?", "answer": "a"}, {"question": "Q2?"}]}]),
         r"bad\.json: record 1: question 2: missing field 'answer'"),
        (json.dumps({"database": [], "questions": []}), r"bad\.json: field 'database' must be a non-empty list"),
        ('"just a string"', r"bad\.json: a problem must be a JSON object, got str"),
    ],
)
def test_errors_name_the_file_and_the_record(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_problems(path)


def test_an_empty_file_holds_no_problems(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert read_problems(tmp_path / "empty.jsonl") == []


def test_support_then_answer_targets():
    (qa2,) = read_problems(OFFICIAL / "babilong_array.json")[1:]
    target = with_support_target(qa2 | {"choices": ["office", "garden"]})
    assert target["answer"] == (
        "<support>Sandra Event 1: Sandra picked up the apple there.\nSandra Event 2: Sandra journeyed to the office."
        "</support>\n<output>office</output>"
    )
    assert target["choices"] == [] and qa2["answer"] == "office", "a copy; the problem is left as it was"
    assert support_target("garden", []) == "garden", "no support: the plain answer, as the official code does"
    assert with_support_target(read_problems(OFFICIAL / "longgorilla.json")[0])["answer"].startswith("pipeline(")


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("<support>Mary went to the garden.</support>\n<output>garden</output>", "garden"),
        ("<SUPPORT>x</SUPPORT><OUTPUT> the Garden </OUTPUT> trailing", "the Garden"),
        ("<support>x</support>\n<output>gard", "gard"),  # cut off by the generation limit
        ("<support>Mary went to the", ""),  # cut off before any output
        ("garden", "garden"),
        ("  The kitchen. ", "The kitchen."),
    ],
)
def test_answer_part(text, answer):
    assert answer_part(text) == answer


def test_targets_are_scored_on_their_output_part():
    problem = {"task": "t", "question": "Where is Mary?", "answer": support_target("garden", ["Mary went to the garden."])}
    right = _scored("perk", problem, "<support>Mary went to the hallway.</support>\n<output>Garden.</output>", None, False)
    wrong = _scored("perk", problem, "<support>Mary went to the garden.</support>\n<output>kitchen</output>", None, False)
    assert right.exact_match and right.f1 == 1.0 and right.answer == "garden"
    assert not wrong.exact_match and wrong.f1 == 0.0


@pytest.mark.parametrize(
    ("name", "count"),
    [("babilong_qa1.json", 1), ("babilong_array.json", 2), ("babilong.jsonl", 3),
     ("student_records_recall.json", 4), ("longgorilla.json", 1)],
)
def test_data_stats_reads_each_official_form(name, count, capsys):
    assert data_main(["stats", str(OFFICIAL / name)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{count} problems\n") and f"{Path(name).stem}: {count} problems" in out


def test_data_stats_reports_a_broken_file_in_one_line(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "context": ["a"],\n  "question": \n}\n')
    assert run_main(data_main, ["stats", str(path)], prog="perk.data") == 1
    error = capsys.readouterr().err
    assert error.startswith("perk.data: error:") and "broken.json: not valid JSON" in error and error.count("\n") == 1
