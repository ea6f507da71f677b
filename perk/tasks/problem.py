"""The record every task generator produces, and the parsers for context lengths ("8k", "128K")
and depths ("50", "12.5%")."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

_LENGTH_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")
_LENGTH_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}


def parse_length(text: str | int) -> int:
    """Parse a context length in tokens: ``"512"``, ``"8k"``, ``"1K"``, ``"128k"``, ``"1m"``, ``"1.5k"``.

    ``k`` is 1024 and ``m`` is 1024², as context windows are counted (8k = 8192 tokens).
    Raises ValueError on anything else, including lengths that are not a positive whole number.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise TypeError(f"length must be a str or int, got {type(text).__name__}")
    if isinstance(text, int):
        value = text
    else:
        match = _LENGTH_PATTERN.match(text)
        if match is None:
            raise ValueError(f"length {text!r} is not a number of tokens like 512, 8k or 1m")
        scaled = float(match.group(1)) * _LENGTH_UNITS[match.group(2).lower()]
        if scaled != int(scaled):
            raise ValueError(f"length {text!r} is not a whole number of tokens")
        value = int(scaled)
    if value <= 0:
        raise ValueError(f"length must be positive, got {text!r}")
    return value


def parse_depth(text: str) -> float:
    """Parse a depth given in percent of the context (``"0"``, ``"50"``, ``"12.5%"``, ``"100"``) into
    the fraction in [0, 1] that the generators take. Raises ValueError on anything else."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise ValueError(f"depth {text!r} is not a percentage like 0, 50 or 100") from None
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"depth {text!r} is not a percentage from 0 to 100")
    return value / 100.0


@dataclasses.dataclass(frozen=True)
class Problem:
    """One long-context question: the JSONL line of a dataset.

    Attributes:
        task: task name, e.g. ``"babilong/qa2"`` or ``"student_records/recall"``.
        context: the documents, in reading order; each one short enough to fit an encoding segment.
        question: a complete question, answerable from the context's facts alone.
        answer: the short gold answer (a location, ``"yes"``/``"no"``, a name, a number).
        choices: the closed answer set when there is one (every location, yes/no), else empty.
        support: the supporting facts, each a verbatim substring of one document.
        length_tokens: the requested context length in tokens.
        context_tokens: the context's length in tokens (sum over documents, no special tokens).
        depth: where the first supporting fact starts, as a fraction of the context's tokens.
        seed: the seed of the generation run.
        index: the problem's index in that run; (task, seed, index, options) determine it.
        order_markers: whether facts carry per-actor event counters ("Mary Event 3: ...").
        doc_index: whether each document starts with its index ("doc_12: ...").
        tokenizer: name or path of the tokenizer that measured the lengths.
    """

    task: str
    context: list[str]
    question: str
    answer: str
    choices: list[str]
    support: list[str]
    length_tokens: int
    context_tokens: int
    depth: float
    seed: int
    index: int
    order_markers: bool
    doc_index: bool
    tokenizer: str

    def to_json(self) -> dict[str, Any]:
        """The problem as a JSON-serialisable dict (one JSONL line), fields in declaration order."""
        return dataclasses.asdict(self)
