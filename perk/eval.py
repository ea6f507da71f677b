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

from perk.cli import ArgumentParser, UsageError, config_to_dict, run_main
from perk.engine import PerkModel, read_pretrained
from perk.evaluate import METHODS, answer_budget, evaluate
from perk.models import load_base_model, resolve_base_dtype
from perk.report import write_results
from perk.tasks import TASKS, generate, parse_depth, parse_length, read_problems, with_support_target
from perk.train import (
    FTIC_ADAPTER,
    PERK_DIR,
    RESOLVED_CONFIG,
    load_ftic_adapter,
    read_run_config,
    resolve_device,
)


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
    parser.add_argument("--n", type=int, default=20, help="problems per length (× depth) (default: 20)")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the generated problems (default: 1000)")
    parser.add_argument("--data", type=Path, help="evaluate on this dataset file (JSONL, JSON array or object, "
                        "Student Records database) instead of generated problems")
    parser.add_argument("--out", type=Path, help="output folder (default: <checkpoint>/eval)")
    parser.add_argument("--model", help="base model (default: the run's); must match the checkpoint")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--max-new-tokens", type=int, help="answer length limit (default: the run's)")
    parser.add_argument("--batch", type=int, default=4, help="contexts encoded together (default: 4)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.batch < 1:
        raise UsageError("--n and --batch must be >= 1")
    check_max_new_tokens(args.max_new_tokens)
    return args


def check_max_new_tokens(value: int | None) -> None:
    """``--max-new-tokens`` checked before anything is loaded (None: the run's or the default)."""
    if value is not None and value < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {value}")


def load_run(run_dir: Path, model_name: str | None, device: str):
    """(PerkModel, run config dict) of a run directory written by perk.train.

    The run's files are checked (readable, valid, finite) before the base model is loaded."""
    config_file = run_dir / RESOLVED_CONFIG
    if not (run_dir / PERK_DIR).is_dir() or not config_file.is_file():
        raise UsageError(f"--checkpoint {run_dir}: not a finished perk.train run (no {PERK_DIR}/ or {RESOLVED_CONFIG})")
    run_config = config_to_dict(read_run_config(run_dir))
    try:
        read_pretrained(run_dir / PERK_DIR)
    except (OSError, ValueError) as err:
        raise UsageError(f"--checkpoint {run_dir}: damaged {PERK_DIR}/ ({err})") from None
    dtype = resolve_base_dtype(run_config.get("base_dtype", "auto"), device)
    model, tokenizer = load_base_model(model_name or run_config["model"], dtype=dtype, device=device)
    try:
        pm = PerkModel.from_pretrained(run_dir / PERK_DIR, model, tokenizer)
    except ValueError as err:
        raise UsageError(f"--checkpoint {run_dir} does not fit base model {model_name or run_config['model']}: {err}") from None
    return pm, run_config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.data is not None and not args.data.is_file():
        raise UsageError(f"--data: no such file: {args.data}")
    if "ftic" in args.methods and not (args.checkpoint / FTIC_ADAPTER).is_file() and (args.checkpoint / PERK_DIR).is_dir():
        raise UsageError(f"--methods ftic: {args.checkpoint} has no FT-ICR adapter (train with methods including ftic)")
    pm, run_config = load_run(args.checkpoint, args.model, device)
    data = run_config["data"]

    data_file = args.data
    generating = args.task is not None or args.lengths is not None or args.depths is not None
    if data_file is None and data.get("eval_file") and not generating:
        data_file = Path(data["eval_file"])
    if data_file is not None:
        problems = read_problems(data_file)
        if not problems:
            raise UsageError(f"--data {data_file}: no problems in the file")
    else:
        task = args.task or data["task"]
        lengths = args.lengths or [data["context_tokens"]]
        depths = args.depths or [None]
        problems = [
            p.to_json()
            for length in lengths
            for depth in depths
            for p in generate(task, args.n, length, pm.tokenizer, seed=args.seed,
                              depth=depth,
                              order_markers=data["order_markers"], doc_index=data["doc_index"])
        ]
    if data.get("support_targets"):
        problems = [with_support_target(p) for p in problems]
    ftic = load_ftic_adapter(args.checkpoint, pm) if "ftic" in args.methods else None
    max_new_tokens = answer_budget(pm.tokenizer, problems, args.max_new_tokens or run_config.get("max_new_tokens", 8))
    predictions = evaluate(pm, problems, args.methods, ftic_adapter=ftic, max_new_tokens=max_new_tokens,
                           batch_size=args.batch)
    out = args.out or args.checkpoint / "eval"
    out.mkdir(parents=True, exist_ok=True)
    header = f"# perk.eval of {args.checkpoint} ({run_config['model']}, {device})\n\n"
    _, table = write_results(out, "eval", predictions, by_depth=args.depths is not None, header=header)
    print("\n" + header + table + f"\nwritten to {out}/", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog="perk.eval"))
