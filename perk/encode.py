"""python -m perk.encode — write a long text file into a PERK memory and answer questions from it.

    python -m perk.encode --checkpoint runs/default --context book.txt --question "Where is Mary?" \\
        [--question "..."] [--save_memory DIR]

The file is split into documents at blank lines (paragraphs); the meta-trained initialisation
of the run is adapted to it by the inner steps, and each question is answered by the adapted
model without the text in the prompt. ``--save_memory`` writes the memory as a PEFT adapter.

``--shard_context`` under ``torchrun --nproc_per_node=K``: the text's segments are shared out over
the K processes (each holds 1/K of the activations) and every inner step all-reduces the inner
gradient, so each process ends with the memory one process would write; rank 0 answers and saves.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch.distributed as dist

from perk.cli import ArgumentParser, UsageError, positive_int, run_main
from perk.distributed import Launch, close, from_torchrun, torchrun_world_size
from perk.runs import add_threads_argument, load_run, resolve_device, set_threads


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
    add_threads_argument(parser)
    parser.add_argument("--shard_context", action="store_true",
                        help="under torchrun: share the text's segments out over the processes, all-reducing "
                        "every inner step's gradient (rank 0 prints and saves)")
    args = parser.parse_args(argv)
    if args.shard_context and torchrun_world_size() < 2:
        raise UsageError("--shard_context needs torchrun with 2 or more processes: torchrun --nproc_per_node=K "
                         "-m perk.encode --shard_context ...")
    if torchrun_world_size() > 1 and not args.shard_context:
        raise UsageError("several torchrun processes would each encode the whole text: pass --shard_context")
    if args.save_memory is not None and args.save_memory.exists() and any(args.save_memory.iterdir()):
        raise UsageError(f"--save_memory {args.save_memory}: folder exists and is not empty")
    documents = read_documents(args.context)
    launch = from_torchrun(resolve_device(args.device))
    set_threads(args.threads)
    try:
        return encode_and_answer(args, documents, launch)
    finally:
        close(launch)


def encode_and_answer(args: argparse.Namespace, documents: list[str], launch: Launch) -> int:
    pm, _ = load_run(args.checkpoint, args.model, launch.device, launch=launch)
    for question in args.question:  # before the (long) encoding: each question fits with its answer
        pm.adapted.question_prompt(question, args.max_new_tokens)

    start = time.perf_counter()
    memory = pm.encode([documents], process_group=dist.group.WORLD if launch.distributed else None)
    if not launch.is_main:  # every process holds the same memory: rank 0 answers and saves
        return 0
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
