"""Lengths, JSONL reading/writing and answer scoring."""

from __future__ import annotations

import json

import pytest

from perk.tasks import (
    exact_match,
    f1,
    generate,
    normalize_answer,
    parse_depth,
    parse_length,
    read_jsonl,
    read_located_problems,
    read_problems,
    write_jsonl,
)
from perk.tasks import io
from tests.test_tasks_lengths import TOKENIZERS


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("512", 512), ("8k", 8192), ("1K", 1024), ("128k", 131072), ("1m", 1048576), (" 1.5k ", 1536), (77, 77)],
)
def test_parse_length(text, tokens):
    assert parse_length(text) == tokens


@pytest.mark.parametrize("text", ["", "8x", "k", "-1k", "0", "1.3", "0.0001k", "8 kb"])
def test_parse_length_rejects_malformed_lengths(text):
    with pytest.raises(ValueError, match="length"):
        parse_length(text)


def test_parse_length_rejects_other_types():
    with pytest.raises(TypeError, match="length"):
        parse_length(8.0)


@pytest.mark.parametrize(("text", "fraction"), [("0", 0.0), ("50", 0.5), (" 12.5% ", 0.125), ("100", 1.0)])
def test_parse_depth_takes_percent(text, fraction):
    assert parse_depth(text) == fraction


@pytest.mark.parametrize("text", ["", "half", "-1", "100.5", "1e3", "50%%"])
def test_parse_depth_rejects_what_is_not_a_percentage(text):
    with pytest.raises(ValueError, match="depth"):
        parse_depth(text)


@pytest.fixture(scope="module")
def problems():
    return generate("babilong/qa2", 3, 1024, TOKENIZERS["bpe"](), seed=4) + generate(
        "student_records/aggregate", 2, 1024, TOKENIZERS["bpe"]()
    )


def test_jsonl_round_trip(tmp_path, problems):
    path = tmp_path / "set.jsonl"
    assert write_jsonl(path, problems) == 5
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5 and all(json.loads(line)["task"] for line in lines)
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n", encoding="utf-8")
    assert read_jsonl(path) == [problem.to_json() for problem in problems]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: "{not json", "Expecting"),
        (lambda r: json.dumps([r]), "JSON object"),
        (lambda r: json.dumps({k: v for k, v in r.items() if k != "answer"}), "missing field 'answer'"),
        (lambda r: json.dumps(r | {"context": "one text"}), "'context'"),
        (lambda r: json.dumps(r | {"context": []}), "'context'"),
        (lambda r: json.dumps(r | {"support": [1, 2]}), "'support'"),
        (lambda r: json.dumps(r | {"length_tokens": True}), "'length_tokens'"),
        (lambda r: json.dumps(r | {"question": "  "}), "'question'"),
    ],
)
def test_read_jsonl_names_the_bad_line(tmp_path, problems, mutate, message):
    records = [problem.to_json() for problem in problems]
    lines = [json.dumps(r) for r in records]
    lines[3] = mutate(records[3])
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:4: .*{message}"):
        read_jsonl(path)


def test_read_jsonl_accepts_a_minimal_hand_made_problem(tmp_path):
    path = tmp_path / "mine.jsonl"
    record = {"task": "x", "context": ["a b"], "question": "Q?", "answer": "a", "depth": None}
    path.write_text(json.dumps(record) + "\n")
    assert read_jsonl(path)[0]["answer"] == "a"


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        read_jsonl(tmp_path / "nothing.jsonl")


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, problems):
    path = tmp_path / "set.jsonl"
    path.write_text("old\n")

    def failing():
        yield problems[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(path, failing())
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["set.jsonl"]


@pytest.mark.parametrize(
    ("prediction", "gold", "match"),
    [
        ("The kitchen.", "kitchen", True),
        ("  KITCHEN ", "kitchen", True),
        ("a garden", "garden", True),
        ("74.3", "74.3", True),
        ("74.3.", "74.3", True),
        ("743", "74.3", False),
        ("74.30", "74.3", False),
        ("Yes!", "yes", True),
        ("Ada  Lovelace", "ada lovelace", True),
        ("the bedroom", "bathroom", False),
        ("", "", True),
    ],
)
def test_exact_match_normalises(prediction, gold, match):
    assert exact_match(prediction, gold) is match


@pytest.mark.parametrize(
    ("prediction", "gold", "score"),
    [
        ("Computer Science", "computer science", 1.0),
        ("Science", "Computer Science", 2 / 3),
        ("the Computer Science major", "Computer Science", 0.8),
        ("kitchen", "garden", 0.0),
        ("", "garden", 0.0),
        ("the", "", 1.0),
    ],
)
def test_f1(prediction, gold, score):
    assert f1(prediction, gold) == pytest.approx(score)


def test_normalize_answer_rejects_non_strings():
    with pytest.raises(TypeError, match="answer"):
        normalize_answer(3)


# --- issue 29: bad data refused at the door, naming the file and the line ----------------------------

GOOD = {"context": ["Mary went to the kitchen."], "question": "Where is Mary?", "answer": "kitchen"}
DATABASE_ROW = {"Student Id": "3109998", "Student Name": "Ada", "Year": "Junior", "School": "Arts", "Major": "Music",
                "Grade": 72}


def _jsonl(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # 5. a context with no text in it fails at read time, not mid-training
        (_jsonl(GOOD, GOOD | {"context": [""]}), r"bad\.json:2: field 'context' must hold at least one document that "
                                                 r"is not blank"),
        # 8. deep nesting: no RecursionError traceback
        (b"[" * 100_000 + b"]" * 100_000, r"bad\.json:1: nested too deeply"),
        (_jsonl(GOOD) + b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", r"bad\.json:2: nested too deeply"),
        # 9. non-UTF-8 bytes: the file and the line
        (_jsonl(GOOD) + b'{"question": "\xff"}\n', r"bad\.json:2: not UTF-8 text \(invalid start byte at byte 14"),
        (b'{\n  "context": ["a"],\n  "question": "\xfe"\n}', r"bad\.json:3: not UTF-8 text"),
        # 10. Student Records fields that are not text or numbers
        (json.dumps({"database": [DATABASE_ROW | {"Student Name": None}], "questions": []}).encode(),
         r"bad\.json: database entry 1: field 'Student Name' must be a string or a number, got null"),
        (json.dumps({"database": [DATABASE_ROW | {"School": {"x": 1}}], "questions": []}).encode(),
         r"field 'School' must be a string or a number"),
        (json.dumps({"database": [DATABASE_ROW | {"Grade": [72]}], "questions": []}).encode(),
         r"field 'Grade' must be a string or a number"),
        # 11. answers NaN and 1e999 are not numbers
        (_jsonl(GOOD) + b'{"context": ["a"], "question": "Q?", "answer": NaN}\n', r"bad\.json:2: NaN is not a JSON number"),
        (_jsonl(GOOD) + b'{"context": ["a"], "question": "Q?", "answer": 1e999}\n', r"bad\.json:2: number 1e999 is out of range"),
        (b'{"context": ["a"], "question": "Q?", "answer": -Infinity}', r"bad\.json:1: -Infinity is not a JSON number"),
        # 12. duplicate keys: refused, not last-wins
        (_jsonl(GOOD) + b'{"context": ["a"], "question": "Q?", "answer": "a", "answer": "b"}\n',
         r"bad\.json:2: duplicate key 'answer'"),
    ],
)
def test_bad_records_are_refused_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_problems(path)


def test_line_breaks_other_than_newline_are_text(tmp_path):
    """13. write_jsonl writes U+2028 and U+0085 raw (ensure_ascii=False): they are not line breaks."""
    problems = [GOOD | {"question": "Where\u2028is\x85Mary?"}, GOOD | {"context": ["a\u2029b\x1cc\rd"]}]
    write_jsonl(tmp_path / "odd.jsonl", problems)
    assert "\u2028".encode() in (tmp_path / "odd.jsonl").read_bytes()
    assert [{k: p[k] for k in GOOD} for p in read_problems(tmp_path / "odd.jsonl")] == problems


def test_a_single_json_document_is_capped_and_jsonl_streams(tmp_path, monkeypatch):
    """7. JSONL is read line by line, whatever its size; one JSON document (a pretty-printed file or
    a line) is read whole only up to MAX_JSON_DOCUMENT_BYTES (here made small)."""
    monkeypatch.setattr(io, "MAX_JSON_DOCUMENT_BYTES", 1000)
    lines = tmp_path / "many.jsonl"
    lines.write_bytes(_jsonl(*[GOOD | {"index": i} for i in range(50)]))  # 5 KB, every line < 1000 bytes
    assert [p["index"] for p in read_problems(lines)] == list(range(50))
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps([GOOD] * 50, indent=2))
    with pytest.raises(ValueError, match=r"whole\.json: a single JSON document larger than 0 MiB.*write it as JSONL"):
        read_problems(whole)
    lines.write_bytes(_jsonl(GOOD, GOOD | {"context": ["x" * 2000]}))
    with pytest.raises(ValueError, match=r"many\.jsonl:2: line longer than"):
        read_problems(lines)


def test_a_limited_read_stops_at_the_limit(tmp_path):
    """perk.train reads only the problems it uses: with a limit, JSONL is read no further."""
    path = tmp_path / "head.jsonl"
    path.write_bytes(_jsonl(GOOD, GOOD | {"index": 1}) + b"not JSON\n")
    assert [where for where, _ in read_located_problems(path, limit=2)] == [f"{path}:1", f"{path}:2"]
    with pytest.raises(ValueError, match=r"head\.jsonl:3: Expecting value"):
        read_located_problems(path)
