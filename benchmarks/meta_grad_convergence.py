"""Convergence check of the meta-gradient in bf16: does meta-training follow the fp32 exact curve?

    python benchmarks/meta_grad_convergence.py [--steps 8] [--batch 1] [--out benchmarks/results]

Meta-trains PERK on the embedded SmolLM2-135M (real weights) from the same initialisation, on the
same sequence of generated babilong/qa1 meta-batches, with the same Adam settings, in four ways:
the reference (``exact`` double backward, base model in fp32, eager attention), ``fd`` with the
automatic step on a bf16 base model (what ``perk.train`` runs on a GPU and, with a fast bf16
CPU, on the CPU), ``fd`` with the old fixed step 1e-3 on bf16, and ``first_order`` on bf16.
Every run's meta-parameters are scored after every step by the fp32 meta-loss on a fixed held-out
meta-batch, so the curves differ only by the meta-gradients that made them. Writes
``meta-grad-convergence-<date>.{json,md,png}``; the markdown states the tolerance and whether
each run met it (mean absolute gap to the reference curve ≤ 5% of the reference's total drop).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from perk import PerkConfig, PerkModel
from perk.models import load_base_model
from perk.tasks import generate

RUNS = {  # name: (base dtype, meta_grad, fd_epsilon)
    "exact-fp32 (reference)": (torch.float32, "exact", None),
    "fd-auto-bf16": (torch.bfloat16, "fd", None),
    "fd-1e-3-bf16": (torch.bfloat16, "fd", 1e-3),
    "first_order-bf16": (torch.bfloat16, "first_order", None),
}
TOLERANCE = 0.05  # mean |gap| to the reference curve, as a fraction of the reference's total drop
CONFIG = PerkConfig(rank=8, inner_steps=3, unroll_steps=2, segment_len=64, inner_lr=0.3, inner_max_grad_norm=1.0)


def perk_model(dtype: torch.dtype, meta_grad: str, fd_epsilon: float | None) -> PerkModel:
    model, tokenizer = load_base_model("smollm2-135m")
    config = dataclasses.replace(CONFIG, meta_grad=meta_grad, fd_epsilon=fd_epsilon)
    return PerkModel.from_base(model.to(dtype), tokenizer, config)


def meta_train(run: PerkModel, judge: PerkModel, batches: list[list[dict]], held_out: list[dict]) -> list[float]:
    """Adam steps on ``run``'s meta-parameters; after each, the fp32 meta-loss of ``judge`` (the
    same meta-parameters copied into a fp32 model) on ``held_out``."""
    params = run.meta_parameters()
    optimizer = torch.optim.Adam([
        {"params": [params["adapter_init"]], "lr": 3e-3},
        {"params": [params["inner_lr_log"]], "lr": 1e-2},
    ])

    def score() -> float:
        with torch.no_grad():
            for name, tensor in judge.meta_parameters().items():
                tensor.copy_(params[name])
        return float(judge.meta_loss(held_out)[0])

    curve = [score()]
    for batch in batches:
        _, grads, _ = run.meta_gradient(batch)
        optimizer.zero_grad()
        for name, tensor in params.items():
            tensor.grad = grads[name]
        optimizer.step()
        curve.append(score())
        print(f"  step {len(curve) - 1}: held-out meta-loss {curve[-1]:.4f}", flush=True)
    return curve


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1, help="problems per meta-step")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.manual_seed(0)
    _, tokenizer = load_base_model("smollm2-135m")
    problems = [p.to_json() for p in generate("babilong/qa1", args.batch * args.steps, 256, tokenizer, seed=0)]
    batches = [problems[args.batch * i : args.batch * (i + 1)] for i in range(args.steps)]
    held_out = [p.to_json() for p in generate("babilong/qa1", 2, 256, tokenizer, seed=1)]
    judge = perk_model(torch.float32, "exact", None)

    curves, seconds = {}, {}
    for name, (dtype, mode, epsilon) in RUNS.items():
        print(f"{name}:", flush=True)
        start = time.perf_counter()
        curves[name] = meta_train(perk_model(dtype, mode, epsilon), judge, batches, held_out)
        seconds[name] = time.perf_counter() - start

    reference = curves["exact-fp32 (reference)"]
    drop = reference[0] - min(reference)
    gaps = {name: sum(abs(a - b) for a, b in zip(curve, reference)) / len(curve) / drop for name, curve in curves.items()}
    date = datetime.date.today().isoformat()
    command = "python benchmarks/meta_grad_convergence.py " + " ".join(sys.argv[1:])
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"meta-grad-convergence-{date}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"date": date, "command": command, "machine": machine, "config": dataclasses.asdict(CONFIG),
         "curves": curves, "seconds": seconds, "gap_over_drop": gaps, "tolerance": TOLERANCE}, indent=2))
    lines = [
        f"# Meta-gradient convergence in bf16 ({date})", "",
        f"`{command}` on {machine}. SmolLM2-135M (real weights), rank 8, N=3 SGD steps clipped at 1.0, T=2, "
        f"segments of 64 tokens; {args.steps} Adam meta-steps on meta-batches of {args.batch} babilong/qa1 problem(s) (256 tokens); "
        f"every curve is the fp32 meta-loss on 2 held-out problems after each step.", "",
        f"Tolerance: mean |gap| to the reference curve ≤ {TOLERANCE:.0%} of the reference's total drop "
        f"({drop:.4f} nats).", "",
        "| run | start | end | mean gap / drop | within tolerance | seconds |", "|---|---|---|---|---|---|",
    ]
    for name, curve in curves.items():
        within = "reference" if name.startswith("exact-fp32") else ("yes" if gaps[name] <= TOLERANCE else "no")
        lines.append(f"| {name} | {curve[0]:.4f} | {curve[-1]:.4f} | {gaps[name]:.3f} | {within} | {seconds[name]:.0f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        axes.plot(range(len(curve)), curve, marker="o", markersize=3, label=name)
    axes.set(xlabel="meta-step", ylabel="held-out meta-loss (fp32, nats)", title="Meta-training: bf16 vs fp32 exact")
    axes.legend()
    figure.tight_layout()
    figure.savefig(stem.with_suffix(".png"), dpi=120)
    print("\n".join(lines))
    return 0 if gaps["fd-auto-bf16"] <= TOLERANCE else 1


if __name__ == "__main__":
    raise SystemExit(main())
