"""Command line for task datasets: ``python -m perk.data generate|stats``.

    python -m perk.data generate --task babilong/qa2 --length 8k --n 500 --seed 0 --out qa2_8k.jsonl
    python -m perk.data generate --task student_records/aggregate --length 32k --n 100 --out agg.jsonl
    python -m perk.data generate --task longgorilla/stdlib --length 8k --n 100 --depth 50 --out api.jsonl
    python -m perk.data stats qa2_8k.jsonl
    python -m perk.data stats official/student_records/recall.json

``stats`` reads every form perk.tasks.read_problems() reads: JSONL, a JSON array, a single
(pretty-printed) JSON object, and a Student Records database with its questions (one problem per
question), as the official PERK data comes. Lengths are counted with ``--tokenizer`` (default: the embedded SmolLM2's). Output is written
atomically; bad input ends with a one-line error and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from perk.cli import ArgumentParser, positive_int, run_main
from perk.models import load_tokenizer
from perk.tasks import (
    TASKS,
    iter_problems,
    parse_depth,
    parse_length,
    read_problems,
    write_jsonl,
)
from perk.tasks.embed import DEFAULT_DOC_TOKENS


def _argument(parse):
    """An argparse type from a parser that raises ValueError: its message becomes the error."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def build_parser() -> argparse.ArgumentParser:
    """The ``generate`` and ``stats`` subcommands."""
    parser = ArgumentParser(prog="python -m perk.data", description="Generate and inspect long-context task datasets.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    generate = commands.add_parser("generate", help="generate a JSONL dataset")
    generate.add_argument("--task", required=True, choices=TASKS, metavar="TASK", help=f"one of {', '.join(TASKS)}")
    generate.add_argument("--length", required=True, type=_argument(parse_length), help="context length in tokens: 512, 8k, 128k, 1m")
    generate.add_argument("--n", required=True, type=positive_int, help="number of problems")
    generate.add_argument("--out", required=True, type=Path, help="output JSONL file (written atomically)")
    generate.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    generate.add_argument(
        "--tokenizer", default="smollm2-135m",
        help="tokenizer that measures lengths: a model alias, model directory or tokenizer directory",
    )
    generate.add_argument(
        "--depth", type=_argument(parse_depth), default=None,
        help="put the first supporting fact at this depth, in percent of the context (0-100; default: random)",
    )
    generate.add_argument("--no_order_markers", action="store_true", help="no per-actor event counters (babilong)")
    generate.add_argument("--no_doc_index", action="store_true", help='no "doc_<i>:" document prefixes')
    generate.add_argument("--corpus", type=Path, default=None, help="plain-text haystack corpus (babilong)")
    generate.add_argument(
        "--doc_tokens", type=positive_int, default=DEFAULT_DOC_TOKENS,
        help=f"most tokens per babilong document (default {DEFAULT_DOC_TOKENS})",
    )

    stats = commands.add_parser(
        "stats", help="summarise a dataset: JSONL, a JSON array or object, or a Student Records database"
    )
    stats.add_argument("file", type=Path)
    return parser


def run_generate(args: argparse.Namespace) -> int:
    tokenizer = load_tokenizer(args.tokenizer)
    problems = iter_problems(
        args.task, args.n, args.length, tokenizer, seed=args.seed, depth=args.depth,
        order_markers=not args.no_order_markers, doc_index=not args.no_doc_index,
        corpus=args.corpus, doc_tokens=args.doc_tokens,
    )
    # disable=None: a progress bar on a terminal only, not in logs and pipes.
    count = write_jsonl(args.out, tqdm(problems, total=args.n, desc=args.task, unit="problem", disable=None))
    print(f"wrote {count} problems to {args.out}")
    return 0


def _spread(values: list[float], digits: int = 1) -> str:
    return (
        f"min {min(values):.{digits}f}  mean {statistics.fmean(values):.{digits}f}  max {max(values):.{digits}f}"
    )


def summarize(records: list[dict[str, Any]]) -> str:
    """A plain-text summary of a dataset, one block per task."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_task[record["task"]].append(record)
    lines = [f"{len(records)} problems"]
    for task, group in sorted(by_task.items()):
        answers = Counter(record["answer"] for record in group)
        top = ", ".join(f"{answer} {100 * count / len(group):.1f}%" for answer, count in answers.most_common(8))
        lines += [
            f"{task}: {len(group)} problems",
            f"  documents per context: {_spread([len(r['context']) for r in group])}",
            f"  supporting facts: {_spread([len(r.get('support', [])) for r in group])}",
            f"  distinct answers: {len(answers)}; most common: {top}",
        ]
        if all("context_tokens" in r for r in group):
            lines.append(f"  context tokens: {_spread([r['context_tokens'] for r in group], 0)}")
        if all(isinstance(r.get("depth"), (int, float)) for r in group):
            lines.append(f"  depth of first supporting fact (%): {_spread([100 * r['depth'] for r in group])}")
        targets = sorted({r["length_tokens"] for r in group if "length_tokens" in r})
        if targets:
            lines.append(f"  target lengths: {', '.join(map(str, targets))}")
    return "\n".join(lines)


def run_stats(args: argparse.Namespace) -> int:
    records = read_problems(args.file)
    if not records:
        raise ValueError(f"{args.file} holds no problems")
    print(summarize(records))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line (errors become one line on stderr through :func:`perk.cli.run_main`)."""
    args = build_parser().parse_args(argv)
    return run_generate(args) if args.command == "generate" else run_stats(args)


if __name__ == "__main__":
    sys.exit(run_main(main, prog="perk.data"))
