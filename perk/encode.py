"""python -m perk.encode — write a long text file into a PERK memory and answer questions from it.

    python -m perk.encode --checkpoint runs/default --context book.txt --question "Where is Mary?" \\
        [--question "..."] [--save_memory DIR]

The file is split into documents at blank lines (paragraphs); the meta-trained initialisation
of the run is adapted to it by the inner steps, and each question is answered by the adapted
model without the text in the prompt. ``--save_memory`` writes the memory as a PEFT adapter.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from perk.cli import ArgumentParser, UsageError, positive_int, run_main
from perk.runs import load_run, resolve_device


def read_documents(path: Path) -> list[str]:
    """The paragraphs (blank-line separated) of a UTF-8 text file."""
    if not path.is_file():
        raise UsageError(f"--context: no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"--context {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    documents = [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
    if not documents:
        raise UsageError(f"--context {path}: the file is empty")
    return documents


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m perk.encode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a run directory written by perk.train")
    parser.add_argument("--context", required=True, type=Path, help="a UTF-8 text file")
    parser.add_argument("--question", action="append", required=True, help="a question (repeatable)")
    parser.add_argument("--save_memory", type=Path, help="write the memory here as a PEFT LoRA adapter")
    parser.add_argument("--max_new_tokens", type=positive_int, default=32, help="answer length limit (default: 32)")
    parser.add_argument("--model", help="base model (default: the run's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    args = parser.parse_args(argv)
    if args.save_memory is not None and args.save_memory.exists() and any(args.save_memory.iterdir()):
        raise UsageError(f"--save_memory {args.save_memory}: folder exists and is not empty")
    documents = read_documents(args.context)
    pm, _ = load_run(args.checkpoint, args.model, resolve_device(args.device))
    for question in args.question:  # before the (long) encoding: each question fits with its answer
        pm.adapted.question_prompt(question, args.max_new_tokens)

    start = time.perf_counter()
    memory = pm.encode([documents])
    stats = memory.stats
    losses = stats.inner_losses[:, 0].tolist()
    print(f"encoded {stats.context_tokens} tokens in {time.perf_counter() - start:.1f} s; context loss per inner "
          f"step: {' → '.join(f'{x:.3f}' for x in losses)}", flush=True)
    for question in args.question:
        print(f"Q: {question}\nA: {pm.answer(memory, question, max_new_tokens=args.max_new_tokens)}", flush=True)
    if args.save_memory is not None:
        memory.save_peft(args.save_memory)
        print(f"memory saved as a PEFT adapter in {args.save_memory}/", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog="perk.encode"))
