"""python -m perk.check_meta_grad — is the meta-gradient right for this model, config, dtype and state?

    python -m perk.check_meta_grad [--config run.yaml] [--model M] [--base_dtype bfloat16] [--perk.rank 8 ...]
    python -m perk.check_meta_grad --checkpoint runs/NAME     # a finished run's config and meta-parameters

Run it before a long meta-training, and on a trained run's state. It takes the options of
``perk.train`` (the same flags and YAML files, so the check sees the model, dtype and engine
settings the run uses), or with ``--checkpoint`` a finished ``perk.train`` run's config and its
meta-parameters (θ and the inner rates: the state users actually train in). It generates
``--problems`` problems of the training task and, for each one alone, compares every
meta-gradient mode computed with the base model in the run's dtype against the reference:
``exact`` (autograd double backward) in float32 on the same weights (rounded to the run's dtype,
so the check isolates compute precision). Per mode it prints the median, 10th percentile and
minimum over the problems of the cosine of the adapter init θ's gradient and of the inner rates',
and the median relative error ``‖g − g_ref‖/‖g_ref‖``, for

* ``exact`` in the run's dtype: the ceiling that dtype allows;
* ``fd`` at its step (automatic, or ``perk.fd_epsilon``) and at ``--fd_scales`` times it (how
  robust the finite difference is to its step);
* ``first_order``: what ignoring the Hessian costs.

It also prints the reference's stability (:func:`reference_stability`, one more fp32 ``exact`` per
problem) and counts the problems where it is below 0.9: there the meta-gradient turns within a bf16
rounding of the state, and a low cosine is not precision a costlier mode would recover. On a CPU
without native bf16 the checked model's bf16 products run as fp32 GEMMs rounded to bf16
(:mod:`perk.bf16_emulation`, a native bf16 GEMM's numerics), where torch's own are tens of times slower.

It exits 1 when the 10th percentile of the θ cosine of the run's own mode (``perk.meta_grad``, at
its own step) is below ``--min_cosine``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from pathlib import Path

import torch

import perk.meta_gradient as meta_gradient_module
from perk.cli import (
    ArgumentParser,
    UsageError,
    add_config_arguments,
    build_config,
    positive_int,
    run_main,
)
from perk.bf16_emulation import emulate_bf16_matmuls
from perk.engine import PerkModel, load_tensors, read_pretrained
from perk.models import cpu_has_native_bf16, load_base_model, resolve_base_dtype
from perk.config import TrainConfig
from perk.runs import PERK_DIR, RESOLVED_CONFIG, read_run_config, resolve_device
from perk.tasks import generate

PARAMETERS = ("adapter_init", "inner_lr_log")
# reference_stability moves every meta-parameter entry by up to this fraction: bf16's rounding
STABILITY_MOVE = 2 ** -8
# below this stability a problem's reference turns within a bf16 rounding of the state
UNSTABLE_BELOW = 0.9


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()  # an fp32 dot of 10⁶ terms can exceed the product of the norms
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(torch.finfo(a.dtype).tiny))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny))


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (q in [0, 1]) by linear interpolation between order statistics."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def fd_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}") from None
    if any(not s > 0 for s in scales):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}")
    return scales


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, TrainConfig]:
    parser = ArgumentParser(prog="python -m perk.check_meta_grad", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a finished perk.train run directory: check its config and its meta-parameters")
    parser.add_argument("--config", metavar="FILE.yaml", help="a perk.train config (e.g. a run's config.yaml)")
    parser.add_argument("--min_cosine", type=float, default=0.95,
                        help="fail when the 10th percentile of the run's mode's θ cosine is below this (default: 0.95)")
    parser.add_argument("--context_tokens", type=int, default=None,
                        help="context length of the check problems (default: 2 segments, at least 256 tokens)")
    parser.add_argument("--problems", type=positive_int, default=4,
                        help="problems checked, one at a time (default: 4)")
    parser.add_argument("--fd_scales", type=fd_scales, default=(0.5, 2.0),
                        help="also run fd at these multiples of its step (default: 0.5,2; empty: none)")
    add_config_arguments(parser, TrainConfig)
    args = parser.parse_args(argv)
    defaults = None
    if args.checkpoint is not None:
        if args.config:
            raise UsageError("--checkpoint takes the run's config: pass --config or --checkpoint, not both")
        if not (args.checkpoint / PERK_DIR).is_dir() or not (args.checkpoint / RESOLVED_CONFIG).is_file():
            raise UsageError(f"--checkpoint {args.checkpoint}: not a finished perk.train run "
                             f"(no {PERK_DIR}/ or {RESOLVED_CONFIG})")
        defaults = read_run_config(args.checkpoint)
    config = build_config(TrainConfig, args, defaults)
    if not 0.0 < args.min_cosine <= 1.0:
        raise UsageError(f"--min_cosine must be in (0, 1], got {args.min_cosine}")
    if args.context_tokens is not None and args.context_tokens < 8:
        raise UsageError(f"--context_tokens must be >= 8, got {args.context_tokens}")
    return args, config


def saved_meta_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    try:
        _, _, tensors = read_pretrained(run_dir / PERK_DIR)
    except (OSError, ValueError) as err:
        raise UsageError(f"--checkpoint {run_dir}: damaged {PERK_DIR}/ ({err})") from None
    return tensors


def perk_models(config: TrainConfig, dtype: torch.dtype, device: str,
                saved: dict[str, torch.Tensor] | None) -> tuple[PerkModel, PerkModel]:
    """(reference, checked): the run's PERK model with its base in fp32 and in ``dtype``, on the
    same ``dtype``-rounded weights, with the saved meta-parameters when given."""
    base, tokenizer = load_base_model(config.model, dtype=dtype, device=device)
    models = []
    for model in (copy.deepcopy(base).float(), base):
        pm = PerkModel.from_base(model, tokenizer, dataclasses.replace(config.perk))
        if saved is not None:
            try:
                load_tensors(pm.meta_parameters(), saved, source=f"{PERK_DIR}/")
            except ValueError as err:
                raise UsageError(f"--checkpoint does not fit base model {config.model}: {err}") from None
        models.append(pm)
    return models[0], models[1]


def gradient(model: PerkModel, problem: dict, mode: str, epsilon: float | None, scale: float) -> tuple[dict, float]:
    """One problem's meta-gradient in ``mode``, fd at ``scale`` times its step; and its seconds."""
    model.config.meta_grad, model.config.fd_epsilon = mode, None if epsilon is None else epsilon * scale
    with meta_gradient_module.scaled_fd_step(scale if epsilon is None else 1.0):
        start = time.perf_counter()
        _, grads, _ = model.meta_gradient([problem])
        return grads, time.perf_counter() - start


def reference_stability(reference: PerkModel, problem: dict, want: dict[str, torch.Tensor],
                        seed: int = 0) -> dict[str, float]:
    """How far ``reference``'s ``exact`` meta-gradient moves when its meta-parameters move by a bf16
    rounding: the cosine, per parameter, of ``exact`` with every entry scaled by (1 + 2⁻⁸·u),
    u ~ U(-1, 1), to ``want`` (``exact`` at the current state; the state is restored after). Near 1
    the meta-gradient is smooth at bf16's resolution, so a low cosine of a bf16 mode is lost
    precision; far below 1 it turns within a bf16 rounding of the state, and no bf16 computation of
    the inner loop can be expected to reproduce it."""
    generator = torch.Generator().manual_seed(seed)
    params = reference.meta_parameters()
    saved = {k: v.detach().clone() for k, v in params.items()}
    with torch.no_grad():
        for v in params.values():
            u = 2 * torch.rand(v.shape, generator=generator, dtype=v.dtype) - 1
            v.mul_(1 + STABILITY_MOVE * u.to(v.device))
    try:
        moved, _ = gradient(reference, problem, "exact", None, 1.0)
    finally:
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(saved[k])
    return {k: cosine(moved[k], want[k]) for k in PARAMETERS}


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv)
    device = resolve_device(config.device)
    dtype = resolve_base_dtype(config.base_dtype, device)
    saved = None if args.checkpoint is None else saved_meta_parameters(args.checkpoint)
    state = f"the meta-parameters of {args.checkpoint}" if saved is not None else "meta-parameters at their init"
    print(f"perk.check_meta_grad: {config.model}, base model in {str(dtype)[6:]} on {device}, {state}; "
          f"reference: exact in float32 on the same weights", flush=True)
    # Without native bf16 a CPU's bf16 matmuls are tens of times slower than fp32; there they run as
    # fp32 GEMMs rounded to bf16, a native bf16 GEMM's numerics (perk.bf16_emulation).
    emulated = dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not cpu_has_native_bf16()
    if emulated:
        print("this CPU has no native bf16: bf16 matrix products run as fp32 GEMMs rounded to bf16 "
              "(perk.bf16_emulation), the numerics of a native bf16 GEMM", flush=True)
    reference, checked = perk_models(config, dtype, device, saved)
    tokens = args.context_tokens or max(256, 2 * config.perk.segment_len)
    problems = [p.to_json() for p in generate(config.data.task, args.problems, tokens, reference.tokenizer,
                                              seed=config.data.seed)]
    epsilon = config.perk.fd_epsilon
    modes = [("exact", None, 1.0), ("fd", epsilon, 1.0)]
    modes += [("fd", epsilon, s) for s in args.fd_scales if s != 1.0]
    modes += [("first_order", None, 1.0)]
    results: dict[tuple, list[dict]] = {m: [] for m in modes}
    stability = []
    for problem in problems:
        want, _ = gradient(reference, problem, "exact", None, 1.0)
        stability.append(reference_stability(reference, problem, want))
        for mode in modes:
            with emulate_bf16_matmuls(emulated):
                got, seconds = gradient(checked, problem, *mode)
            results[mode].append({
                **{f"cosine {k}": cosine(got[k], want[k]) for k in PARAMETERS},
                **{f"rel_error {k}": relative_error(got[k], want[k]) for k in PARAMETERS},
                "seconds": seconds,
            })

    print(f"\n{config.data.task}, {tokens}-token contexts, {args.problems} problem(s), one at a time; rank "
          f"{config.perk.rank}, N={config.perk.inner_steps}, T={config.perk.unroll_steps}, "
          f"{config.perk.inner_optimizer}, clip {config.perk.inner_max_grad_norm}, segments of "
          f"{config.perk.segment_len}\n")
    print("| mode | fd step | cosine θ: median | p10 | min | rel. error θ: median "
          "| cosine rates: median | p10 | min | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (mode, eps, scale), rows in results.items():
        step = "-" if mode != "fd" else ("auto" if eps is None else f"{eps:g}") + ("" if scale == 1.0 else f" x{scale:g}")
        cells = []
        for k in PARAMETERS:
            values = [r[f"cosine {k}"] for r in rows]
            cells += [f"{statistics.median(values):.4f}", f"{percentile(values, 0.1):.4f}", f"{min(values):.4f}"]
            if k == "adapter_init":
                cells.append(f"{statistics.median(r[f'rel_error {k}'] for r in rows):.3g}")
        seconds = statistics.mean(r["seconds"] for r in rows)
        print(f"| {mode} | {step} | {' | '.join(cells)} | {seconds:.1f} |", flush=True)

    theta_stability = [s["adapter_init"] for s in stability]
    unstable = [i for i, value in enumerate(theta_stability) if value < UNSTABLE_BELOW]
    print(f"\nstability of the reference (cosine of float32 exact at a bf16-sized move of the state to itself, θ): "
          f"median {statistics.median(theta_stability):.4f}, min {min(theta_stability):.4f}")
    mode = config.perk.meta_grad
    own = results[mode, epsilon if mode == "fd" else None, 1.0]
    judged = percentile([r["cosine adapter_init"] for r in own], 0.1)
    ok = judged >= args.min_cosine
    print(f"the run's mode ({mode}): 10th percentile of the θ cosine over {args.problems} problem(s) {judged:.4f}, "
          f"{'at or above' if ok else 'BELOW'} --min_cosine {args.min_cosine}")
    if unstable:
        below = sum(own[i]["cosine adapter_init"] < args.min_cosine for i in unstable)
        print(f"on {len(unstable)} problem(s) the reference itself turns within a bf16 rounding of the state "
              f"(stability below {UNSTABLE_BELOW}; {below} of them below --min_cosine): there the meta-gradient is "
              "not a smooth function of the state at bf16's resolution, and no precision of the bf16 passes "
              "recovers it (a float32 base model, --base_dtype float32, follows the float32 one)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog="perk.check_meta_grad"))
