"""Meta-training and FT-ICR training: the optimisation phases of a run (docs/design.md §7, §8).

A run (``python -m perk.train``) is a sequence of :class:`Phase` objects, PERK's meta-training then
the FT-ICR baseline: each is ``config.meta_steps`` Adam steps (:func:`run_phase`) on batches whose
problems are a pure function of the step (:func:`batch_indices`), with a warm-up then cosine
learning-rate schedule (:func:`lr_lambda`), checkpointed so that ``--resume`` continues exactly
(:func:`resumable_state`, :func:`restore`).

Distributed (:mod:`perk.distributed`): every process takes its share of each step's batch, one
all-reduce makes the loss and gradients those of the whole batch, so every process takes the same
step; rank 0 alone logs and checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from perk.checkpoint import Checkpoint, rng_state, save_checkpoint, set_rng_state
from perk.cli import UsageError
from perk.config import TrainConfig
from perk.distributed import SINGLE_PROCESS, Launch, all_reduce_mean, shard
from perk.engine import PerkModel, load_tensors
from perk.methods import ftic_batch, ftic_loss_and_grad
from perk.runs import PHASES, MetricsLog


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
