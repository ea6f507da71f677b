"""python -m perk.eval — evaluate a trained run: PERK vs the prompt-based baselines.

    python -m perk.eval --checkpoint runs/default --task babilong/qa1 --lengths 1k,2k,4k \\
        [--depths 0,25,50,75,100] [--methods perk,zeroshot,ftic] [--n 20] [--data FILE.jsonl]

Problems are generated offline per length (× depth) or read from a dataset file (``--data``;
default: the run's ``data.eval_file`` when it has one and no --task, --lengths or --depths is
given): JSONL, a JSON array or object, or a Student Records database with questions, the
official PERK data as it comes. A run trained on support-then-answer targets is evaluated on
them too, scored on the output part. Accuracy (exact match), token F1 and constrained-choice
accuracy per method × length (× depth) are printed and written to ``<out>/eval.{json,md}`` with plots ``eval_vs_length.png``
and ``eval_vs_depth.png`` (default ``<out>``: ``<checkpoint>/eval``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from perk.cli import ArgumentParser, UsageError, positive_int, run_main
from perk.config import METHODS
from perk.methods import answer_budget, evaluate
from perk.problems import as_trained, generate_problems
from perk.report import write_results
from perk.runs import (
    FTIC_ADAPTER,
    PERK_DIR,
    add_threads_argument,
    load_ftic_adapter,
    load_run,
    resolve_device,
    set_threads,
)
from perk.tasks import TASKS, parse_depth, parse_length, read_problems


def _csv(parse, what):
    def convert(text: str):
        try:
            values = [parse(part) for part in text.split(",") if part.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"malformed {what} {text!r}: {err}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"no {what} in {text!r}")
        return values

    return convert


def _method(text: str) -> str:
    if text.strip() not in METHODS:
        raise ValueError(f"choose from {', '.join(METHODS)}")
    return text.strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m perk.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a run directory written by perk.train")
    parser.add_argument("--task", choices=TASKS, help="task to generate (default: the run's task)")
    parser.add_argument("--lengths", type=_csv(parse_length, "lengths"), help="context lengths, e.g. 1k,2k,4k (default: the run's)")
    parser.add_argument("--depths", type=_csv(parse_depth, "depths"),
                        help="depths (%%) of the first supporting fact, e.g. 0,50,100")
    parser.add_argument("--methods", type=_csv(_method, "methods"), default=list(METHODS), help="perk,zeroshot,ftic (default: all)")
    parser.add_argument("--n", type=positive_int, default=20, help="problems per length (× depth) (default: 20)")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the generated problems (default: 1000)")
    parser.add_argument("--data", type=Path, help="evaluate on this dataset file (JSONL, JSON array or object, "
                        "Student Records database) instead of generated problems")
    parser.add_argument("--out", type=Path, help="output folder (default: <checkpoint>/eval)")
    parser.add_argument("--model", help="base model (default: the run's); must match the checkpoint")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--max_new_tokens", type=positive_int, help="answer length limit (default: the run's)")
    add_threads_argument(parser)
    parser.add_argument("--batch", type=positive_int, default=4, help="contexts encoded together (default: 4)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    set_threads(args.threads)
    if args.data is not None and not args.data.is_file():
        raise UsageError(f"--data: no such file: {args.data}")
    if "ftic" in args.methods and not (args.checkpoint / FTIC_ADAPTER).is_file() and (args.checkpoint / PERK_DIR).is_dir():
        raise UsageError(f"--methods ftic: {args.checkpoint} has no FT-ICR adapter (train with methods including ftic)")
    pm, run_config = load_run(args.checkpoint, args.model, device)
    data = run_config.data

    data_file = args.data
    generating = args.task is not None or args.lengths is not None or args.depths is not None
    if data_file is None and data.eval_file and not generating:
        data_file = Path(data.eval_file)
        if not data_file.is_file():  # a run is used without its data: only this default needs it
            raise UsageError(f"the run's data.eval_file {data_file} no longer exists: pass --data FILE, or --task to "
                             "generate problems")
    if data_file is not None:
        problems = read_problems(data_file)
        if not problems:
            raise UsageError(f"--data {data_file}: no problems in the file")
    else:
        problems = [  # the run's task and length unless --task or --lengths is given
            p
            for length in args.lengths or [None]
            for depth in args.depths or [None]
            for p in generate_problems(data, pm.tokenizer, args.n, args.seed, task=args.task, context_tokens=length,
                                       depth=depth)
        ]
    problems = [as_trained(data, p) for p in problems]
    ftic = load_ftic_adapter(args.checkpoint, pm) if "ftic" in args.methods else None
    max_new_tokens = answer_budget(pm.tokenizer, problems, args.max_new_tokens or run_config.max_new_tokens)
    predictions = evaluate(pm, problems, args.methods, ftic_adapter=ftic, max_new_tokens=max_new_tokens,
                           batch_size=args.batch)
    out = args.out or args.checkpoint / "eval"
    out.mkdir(parents=True, exist_ok=True)
    header = f"# perk.eval of {args.checkpoint} ({run_config.model}, {device})\n\n"
    _, table = write_results(out, "eval", predictions, by_depth=args.depths is not None, header=header)
    print("\n" + header + table + f"\nwritten to {out}/", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog="perk.eval"))
