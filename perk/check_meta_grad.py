"""python -m perk.check_meta_grad — is the meta-gradient right for this model, config and dtype?

    python -m perk.check_meta_grad [--config run.yaml] [--model M] [--base_dtype bfloat16] [--perk.rank 8 ...]

Run it before a long meta-training. It takes the options of ``perk.train`` (the same flags and
YAML files, so the check sees the model, dtype and engine settings the run will use), builds a
small problem of the training task, and compares every meta-gradient mode computed in the run's
base-model dtype with the reference: ``exact`` (autograd double backward) on the same model in
float32 with eager attention. It prints the cosine and the relative error ``‖g − g_ref‖/‖g_ref‖``
of the adapter init θ and of the inner learning rates for

* ``exact`` in the run's dtype: the ceiling that dtype allows;
* ``fd`` with the automatic step (and with ``perk.fd_epsilon`` when the config sets one);
* ``first_order``: what ignoring the Hessian costs.

It exits 1 when the run's own mode (``perk.meta_grad``) has a cosine below ``--min_cosine`` for θ.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from perk.cli import (
    ArgumentParser,
    UsageError,
    add_config_arguments,
    build_config,
    positive_int,
    run_main,
)
from perk.engine import PerkModel
from perk.models import load_base_model, resolve_base_dtype
from perk.runs import TrainConfig, resolve_device
from perk.tasks import generate

PARAMETERS = ("adapter_init", "inner_lr_log")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()  # an fp32 dot of 10⁶ terms can exceed the product of the norms
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(torch.finfo(a.dtype).tiny))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny))


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, TrainConfig]:
    parser = ArgumentParser(prog="python -m perk.check_meta_grad", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", metavar="FILE.yaml", help="a perk.train config (e.g. a run's config.yaml)")
    parser.add_argument("--min_cosine", type=float, default=0.95,
                        help="fail below this cosine of the run's mode to the reference (default: 0.95)")
    parser.add_argument("--context_tokens", type=int, default=None,
                        help="context length of the check problem (default: 2 segments, at least 256 tokens)")
    parser.add_argument("--problems", type=positive_int, default=1, help="problems in the check's meta-batch (default: 1)")
    add_config_arguments(parser, TrainConfig)
    args = parser.parse_args(argv)
    config = build_config(TrainConfig, args)
    if not 0.0 < args.min_cosine <= 1.0:
        raise UsageError(f"--min_cosine must be in (0, 1], got {args.min_cosine}")
    if args.context_tokens is not None and args.context_tokens < 8:
        raise UsageError(f"--context_tokens must be >= 8, got {args.context_tokens}")
    return args, config


def perk_model(config: TrainConfig, dtype: torch.dtype, device: str, meta_grad: str) -> PerkModel:
    """The run's PERK model with its base in ``dtype`` and the meta-gradient mode ``meta_grad``."""
    model, tokenizer = load_base_model(config.model, dtype=dtype, device=device)
    return PerkModel.from_base(model, tokenizer, dataclasses.replace(config.perk, meta_grad=meta_grad))


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv)
    device = resolve_device(config.device)
    dtype = resolve_base_dtype(config.base_dtype, device)
    print(f"perk.check_meta_grad: {config.model}, base model in {str(dtype)[6:]} on {device}; "
          f"reference: exact in float32", flush=True)

    reference = perk_model(config, torch.float32, device, "exact")
    tokens = args.context_tokens or max(256, 2 * config.perk.segment_len)
    problems = [p.to_json() for p in generate(config.data.task, args.problems, tokens, reference.tokenizer,
                                              seed=config.data.seed)]
    _, want, _ = reference.meta_gradient(problems)
    del reference

    checked = perk_model(config, dtype, device, "exact")
    modes = [("exact", None), ("fd", None), ("first_order", None)]
    if config.perk.fd_epsilon is not None:
        modes.insert(2, ("fd", config.perk.fd_epsilon))
    print(f"\n{config.data.task}, {tokens}-token context, {args.problems} problem(s); rank {config.perk.rank}, "
          f"N={config.perk.inner_steps}, T={config.perk.unroll_steps}, {config.perk.inner_optimizer}, "
          f"clip {config.perk.inner_max_grad_norm}\n")
    print("| mode | fd step | cosine θ | rel. error θ | cosine lr | rel. error lr | seconds |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for mode, epsilon in modes:
        checked.config.meta_grad, checked.config.fd_epsilon = mode, epsilon
        start = time.perf_counter()
        _, got, _ = checked.meta_gradient(problems)
        seconds = time.perf_counter() - start
        scores = {name: (cosine(got[name], want[name]), relative_error(got[name], want[name])) for name in PARAMETERS}
        results[mode, epsilon] = scores
        step = "-" if mode != "fd" else ("auto" if epsilon is None else f"{epsilon:g}")
        cells = " | ".join(f"{c:.4f} | {e:.3g}" for c, e in scores.values())
        print(f"| {mode} | {step} | {cells} | {seconds:.1f} |", flush=True)

    mode = config.perk.meta_grad
    judged = results[mode, config.perk.fd_epsilon if mode == "fd" else None]["adapter_init"][0]
    ok = judged >= args.min_cosine
    print(f"\nthe run's mode ({mode}): cosine {judged:.4f} to the reference, "
          f"{'at or above' if ok else 'BELOW'} --min_cosine {args.min_cosine}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog="perk.check_meta_grad"))
