"""Evaluation results: per-problem records, the summary table, and plots to look at.

Every evaluated (method, problem) pair gives one :class:`Prediction`; :func:`summarize` groups them
by method × context length × depth into exact-match accuracy, token F1 and, for tasks with a
closed answer set (locations, yes/no), constrained-choice accuracy (the answer is the choice the
model finds most likely). Results are written as JSON, a markdown table and PNG plots.
"""

from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from perk.checkpoint import write_file_atomic


@dataclass
class Prediction:
    """One method's answer to one problem, scored."""

    method: str
    task: str
    length_tokens: int
    depth: float | None
    question: str
    answer: str
    prediction: str
    exact_match: bool
    f1: float
    choice: str | None = None  # the constrained choice, when the task has a closed answer set
    truncated: bool = False  # the context did not fit the prompt window and was cut


GROUP_KEYS = ("length_tokens", "depth_pct")


def summarize(predictions: list[Prediction], by: tuple[str, ...] = ("length_tokens",)) -> list[dict]:
    """One row per method × task × the ``by`` keys (``length_tokens``, ``depth_pct``): n, exact
    match, F1, choice accuracy (all in %) and how many prompts were truncated. A key not in
    ``by`` is None in the rows (aggregated over)."""
    if not set(by) <= set(GROUP_KEYS):
        raise ValueError(f"by must name keys of {GROUP_KEYS}, got {by}")
    groups: dict[tuple, list[Prediction]] = defaultdict(list)
    for p in predictions:
        length = p.length_tokens if "length_tokens" in by else None
        depth = round(p.depth * 100) if ("depth_pct" in by and p.depth is not None) else None
        groups[(p.task, length, depth, p.method)].append(p)
    rows = []
    for (task, length, depth, method), group in sorted(groups.items(), key=lambda kv: _sort_key(kv[0])):
        choices = [p for p in group if p.choice is not None]
        rows.append({
            "method": method,
            "task": task,
            "length_tokens": length,
            "depth_pct": depth,
            "n": len(group),
            "exact_match": 100.0 * sum(p.exact_match for p in group) / len(group),
            "f1": 100.0 * sum(p.f1 for p in group) / len(group),
            "choice_accuracy": (
                100.0 * sum(p.choice == p.answer for p in choices) / len(choices) if choices else None
            ),
            "truncated": sum(p.truncated for p in group),
        })
    return rows


def _sort_key(key: tuple) -> tuple:
    task, length, depth, method = key
    return (task, -1 if length is None else length, -1 if depth is None else depth, method)


def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def accuracy_table(rows: list[dict]) -> str:
    """The summary as a markdown table (accuracies in %)."""
    with_depth = any(r["depth_pct"] is not None for r in rows)
    header = ["method", "task", "length"] + (["depth %"] if with_depth else []) + [
        "n", "exact match", "F1", "choice acc.", "truncated"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["method"], r["task"], "all" if r["length_tokens"] is None else _format_length(r["length_tokens"])]
        if with_depth:
            cells.append("–" if r["depth_pct"] is None else str(r["depth_pct"]))
        cells += [str(r["n"]), _fmt(r["exact_match"]), _fmt(r["f1"]), _fmt(r["choice_accuracy"]),
                  str(r["truncated"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _format_length(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens >= 1024 and tokens % 1024 == 0 else str(tokens)


def plot_accuracy(rows: list[dict], path: str | Path, *, x: str = "length_tokens") -> Path:
    """Accuracy (exact match, and choice accuracy dashed) vs context length or depth, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method in sorted({r["method"] for r in rows}):
        points = sorted((r[x], r) for r in rows if r["method"] == method and r[x] is not None)
        if not points:
            continue
        xs = [p[0] for p in points]
        (line,) = ax.plot(xs, [p[1]["exact_match"] for p in points], marker="o", label=f"{method} (exact match)")
        choice = [(xv, r["choice_accuracy"]) for xv, r in points if r["choice_accuracy"] is not None]
        if choice:
            ax.plot(*zip(*choice), marker="x", linestyle="--", color=line.get_color(), label=f"{method} (choice)")
    if x == "length_tokens":
        ax.set_xscale("log", base=2)
        ticks = sorted({r[x] for r in rows})
        ax.set_xticks(ticks, [_format_length(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("context length (tokens)")
    else:
        ax.set_xlabel("depth of the first supporting fact (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    task = ", ".join(sorted({r["task"] for r in rows}))
    ax.set_title(f"{task}: accuracy vs {'length' if x == 'length_tokens' else 'depth'}", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_file_atomic(path, buffer.getvalue())
    return Path(path)


def write_results(directory: str | Path, name: str, predictions: list[Prediction], *, by_depth: bool = False,
                  header: str = "") -> tuple[list[dict], str]:
    """Write ``<name>.json`` (summary + every prediction), ``<name>.md`` and the plots that have
    more than one point (accuracy vs length; vs depth when ``by_depth``); return the summary rows
    and the markdown table."""
    directory = Path(directory)
    rows = summarize(predictions, by=GROUP_KEYS if by_depth else ("length_tokens",))
    table = accuracy_table(rows)
    payload = {"summary": rows, "predictions": [asdict(p) for p in predictions]}
    write_file_atomic(directory / f"{name}.json", json.dumps(payload, indent=1).encode())
    write_file_atomic(directory / f"{name}.md", (header + table).encode())
    by_length = summarize(predictions, by=("length_tokens",))
    if len({r["length_tokens"] for r in by_length}) > 1:
        plot_accuracy(by_length, directory / f"{name}_vs_length.png", x="length_tokens")
    by_depth_rows = summarize(predictions, by=("depth_pct",))
    if by_depth and len({r["depth_pct"] for r in by_depth_rows}) > 1:
        plot_accuracy(by_depth_rows, directory / f"{name}_vs_depth.png", x="depth_pct")
    return rows, table
