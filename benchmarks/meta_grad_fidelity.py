"""Fidelity of bf16 meta-gradients as a distribution over problems, settings and meta-parameter states.

    python -m benchmarks.meta_grad_fidelity [--problems 5] [--max_minutes 9] [--trained STATE]
    python -m benchmarks.meta_grad_fidelity --report     # json + md summary, and README's table

Every case is one problem (one adapter) of a family — ``qa1`` (generated babilong/qa1, 256 tokens),
``student_records`` (generated student_records/recall, 256 tokens) or ``tiny`` (three short
documents, ~60 tokens in all, the shape of the fidelity test's problem) — in one setting:

* ``test``: the fidelity test's engine (rank 8, N=3 SGD steps, T=2, 32-token segments, inner lr
  0.3, no clipping);
* ``train``: ``perk.train``'s engine (rank 16, N=4, T=1, inner lr 0.7, clipping at 1.0, 128-token
  segments), and ``train-seg32`` the same with 32-token segments;

with the meta-parameters (θ, inner rates) at ``init`` (LoRA init, B = 0), ``B-perturbed`` (B ~
N(0, 0.02²), standing in for a meta-trained θ) or ``trained`` (the state of a real meta-training:
``--trained``: by default the accuracy study's exported meta-parameters after 80 meta-steps of
``perk.train``'s engine; or an arm's state of ``benchmarks.meta_grad_convergence``, or a finished
``perk.train`` run directory). The reference is ``exact`` with the base model in fp32 holding the same
bf16-rounded weights as the bf16 model, so every difference is bf16 compute. Against it, with the
base model in bf16: ``exact`` (the bf16 ceiling), ``fd`` at 0.5x, 1x and 2x its automatic step
(``fd`` at 1x being what the library runs: with its fp32 passes where :func:`perk.meta_gradient.float32_from`
chooses them), ``fd-bf16`` (``fd_float32="never"``: every pass in bf16, the behaviour before the fp32 passes),
``fd-fp32-last`` (``fd_float32="unrolled"``: the last T steps and what follows in fp32, forced) and ``first_order``: the cosine
and relative error of ∂L/∂θ and of the log-rates' gradient. Each case also records what explains
it: context tokens, the fp32 inner losses and inner gradient norms per step (clipping acts where
the norm exceeds the threshold), the fp32 meta-gradient's norm, and the share of it that
first_order misses (the Hessian term: ``‖g_exact − g_first_order‖ / ‖g_first_order‖`` in fp32).

Cases are appended to ``meta-grad-fidelity.jsonl`` one line each, so the run can be stopped and
resumed (``--max_minutes``; rerun the same command); ``--report`` summarises the lines.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import random
import statistics
import time
from pathlib import Path

import torch

import perk.meta_gradient as meta_gradient_module
from benchmarks.report import README, cpu_name, git_commit, write_readme_section
from perk import PerkConfig, PerkModel
from perk.bf16_emulation import emulate_bf16_matmuls
from perk.check_meta_grad import cosine, percentile, reference_stability, relative_error
from perk.config import TrainConfig
from perk.inner_loop import inner_loop
from perk.models import cpu_has_native_bf16, load_base_model
from perk.tasks import generate
from perk.tasks.io import write_jsonl

RESULTS = Path(__file__).resolve().parent / "results"
STEM = "meta-grad-fidelity"
FAMILIES = {"qa1": ("babilong/qa1", 256), "student_records": ("student_records/recall", 256), "tiny": (None, 60)}
TRAIN = TrainConfig().perk
SETTINGS = {
    "test": PerkConfig(rank=8, inner_steps=3, unroll_steps=2, segment_len=32, inner_lr=0.3),
    "train": TRAIN,
    "train-seg32": dataclasses.replace(TRAIN, segment_len=32),
}
THETAS = ("init", "B-perturbed", "trained")
FD_SCALES = (0.5, 1.0, 2.0)
B_SIGMA = 0.02
STABILITY_SEED = 7
# A case's seconds count as an idle machine's where the 1-minute load average after it is at most
# this: its own 2 threads on the 2 cores, nothing else (cases before load_average was recorded ran beside other jobs).
IDLE_LOAD = 2.5
# Without native bf16 dot products torch's bf16 CPU matmuls are tens of times slower than fp32 ones;
# there the bf16 products run as fp32 GEMMs with a native bf16 GEMM's rounding (perk.bf16_emulation).
EMULATED = not cpu_has_native_bf16()
BF16_MATMULS = "emulated (fp32 GEMMs, bf16 rounding)" if EMULATED else "torch"
PARAMETERS = ("adapter_init", "inner_lr_log")
README_MODES = ("exact", "default", "fd-bf16", "fd-fp32-last", "first_order")  # the README's table; the md has every mode
NAMES = ("Mary", "John", "Sandra", "Daniel", "Emma", "Oliver", "Lucy", "Peter")
PLACES = ("kitchen", "garden", "office", "hallway", "bedroom", "bathroom", "cellar", "garage")
VERBS = ("went to", "moved to", "travelled to", "journeyed to")


def tiny_problem(seed: int) -> dict:
    """Three documents of two movements each (~60 tokens in all); where is someone at the end?"""
    rng = random.Random(seed)
    names = rng.sample(NAMES, 3)
    where, documents = {}, []
    for _ in range(3):
        sentences = []
        for _ in range(2):
            name, place = rng.choice(names), rng.choice(PLACES)
            where[name] = place
            sentences.append(f"{name} {rng.choice(VERBS)} the {place}.")
        documents.append(" ".join(sentences))
    name = rng.choice(sorted(where))
    return {"context": documents, "question": f"Where is {name}?", "answer": where[name]}


def family_problems(family: str, n: int, tokenizer) -> list[dict]:
    task, tokens = FAMILIES[family]
    if task is None:
        return [tiny_problem(seed) for seed in range(n)]
    return [p.to_json() for p in generate(task, n, tokens, tokenizer, seed=0)]


def load_trained(path: Path) -> dict[str, torch.Tensor]:
    """Meta-parameters of a convergence-study arm state (``.pt``) or a finished perk.train run."""
    if path.suffix == ".pt":
        return torch.load(path, weights_only=True)["params"]
    from perk.checkpoint import read_safetensors
    from perk.runs import PERK_DIR

    return read_safetensors(path / PERK_DIR / "perk_meta.safetensors")


class Setting:
    """The fp32 reference and the bf16 model of one setting, on the same bf16-rounded weights."""

    def __init__(self, name: str, base, tokenizer):
        self.name, self.config = name, SETTINGS[name]
        rounded = copy.deepcopy(base).to(torch.bfloat16)
        self.reference = PerkModel.from_base(copy.deepcopy(rounded).to(torch.float32), tokenizer, dataclasses.replace(self.config))
        self.bf16 = PerkModel.from_base(rounded, tokenizer, dataclasses.replace(self.config))
        self.init = {k: v.detach().clone() for k, v in self.reference.meta_parameters().items()}

    def theta(self, kind: str, seed: int, trained: dict | None) -> dict[str, torch.Tensor] | None:
        if kind == "init":
            return self.init
        if kind == "trained":
            if trained is None or any(trained[k].shape != self.init[k].shape for k in PARAMETERS):
                return None
            return {k: trained[k].to(self.init[k].dtype) for k in PARAMETERS}
        params = {k: v.clone() for k, v in self.init.items()}
        layout, generator = self.reference.layout, torch.Generator().manual_seed(1000 + seed)
        for group in range(1, layout.n_groups, 2):  # B of every module
            start, end = layout.offsets[group], layout.offsets[group + 1]
            params["adapter_init"][start:end] = B_SIGMA * torch.randn(end - start, generator=generator)
        return params


def load_params(model: PerkModel, params: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, tensor in model.meta_parameters().items():
            tensor.copy_(params[name])


def gradient(model: PerkModel, problem: dict, mode: str, fd_float32: str = "auto", fd_scale: float = 1.0) -> tuple[dict, float]:
    model.config.meta_grad, model.config.fd_float32 = mode, fd_float32
    start = time.perf_counter()
    with meta_gradient_module.scaled_fd_step(fd_scale), emulate_bf16_matmuls(EMULATED and model.model.dtype == torch.bfloat16):
        _, grads, _ = model.meta_gradient([problem])
    return grads, time.perf_counter() - start


def inner_diagnostics(model: PerkModel, problem: dict) -> dict:
    """fp32 inner losses and inner gradient norms per step (‖d_n‖ = min(‖g_n‖, clip) for SGD)."""
    segments, _ = model._problem_batches([problem])
    with torch.no_grad():
        _, records, stats = inner_loop(model.adapted, model.config, model.adapter_init, model.inner_learning_rates(),
                                       segments, None, record_from=model.config.inner_steps)
    return {"context_tokens": segments.n_tokens, "inner_losses": stats.inner_losses[:, 0].tolist(),
            "inner_grad_norms": [float(r.direction.norm()) for r in records]}


def run_case(setting: Setting, problem: dict, params: dict) -> dict:
    """Every mode of one case against the fp32 reference."""
    load_params(setting.reference, params)
    load_params(setting.bf16, params)
    want, seconds = gradient(setting.reference, problem, "exact")
    case = {"reference_seconds": seconds, **inner_diagnostics(setting.reference, problem),
            "reference_stability": reference_stability(setting.reference, problem, want, STABILITY_SEED)}
    first_order, _ = gradient(setting.reference, problem, "first_order")
    case["reference_norm"] = {k: float(want[k].norm()) for k in PARAMETERS}
    case["hessian_share"] = {k: relative_error(want[k], first_order[k]) for k in PARAMETERS}
    modes = [("exact", "exact", 1.0, "auto")]
    modes += [(f"fd x{scale:g}", "fd", scale, "auto") for scale in FD_SCALES]
    modes += [("fd-bf16", "fd", 1.0, "never"), ("fd-fp32-last", "fd", 1.0, "unrolled"),
              ("first_order", "first_order", 1.0, "auto")]
    segments, _ = setting.bf16._problem_batches([problem])
    library_bf16_only = meta_gradient_module.float32_from(setting.bf16.adapted, setting.config, segments) is None
    case["modes"] = {}
    for name, mode, scale, fd_float32 in modes:
        if name == "fd-bf16" and library_bf16_only:  # the library's fd x1 is this very computation
            case["modes"][name] = dict(case["modes"]["fd x1"])
            continue
        got, seconds = gradient(setting.bf16, problem, mode, fd_float32, scale)
        case["modes"][name] = {
            **{f"cosine {k}": cosine(got[k], want[k]) for k in PARAMETERS},
            **{f"rel_error {k}": relative_error(got[k], want[k]) for k in PARAMETERS},
            "seconds": seconds,
        }
    return case


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=5, help="problems per family")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--thetas", default=",".join(THETAS))
    parser.add_argument("--trained", type=Path, default=Path("benchmarks/results/accuracy-study-perk"),
                        help="meta-parameters after real meta-training: a perk.train run or export (default: the "
                             "accuracy study's, 80 meta-steps of perk.train's engine) or a convergence arm's .pt")
    parser.add_argument("--max_minutes", type=float, default=None, help="stop (resumably) after about this long")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true", help="only summarise the cases run so far")
    parser.add_argument("--add_stability", action="store_true",
                        help="add reference_stability to the recorded cases (of the selected families, settings "
                             "and θs) that ran before it was measured")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    lines_file = args.out / f"{STEM}.jsonl"
    if args.report:
        write_report(args.out, [json.loads(line) for line in lines_file.read_text().splitlines()])
        return 0
    start = time.perf_counter()
    done = set()
    if lines_file.exists():
        done = {(c["family"], c["problem"], c["setting"], c["theta"]) for c in map(json.loads, lines_file.open())}
    base, tokenizer = load_base_model("smollm2-135m", dtype=torch.float32)
    trained = load_trained(args.trained) if args.trained.exists() else None
    commit = git_commit()
    problems = {f: family_problems(f, args.problems, tokenizer) for f in args.families.split(",")}
    if args.add_stability:
        add_stability(args, lines_file, base, tokenizer, trained, problems, commit)
        return 0
    for setting_name in args.settings.split(","):
        setting = None
        for theta in args.thetas.split(","):
            for family, family_list in problems.items():
                for index, problem in enumerate(family_list):
                    if (family, index, setting_name, theta) in done:
                        continue
                    if args.max_minutes is not None and time.perf_counter() - start > 60 * args.max_minutes:
                        print("time is up; rerun the same command to continue", flush=True)
                        return 0
                    setting = setting or Setting(setting_name, base, tokenizer)
                    params = setting.theta(theta, index, trained)
                    if params is None:
                        continue
                    case = {"family": family, "problem": index, "setting": setting_name, "theta": theta,
                            **run_case(setting, problem, params),
                            "commit": commit, "date": datetime.date.today().isoformat(),
                            "load_average": os.getloadavg()[0], "bf16_matmuls": BF16_MATMULS,
                            "machine": f"{cpu_name()}, {torch.get_num_threads()} threads"}
                    with lines_file.open("a") as f:
                        f.write(json.dumps(case) + "\n")
                    fd = case["modes"]["fd x1"]
                    print(f"{family} #{index} {setting_name} {theta}: fd cos θ {fd['cosine adapter_init']:.3f} "
                          f"rates {fd['cosine inner_lr_log']:.3f}; bf16-only "
                          f"{case['modes']['fd-bf16']['cosine adapter_init']:.3f}; exact-bf16 "
                          f"{case['modes']['exact']['cosine adapter_init']:.3f}; "
                          f"{time.perf_counter() - start:.0f} s", flush=True)
    return 0


def add_stability(args, lines_file: Path, base, tokenizer, trained, problems: dict, commit: str) -> None:
    """Measure :func:`reference_stability` for the selected recorded cases that lack it, rewriting
    the file after each (resumable like the run)."""
    cases = [json.loads(line) for line in lines_file.read_text().splitlines()]
    settings: dict[str, Setting] = {}
    for case in cases:
        if ("reference_stability" in case or case["setting"] not in args.settings.split(",")
                or case["theta"] not in args.thetas.split(",") or case["family"] not in problems
                or case["problem"] >= len(problems[case["family"]])):
            continue
        setting = settings.setdefault(case["setting"], Setting(case["setting"], base, tokenizer))
        problem, params = problems[case["family"]][case["problem"]], setting.theta(case["theta"], case["problem"], trained)
        load_params(setting.reference, params)
        want, _ = gradient(setting.reference, problem, "exact")
        case["reference_stability"] = reference_stability(setting.reference, problem, want, STABILITY_SEED)
        case["reference_stability_commit"] = commit
        write_jsonl(lines_file, cases)  # atomically: a kill mid-write leaves the previous file
        print(f"{case['family']} #{case['problem']} {case['setting']} {case['theta']}: reference stability "
              f"{case['reference_stability']}", flush=True)


def default_mode(case: dict) -> str:
    """The recorded mode that the library's ``fd`` (``fd_float32="auto"``) now computes for ``case``:
    ``fd-fp32-last`` where :func:`perk.meta_gradient.float32_passes_needed` asks for fp32 passes, else ``fd-bf16``."""
    needed = meta_gradient_module.float32_passes_needed(case["context_tokens"], SETTINGS[case["setting"]].segment_len)
    return "fd-fp32-last" if needed else "fd-bf16"


def write_report(out: Path, cases: list[dict], readme: Path = README) -> None:
    """Group the cases (realistic = contexts of >= 256 tokens, tiny) and write json + md, and the
    rows per θ over every setting, of the main modes, into ``readme``'s fidelity table."""
    cases = [{**case, "modes": {**case["modes"], "default": case["modes"][default_mode(case)]}} for case in cases]
    groups: dict[tuple, list[dict]] = {}
    for case in cases:
        size = "tiny" if case["family"] == "tiny" else "realistic"
        groups.setdefault((size, case["setting"], case["theta"]), []).append(case)
        groups.setdefault((size, "all", case["theta"]), []).append(case)
    summary = []
    for (size, setting, theta), members in sorted(groups.items()):
        for mode in members[0]["modes"]:
            row = {"contexts": size, "setting": setting, "theta": theta, "mode": mode, "cases": len(members)}
            for k in PARAMETERS:
                values = [m["modes"][mode][f"cosine {k}"] for m in members]
                row[f"median cosine {k}"] = statistics.median(values)
                row[f"p10 cosine {k}"] = percentile(values, 0.1)
                row[f"min cosine {k}"] = min(values)
                row[f"median rel_error {k}"] = statistics.median(m["modes"][mode][f"rel_error {k}"] for m in members)
            idle = [m["modes"][mode]["seconds"] for m in members
                    if m.get("load_average", math.inf) <= IDLE_LOAD and m.get("bf16_matmuls", "torch") == "torch"]
            row["median seconds idle"] = statistics.median(idle) if idle else None
            summary.append(row)
    commits = sorted({c["commit"] for c in cases})
    meta = {"command": "python -m benchmarks.meta_grad_fidelity", "commits": commits,
            "dates": sorted({c["date"] for c in cases}), "machines": sorted({c["machine"] for c in cases})}
    (out / f"{STEM}.json").write_text(json.dumps({**meta, "summary": summary}, indent=1))
    md = [f"# bf16 meta-gradient fidelity as a distribution ({', '.join(meta['dates'])})", "",
          f"`{meta['command']}` (commits {', '.join(commits)}) on {'; '.join(meta['machines'])}; SmolLM2-135M real weights; "
          "cosine of each bf16 mode's gradient to `exact` in fp32 on the same bf16-rounded weights, per problem. "
          "Realistic: babilong/qa1 and student_records/recall contexts of 256 tokens; tiny: three short documents "
          "(~60 tokens). Raw cases (with inner losses, inner gradient norms, the fp32 meta-gradient's norm): "
          f"`{STEM}.jsonl`.", "",
          "`default` is the library's `fd` as it now decides (`fd_float32=auto`): `fd-fp32-last` (the last T "
          "steps, the outer pass and the probes in fp32) where `perk.meta_gradient.float32_passes_needed` asks for "
          "it (contexts under `FLOAT32_BELOW_TOKENS` tokens per adapter, segments under "
          "`FLOAT32_BELOW_SEGMENT_TOKENS`), else `fd-bf16` (every pass in bf16). `fd x1` is the library's `fd` at "
          "the commit that ran the case (the cases of commit 34d0ef2 ran before fp32 passes existed; the "
          "32-token-segment cases before they applied to short segments). Cases whose `bf16_matmuls` is `emulated` ran on a CPU "
          "without native bf16, where torch's bf16 matmuls are tens of times slower than fp32 ones: their bf16 "
          "matrix products ran as fp32 GEMMs on the exact operands, rounded to bf16 (`perk.bf16_emulation`, a "
          "native bf16 GEMM's numerics); their seconds are left out of the cost column.", "",
          fidelity_table(summary, overall=False), "", *stability_section(cases)]
    (out / f"{STEM}.md").write_text("\n".join(md))
    write_readme_section("fidelity-table", fidelity_table(summary, overall=True, modes=README_MODES), readme)
    print("\n".join(md))


def stability_section(cases: list[dict]) -> list[str]:
    """The cases with ``reference_stability`` measured: how far the fp32 reference itself moves at a
    bf16-sized move of the state, beside the bf16 modes' cosines."""
    measured = [c for c in cases if "reference_stability" in c]
    if not measured:
        return []
    lines = ["## Stability of the reference", "",
             "Cosine of fp32 `exact` at θ and the rates with every entry scaled by (1 + 2⁻⁸·u), u ~ U(-1, 1), to fp32 "
             "`exact` at θ (`reference_stability`). Near 1 the reference is smooth at bf16's resolution; far below, "
             "the meta-gradient turns within a bf16 rounding of the state and no bf16 mode can be expected to match it.",
             "", "| family | problem | setting | θ | stability θ / rates | default θ / rates | exact (bf16) θ / rates |",
             "|---|---|---|---|---|---|---|"]
    for c in sorted(measured, key=lambda c: (c["setting"], c["theta"], c["family"], c["problem"])):
        pair = [" / ".join(f"{values[k]:.3f}" for k in PARAMETERS) for values in (
            c["reference_stability"], *({k: c["modes"][m][f"cosine {k}"] for k in PARAMETERS} for m in ("default", "exact")))]
        lines.append(f"| {c['family']} | {c['problem']} | {c['setting']} | {c['theta']} | " + " | ".join(pair) + " |")
    return lines + [""]


def fidelity_table(summary: list[dict], *, overall: bool, modes: tuple[str, ...] | None = None) -> str:
    """Markdown table: median / 10th percentile / min cosine of θ's and the rates' gradients, of the
    rows over every setting (``overall``) or per setting, of ``modes`` (None: all)."""
    rows = [r for r in summary if (r["setting"] == "all") == overall and (modes is None or r["mode"] in modes)]
    lines = ["| contexts | setting | θ | mode | cases | θ: median / p10 / min | rates: median / p10 / min | median s (idle) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [" / ".join(f"{r[f'{s} cosine {k}']:.3f}" for s in ("median", "p10", "min")) for k in PARAMETERS]
        seconds = "–" if r.get("median seconds idle") is None else f"{r['median seconds idle']:.1f}"
        lines.append(f"| {r['contexts']} | {r['setting']} | {r['theta']} | {r['mode']} | {r['cases']} | "
                     f"{cells[0]} | {cells[1]} | {seconds} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
