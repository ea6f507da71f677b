"""Datasets: written as JSONL (one problem per line, atomically); read from every form the official
PERK data comes in, with validation.

read_problems() reads, by content rather than file name:

* JSONL: one JSON value per line (blank lines skipped);
* a JSON array of values, or a single (pretty-printed) JSON value;

where each value is a problem ``{"context": [documents], "question", "answer", "support"?, ...}``
(fields beyond those perk knows, like LongGorilla's ``"location"``, are kept), or a Student
Records database with its questions ``{"database": [{"Student Id", "Student Name", "Year",
"School", "Major", "Grade"}, ...], "questions": [{"question", "answer"}, ...]}``, which becomes
one problem per question, the database's records (one document each, in order) as the context.
A ``"..."`` in a question list (how the official samples mark elided entries) is skipped.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from perk.tasks.problem import Problem
from perk.tasks.student_records import record_document

# field -> (accepted types, required); a problem needs only context, question and answer (a read
# problem without a task gets one from the reader).
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "task": ((str,), False),
    "context": ((list,), True),
    "question": ((str,), True),
    "answer": ((str,), True),
    "choices": ((list,), False),
    "support": ((list,), False),
    "length_tokens": ((int,), False),
    "context_tokens": ((int,), False),
    "depth": ((float, int), False),
    "seed": ((int,), False),
    "index": ((int,), False),
    "order_markers": ((bool,), False),
    "doc_index": ((bool,), False),
    "tokenizer": ((str,), False),
}


def write_jsonl(path: str | Path, problems: Iterable[Problem | dict[str, Any]]) -> int:
    """Write problems one per line (UTF-8) to ``path`` atomically: into a temporary file in the
    same folder, renamed over ``path`` only once complete. Returns the number written."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(path.parent)!r} does not exist")
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            count = 0
            for problem in problems:
                record = problem.to_json() if isinstance(problem, Problem) else problem
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise
    return count


def validate_record(record: Any) -> None:
    """Raise ValueError naming the first field of ``record`` that is missing or malformed."""
    if not isinstance(record, dict):
        raise ValueError(f"a problem must be a JSON object, got {type(record).__name__}")
    for field, (types, required) in _FIELDS.items():
        if field not in record:
            if required:
                raise ValueError(f"missing field {field!r}")
            continue
        value = record[field]
        if field == "depth" and value is None:
            continue
        # bool is an int in Python; a count or seed of true/false is still malformed.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"field {field!r} must be {' or '.join(t.__name__ for t in types)}")
    for field in ("context", "choices", "support"):
        if not all(isinstance(item, str) for item in record.get(field, ())):
            raise ValueError(f"field {field!r} must be a list of strings")
    if not record["context"]:
        raise ValueError("field 'context' must hold at least one document")
    if not record["question"].strip():
        raise ValueError("field 'question' is empty")


DATABASE_FIELDS = ("Student Id", "Student Name", "Year", "School", "Major", "Grade")
ELIDED = "..."


def read_problems(path: str | Path, *, task: str | None = None) -> list[dict[str, Any]]:
    """Read and validate the problems of a dataset file in any of the forms of the module docstring.

    Problems without a ``task`` field get ``task`` (default: the file's name without suffix, e.g.
    ``qa1`` for ``qa1.json``). A numeric answer becomes a string.

    Raises FileNotFoundError for a missing file and ValueError naming the file and the record
    (``path:line`` in JSONL, ``path: record i`` in an array, ``path: ... question j`` in a
    database's questions) of the first thing that is not valid JSON or not a valid problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {str(path)!r} does not exist")
    default_task = task or path.stem
    problems: list[dict[str, Any]] = []
    for where, record in _records(path):
        try:
            problems += _problems_of(record, default_task)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
    return problems


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The older name of read_problems(), which reads JSONL and the other forms alike."""
    return read_problems(path)


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, JSON value) of every record of the file: the whole file when it is one JSON value
    (an array gives its items), else one per non-blank line."""
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return
    try:
        whole = json.loads(text)
    except ValueError as whole_error:  # json.JSONDecodeError is a ValueError
        lines = text.splitlines()
        first = next(line for line in lines if line.strip())
        try:
            json.loads(first)
        except ValueError:
            # Not JSONL either: report where the single JSON value breaks (line and column).
            raise ValueError(f"{path}: not valid JSON: {whole_error}") from None
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError as error:
                    raise ValueError(f"{path}:{number}: {error}") from None
                yield f"{path}:{number}", record
        return
    if isinstance(whole, list):
        for number, record in enumerate(whole, start=1):
            yield f"{path}: record {number}", record
    else:
        yield str(path), whole


def _problems_of(record: Any, task: str) -> list[dict[str, Any]]:
    """The problems of one record: itself, or one per question of a Student Records database."""
    if isinstance(record, dict) and ("database" in record or "questions" in record):
        return _database_problems(record, task)
    if isinstance(record, dict):
        record = {"task": task, **record} | _answer_as_text(record)
    validate_record(record)
    return [record]


def _answer_as_text(record: dict[str, Any]) -> dict[str, Any]:
    answer = record.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return {"answer": str(answer)}
    return {}


def _database_problems(record: dict[str, Any], task: str) -> list[dict[str, Any]]:
    database, questions = record.get("database"), record.get("questions")
    if not isinstance(database, list) or not database:
        raise ValueError("field 'database' must be a non-empty list of student records")
    if not isinstance(questions, list):
        raise ValueError("field 'questions' must be a list of {question, answer} objects")
    context = []
    for number, row in enumerate(database, start=1):
        missing = [name for name in DATABASE_FIELDS if not isinstance(row, dict) or name not in row]
        if missing:
            raise ValueError(f"database entry {number} lacks {', '.join(repr(name) for name in missing)}")
        context.append(record_document(*(row[name] for name in DATABASE_FIELDS)))
    problems = []
    for number, item in enumerate(questions, start=1):
        if item == ELIDED:
            continue
        try:
            if not isinstance(item, dict):
                raise ValueError(f"a question must be a JSON object, got {type(item).__name__}")
            support = item.get("support", [])
            problem = {
                "task": task,
                "context": context,
                "question": item.get("question"),
                "answer": item.get("answer"),
                "support": [support] if isinstance(support, str) and support else support or [],
            }
            problem = {name: value for name, value in problem.items() if value is not None} | _answer_as_text(item)
            validate_record(problem)
        except ValueError as error:
            raise ValueError(f"question {number}: {error}") from None
        problems.append(problem)
    return problems
