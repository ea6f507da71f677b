"""JSONL datasets: one problem per line, written atomically, read back with validation."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from perk.tasks.problem import Problem

# field -> (accepted types, required); a reader of hand-made files needs only the first four.
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "task": ((str,), True),
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


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a JSONL dataset; blank lines are skipped.

    Raises FileNotFoundError for a missing file and ValueError naming ``path:line`` for the first
    line that is not valid JSON or not a valid problem (see validate_record()).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {str(path)!r} does not exist")
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                validate_record(record)
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{number}: {error}") from None
            records.append(record)
    return records
