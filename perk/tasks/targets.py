"""The official support-then-answer targets: ``<support>facts</support>\\n<output>answer</output>``.

The official PERK code trains answers in this form (the supporting facts, one per line, then the
answer) when a problem has supporting facts, and the plain answer otherwise; it scores exact match
on the output part only. with_support_target() makes a problem's answer the target;
answer_part() takes the output back out of a target or of a generated answer, so scoring compares
answers whichever form the model was trained on.
"""

from __future__ import annotations

import re
from typing import Any

_OUTPUT = re.compile(r"<output>(.*?)(?:</output>|$)", re.DOTALL | re.IGNORECASE)
# A support block, closed or cut off by the generation limit.
_SUPPORT = re.compile(r"<support>.*?(?:</support>|$)", re.DOTALL | re.IGNORECASE)


def support_target(answer: str, support: list[str]) -> str:
    """``<support>facts, one per line</support>\\n<output>answer</output>``, or ``answer`` itself
    when there are no supporting facts (as the official code does)."""
    if not support:
        return answer
    return "<support>" + "\n".join(support) + f"</support>\n<output>{answer}</output>"


def with_support_target(problem: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``problem`` whose answer is its support-then-answer target. Its ``choices`` are
    dropped: constrained choice scores a bare choice right after the prompt, which a model trained
    to write the support first never does."""
    return problem | {"answer": support_target(problem["answer"], problem.get("support") or []), "choices": []}


def answer_part(text: str) -> str:
    """The answer inside a target or a generated answer: what ``<output>`` holds (up to
    ``</output>`` or the end), else the text without any ``<support>`` block; plain answers
    come back unchanged (stripped)."""
    match = _OUTPUT.search(text)
    if match is not None:
        return match.group(1).strip()
    return _SUPPORT.sub("", text).strip()
