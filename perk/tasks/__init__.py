"""Long-context reasoning tasks generated offline: BabiLong-style needle tasks, student records and
LongGorilla-style API retrieval.

``generate(task, n, length_tokens, tokenizer)`` returns Problem records; datasets are JSONL files
(write_jsonl / read_jsonl); answers are scored with exact_match and f1. ``python -m perk.data``
is the command line.
"""

from perk.tasks.io import read_jsonl, validate_record, write_jsonl
from perk.tasks.problem import Problem, parse_depth, parse_length
from perk.tasks.registry import (
    BABILONG_TASKS,
    LONGGORILLA_TASKS,
    STUDENT_RECORDS_TASKS,
    TASKS,
    generate,
    iter_problems,
)
from perk.tasks.scoring import exact_match, f1, normalize_answer

__all__ = [
    "BABILONG_TASKS",
    "LONGGORILLA_TASKS",
    "STUDENT_RECORDS_TASKS",
    "TASKS",
    "Problem",
    "exact_match",
    "f1",
    "generate",
    "iter_problems",
    "normalize_answer",
    "parse_depth",
    "parse_length",
    "read_jsonl",
    "validate_record",
    "write_jsonl",
]
