"""python -m perk.train — meta-train PERK, fine-tune the FT-ICR baseline, evaluate both.

With no arguments: the embedded SmolLM2-135M-Instruct on generated BabiLong qa1 problems, sized
to finish (training and evaluation) in about a quarter of an hour on a 2-core CPU; on a GPU the
defaults scale up. The run reads top to bottom:

1. config: dataclass defaults (CPU or GPU sized), then ``--config FILE.yaml``, then ``--key value``;
2. data: training and held-out problems generated offline (perk.tasks), lengths in the base
   model's tokens, or read from dataset files (``--data.train_file``, ``--data.eval_file``: the
   official PERK data as it comes), optionally as support-then-answer targets;
3. meta-training: Adam on PERK's meta-parameters (adapter init θ, inner learning rates) with
   ``PerkModel.meta_gradient`` on meta-batches of problems;
4. FT-ICR: a LoRA of the same rank trained on the same problems, batches and number of steps,
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
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from perk.checkpoint import (
    Checkpoint,
    load_latest_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from perk.cli import (
    ArgumentParser,
    UsageError,
    add_config_arguments,
    build_config,
    config_to_dict,
    run_main,
)
from perk.distributed import (
    SINGLE_PROCESS,
    Launch,
    all_reduce_mean,
    barrier,
    check_same_everywhere,
    close,
    from_rank0,
    from_torchrun,
    gather_lists,
    shard,
)
from perk.engine import PerkModel, load_tensors
from perk.adapted_model import AdaptedModel
from perk.methods import answer_budget, check_fits_window, evaluate, ftic_batch, ftic_loss_and_grad
from perk.models import load_base_model, resolve_base_dtype
from perk.report import write_results
from perk.runs import (
    METRICS,
    PERK_DIR,
    PHASES,
    RESOLVED_CONFIG,
    MetricsLog,
    TrainConfig,
    gpu_defaults,
    read_run_config,
    resolve_device,
    run_directory,
    run_lock,
    save_ftic_adapter,
    save_resolved_config,
    set_threads,
)
from perk.tasks import generate, read_located_problems, with_support_target

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
    config.data.check_files()
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
        saved_config.data.check_files()
        return run_dir, saved_config
    if saved.is_file():
        raise UsageError(f"{run_dir} already holds a run: pass --resume to continue it or --name for a new one")
    return run_dir, config


# ----------------------------------------------------------------------------------------------
# Data order and learning-rate schedule
# ----------------------------------------------------------------------------------------------


def batch_indices(step: int, batch: int, n: int, seed: int) -> list[int]:
    """Problems of ``step``: consecutive slices of one seeded permutation per epoch, so the data
    position is a pure function of the step (what makes a resumed run see the same batches)."""
    indices = []
    for position in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(position, n)
        indices.append(int(np.random.default_rng([seed, epoch]).permutation(n)[offset]))
    return indices


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One optimisation phase: its parameters and how one step's loss and gradients are made."""

    name: str
    params: dict[str, torch.Tensor]
    lrs: dict[str, float]  # Adam learning rate of each parameter
    loss_and_grads: Callable[[list[dict]], tuple[float, dict[str, torch.Tensor], dict]]
    # The size of a share of a batch in the unit the loss averages over (problems by default):
    # what each process's mean is weighted by when the processes' gradients are all-reduced.
    weight: Callable[[list[dict]], float] = len
    # The loss of a uniform prediction, ln(vocabulary size), where a step that reaches it with a
    # zero gradient means the inner loop destroyed the model (see check_not_collapsed); None: no check.
    uniform_loss: float | None = None


def make_optimizer(phase: Phase, config: TrainConfig):
    groups = [{"params": [param], "lr": phase.lrs[name]} for name, param in phase.params.items()]
    optimizer = torch.optim.Adam(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.warmup_steps, config.meta_steps))
    return optimizer, scheduler


def all_tensors(pm: PerkModel, ftic_adapter: torch.Tensor | None) -> dict[str, torch.Tensor]:
    tensors = {f"perk/{k}": v for k, v in pm.meta_parameters().items()}
    if ftic_adapter is not None:
        tensors["ftic/adapter"] = ftic_adapter
    return tensors


def run_phase(phase: Phase, *, config: TrainConfig, problems: list[dict], run_dir: Path, metrics: MetricsLog,
              checkpoint_tensors: Callable[[], dict[str, torch.Tensor]], start_step: int = 0,
              resume_state: dict | None = None, launch: Launch = SINGLE_PROCESS) -> None:
    """``config.meta_steps`` Adam steps of ``phase`` from ``start_step``, checkpointed.

    Distributed (``launch``): each process takes its share of every step's batch, and the all-reduced
    loss and gradients are the whole batch's, so every process takes the same step; rank 0 alone
    logs and checkpoints."""
    optimizer, scheduler = make_optimizer(phase, config)
    if resume_state is not None:
        try:
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            set_rng_state(resume_state["rng"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"--resume: the checkpoint's {phase.name} optimizer state does not load "
                             f"({type(err).__name__}: {err}); start a new run (--name)") from None
    params = list(phase.params.values())
    bar = tqdm(total=config.meta_steps, initial=start_step, desc=phase.name, unit="step", dynamic_ncols=True,
               **({} if launch.is_main else {"disable": True}))
    for step in range(start_step, config.meta_steps):
        indices = batch_indices(step, config.meta_batch, len(problems), config.data.seed)  # the global batch
        batch = [problems[i] for i in shard(indices, launch)]
        start = time.perf_counter()
        loss, grads, info = phase.loss_and_grads(batch)
        if launch.distributed:
            loss, grads, info = all_reduce_mean(loss, grads, info, phase.weight(batch), launch)
        for name, param in phase.params.items():
            param.grad = grads[name].to(param.dtype)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            # Stop before the step: the parameters and the last checkpoint stay finite (resumable).
            raise FloatingPointError(
                f"{phase.name} step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                "lower the learning rates or max_grad_norm"
            )
        check_not_collapsed(phase, step, loss, grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        record = {"phase": phase.name, "step": step, "loss": loss, "grad_norm": grad_norm,
                  "lr": scheduler.get_last_lr()[0], "seconds": round(seconds, 4), **info,
                  "world_size": launch.world_size}
        if launch.is_main:
            metrics.append(record)
        bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k in ("loss", "inner_first", "inner_last", "tok_s")})
        bar.update(1)
        done = step + 1
        if launch.is_main and (done % config.checkpoint_every == 0 or done == config.meta_steps):
            # Nothing in it is per-process (the optimizer state is the same everywhere), so a run
            # resumes on any number of processes.
            state = {"phase": phase.name, "phase_step": done, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": rng_state(), "world_size": launch.world_size}
            global_step = PHASES.index(phase.name) * config.meta_steps + done
            save_checkpoint(run_dir, global_step, checkpoint_tensors(), state, keep=config.keep_checkpoints)
    bar.close()


def check_not_collapsed(phase: Phase, step: int, loss: float, grad_norm: float) -> None:
    """Stop a run whose inner loop collapsed: inner steps so large (``perk.inner_lr``,
    ``perk.inner_weight_decay``) that the adapted model predicts the uniform distribution, whose loss
    is ln(vocabulary size) whatever the meta-parameters are, so the meta-gradient is exactly zero and
    meta-training would go on for nothing (before the step: the last checkpoint stays a good one)."""
    if phase.uniform_loss is None or grad_norm != 0.0:
        return
    if abs(loss - phase.uniform_loss) <= 1e-3 * phase.uniform_loss:
        raise FloatingPointError(
            f"{phase.name} step {step}: the inner loop collapsed: the meta-loss is {loss:.4f}, the loss of a uniform "
            f"prediction (ln of the {math.exp(phase.uniform_loss):.0f}-token vocabulary), with a zero meta-gradient, so "
            "nothing can be learned; lower perk.inner_lr or perk.inner_weight_decay"
        )


def perk_phase(pm: PerkModel, config: TrainConfig) -> Phase:
    def loss_and_grads(batch: list[dict]):
        loss, grads, stats = pm.meta_gradient(batch)
        inner = stats.inner_losses.mean(1)
        return float(loss), grads, {
            "inner_first": float(inner[0]) if len(inner) else float("nan"),
            "inner_last": float(inner[-1]) if len(inner) else float("nan"),
            "tok_s": stats.tokens_per_second,
            "inner_lr": float(pm.inner_learning_rates().detach().mean()),
        }

    params = pm.meta_parameters()
    lrs = {name: config.inner_lr_meta_lr if name == "inner_lr_log" else config.meta_lr for name in params}
    vocab = pm.adapted.model.get_output_embeddings().weight.shape[0]
    return Phase("perk", params, lrs, loss_and_grads, uniform_loss=math.log(vocab))


def ftic_phase(pm: PerkModel, adapter: torch.Tensor, config: TrainConfig) -> Phase:
    def loss_and_grads(batch: list[dict]):
        loss, grad = ftic_loss_and_grad(pm.adapted, adapter.unsqueeze(0), batch)
        return loss, {"adapter": grad[0]}, {}

    def answer_tokens(batch: list[dict]) -> int:  # the FT-ICR loss is a mean over the answer tokens
        return ftic_batch(pm.adapted, batch).n_tokens

    return Phase("ftic", {"adapter": adapter}, {"adapter": config.ftic_lr}, loss_and_grads, answer_tokens)


def resumable_state(config: TrainConfig) -> Callable[[dict], None]:
    """The check of a checkpoint's state before resuming from it (a ValueError saying what is wrong,
    so that the checkpoint is skipped for the previous one rather than failing with a KeyError)."""
    def check(state: dict) -> None:
        if state.get("phase") not in PHASES:
            raise ValueError(f"names no phase of a run ({', '.join(PHASES)})")
        step = state.get("phase_step")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= config.meta_steps:
            raise ValueError(f"has no phase_step from 0 to meta_steps={config.meta_steps}")
        missing = [key for key in ("optimizer", "scheduler", "rng") if not isinstance(state.get(key), dict)]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")

    return check


def restore(pm: PerkModel, ftic_adapter: torch.Tensor | None, checkpoint: Checkpoint) -> None:
    """Load a checkpoint's tensors (checked: names, shapes, finite values) into the live ones."""
    load_tensors(all_tensors(pm, ftic_adapter), checkpoint.tensors, source=str(checkpoint.path))


def make_problems(config: TrainConfig, adapted: AdaptedModel) -> tuple[list[dict], list[dict]]:
    """(training, held-out) problems: generated, or read from data.train_file / data.eval_file;
    as support-then-answer targets with data.support_targets.

    Every problem the run will use is checked here, before anything is written: none of the sets is
    empty, and each problem's rows fit the model window (its question prompt and its answer for
    training, its question prompt and the answer length limit for the evaluation); a problem that
    does not is a UsageError naming where it is (``file:line``), not a failure mid-training."""
    data = config.data
    tokenizer = adapted.tokenizer
    kwargs = dict(order_markers=data.order_markers, doc_index=data.doc_index)

    def generated(n: int, seed: int) -> list[tuple[str, dict]]:
        problems = generate(data.task, n, data.context_tokens, tokenizer, seed=seed, **kwargs)
        return [(f"generated {data.task} problem {i} (seed {seed})", p.to_json()) for i, p in enumerate(problems)]

    if data.train_file is None:
        train = generated(data.train_problems, data.seed)
    else:
        # With an eval file only the first train_problems are used (the file is read no further);
        # without one, the last eval_problems of the whole file are held out.
        train = read_located_problems(data.train_file, limit=data.train_problems if data.eval_file else None)
        if not train:
            raise UsageError(f"data.train_file {data.train_file} holds no problems: nothing to train on")
    if data.eval_file is not None:
        held_out = read_located_problems(data.eval_file, limit=data.eval_problems)
        if not held_out:
            raise UsageError(f"data.eval_file {data.eval_file} holds no problems: nothing to evaluate")
    elif data.train_file is not None:
        if len(train) <= data.eval_problems:
            raise UsageError(
                f"data.train_file holds {len(train)} problems, too few to hold out data.eval_problems="
                f"{data.eval_problems} of them: pass data.eval_file or a smaller data.eval_problems"
            )
        train, held_out = train[: -data.eval_problems], train[-data.eval_problems :]
    else:
        held_out = generated(data.eval_problems, data.seed + 1)
    train = train[: data.train_problems]
    if data.support_targets:
        train = [(where, with_support_target(p)) for where, p in train]
        held_out = [(where, with_support_target(p)) for where, p in held_out]
    budget = answer_budget(tokenizer, [p for _, p in held_out], config.max_new_tokens)
    for problems, answer_tokens in ((train, None), (held_out, budget)):
        for where, problem in problems:
            try:
                check_fits_window(adapted, problem, answer_tokens=answer_tokens)
            except ValueError as err:
                raise UsageError(f"{where}: {err}") from None
    return [p for _, p in train], [p for _, p in held_out]


def check_world_size(config: TrainConfig, launch: Launch) -> None:
    """Every process takes an equal share of a meta-batch: ``meta_batch`` must be a multiple of
    the world size (so at least as large)."""
    if config.meta_batch % launch.world_size:
        larger = -(-config.meta_batch // launch.world_size) * launch.world_size
        raise UsageError(
            f"meta_batch={config.meta_batch} is not a multiple of the world size ({launch.world_size} processes): "
            f"each process takes an equal share of every meta-batch; use meta_batch={larger} or a number of "
            f"processes that divides {config.meta_batch}"
        )


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args, config = parse_args(argv)
    explicit = {k[4:] for k in vars(args) if k.startswith("cfg:")} | ({"config"} if args.config else set())
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
