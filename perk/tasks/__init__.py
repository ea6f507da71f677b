"""Long-context reasoning tasks generated offline: BabiLong-style needle tasks, student records and
LongGorilla-style API retrieval.

``generate(task, n, length_tokens, tokenizer)`` returns Problem records; datasets are written as
JSONL (write_jsonl) and read from JSONL, JSON arrays and objects and Student Records databases
(read_problems); answers are scored with exact_match and f1 (on the answer_part of official
support-then-answer targets). ``python -m perk.data`` is the command line.
"""

from perk.tasks.io import read_jsonl, read_located_problems, read_problems, validate_record, write_jsonl
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
from perk.tasks.targets import answer_part, support_target, with_support_target

__all__ = [
    "BABILONG_TASKS",
    "LONGGORILLA_TASKS",
    "STUDENT_RECORDS_TASKS",
    "TASKS",
    "Problem",
    "answer_part",
    "exact_match",
    "f1",
    "generate",
    "iter_problems",
    "normalize_answer",
    "parse_depth",
    "parse_length",
    "read_jsonl",
    "read_located_problems",
    "read_problems",
    "support_target",
    "validate_record",
    "with_support_target",
    "write_jsonl",
]
