"""Convergence of meta-training with bf16 meta-gradients: does it follow the fp32 exact curve?

    python -m benchmarks.meta_grad_convergence [--steps 30] [--batch 4] [--held_out 8] [--max_minutes 9]

Meta-trains PERK on the embedded SmolLM2-135M (real weights) in ``perk.train``'s engine
configuration (rank 16, N=4 SGD steps clipped at 1.0, T=1, inner lr 0.7, 128-token segments) on
generated babilong/qa1 problems of 256 tokens, from the same initialisation, on the same sequence of
meta-batches, with the same Adam settings (a linear warm-up, then a constant rate, so that a study
can be extended by more steps; global gradient-norm clipping at 1.0 as in ``perk.train``), in three arms:

* ``exact-fp32``: the reference, ``exact`` double backward with the base model in fp32;
* ``fd-bf16``: the default, ``fd`` with the automatic step on a bf16 base model;
* ``first_order-bf16``: no Hessian term, bf16 base model.

After every step each arm's meta-parameters are scored by the same fp32 judge: the meta-loss on a
fixed held-out set (another seed), so the curves differ only by the meta-gradients that made them;
at the end, the held-out exact match of greedy answers. The arms advance step by step together, and
the run is resumable: each arm's meta-parameters and Adam state are saved after every step under
``--work`` and every result is a line of ``progress.jsonl`` there, so ``--max_minutes`` can cut it
into chunks (rerun the same command to continue). When every arm is done it writes
``meta-grad-convergence.{json,md,png}`` under ``--out`` and README.md's generated section
(``--report`` writes them from the steps every arm has finished so far, marked partial): the
tolerance is the mean absolute gap to the reference curve ≤ 5% of the reference's drop (start to
its lowest point).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.report import (
    README,
    cpu_name,
    git_commit,
    markdown_table,
    write_readme_section,
)
from perk import PerkModel
from perk.config import TrainConfig
from perk.models import load_base_model
from perk.tasks import generate
from perk.tasks.scoring import exact_match

ARMS = {  # name: (base dtype, meta_grad)
    "exact-fp32": (torch.float32, "exact"),
    "fd-bf16": (torch.bfloat16, "fd"),
    "first_order-bf16": (torch.bfloat16, "first_order"),
}
REFERENCE, DEFAULT = "exact-fp32", "fd-bf16"
TOLERANCE = 0.05  # mean |gap| to the reference curve, as a fraction of the reference's drop
RESULTS = Path(__file__).resolve().parent / "results"
# options of one invocation, not of the study (--steps may also grow between chunks)
INVOCATION_OPTIONS = ("max_minutes", "work", "out", "report")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="meta-steps of every arm")
    parser.add_argument("--batch", type=int, default=4, help="problems per meta-step")
    parser.add_argument("--held_out", type=int, default=8, help="held-out problems of the per-step meta-loss")
    parser.add_argument("--context_tokens", type=int, default=256)
    parser.add_argument("--meta_lr", type=float, default=1e-3, help="Adam rate of the adapter init")
    parser.add_argument("--rates_meta_lr", type=float, default=3e-3, help="Adam rate of the log inner rates")
    parser.add_argument("--warmup", type=int, default=3, help="linear warm-up steps (then a constant rate)")
    parser.add_argument("--max_minutes", type=float, default=None, help="stop (resumably) after about this long")
    parser.add_argument("--work", type=Path, default=Path("runs/meta-grad-convergence"), help="resumable state")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true",
                        help="only write the report from --work's progress (of the steps every arm finished)")
    return parser.parse_args(argv)


class Arm:
    """One arm's meta-parameters, Adam state and schedule, saved after every step."""

    def __init__(self, name: str, model: PerkModel, args: argparse.Namespace):
        self.name, self.model = name, model
        self.mode = ARMS[name][1]
        self.params = {k: v.detach().clone().requires_grad_() for k, v in model.meta_parameters().items()}
        self.optimizer = torch.optim.Adam([
            {"params": [self.params["adapter_init"]], "lr": args.meta_lr},
            {"params": [self.params["inner_lr_log"]], "lr": args.rates_meta_lr},
        ])
        warmup = args.warmup
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        self.path = args.work / f"{name}.pt"
        if self.path.exists():
            state = torch.load(self.path, weights_only=True)
            with torch.no_grad():
                for k, v in self.params.items():
                    v.copy_(state["params"][k])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])

    def load_into(self, model: PerkModel) -> None:
        with torch.no_grad():
            for k, v in model.meta_parameters().items():
                v.copy_(self.params[k])

    def step(self, batch: list[dict]) -> tuple[float, float]:
        """One Adam step on ``batch``; (training meta-loss, gradient norm before clipping)."""
        self.load_into(self.model)
        self.model.config.meta_grad = self.mode
        loss, grads, _ = self.model.meta_gradient(batch)
        for k, v in self.params.items():
            v.grad = grads[k].to(v.dtype)
        norm = float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), 1.0))
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        state = {"params": {k: v.detach() for k, v in self.params.items()},
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        torch.save(state, self.path.with_suffix(".tmp"))
        self.path.with_suffix(".tmp").replace(self.path)
        return float(loss), norm


def held_out_exact_match(judge: PerkModel, problems: list[dict]) -> float:
    memory = judge.encode([p["context"] for p in problems])
    answers = judge.answer(memory, [p["question"] for p in problems], max_new_tokens=8)
    return sum(exact_match(a, p["answer"]) for a, p in zip(answers, problems)) / len(problems)


def read_progress(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    progress_file = args.work / "progress.jsonl"
    # --steps may grow between chunks: problem i of a seed does not depend on how many are generated.
    settings = {k: v for k, v in vars(args).items() if k not in ("steps", *INVOCATION_OPTIONS)}
    settings_file = args.work / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != json.loads(json.dumps(settings, default=str)):
        raise SystemExit(f"{args.work} holds a study with other settings; remove it or pass another --work")
    settings_file.write_text(json.dumps(settings, default=str, indent=2))
    progress = read_progress(progress_file)
    if args.report:
        write_report(args, progress)
        return 0

    def record(entry: dict) -> None:
        progress.append(entry)
        with progress_file.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def done(arm: str, step: int, kind: str = "step") -> bool:
        return any(p["arm"] == arm and p["step"] == step and p["kind"] == kind for p in progress)

    fp32, tokenizer = load_base_model("smollm2-135m", dtype=torch.float32)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    config = TrainConfig().perk
    models = {torch.float32: PerkModel.from_base(fp32, tokenizer, config),
              torch.bfloat16: PerkModel.from_base(bf16, tokenizer, dataclasses.replace(config))}
    judge = models[torch.float32]
    problems = [p.to_json() for p in generate("babilong/qa1", args.batch * args.steps, args.context_tokens, tokenizer, seed=0)]
    batches = [problems[args.batch * i : args.batch * (i + 1)] for i in range(args.steps)]
    held_out = [p.to_json() for p in generate("babilong/qa1", args.held_out, args.context_tokens, tokenizer, seed=1)]
    arms = {name: Arm(name, models[dtype], args) for name, (dtype, _) in ARMS.items()}

    def held_out_loss(arm: Arm) -> float:
        arm.load_into(judge)
        return float(judge.meta_loss(held_out)[0])

    if not done(REFERENCE, 0, "held_out"):  # every arm starts from the same meta-parameters
        loss = held_out_loss(arms[REFERENCE])
        for name in ARMS:
            record({"arm": name, "step": 0, "kind": "held_out", "held_out_loss": loss})
    for step in range(1, args.steps + 1):
        for name, arm in arms.items():
            if done(name, step):
                continue
            if args.max_minutes is not None and time.perf_counter() - start > 60 * args.max_minutes:
                print(f"stopping after {args.max_minutes} min; rerun the same command to continue", flush=True)
                return 0
            t0 = time.perf_counter()
            train_loss, norm = arm.step(batches[step - 1])
            t1 = time.perf_counter()
            loss = held_out_loss(arm)
            record({"arm": name, "step": step, "kind": "step", "train_loss": train_loss, "grad_norm": norm,
                    "held_out_loss": loss, "step_seconds": t1 - t0, "eval_seconds": time.perf_counter() - t1})
            print(f"{name} step {step}: train {train_loss:.4f}, held-out {loss:.4f}, |g| {norm:.3g}, "
                  f"{t1 - t0:.0f}+{time.perf_counter() - t1:.0f} s", flush=True)
    for name, arm in arms.items():
        if not done(name, args.steps, "exact_match"):
            arm.load_into(judge)
            record({"arm": name, "step": args.steps, "kind": "exact_match",
                    "exact_match": held_out_exact_match(judge, held_out)})
    write_report(args, progress)
    return 0


def completed_steps(progress: list[dict]) -> int:
    """The last step every arm has finished (the steps before it too)."""
    finished = {(p["arm"], p["step"]) for p in progress if p["kind"] == "step"}
    step = 0
    while all((name, step + 1) in finished for name in ARMS):
        step += 1
    return step


def write_report(args: argparse.Namespace, progress: list[dict], readme: Path = README) -> dict:
    """json + md + png, and README.md's ``meta-grad-convergence`` section, from the progress
    lines: of the steps every arm has finished (a partial study says so). Returns the summary."""
    if not progress:
        raise SystemExit(f"no progress under {args.work}: run the study first (the same command without --report)")
    steps = completed_steps(progress)
    curves = {name: [None] * (steps + 1) for name in ARMS}
    matches, seconds = {}, {name: [] for name in ARMS}
    for p in progress:
        if p["kind"] in ("step", "held_out") and p["step"] <= steps:
            curves[p["arm"]][p["step"]] = p["held_out_loss"]
        if p["kind"] == "step" and p["step"] <= steps:
            seconds[p["arm"]].append(p["step_seconds"])
        if p["kind"] == "exact_match" and p["step"] == steps:
            matches[p["arm"]] = p["exact_match"]
    reference = curves[REFERENCE]
    drop = reference[0] - min(reference)
    if drop <= 0:
        raise SystemExit(f"the reference's held-out meta-loss did not decrease over {steps} steps: nothing to track")
    gaps = {name: sum(abs(a - b) for a, b in zip(curve, reference)) / len(curve) / drop for name, curve in curves.items()}
    drops = {name: (curve[0] - min(curve)) / drop for name, curve in curves.items()}
    commit = git_commit()
    # the study's command (a --report rerun writes the same files from its progress)
    command = "python -m benchmarks.meta_grad_convergence " + " ".join(a for a in sys.argv[1:] if a != "--report")
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    date = datetime.date.today().isoformat()
    partial = steps < args.steps
    summary = {"steps": steps, "partial": partial, "gap_over_drop": gaps, "drop_over_reference_drop": drops,
               "exact_match": matches, "mean_step_seconds": {k: sum(v) / len(v) for k, v in seconds.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "meta-grad-convergence"
    settings = {k: v for k, v in vars(args).items() if k not in INVOCATION_OPTIONS}
    stem.with_suffix(".json").write_text(json.dumps(
        {"date": date, "commit": commit, "command": command, "machine": machine, "settings": settings,
         "perk_config": dataclasses.asdict(TrainConfig().perk), "curves": curves, **summary,
         "tolerance": TOLERANCE, "progress": progress}, indent=1, default=str))
    title = f"Meta-training with bf16 meta-gradients vs fp32 exact ({date}, commit {commit})"
    setup = (
        f"`{command}` on {machine}. SmolLM2-135M (real weights), `perk.train`'s engine configuration (rank 16, "
        f"N=4 SGD steps clipped at 1.0, T=1, inner lr 0.7, 128-token segments); {steps} Adam meta-steps"
        + (f" (**partial: {steps} of {args.steps}**)" if partial else "")
        + f" (θ {args.meta_lr:g}, log-rates {args.rates_meta_lr:g}, {args.warmup} warm-up steps then constant, "
        f"gradient norm clipped at 1.0) on the same meta-batches of {args.batch} babilong/qa1 problems "
        f"of {args.context_tokens} tokens for every arm. Every curve value is the fp32 meta-loss of the arm's "
        f"meta-parameters on the same {args.held_out} held-out problems (seed 1).")
    tolerance = (f"Tolerance: mean |gap| to the reference curve ≤ {TOLERANCE:.0%} of the reference's drop "
                 f"({drop:.4f} nats, start to its lowest point).")
    rows = []
    for name, curve in curves.items():
        within = "reference" if name == REFERENCE else ("yes" if gaps[name] <= TOLERANCE else "no")
        match = f"{matches[name]:.3f}" if name in matches else "–"
        rows.append([name, f"{curve[0]:.4f}", f"{min(curve):.4f}", f"{curve[-1]:.4f}", f"{drops[name]:.2f}",
                     f"{gaps[name]:.3f}", within, match, f"{summary['mean_step_seconds'][name]:.0f}"])
    table = markdown_table(["arm", "start", "lowest", "end", "drop / reference's", "mean gap / drop",
                            "within tolerance", "held-out exact match", "s / meta-step"], rows)
    verdicts = [f"{name}: mean gap {gaps[name]:.1%} of the reference's drop, "
                f"{'within' if gaps[name] <= TOLERANCE else 'outside'} the {TOLERANCE:.0%} tolerance; "
                f"it reaches {drops[name]:.0%} of the reference's drop." for name in ARMS if name != REFERENCE]
    per_step = markdown_table(["step", *ARMS], [[str(s), *(f"{curves[n][s]:.4f}" for n in ARMS)] for s in range(steps + 1)])
    stem.with_suffix(".md").write_text("\n\n".join([f"# {title}", setup, tolerance, table, "\n".join(verdicts), per_step]) + "\n")
    write_readme_section("meta-grad-convergence", "\n\n".join([
        f"Generated by `{command}` (commit {commit}, {date}; {machine}) into "
        "[benchmarks/results/meta-grad-convergence.md](benchmarks/results/meta-grad-convergence.md)"
        + (f", **partial: {steps} of {args.steps} steps**" if partial else "") + ".",
        tolerance, table, "\n".join(f"- {v}" for v in verdicts),
        "![held-out meta-loss per meta-step, three arms](benchmarks/results/meta-grad-convergence.png)"]), readme)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        axes.plot(range(len(curve)), curve, marker="o", markersize=3, label=name)
    axes.set(xlabel="meta-step", ylabel=f"held-out meta-loss (fp32, {args.held_out} problems)",
             title="Meta-training: bf16 meta-gradients vs fp32 exact")
    axes.legend()
    figure.tight_layout()
    figure.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(figure)
    print(table + "\n" + "\n".join(verdicts))
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
