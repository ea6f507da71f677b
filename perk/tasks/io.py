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

JSONL is read as a stream, split at "\\n" only; a single JSON document (a whole-file value, or one
line) is read whole only up to MAX_JSON_DOCUMENT_BYTES. What JSON allows but no dataset means is
refused, naming the file and line: NaN, numbers out of range, duplicate keys, deep nesting, bytes
that are not UTF-8, Student Records fields that are null, lists or objects.
"""

from __future__ import annotations

import itertools
import json
import math
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
    if not any(document.strip() for document in record["context"]):
        raise ValueError("field 'context' must hold at least one document that is not blank")
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
    return [problem for _, problem in read_located_problems(path, task=task)]


def read_located_problems(path: str | Path, *, task: str | None = None,
                          limit: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """read_problems(), each problem with where it is in the file (``path:line``, ``path: record
    i``, ``path: question j``): what a later check of the problem names. With ``limit``, the first
    ``limit`` problems only: a JSONL file is read no further."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {str(path)!r} does not exist")
    default_task = task or path.stem
    problems: list[tuple[str, dict[str, Any]]] = []
    for where, record in _records(path):
        try:
            problems += [(f"{where}: {label}" if label else where, problem)
                         for label, problem in _problems_of(record, default_task)]
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if limit is not None and len(problems) >= limit:
            break
    return problems[:limit]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The older name of read_problems(), which reads JSONL and the other forms alike."""
    return read_problems(path)


# A JSON document (a JSONL line, or a whole file that is one JSON value) is read into memory whole:
# larger ones are refused rather than exhausting it. JSONL files of any size stream line by line.
MAX_JSON_DOCUMENT_BYTES = 256 * 1024 * 1024


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise ValueError(f"duplicate key {key!r} in one object")
        record[key] = value
    return record


def _finite_number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


class _Semantic(ValueError):
    """Valid JSON syntax perk refuses (duplicate keys, NaN, overflowing numbers, deep nesting)."""


def _parse(text: str) -> Any:
    """One JSON value; json.JSONDecodeError for bad syntax, _Semantic for what perk refuses in it."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_float=_finite_number,
                          parse_constant=_no_constant)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise _Semantic("nested too deeply") from None
    except ValueError as error:
        raise _Semantic(str(error)) from None


def _decode(data: bytes, path: Path, number: int | None) -> str:
    """``data`` as UTF-8; a ValueError naming the line otherwise (``number``: the line ``data``
    is; None: ``data`` is the whole file)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        if number is None:
            number, byte = data.count(b"\n", 0, err.start) + 1, err.start - (data.rfind(b"\n", 0, err.start) + 1)
        else:
            byte = err.start
        raise ValueError(f"{path}:{number}: not UTF-8 text ({err.reason} at byte {byte} of the line)") from None


def _lines(handle, path: Path) -> Iterator[tuple[int, bytes]]:
    """(number, bytes) of every non-blank line, split on "\\n" alone (U+2028 or U+0085 inside a
    JSON string is text, not a line break), each at most MAX_JSON_DOCUMENT_BYTES."""
    number = 0
    while True:
        line = handle.readline(MAX_JSON_DOCUMENT_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_JSON_DOCUMENT_BYTES:
            raise ValueError(f"{path}:{number}: line longer than {MAX_JSON_DOCUMENT_BYTES // 2**20} MiB, the largest "
                             "JSON document perk reads")
        if line.strip():
            yield number, line


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, JSON value) of every record of the file: the whole file when it is one JSON value
    (an array gives its items), else one per non-blank line, read as a stream."""
    with open(path, "rb") as handle:
        lines = _lines(handle, path)
        first = next(lines, None)
        if first is None:
            return
        number, line = first
        try:
            value = _parse(_decode(line, path, number))
        except _Semantic as error:
            raise ValueError(f"{path}:{number}: {error}") from None
        except json.JSONDecodeError:  # not JSONL: one JSON value over several lines
            handle.seek(0)
            yield from _whole_document(handle.read(MAX_JSON_DOCUMENT_BYTES + 1), path)
            return
        second = next(lines, None)
        if second is None:  # one value on one line: the whole file
            yield from _items(value, path)
            return
        yield f"{path}:{number}", value
        for number, line in itertools.chain([second], lines):
            try:
                yield f"{path}:{number}", _parse(_decode(line, path, number))
            except ValueError as error:
                raise ValueError(f"{path}:{number}: {error}") from None


def _whole_document(data: bytes, path: Path) -> Iterator[tuple[str, Any]]:
    if len(data) > MAX_JSON_DOCUMENT_BYTES:
        raise ValueError(f"{path}: a single JSON document larger than {MAX_JSON_DOCUMENT_BYTES // 2**20} MiB, the "
                         "largest perk reads whole: write it as JSONL (one problem per line), which is read as a stream")
    try:
        value = _parse(_decode(data, path, None))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    except _Semantic as error:
        raise ValueError(f"{path}: {error}") from None
    yield from _items(value, path)


def _items(value: Any, path: Path) -> Iterator[tuple[str, Any]]:
    if isinstance(value, list):
        for number, record in enumerate(value, start=1):
            yield f"{path}: record {number}", record
    else:
        yield str(path), value


def _problems_of(record: Any, task: str) -> list[tuple[str, dict[str, Any]]]:
    """The problems of one record, each with where it is in the record ("" for the record itself,
    ``question j`` for those of a Student Records database)."""
    if isinstance(record, dict) and ("database" in record or "questions" in record):
        return _database_problems(record, task)
    if isinstance(record, dict):
        record = {"task": task, **record} | _answer_as_text(record)
    validate_record(record)
    return [("", record)]


def _answer_as_text(record: dict[str, Any]) -> dict[str, Any]:
    answer = record.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return {"answer": str(answer)}
    return {}


def _database_problems(record: dict[str, Any], task: str) -> list[tuple[str, dict[str, Any]]]:
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
        for name in DATABASE_FIELDS:  # null, a list or an object would become text like "None"
            if not isinstance(row[name], (str, int, float)) or isinstance(row[name], bool):
                raise ValueError(f"database entry {number}: field {name!r} must be a string or a number, got "
                                 f"{json.dumps(row[name])[:40]}")
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
        problems.append((f"question {number}", problem))
    return problems
