"""python -m benchmarks.accuracy_study — does PERK learn? PERK vs FT-ICR vs zero-shot on one machine.

    python -m benchmarks.accuracy_study --config benchmarks/accuracy_study.yaml [--stage STAGE] [--resume]

One YAML file (``benchmarks/accuracy_study.yaml``) holds the whole study: ``train`` is a
``perk.train`` config (the recipe: model, task, context length, meta-steps, meta-batch, rank, N,
T, rates), the other sections say what is evaluated and where results go. The stages, in the
order ``--stage all`` runs them:

1. ``train`` — ``perk.train`` in this process: meta-trains PERK, then FT-ICR on the same problems
   with the same rank, batches and steps, checkpointing every ``train.checkpoint_every`` steps and
   keeping them all (the learning curve is read from them); an interrupted run continues from
   its last checkpoint (perk.train ``--resume``);
2. ``export`` — the trained meta-parameters in ``PerkModel.save_pretrained``'s format, floats
   stored as ``export.dtype`` (bf16 keeps SmolLM2's rank-16 θ under 12 MB), to ``export.dir``:
   what the evaluation uses and what gets committed;
3. ``curve`` — PERK's held-out exact match at every kept PERK checkpoint (and the initial
   meta-parameters);
4. ``eval`` — PERK, FT-ICR and zero-shot on the same held-out problems per cell: the training
   length × ``eval.length_multiples``, ``eval.depths`` at one length, ``eval.extra_lengths``
   (e.g. 16K, twice SmolLM2's window: the prompt-based methods then see only the context's last
   tokens that fit, ``perk.methods.context_prompt``);
5. ``report`` — ``<results_dir>/<name>.{json,md}`` and plots (accuracy vs length, vs depth, the
   learning curve), with command, commit, date, machine, the recipe, every part's wall time, the
   targets of issue 26 met or not, and the probes and cost model when they were run.

Two more stages run alone: ``cost`` times one meta-step, one FT-ICR step and one evaluation per
problem of each method at each length and writes the plan's expected wall time per part
(``<name>-cost.{json,md}``); ``probe`` runs the short recipe probes of the YAML's ``probes``
section through perk.train and compares their losses (``<name>-probes.{json,md}``).

Every stage is idempotent and resumable: curve and eval append one JSON line per answered
problem to ``<run>/study/{curve,eval}.jsonl`` (keyed by the cell, the problem and a fingerprint of
the weights used), a chunk of problems at a time; a rerun skips what is there, so a killed study
continues where it stopped and a changed grid (a 16K cell added later) only adds its cells.
``<run>/study/timings.jsonl`` records the wall time of every stage invocation.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save
from tqdm.auto import tqdm

from benchmarks.report import cpu_name, git_commit, write_readme_section
from perk.checkpoint import checkpoint_dir, read_checkpoint, read_safetensors, write_file_atomic, write_folder_atomic
from perk.cli import ArgumentParser, UsageError, build_config, config_to_dict, flatten, run_main
from perk.config import field
from perk.engine import CONFIG_NAME, WEIGHTS_NAME, PerkModel, load_tensors, read_pretrained
from perk.methods import answer_budget, evaluate, ftic_loss_and_grad
from perk.models import load_base_model, resolve_base_dtype
from perk.report import Prediction, accuracy_table, plot_accuracy, summarize
from perk.config import TrainConfig
from perk.runs import FTIC_ADAPTER, METRICS, PERK_DIR, RESOLVED_CONFIG, load_ftic_adapter, read_run_config, run_directory
from perk.tasks import generate

STAGES = ("train", "export", "curve", "eval", "report")  # what --stage all runs, in order
SOLO_STAGES = ("cost", "probe")
STUDY_DIR = "study"  # inside the training run's directory
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------
# The study's config: the train section is a perk.train config, the rest is below
# ----------------------------------------------------------------------------------------------


@dataclass
class CurveConfig:
    problems: int = field(50, "held-out problems at the training length, evaluated at every curve point")
    every: int = field(20, "a curve point every this many meta-steps (a multiple of train.checkpoint_every), and the last step")
    seed: int = field(1000, "seed of the curve's problems (the eval grid's seed: the last point answers the 1x cell's problems)")


@dataclass
class EvalConfig:
    methods: tuple[str, ...] = field(("perk", "ftic", "zeroshot"), "methods of the grid")
    length_multiples: tuple[int, ...] = field((1, 4, 16), "context lengths, as multiples of the training length")
    problems: int = field(50, "held-out problems per length (× depth) cell")
    length_problems: tuple[int, ...] = field(
        (), "problems per length multiple, one count each (default: problems for all); raising a count later "
        "only adds problems (results are kept per problem)"
    )
    depths: tuple[int, ...] = field((0, 50, 100), "depths (%) of the first supporting fact, at depth_length_multiple")
    depth_length_multiple: int = field(1, "the length of the depth cells, as a multiple of the training length")
    extra_lengths: tuple[int, ...] = field((), "more lengths in tokens (e.g. 16384), with extra_problems each")
    extra_problems: int = field(20, "held-out problems per extra length")
    seed: int = field(1000, "seed of the held-out problems (training uses train.data.seed)")
    batch: int = field(4, "contexts PERK encodes together; also the chunk appended to eval.jsonl at a time")
    chunk_tokens: int = field(
        16384, "at most this many context tokens per chunk (at least one problem): what a kill can lose stays "
        "short at long lengths"
    )
    choice_up_to_tokens: int = field(
        1024, "constrained-choice scoring only up to this context length: it runs the whole prompt once per "
        "choice with full-vocabulary logits (6 locations x 4K tokens x 49K vocab x 4 B = 4.8 GB for qa1 at 4K)"
    )


@dataclass
class CostConfig:
    meta_steps: int = field(2, "timed meta-steps (and FT-ICR steps)")
    warmup_steps: int = field(1, "untimed steps before them")
    problems: int = field(4, "timed problems per method and length")
    perk_up_to_tokens: int = field(4096, "PERK is timed up to this length and extrapolated linearly beyond")
    meta_step_speedup: float = field(1.0, "assumed speed-up of a meta-step over the measured one (a faster engine not yet merged)")
    plan_from: str = field("cpu", "price the plan with wall seconds, or cpu: process CPU seconds / threads (a busy machine's wall clock counts its neighbours)")
    encode_speedup: float = field(1.0, "assumed speed-up of PERK's encode over the measured one")


@dataclass
class StudyConfig:
    name: str = field("accuracy-study", "results are <results_dir>/<name>.{json,md} and <name>-*.png")
    results_dir: str = field("benchmarks/results", "folder of the results files")
    readme: str = field("", "a README whose '<!-- NAME: begin/end -->' section the report rewrites ('': none)")
    threads: int = field(2, "torch intra-op threads (0: torch's default)")
    curve: CurveConfig = field(CurveConfig(), "learning curve")
    eval: EvalConfig = field(EvalConfig(), "evaluation grid")
    export_dir: str = field("benchmarks/results/accuracy-study-perk", "the exported meta-parameters (committed)")
    export_dtype: str = field("bfloat16", "storage dtype of the exported floats: float32 or bfloat16")
    export_max_mb: float = field(12.0, "refuse an export larger than this")
    cost: CostConfig = field(CostConfig(), "cost model (--stage cost)")
    probe_steps: int = field(10, "meta-steps of each probe (--stage probe)")
    notes: str = field("", "the recipe's rationale and what was tried (markdown, copied into the report)")

    def __post_init__(self) -> None:
        if self.cost.plan_from not in ("wall", "cpu"):
            raise ValueError(f"cost.plan_from must be wall or cpu, got {self.cost.plan_from!r}")
        if self.export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"export_dtype must be one of {', '.join(EXPORT_DTYPES)}, got {self.export_dtype!r}")
        for name in ("curve.problems", "eval.problems", "eval.extra_problems", "eval.batch", "cost.problems", "probe_steps"):
            value = self
            for part in name.split("."):
                value = getattr(value, part)
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.curve.every < 1:
            raise ValueError(f"curve.every must be >= 1, got {self.curve.every}")
        if self.eval.length_problems and len(self.eval.length_problems) != len(self.eval.length_multiples):
            raise ValueError("eval.length_problems needs one count per eval.length_multiples entry")
        if not all(0 <= d <= 100 for d in self.eval.depths):
            raise ValueError(f"eval.depths are percentages from 0 to 100, got {self.eval.depths}")


@dataclass
class Study:
    """Everything a stage needs: both configs, the probes, the paths, how it was invoked."""

    config: StudyConfig
    train: TrainConfig
    probes: dict[str, dict]  # probe name -> perk.train overrides (nested mapping)
    config_path: Path
    argv: list[str]

    @property
    def run_dir(self) -> Path:
        return run_directory(self.train)

    @property
    def study_dir(self) -> Path:
        return self.run_dir / STUDY_DIR

    @property
    def results(self) -> Path:
        return Path(self.config.results_dir)

    @property
    def export_dir(self) -> Path:
        return Path(self.config.export_dir)

    def train_length(self) -> int:
        return self.train.data.context_tokens


def load_study(path: Path, argv: list[str]) -> Study:
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    if not isinstance(data, dict) or not isinstance(data.get("train"), dict):
        raise UsageError(f"--config {path}: expected a YAML mapping with a 'train' section (a perk.train config)")
    train = build_config(TrainConfig, argparse.Namespace(**{f"cfg:{k}": v for k, v in flatten(data["train"]).items()}))
    probes = data.get("probes") or {}
    if not isinstance(probes, dict) or not all(isinstance(v, dict) for v in probes.values()):
        raise UsageError(f"--config {path}: 'probes' maps a probe name to perk.train overrides")
    rest = {k: v for k, v in data.items() if k not in ("train", "probes")}
    study = build_config(StudyConfig, argparse.Namespace(**{f"cfg:{k}": v for k, v in flatten(rest).items()}))
    if "ftic" in study.eval.methods and "ftic" not in train.methods:
        raise UsageError("eval.methods has ftic but train.methods does not train it")
    checkpoints = math.ceil(train.meta_steps / train.checkpoint_every) * (2 if "ftic" in train.methods else 1)
    if study.curve.every % train.checkpoint_every:
        raise UsageError(f"curve.every={study.curve.every} is not a multiple of train.checkpoint_every={train.checkpoint_every}: "
                         "the curve is read from the checkpoints")
    if train.keep_checkpoints < checkpoints:
        raise UsageError(
            f"train.keep_checkpoints={train.keep_checkpoints} would delete checkpoints the learning curve reads: "
            f"the run writes {checkpoints}; keep at least that many"
        )
    return Study(study, train, probes, path, argv)


# ----------------------------------------------------------------------------------------------
# Results files: JSON lines appended as they are made, a torn last line dropped
# ----------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    """The records of ``path``; a torn last line (a kill mid-write) is cut from the file."""
    if not path.is_file():
        return []
    text = path.read_bytes().decode("utf-8", errors="replace")
    whole, _, torn = text.rpartition("\n") if not text.endswith("\n") else (text, "", "")
    if torn:
        write_file_atomic(path, (whole + "\n" if whole else "").encode())
    return [json.loads(line) for line in whole.splitlines() if line.strip()]


def append_jsonl(path: Path, records: list[dict]) -> None:
    """Append ``records`` in one write (a kill leaves whole lines and at most one torn one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A short hash of named tensors (which weights answered a problem)."""
    return hashlib.sha256(save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})).hexdigest()[:16]


@dataclass
class Cell:
    """Problems ``range(n)`` of one (length, depth) for one method, with one set of weights."""

    method: str
    length: int
    depth_pct: int | None
    n: int
    weights: str  # fingerprint
    label: str  # what the results call it: "1x", "4x", "16x", "16K", "curve step 40"

    def key(self, index: int) -> str:
        return f"{self.method}|{self.length}|{self.depth_pct}|{index}|{self.weights}"


def run_cells(cells: list[Cell], path: Path, answer: Callable[[Cell, list[dict]], list[Prediction]],
              problems: Callable[[int, int | None], list[dict]], *, eval_config: EvalConfig, desc: str) -> list[dict]:
    """Answer every cell's problems not yet in ``path`` (a chunk at a time: ``eval.batch`` problems,
    fewer where they would exceed ``eval.chunk_tokens``; appended as they come); return the
    records of ``cells`` (old and new)."""
    done = {r["key"]: r for r in read_jsonl(path)}
    todo = sum(1 for c in cells for i in range(c.n) if c.key(i) not in done)
    with tqdm(total=todo, desc=desc, unit="problem", dynamic_ncols=True) as bar:
        for cell in cells:
            bar.set_postfix(cell=f"{cell.method} {cell.label}" + ("" if cell.depth_pct is None else f" d{cell.depth_pct}"))
            pool = None
            chunk = max(1, min(eval_config.batch, eval_config.chunk_tokens // cell.length))
            for start in range(0, cell.n, chunk):
                indices = range(start, min(cell.n, start + chunk))
                if all(cell.key(i) in done for i in indices):
                    continue  # a chunk is redone whole, so a resumed run groups problems as a straight one
                pool = pool if pool is not None else problems(cell.length, cell.depth_pct)
                began = time.perf_counter()
                predictions = answer(cell, [pool[i] for i in indices])
                seconds = (time.perf_counter() - began) / len(indices)
                records = [{"key": cell.key(i), **dataclasses.asdict(cell), "index": i, "seconds": round(seconds, 3),
                            **dataclasses.asdict(p)} for i, p in zip(indices, predictions) if cell.key(i) not in done]
                append_jsonl(path, records)
                done.update({r["key"]: r for r in records})
                bar.update(len(records))
    return [done[c.key(i)] for c in cells for i in range(c.n)]


def as_prediction(record: dict) -> Prediction:
    names = {f.name for f in dataclasses.fields(Prediction)}
    return Prediction(**{k: v for k, v in record.items() if k in names})


# ----------------------------------------------------------------------------------------------
# Models and problems
# ----------------------------------------------------------------------------------------------


def load_model(study: Study):
    """(model, tokenizer) of the recipe's base model on the CPU, in its base dtype."""
    dtype = resolve_base_dtype(study.train.base_dtype, "cpu")
    return load_base_model(study.train.model, dtype=dtype, device="cpu")


def problem_maker(study: Study, tokenizer, seed: int) -> Callable[[int, int | None], list[dict]]:
    """(length, depth %) -> the held-out problems of that cell, enough for any cell of the study,
    without constrained-choice answer sets beyond ``eval.choice_up_to_tokens``."""
    data = study.train.data
    n = max(study.config.eval.problems, study.config.eval.extra_problems, study.config.curve.problems,
            *study.config.eval.length_problems)

    @functools.lru_cache(maxsize=4)
    def problems(length: int, depth_pct: int | None) -> list[dict]:
        made = [p.to_json() for p in generate(data.task, n, length, tokenizer, seed=seed,
                                              depth=None if depth_pct is None else depth_pct / 100,
                                              order_markers=data.order_markers, doc_index=data.doc_index)]
        if length > study.config.eval.choice_up_to_tokens:
            made = [{**p, "choices": []} for p in made]
        return made

    return problems


def answerer(pm: PerkModel, study: Study, ftic_adapter: torch.Tensor | None, tokenizer) -> Callable:
    def answer(cell: Cell, problems: list[dict]) -> list[Prediction]:
        budget = answer_budget(tokenizer, problems, study.train.max_new_tokens)
        return evaluate(pm, problems, [cell.method], ftic_adapter=ftic_adapter, max_new_tokens=budget,
                        batch_size=study.config.eval.batch, progress=False)

    return answer


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------


def train_done(study: Study) -> bool:
    run = study.run_dir
    ftic = "ftic" not in study.train.methods or (run / FTIC_ADAPTER).is_file()
    return (run / PERK_DIR).is_dir() and ftic and (run / "results.json").is_file()


def run_perk_train(config: TrainConfig) -> None:
    """perk.train with ``config`` in this process: a new run, or ``--resume`` of the one it names."""
    from perk.train import main as train_main

    if (run_directory(config) / RESOLVED_CONFIG).is_file():
        code = train_main(["--name", config.name, "--runs_dir", config.runs_dir, "--resume"])
    else:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "train.yaml"
            path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
            code = train_main(["--config", str(path)])
    if code:
        raise RuntimeError(f"perk.train exited with {code}")


def stage_train(study: Study, resume: bool) -> None:
    """Meta-train PERK and train FT-ICR (perk.train), or continue the run with ``resume``."""
    run = study.run_dir
    if (run / RESOLVED_CONFIG).is_file():
        saved, wanted = flatten(config_to_dict(read_run_config(run))), flatten(config_to_dict(study.train))
        changed = sorted(k for k, v in wanted.items() if saved.get(k) != v)
        if changed:
            raise UsageError(f"{run} was trained with another train section ({', '.join(changed)} differ): "
                             "restore the YAML, or name a new run (train.name)")
        if train_done(study):
            print(f"train: {run} is finished; nothing to do", flush=True)
            return
        if not resume:
            raise UsageError(f"{run} holds an unfinished run: pass --resume to continue it")
    run_perk_train(study.train)


def stage_export(study: Study) -> None:
    """The trained PERK as a run folder of its own: ``config.yaml`` (the run's) and ``perk/`` (the
    run's, floats stored as ``export_dtype``; PerkModel.from_pretrained loads them into its fp32
    meta-parameters), so ``PerkModel.from_pretrained(<export_dir>/perk)`` and
    ``python -m perk.eval --checkpoint <export_dir> --methods perk,zeroshot`` both take it."""
    source = study.run_dir / PERK_DIR
    target = study.export_dir
    if not source.is_dir():
        if (target / PERK_DIR / WEIGHTS_NAME).is_file():
            print(f"export: no trained run at {study.run_dir}; keeping {target}", flush=True)
            return
        raise UsageError(f"export: {source} does not exist: run --stage train first")
    read_pretrained(source)  # checked: config, finite tensors
    dtype = EXPORT_DTYPES[study.config.export_dtype]
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in read_safetensors(source / WEIGHTS_NAME).items()}
    files = {WEIGHTS_NAME: save(tensors), CONFIG_NAME: (source / CONFIG_NAME).read_bytes()}
    config = (study.run_dir / RESOLVED_CONFIG).read_bytes()
    megabytes = (sum(map(len, files.values())) + len(config)) / 1e6
    if megabytes > study.config.export_max_mb:
        raise UsageError(f"export: {megabytes:.1f} MB exceeds export_max_mb={study.config.export_max_mb}")
    write_folder_atomic(target / PERK_DIR, files)
    write_file_atomic(target / RESOLVED_CONFIG, config)
    print(f"export: {target} ({megabytes:.1f} MB, {study.config.export_dtype})", flush=True)


def curve_checkpoints(study: Study) -> list[tuple[int, Path]]:
    """(PERK step, folder) of the kept PERK-phase checkpoints (global step <= meta_steps) at a
    multiple of ``curve.every`` or at the last step."""
    found = []
    for path in sorted(checkpoint_dir(study.run_dir).glob("step-*")):
        step = int(path.name.split("-")[1])
        if step <= study.train.meta_steps and (step % study.config.curve.every == 0 or step == study.train.meta_steps):
            found.append((step, path))
    return found


def perk_tensors(pm: PerkModel) -> dict[str, torch.Tensor]:
    return {f"perk/{k}": v for k, v in pm.meta_parameters().items()}


def stage_curve(study: Study) -> list[dict]:
    """PERK's exact match on ``curve.problems`` held-out problems at the initial meta-parameters
    and at every ``curve.every``-th step's checkpoint."""
    model, tokenizer = load_model(study)
    pm = PerkModel.from_base(model, tokenizer, study.train.perk)
    problems = problem_maker(study, tokenizer, study.config.curve.seed)
    initial = {k: v.detach().clone() for k, v in perk_tensors(pm).items()}
    points = [(0, None)] + curve_checkpoints(study)
    path = study.study_dir / "curve.jsonl"
    records = []
    for step, folder in tqdm(points, desc="curve checkpoints", unit="ckpt", dynamic_ncols=True):
        tensors = initial if folder is None else {k: v for k, v in read_checkpoint(folder).tensors.items() if k.startswith("perk/")}
        load_tensors(perk_tensors(pm), tensors, source=str(folder or "initial meta-parameters"))
        cell = Cell("perk", study.train_length(), None, study.config.curve.problems, fingerprint(tensors), f"step {step}")
        for record in run_cells([cell], path, answerer(pm, study, None, tokenizer), problems,
                                eval_config=study.config.eval, desc=f"curve step {step}"):
            records.append({**record, "step": step})
    return records


def grid(study: Study) -> list[tuple[int, int | None, int, str]]:
    """(length, depth %, problems, label) of every evaluation cell, cheapest first."""
    ev, base = study.config.eval, study.train_length()
    counts = ev.length_problems or (ev.problems,) * len(ev.length_multiples)
    cells = [(base * m, None, n, f"{m}x") for m, n in zip(ev.length_multiples, counts)]
    cells += [(base * ev.depth_length_multiple, d, ev.problems, f"{ev.depth_length_multiple}x") for d in ev.depths]
    cells += [(length, None, ev.extra_problems, f"{length // 1024}K" if length % 1024 == 0 else str(length))
              for length in ev.extra_lengths]
    return sorted(cells, key=lambda c: (c[0], c[1] is not None))


def stage_eval(study: Study) -> list[dict]:
    """Every method on every cell of the grid: PERK from the exported meta-parameters (what is
    committed), FT-ICR from the run's adapter, zero-shot from the base model."""
    if not (study.export_dir / PERK_DIR / WEIGHTS_NAME).is_file():
        raise UsageError(f"eval: {study.export_dir} holds no exported PERK: run --stage export first")
    model, tokenizer = load_model(study)
    pm = PerkModel.from_pretrained(study.export_dir / PERK_DIR, model, tokenizer)
    methods = study.config.eval.methods
    weights = {"perk": fingerprint(pm.meta_parameters()), "zeroshot": "base"}
    ftic = None
    if "ftic" in methods:
        if not (study.run_dir / FTIC_ADAPTER).is_file():
            raise UsageError(f"eval: {study.run_dir / FTIC_ADAPTER} does not exist: run --stage train first")
        ftic = load_ftic_adapter(study.run_dir, pm)
        weights["ftic"] = fingerprint({"adapter": ftic})
    cells = [Cell(method, length, depth, n, weights[method], label)
             for length, depth, n, label in grid(study) for method in methods]
    return run_cells(cells, study.study_dir / "eval.jsonl", answerer(pm, study, ftic, tokenizer),
                     problem_maker(study, tokenizer, study.config.eval.seed), eval_config=study.config.eval, desc="eval")


# ----------------------------------------------------------------------------------------------
# Cost model and probes
# ----------------------------------------------------------------------------------------------


class Clock:
    """Wall and process CPU seconds of what runs inside ``with``."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def stage_cost(study: Study) -> dict:
    """Seconds of one meta-step, one FT-ICR step and one problem per method and length (wall and
    process CPU), and the plan of the YAML priced with them. Each measurement is appended to
    ``<run>/study/cost.jsonl`` as it finishes and reused by a rerun (delete the file to measure again).

    On a shared machine the wall clock measures the neighbours too; ``cost.plan_from: cpu`` prices
    the plan with CPU seconds / threads, the wall time of an otherwise idle machine if the threads
    scaled perfectly (an optimistic bound; ``wall`` is the pessimistic one on a busy machine)."""
    model, tokenizer = load_model(study)
    pm = PerkModel.from_base(model, tokenizer, study.train.perk)
    cost, train, ev = study.config.cost, study.train, study.config.eval
    path = study.study_dir / "cost.jsonl"
    measured = {r["what"]: r for r in read_jsonl(path)}

    def measure(what: str, items: int, work: Callable[[], object]) -> dict:
        if what not in measured:
            with Clock() as clock:
                work()
            measured[what] = {"what": what, "wall": clock.wall / items, "cpu": clock.cpu / items, "items": items,
                              "base_dtype": str(model.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
                              "load_average": round(os.getloadavg()[0], 1)}
            append_jsonl(path, [measured[what]])
        return measured[what]

    batch = train.meta_batch
    training = [p.to_json() for p in generate(train.data.task, batch * (cost.warmup_steps + cost.meta_steps),
                                              study.train_length(), tokenizer, seed=train.data.seed,
                                              order_markers=train.data.order_markers, doc_index=train.data.doc_index)]
    warmup, timed = training[: batch * cost.warmup_steps], training[batch * cost.warmup_steps :]
    adapter = pm.adapted.initial_adapter(torch.Generator().manual_seed(1)).unsqueeze(0)
    step_kinds = {"meta_step": lambda b: pm.meta_gradient(b), "ftic_step": lambda b: ftic_loss_and_grad(pm.adapted, adapter, b)}
    steps = {}
    for name, step in tqdm(step_kinds.items(), desc="cost steps", dynamic_ncols=True):
        if name not in measured:
            for k in range(cost.warmup_steps):  # untimed
                step(warmup[k * batch : (k + 1) * batch])
        steps[name] = measure(name, cost.meta_steps, lambda: [step(timed[k * batch : (k + 1) * batch])
                                                               for k in range(cost.meta_steps)])
    problems = problem_maker(study, tokenizer, ev.seed)
    issue = issue_grid(study)
    lengths = sorted({length for length, _, _, _ in grid(study) + grid(issue)})
    # Lengths as str keys, as they come back from the JSON file.
    per_problem: dict[str, dict[str, dict]] = {m: {} for m in ev.methods}
    for length in tqdm(lengths, desc="cost eval lengths", dynamic_ncols=True):
        for method in ev.methods:
            if method == "perk" and length > cost.perk_up_to_tokens:
                longest = per_problem["perk"][max(per_problem["perk"], key=int)]  # encode is linear in tokens
                scale = length / longest["length"]
                per_problem["perk"][str(length)] = {"wall": longest["wall"] * scale, "cpu": longest["cpu"] * scale,
                                                    "length": length, "measured": False}
                continue
            pool = problems(length, None)[: cost.problems]
            timing = measure(f"eval {method} {length}", len(pool), lambda: evaluate(
                pm, pool, [method], ftic_adapter=adapter, max_new_tokens=train.max_new_tokens, batch_size=ev.batch,
                progress=False))
            per_problem[method][str(length)] = {"wall": timing["wall"], "cpu": timing["cpu"], "length": length,
                                                "measured": True}
    threads = torch.get_num_threads()
    estimate = (lambda t: t["wall"]) if cost.plan_from == "wall" else (lambda t: t["cpu"] / threads)  # noqa: E731
    step_estimates = {k: estimate(v) for k, v in steps.items()}
    problem_estimates = {m: {length: estimate(t) for length, t in by.items()} for m, by in per_problem.items()}
    return {"step_seconds": {k: {"wall": v["wall"], "cpu": v["cpu"]} for k, v in steps.items()},
            "eval_seconds_per_problem": per_problem, "plan_from": cost.plan_from,
            "plan_seconds": price_plan(study, step_estimates, problem_estimates),
            # the same recipe with issue 26's whole grid and curve, for scale
            "issue_grid_seconds": price_plan(issue, step_estimates, problem_estimates), "threads": threads, "train_length": study.train_length(),
            "base_dtype": str(model.dtype).removeprefix("torch."),
            # other processes on the machine make wall times longer: the 1-minute load averages
            # after the measurements (lowest, highest)
            "load_average": [min(r["load_average"] for r in measured.values()),
                             max(r["load_average"] for r in measured.values())],
            "measurements": list(measured.values())}


def issue_grid(study: Study) -> Study:
    """``study`` with issue 26's evaluation: >= 50 problems at 1x, 4x, 16x and at depths 0/50/100 %
    (at 1x), 20 at 16K, a curve point of 50 problems every ``curve.every`` steps."""
    ev = dataclasses.replace(study.config.eval, length_multiples=(1, 4, 16), length_problems=(50, 50, 50), problems=50,
                             depths=(0, 50, 100), depth_length_multiple=1, extra_lengths=(16384,), extra_problems=20)
    config = dataclasses.replace(study.config, eval=ev, curve=dataclasses.replace(study.config.curve, problems=50))
    return dataclasses.replace(study, config=config)


def price_plan(study: Study, step_seconds: dict[str, float], per_problem: dict[str, dict[str, float]]) -> dict:
    """Expected seconds of each part of the study (assumed speed-ups applied)."""
    cost, train = study.config.cost, study.train
    points = math.ceil(train.meta_steps / study.config.curve.every)

    def seconds(method: str, length: int) -> float:
        measured = per_problem[method][str(length)]
        return measured / cost.encode_speedup if method == "perk" else measured

    base = study.train_length()
    plan = {
        "train_perk": train.meta_steps * step_seconds["meta_step"] / cost.meta_step_speedup,
        "train_ftic": train.meta_steps * step_seconds["ftic_step"] if "ftic" in train.methods else 0.0,
        "train_final_eval": train.data.eval_problems * sum(seconds(m, base) for m in train.methods if m in per_problem),
        "curve": (points + 1) * study.config.curve.problems * seconds("perk", base),
    }
    for length, _, n, _ in grid(study):
        for method in study.config.eval.methods:
            plan[f"eval_{method}"] = plan.get(f"eval_{method}", 0.0) + n * seconds(method, length)
    plan["total"] = sum(plan.values())
    return plan


def stage_probe(study: Study) -> dict:
    """Each probe: perk.train with the train section plus its overrides for ``probe_steps``
    meta-steps (PERK only, one warm-up step, 2 held-out problems), resumable; then its losses
    summarised. Every probe sees the same problems at the same step (the data order is a function
    of the step), so their losses compare pairwise."""
    summary = {}
    for name, overrides in study.probes.items():
        values = {**flatten(config_to_dict(study.train)), **flatten(overrides),
                  "name": f"{study.train.name}-probe-{name}", "meta_steps": study.config.probe_steps, "warmup_steps": 1,
                  "methods": ["perk"], "data.eval_problems": 2, "keep_checkpoints": 2,
                  "checkpoint_every": min(5, study.config.probe_steps)}
        probe = build_config(TrainConfig, argparse.Namespace(**{f"cfg:{k}": v for k, v in values.items()}))
        run = run_directory(probe)
        if not (run / "results.json").is_file():
            print(f"probe {name}: {', '.join(f'{k}={v}' for k, v in flatten(overrides).items()) or 'the recipe'}", flush=True)
            run_perk_train(probe)
        summary[name] = summarize_probe(run, overrides)
    return summary


def summarize_probe(run: Path, overrides: dict) -> dict:
    steps = [r for r in read_jsonl(run / METRICS) if r.get("phase") == "perk"]
    third = max(1, len(steps) // 3)
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    results = json.loads((run / "results.json").read_text())["summary"]
    return {
        "overrides": flatten(overrides),
        "steps": len(steps),
        "meta_loss_first_third": mean(steps[:third], "loss"),
        "meta_loss_last_third": mean(steps[-third:], "loss"),
        "inner_first": mean(steps, "inner_first"),
        "inner_last_first_third": mean(steps[:third], "inner_last"),
        "inner_last_last_third": mean(steps[-third:], "inner_last"),
        "seconds_per_step": mean(steps, "seconds"),
        "exact_match_2": results[0]["exact_match"] if results else None,
    }


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def provenance(study: Study) -> dict:
    cpu = cpu_name()
    return {
        "command": f"python -m benchmarks.accuracy_study --config {study.config_path}",
        "commit": git_commit(mark_uncommitted=True),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
    }


def timings(study: Study) -> dict:
    """Wall seconds per stage over every invocation, and the optimizer-step seconds of training."""
    per_stage: dict[str, float] = {}
    for r in read_jsonl(study.study_dir / "timings.jsonl"):
        per_stage[r["stage"]] = per_stage.get(r["stage"], 0.0) + r["seconds"]
    steps = read_jsonl(study.run_dir / METRICS)
    for phase in ("perk", "ftic"):
        done = [r["seconds"] for r in steps if r.get("phase") == phase]
        if done:
            per_stage[f"{phase} steps ({len(done)})"] = sum(done)
    return per_stage


def targets(length_rows: list[dict], depth_rows: list[dict], base: int, multiple: int, extra: tuple[int, ...],
            depth_answers: int | None = None) -> list[dict]:
    """Issue 26's targets, each met or not (None: not measured). ``depth_answers``: how many
    distinct answers PERK gave over the depth cells (one answer to all leaves robustness unmeasured)."""
    em = {(r["method"], r["length_tokens"]): r["exact_match"] for r in length_rows}
    perk_depths = [r["exact_match"] for r in depth_rows if r["method"] == "perk"]

    def row(goal: str, value: str, met: bool | None) -> dict:
        return {"target": goal, "reached": value, "met": met}

    def get(method: str, length: int) -> float | None:
        return em.get((method, length))

    rows = []
    perk1, ftic1, perk16, ftic16 = get("perk", base), get("ftic", base), get("perk", base * multiple), get("ftic", base * multiple)
    rows.append(row("PERK >= 80 % exact match at the training length", _pct(perk1), None if perk1 is None else perk1 >= 80))
    rows.append(row("PERK within 10 points of FT-ICR at the training length", f"{_pct(perk1)} vs {_pct(ftic1)}",
                    None if None in (perk1, ftic1) else perk1 >= ftic1 - 10))
    rows.append(row(f"PERK >= FT-ICR at {multiple}x the training length", f"{_pct(perk16)} vs {_pct(ftic16)}",
                    None if None in (perk16, ftic16) else perk16 >= ftic16))
    for length in extra:
        p, f = get("perk", length), get("ftic", length)
        rows.append(row(f"PERK well above FT-ICR at {length} tokens (taken as >= 10 points)", f"{_pct(p)} vs {_pct(f)}",
                        None if None in (p, f) else p >= f + 10))
    spread = max(perk_depths) - min(perk_depths) if perk_depths else None
    goal = "PERK max - min across depths <= 10 points"
    if spread is not None and depth_answers == 1:  # equal scores by one answer to all: no reading to be robust
        rows.append(row(goal, f"{_pct(spread)}, but PERK gave one answer to every depth problem", None))
    else:
        rows.append(row(goal, _pct(spread), None if spread is None else spread <= 10))
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def plot_curve(points: list[dict], metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([p["step"] for p in points], [p["exact_match"] for p in points], marker="o", label="PERK held-out exact match")
    ax.set_xlabel("meta-step")
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    losses = [(r["step"] + 1, r["loss"]) for r in metrics if r.get("phase") == "perk"]
    if losses:
        twin = ax.twinx()
        twin.plot(*zip(*losses), color="gray", alpha=0.5, linewidth=0.8, label="meta-loss (answer NLL)")
        twin.set_ylabel("meta-loss (nats)")
        twin.legend(loc="upper right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title(f"learning curve ({points[0]['n']} held-out problems per point)" if points else "learning curve", fontsize=9)
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_file_atomic(path, buffer.getvalue())


def stage_report(study: Study) -> dict:
    """``<name>.{json,md}`` and the plots, from what the other stages left."""
    name, out = study.config.name, study.results
    base = study.train_length()
    # The grid's problems, the newest record of each (a run directory holds one training run, so
    # records differ only where a grid was shrunk or a cell redone).
    sizes = {(length, depth): n for length, depth, n, _ in grid(study)}
    latest = {(r["method"], r["length"], r["depth_pct"], r["index"]): r for r in read_jsonl(study.study_dir / "eval.jsonl")
              if r["method"] in study.config.eval.methods and r["index"] < sizes.get((r["length"], r["depth_pct"]), 0)}
    records = list(latest.values())
    by_length = summarize([as_prediction(r) for r in records if r["depth_pct"] is None])
    depth_predictions = [as_prediction({**r, "depth": r["depth_pct"] / 100}) for r in records if r["depth_pct"] is not None]
    by_depth = summarize(depth_predictions, by=("length_tokens", "depth_pct"))
    curve_records = list({(r["label"], r["index"]): r for r in read_jsonl(study.study_dir / "curve.jsonl")
                          if r["index"] < study.config.curve.problems}.values())
    checkpoint_steps = {0} | {step for step, _ in curve_checkpoints(study)}
    curve = []
    for step in sorted(checkpoint_steps):
        group = [r for r in curve_records if r["label"] == f"step {step}"]
        if group:
            curve.append({"step": step, "n": len(group), "exact_match": 100.0 * sum(r["exact_match"] for r in group) / len(group)})
    metrics = read_jsonl(study.run_dir / METRICS)
    probes = (_read_json(out / f"{name}-probes.json") or {}).get("probes")  # the file has its provenance beside them
    cost = _read_json(out / f"{name}-cost.json")
    payload = {
        **provenance(study),
        "recipe": config_to_dict(study.train),
        "study": config_to_dict(study.config),
        "seconds": timings(study),
        "targets": targets(by_length, by_depth, base, max(study.config.eval.length_multiples), study.config.eval.extra_lengths,
                           answer_spread([r for r in records if r["depth_pct"] is not None]).get("perk", {}).get("distinct")),
        "by_length": by_length,
        "by_depth": by_depth,
        "learning_curve": curve,
        "answers": answer_spread(records),
        "meta_training": [{k: r.get(k) for k in ("step", "loss", "inner_first", "inner_last", "inner_lr", "seconds")}
                          for r in metrics if r.get("phase") == "perk"],
        "probes": probes,
        "cost": cost,
        "predictions": records,
        "curve_predictions": curve_records,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out / f"{name}.json", json.dumps(payload, indent=1).encode())
    if len({r["length_tokens"] for r in by_length}) > 1:
        plot_accuracy(by_length, out / f"{name}-vs-length.png", x="length_tokens")
    if len({r["depth_pct"] for r in by_depth}) > 1:
        plot_accuracy(by_depth, out / f"{name}-vs-depth.png", x="depth_pct")
    if curve:
        plot_curve(curve, metrics, out / f"{name}-curve.png")
    write_file_atomic(out / f"{name}.md", report_markdown(study, payload).encode())
    readme = Path(study.config.readme) if study.config.readme else None
    if readme and write_readme_section(name, readme_markdown(study, payload, readme.parent), readme):
        print(f"report: {readme}'s {name} section rewritten", flush=True)
    print(f"report: {out / name}.{{json,md}}", flush=True)
    return payload


def answer_spread(records: list[dict]) -> dict:
    """Per method, over every cell: how many distinct answers it gave and its most common one. A
    method that answers the same to every problem has learned a prior, not to read the context."""
    spread = {}
    for method in sorted({r["method"] for r in records}):
        answers = Counter(r["prediction"].strip() for r in records if r["method"] == method)
        top, count = answers.most_common(1)[0]
        spread[method] = {"n": sum(answers.values()), "distinct": len(answers), "most_common": top,
                          "most_common_count": count}
    return spread


def answers_sentence(spread: dict) -> str:
    return "Answers given, over every cell: " + "; ".join(
        f"{method} {s['distinct']} distinct in {s['n']} (most often {s['most_common']!r}, {s['most_common_count']} times)"
        for method, s in spread.items()) + "."


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def report_markdown(study: Study, payload: dict) -> str:
    name, train = study.config.name, study.train
    lines = [
        f"# Accuracy study: {train.data.task}, PERK vs FT-ICR vs zero-shot ({train.model})", "",
        f"- command: `{payload['command']}` (stages train, export, curve, eval, report; `--resume` continues)",
        f"- commit: {payload['commit']}", f"- date: {payload['date']}", f"- machine: {payload['machine']}",
        f"- recipe: {train.data.context_tokens}-token training contexts, {train.meta_steps} meta-steps of "
        f"{train.meta_batch} problems, rank {train.perk.rank}, N={train.perk.inner_steps} {train.perk.inner_optimizer} "
        f"inner steps (T={train.perk.unroll_steps} unrolled, meta-gradient {train.perk.meta_grad}), meta-rate "
        f"{train.meta_lr}, base dtype {train.base_dtype}; FT-ICR: same problems, rank, batches and steps, rate "
        f"{train.ftic_lr}. Full config in the JSON.",
        f"- PERK is evaluated from the exported meta-parameters `{study.config.export_dir}` "
        f"({study.config.export_dtype} storage); beyond {study.config.eval.choice_up_to_tokens} tokens constrained "
        "choice is not scored (exact match only); the prompt-based methods keep the last context tokens that fit "
        "the model window (`perk.methods.context_prompt`), the `truncated` column counts them.", "",
        "## Targets (issue 26)", "", "| target | reached | met |", "|---|---|---|",
    ]
    lines += [f"| {t['target']} | {t['reached']} | {'-' if t['met'] is None else ('yes' if t['met'] else 'no')} |"
              for t in payload["targets"]]
    def section(title: str, rows: list[dict], plot: str) -> list[str]:
        return ["", f"## {title}", "", accuracy_table(rows) if rows else "(not run yet)"] + (
            [f"![{title}]({name}-{plot}.png)"] if rows else [])

    lines += section("Accuracy vs context length", payload["by_length"], "vs-length")
    lines += section("Accuracy vs depth", payload["by_depth"], "vs-depth")
    if payload["answers"]:
        lines += ["", answers_sentence(payload["answers"])]
    lines += ["", "## Learning curve (PERK, training length)", "", "| meta-step | n | exact match |", "|---|---|---|"]
    lines += [f"| {p['step']} | {p['n']} | {p['exact_match']:.1f} |" for p in payload["learning_curve"]]
    lines += (["", f"![learning curve]({name}-curve.png)"] if payload["learning_curve"] else [])
    lines += ["", "## Wall time", "", "| part | seconds | minutes |", "|---|---|---|"]
    lines += [f"| {k} | {v:.0f} | {v / 60:.1f} |" for k, v in payload["seconds"].items()]
    evals = {}
    for r in payload["predictions"]:
        key = (r["method"], r["length"])
        evals[key] = evals.get(key, 0.0) + r["seconds"]
    lines += ["", "Evaluation seconds per method and length (sum over problems):", "", "| method | length | seconds |", "|---|---|---|"]
    lines += [f"| {m} | {length} | {s:.0f} |" for (m, length), s in sorted(evals.items())]
    if payload["cost"]:
        lines += ["", "## Cost model", "", cost_markdown(payload["cost"])]
    if payload["probes"]:
        lines += ["", "## Recipe probes", "", probes_markdown(payload["probes"])]
    if study.config.notes:
        lines += ["", "## Notes: recipe and what was tried", "", study.config.notes.strip()]
    return "\n".join(lines) + "\n"


def readme_markdown(study: Study, payload: dict, readme_dir: Path) -> str:
    """The README's accuracy section: the headline per method and length, the targets, the curve
    (links relative to ``readme_dir``)."""
    name, train, base = study.config.name, study.train, study.train_length()
    results = Path(os.path.relpath(study.results, readme_dir))
    em = {(r["method"], r["length_tokens"]): r for r in payload["by_length"]}

    def at(method: str, length: int) -> str:
        row = em.get((method, length))
        return "not run" if row is None else f"{row['exact_match']:.0f} % (n={row['n']})"

    lengths = sorted({r["length_tokens"] for r in payload["by_length"]})
    seconds = payload["seconds"]
    train_minutes = sum(v for k, v in seconds.items() if k.endswith(")")) / 60  # the "perk/ftic steps (n)" rows
    lines = [
        f"Generated by `{payload['command']}` (commit {payload['commit']}, {payload['date']}; {payload['machine']}) "
        f"into [{results / name}.md]({results / name}.md), with every prediction in the JSON beside it.", "",
        f"PERK meta-trained for {train.meta_steps} steps of {train.meta_batch} {train.data.task} problems of "
        f"{base} tokens (rank {train.perk.rank}, N={train.perk.inner_steps}, meta-gradient {train.perk.meta_grad}; "
        f"{train_minutes:.0f} min of optimizer steps for PERK and FT-ICR together here) answers exactly, on held-out "
        "problems:", "",
        "| method | " + " | ".join(f"{n // base}x ({n} tokens)" for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for method in study.config.eval.methods:
        lines.append(f"| {method} | " + " | ".join(at(method, n) for n in lengths) + " |")
    by_depth = {(r["method"], r["depth_pct"]): r for r in payload["by_depth"]}
    if by_depth:
        depths = sorted({d for _, d in by_depth})
        depth_tokens = payload["by_depth"][0]["length_tokens"]
        lines += ["", f"By depth of the supporting fact in the context ({depth_tokens} tokens):", "",
                  "| method | " + " | ".join(f"{d} %" for d in depths) + " |", "|---|" + "---|" * len(depths)]
        for method in study.config.eval.methods:
            cells = [by_depth.get((method, d)) for d in depths]
            lines.append(f"| {method} | " + " | ".join(
                "not run" if r is None else f"{r['exact_match']:.0f} % (n={r['n']})" for r in cells) + " |")
    if payload["answers"]:
        lines += ["", answers_sentence(payload["answers"])]
    curve = payload["learning_curve"]
    if curve:
        lines += ["", "Learning curve (PERK's held-out exact match at the training length): " + ", ".join(
            f"step {p['step']}: {p['exact_match']:.0f} % (n={p['n']})" for p in curve) + "."]
        if len(curve) > 1:
            last, before = curve[-1]["exact_match"], curve[-2]["exact_match"]
            trend = "still rising" if last > before else "not rising"
            lines[-1] += f" Between the last two points it was {trend} ({before:.0f} → {last:.0f} %)."
    measured = [t for t in payload["targets"] if t["met"] is not None]
    lines += ["", f"{sum(t['met'] for t in measured)} of the {len(measured)} issue 26 targets measured here are met "
              f"({len(payload['targets']) - len(measured)} not measured):"]
    lines += ["", "| issue 26 target | reached | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['reached']} | {'-' if t['met'] is None else ('yes' if t['met'] else '**no**')} |"
              for t in payload["targets"]]
    cost = payload["cost"]
    if cost:
        stages = sum(v for k, v in seconds.items() if k in STAGES)
        lines += ["", f"Time: the stages' recorded wall clock here came to {stages / 60:.0f} min (on a shared machine: the md's wall-time table). At "
                  f"the cost measured on the idle machine ([{results / name}-cost.md]({results / name}-cost.md)) this "
                  f"YAML's study takes {cost['plan_seconds']['total'] / 60:.0f} min and issue 26's whole grid (20 problems "
                  f"at 16K included) {cost['issue_grid_seconds']['total'] / 60:.0f} min, against the issue's 120 min; "
                  f"PERK's evaluation, linear in the context's tokens, is {cost['plan_seconds']['eval_perk'] / 60:.0f} "
                  "min of the former."]
    plots = [f"{name}-{p}.png" for p in ("vs-length", "vs-depth", "curve") if (study.results / f"{name}-{p}.png").is_file()]
    if plots:
        lines += ["", " ".join(f"![{p}]({results / p})" for p in plots)]
    return "\n".join(lines)


def cost_markdown(cost: dict) -> str:
    steps = cost["step_seconds"]
    lines = [f"Measured with {cost['threads']} threads, base model in {cost['base_dtype']}, the 1-minute load average "
             f"{cost['load_average'][0]}-{cost['load_average'][1]} after the measurements (on {os.cpu_count()} cores). Wall seconds, and process CPU seconds / "
             f"threads (the idle-machine estimate); the plan uses {cost['plan_from']}.", "",
             "| what | wall s | CPU s / threads | |", "|---|---|---|---|"]
    for name, t in steps.items():
        lines.append(f"| one {name.replace('_', ' ')} | {t['wall']:.2f} | {t['cpu'] / cost['threads']:.2f} | measured |")
    for method, by_length in cost["eval_seconds_per_problem"].items():
        for length, t in sorted(by_length.items(), key=lambda kv: int(kv[0])):
            how = "measured" if t["measured"] else "extrapolated (linear in tokens)"
            lines.append(f"| {method}, one problem at {length} | {t['wall']:.2f} | {t['cpu'] / cost['threads']:.2f} | {how} |")
    lines += ["", "Expected seconds (assumed speed-ups applied) of the YAML's plan, and of the same recipe with issue "
              "26's whole grid (>= 50 problems at 1x, 4x, 16x and at depths 0/50/100 %, 20 at 16K, curve points of 50):",
              "", "| part | plan s | plan min | issue grid s | issue grid min |", "|---|---|---|---|---|"]
    issue = cost.get("issue_grid_seconds", {})
    lines += [f"| {k} | {v:.0f} | {v / 60:.1f} | {issue.get(k, 0):.0f} | {issue.get(k, 0) / 60:.1f} |"
              for k, v in cost["plan_seconds"].items()]
    return "\n".join(lines) + "\n"


def probes_markdown(probes: dict) -> str:
    lines = ["| probe | overrides | steps | meta-loss, first third | last third | inner loss before | after N, first third "
             "| last third | s / step | exact match (2) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in probes.items():
        overrides = ", ".join(f"{k}={v}" for k, v in p["overrides"].items()) or "(the recipe)"
        lines.append(f"| {name} | {overrides} | {p['steps']} | {p['meta_loss_first_third']:.3f} | {p['meta_loss_last_third']:.3f} "
                     f"| {p['inner_first']:.3f} | {p['inner_last_first_third']:.3f} | {p['inner_last_last_third']:.3f} "
                     f"| {p['seconds_per_step']:.1f} | {_pct(p['exact_match_2'])} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m benchmarks.accuracy_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("benchmarks/accuracy_study.yaml"), help="the study's YAML")
    parser.add_argument("--stage", choices=("all",) + STAGES + SOLO_STAGES, default="all",
                        help="one stage, or all of train, export, curve, eval, report (default: all)")
    parser.add_argument("--resume", action="store_true", help="continue an unfinished training run")
    return parser.parse_args(argv)


@contextlib.contextmanager
def timed(study: Study, stage: str) -> Iterator[None]:
    """Record the wall time of one stage invocation (also when it is interrupted)."""
    began, started = time.perf_counter(), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    completed = False
    try:
        yield
        completed = True
    finally:
        append_jsonl(study.study_dir / "timings.jsonl", [{
            "stage": stage, "seconds": round(time.perf_counter() - began, 1), "started": started,
            "completed": completed, "argv": study.argv}])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    study = load_study(args.config, argv)
    if study.config.threads:
        torch.set_num_threads(study.config.threads)
    stages = STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        if stage == "report":
            stage_report(study)
            continue
        if stage in SOLO_STAGES:
            result = stage_cost(study) if stage == "cost" else stage_probe(study)
            out = study.results / f"{study.config.name}-{'cost' if stage == 'cost' else 'probes'}"
            header = {**provenance(study), "recipe": config_to_dict(study.train)}
            write_file_atomic(out.with_suffix(".json"), json.dumps({**header, **result} if stage == "cost" else {**header, "probes": result}, indent=1).encode())
            body = cost_markdown(result) if stage == "cost" else probes_markdown(result)
            write_file_atomic(out.with_suffix(".md"), (f"# {study.config.name}: {stage}\n\n" + "\n".join(
                f"- {k}: {header[k]}" for k in ("command", "commit", "date", "machine")) + f" (`--stage {stage}`)\n\n" + body).encode())
            print(f"{stage}: {out}.{{json,md}}\n\n{body}", flush=True)
            continue
        with timed(study, stage):
            if stage == "train":
                stage_train(study, args.resume)
            elif stage == "export":
                stage_export(study)
            elif stage == "curve":
                stage_curve(study)
            elif stage == "eval":
                stage_eval(study)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog="benchmarks.accuracy_study"))
