"""python -m perk.train — meta-train PERK, fine-tune the FT-ICR baseline, evaluate both.

With no arguments: the embedded SmolLM2-135M-Instruct on generated BabiLong qa1 problems, sized
to finish (training and evaluation) in about a quarter of an hour on a 2-core CPU; on a GPU the
defaults scale up. The run reads top to bottom:

1. config: dataclass defaults (CPU or GPU sized), then ``--config FILE.yaml``, then ``--key value``;
2. data: training and held-out problems generated offline (perk.tasks), lengths in the base
   model's tokens, or read from dataset files (``--data.train_file``, ``--data.eval_file``: the
   official PERK data as it comes), optionally as support-then-answer targets (perk.problems);
3. meta-training (perk.trainer): Adam on PERK's meta-parameters (adapter init θ, inner learning rates) with
   ``PerkModel.meta_gradient`` on meta-batches of problems;
4. FT-ICR (perk.trainer): a LoRA of the same rank trained on the same problems, batches and number of steps,
   with the context in the prompt;
5. evaluation on held-out problems: PERK vs zero-shot vs FT-ICR, printed and saved as a table.

Under ``torchrun --nproc_per_node=K`` (perk.distributed) every meta-batch and the held-out
problems are shared out over the K processes: each computes the loss and gradients of its share,
one all-reduce makes them those of the whole batch, so every process takes the same Adam step;
rank 0 alone prints and writes the run directory. ``meta_batch`` must be a multiple of K.

Everything lands in ``runs/<name>/``: the resolved config, ``metrics.jsonl`` (one line per
step), atomic checkpoints every ``checkpoint_every`` steps (``--resume`` continues exactly where
a run stopped), the trained PERK model (``perk/``), the FT-ICR adapter, and the results.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from perk.checkpoint import load_latest_checkpoint
from perk.cli import (
    ArgumentParser,
    UsageError,
    add_config_arguments,
    build_config,
    config_to_dict,
    run_main,
    set_keys,
)
from perk.config import TrainConfig, gpu_defaults
from perk.distributed import (
    Launch,
    barrier,
    check_same_everywhere,
    close,
    from_rank0,
    from_torchrun,
    gather_lists,
    shard,
)
from perk.engine import PerkModel
from perk.methods import answer_budget, evaluate
from perk.models import load_base_model, resolve_base_dtype
from perk.problems import check_data_files, make_problems
from perk.report import write_results
from perk.runs import (
    METRICS,
    PERK_DIR,
    PHASES,
    RESOLVED_CONFIG,
    MetricsLog,
    read_run_config,
    resolve_device,
    run_directory,
    run_lock,
    save_ftic_adapter,
    save_resolved_config,
    set_threads,
)
from perk.trainer import all_tensors, check_world_size, ftic_phase, perk_phase, restore, resumable_state, run_phase

# ----------------------------------------------------------------------------------------------
# The command line and the run directory
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, TrainConfig]:
    parser = ArgumentParser(
        prog="python -m perk.train",
        description="Meta-train PERK, train the FT-ICR baseline with the same budget, and evaluate "
        "PERK vs zero-shot vs FT-ICR on held-out problems. Defaults are sized for the machine "
        "(CPU or GPU, see --device).",
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="config file; --key options override it")
    parser.add_argument("--resume", action="store_true", help="continue the run <runs_dir>/<name> from its last good checkpoint")
    device = _peek_device(argv)
    defaults = gpu_defaults() if device == "cuda" else TrainConfig()
    add_config_arguments(parser, TrainConfig, defaults)
    args = parser.parse_args(argv)
    config = build_config(TrainConfig, args, defaults)
    check_data_files(config.data)
    return args, config


def _peek_device(argv: list[str] | None) -> str:
    """The device the defaults are sized for (before the full parse)."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--device", default="auto")
    requested = peek.parse_known_args(argv)[0].device
    return resolve_device(requested)


def resolve_run(config: TrainConfig, resume: bool, explicit_keys: set[str]) -> tuple[Path, TrainConfig]:
    """The run directory and its config: the saved one when resuming. A new run never reuses the
    directory of another (nothing previously written is overwritten)."""
    run_dir = run_directory(config)
    saved = run_dir / RESOLVED_CONFIG
    if resume:
        if not saved.is_file():
            raise UsageError(f"--resume: {run_dir} has no {RESOLVED_CONFIG}; nothing to resume")
        if explicit_keys - {"name", "runs_dir"}:
            raise UsageError(
                f"--resume continues with the saved config; drop {', '.join(sorted(explicit_keys - {'name', 'runs_dir'}))}"
            )
        saved_config = read_run_config(run_dir)
        check_data_files(saved_config.data)
        return run_dir, saved_config
    if saved.is_file():
        raise UsageError(f"{run_dir} already holds a run: pass --resume to continue it or --name for a new one")
    return run_dir, config


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args, config = parse_args(argv)
    explicit = set_keys(args) | ({"config"} if args.config else set())
    run_dir, run_config = resolve_run(config, args.resume, explicit)  # reads only: no process has written yet
    launch = from_torchrun(resolve_device(run_config.device))
    set_threads(run_config.threads)
    try:
        check_world_size(run_config, launch)
        check_same_everywhere("the resolved config", yaml.safe_dump(config_to_dict(run_config)), launch)
        with run_lock(run_dir, launch):
            # Again under the lock: another perk.train may have started this run meanwhile.
            run_dir, run_config = resolve_run(config, args.resume, explicit)
            return train_and_evaluate(args, run_config, run_dir, launch, started)
    finally:
        close(launch)


def train_and_evaluate(args: argparse.Namespace, config: TrainConfig, run_dir: Path, launch: Launch,
                       started: float) -> int:
    barrier(launch)  # every process has checked the run directory before rank 0 writes to it
    say = print if launch.is_main else (lambda *a, **k: None)
    device = launch.device
    torch.manual_seed(config.perk.seed)

    processes = f" ({launch.world_size} processes, {launch.backend})" if launch.distributed else ""
    threads = f", {torch.get_num_threads()} CPU thread{'s' if torch.get_num_threads() > 1 else ''}"
    say(f"perk.train: run {run_dir} on {device}{processes}{threads}; loading {config.model}", flush=True)
    dtype = from_rank0(resolve_base_dtype(config.base_dtype, device), launch)
    model, tokenizer = load_base_model(config.model, dtype=dtype, device=device)
    pm = PerkModel.from_base(model, tokenizer, config.perk)
    ftic_adapter = pm.adapted.initial_adapter(torch.Generator().manual_seed(config.perk.seed + 1)).requires_grad_()

    phase_index, start_step, resume_state = 0, 0, None
    if args.resume:
        checkpoint = load_latest_checkpoint(run_dir, check_state=resumable_state(config))
        if checkpoint is not None:
            restore(pm, ftic_adapter if "ftic" in config.methods else None, checkpoint)
            phase_index = PHASES.index(checkpoint.state["phase"])
            start_step, resume_state = checkpoint.state["phase_step"], checkpoint.state
            written = checkpoint.state.get("world_size", 1)
            how = "" if written == launch.world_size == 1 else f"; written by {written}, continued by {launch.world_size} processes"
            say(f"resuming from {checkpoint.path.name} ({checkpoint.state['phase']} step {start_step}{how})", flush=True)
    train_problems, eval_problems = make_problems(config, pm.adapted)
    say(f"data: {len(train_problems)} training and {len(eval_problems)} held-out problems", flush=True)
    metrics = MetricsLog(run_dir / METRICS)
    if launch.is_main:
        if not args.resume:
            # Only now: a start that fails (a model that does not fit, a task that cannot generate
            # these problems) leaves no run behind, so the same --name can be used again.
            save_resolved_config(run_dir, config, world_size=launch.world_size)
        metrics.truncate_after(phase_index, start_step)

    phases = [perk_phase(pm, config)]
    if "ftic" in config.methods:
        phases.append(ftic_phase(pm, ftic_adapter, config))
    for index, phase in enumerate(phases):
        if index < phase_index:
            continue
        resuming = index == phase_index and resume_state is not None
        run_phase(phase, config=config, problems=train_problems, run_dir=run_dir, metrics=metrics,
                  checkpoint_tensors=lambda: all_tensors(pm, ftic_adapter if "ftic" in config.methods else None),
                  start_step=start_step if resuming else 0, resume_state=resume_state if resuming else None,
                  launch=launch)

    if launch.is_main:
        pm.save_pretrained(run_dir / PERK_DIR)
        if "ftic" in config.methods:
            save_ftic_adapter(run_dir, ftic_adapter)

    # Each process answers its share of the held-out problems; rank 0 gathers the predictions.
    predictions = evaluate(pm, shard(eval_problems, launch), config.methods,
                           ftic_adapter=ftic_adapter.detach().unsqueeze(0),
                           max_new_tokens=answer_budget(tokenizer, eval_problems, config.max_new_tokens),
                           batch_size=config.eval_batch, progress=launch.is_main)
    if launch.distributed:
        shares = gather_lists(predictions, launch)  # per rank: method by method, its problems in order
        predictions = [p for method in config.methods for share in shares for p in share if p.method == method]
    if not launch.is_main:
        return 0
    minutes = (time.perf_counter() - started) / 60
    header = (f"# {config.data.describe()}, {len(eval_problems)} held-out "
              f"problems\n\nbase model {config.model} on {device}{processes}; {config.meta_steps} steps of "
              f"{config.meta_batch} problems per method; run {run_dir}; {minutes:.1f} min\n\n")
    _, table = write_results(run_dir, "results", predictions, header=header)
    print("\n" + header + table, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog="perk.train"))
