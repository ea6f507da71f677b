"""benchmarks/accuracy_study.py end to end on a tiny model: every stage, an interrupted evaluation
resumed, the export loaded back, and the committed SmolLM2 export when it exists."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks import accuracy_study
from benchmarks.accuracy_study import main, read_jsonl, targets
from perk.cli import UsageError
from perk.engine import WEIGHTS_NAME, PerkModel
from perk.checkpoint import read_safetensors
from tests.tiny_models import save_tiny_model, tiny_model_and_tokenizer

REPO = Path(__file__).resolve().parents[1]
COMMITTED_EXPORT = REPO / "benchmarks" / "results" / "accuracy-study-perk"


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    # Whole runs use the plain-torch kernels (the Triton interpreter is tested op by op elsewhere).
    monkeypatch.setenv("PERK_KERNELS_BACKEND", "torch")
    monkeypatch.setenv("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


def study_config(model_dir: Path, root: Path, **eval_overrides) -> dict:
    """A study small enough for seconds: 768-byte contexts (the byte tokenizer: one token a byte),
    1x and 2x (2x is past the tiny model's 1024-token window, so the prompts are cut) and 2048."""
    return {
        "name": "tiny-study",
        "results_dir": str(root / "results"),
        "export_dir": str(root / "results" / "tiny-study-perk"),
        "threads": 1,
        "curve": {"problems": 2, "every": 1},
        "eval": {"length_multiples": [1, 2], "problems": 4, "length_problems": [4, 3], "depths": [0, 100], "extra_lengths": [2048],
                 "extra_problems": 2, "batch": 2, "choice_up_to_tokens": 1000, **eval_overrides},
        "cost": {"meta_steps": 1, "warmup_steps": 0, "problems": 2, "perk_up_to_tokens": 800, "meta_step_speedup": 2.0},
        "probe_steps": 2,
        "probes": {"lower-inner-lr": {"perk": {"inner_lr": 0.3}}},
        "notes": "tiny notes",
        "train": {
            "model": str(model_dir), "name": "tiny-run", "runs_dir": str(root / "runs"), "device": "cpu",
            "base_dtype": "float32", "meta_steps": 2, "meta_batch": 2, "checkpoint_every": 1, "keep_checkpoints": 4,
            "max_new_tokens": 3, "eval_batch": 2,
            "data": {"context_tokens": 768, "train_problems": 4, "eval_problems": 2},
            "perk": {"rank": 2, "segment_len": 64, "inner_steps": 2, "unroll_steps": 1, "micro_batch_tokens": 512},
        },
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def finished_study(tiny_model_dir, tmp_path_factory):
    """(root, config file) of a tiny study that ran every stage of --stage all."""
    root = tmp_path_factory.mktemp("study")
    path = write_config(root / "study.yaml", study_config(tiny_model_dir, root))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PERK_KERNELS_BACKEND", "torch")
        patch.setenv("TQDM_DISABLE", "1")
        assert main(["--config", str(path)]) == 0
    return root, path


def test_all_stages_write_results_plots_and_timings(finished_study):
    root, _ = finished_study
    results = root / "results"
    report = json.loads((results / "tiny-study.json").read_text())
    for name in ("tiny-study.md", "tiny-study-vs-length.png", "tiny-study-vs-depth.png", "tiny-study-curve.png"):
        assert (results / name).stat().st_size > 0, name
    # every method at 768 (4 problems), 1536 (3) and 2048 (2), the same problems for all
    cells = {(r["method"], r["length_tokens"]): r["n"] for r in report["by_length"]}
    assert cells == {(m, length): n for m in ("perk", "ftic", "zeroshot") for length, n in ((768, 4), (1536, 3), (2048, 2))}
    truncated = {(r["method"], r["length_tokens"]): r["truncated"] for r in report["by_length"]}
    assert truncated[("zeroshot", 768)] == 0 and truncated[("ftic", 1536)] == 3 and truncated[("perk", 2048)] == 0
    assert {(r["method"], r["depth_pct"]) for r in report["by_depth"]} == {(m, d) for m in ("perk", "ftic", "zeroshot") for d in (0, 100)}
    questions = {}
    for record in report["predictions"]:
        questions.setdefault((record["length"], record["depth_pct"], record["index"]), set()).add(record["question"])
    assert all(len(q) == 1 for q in questions.values())
    for method, spread in report["answers"].items():
        answers = [r["prediction"].strip() for r in report["predictions"] if r["method"] == method]
        assert spread["n"] == len(answers) and spread["distinct"] == len(set(answers))
        assert spread["most_common_count"] == answers.count(spread["most_common"]) == max(map(answers.count, answers))
    assert "Answers given, over every cell: ftic " in (results / "tiny-study.md").read_text()
    # choices dropped past choice_up_to_tokens
    assert all((r["choice_accuracy"] is None) == (r["length_tokens"] > 1000) for r in report["by_length"])
    # learning curve: the initial meta-parameters, then each of the 2 PERK checkpoints
    assert [(p["step"], p["n"]) for p in report["learning_curve"]] == [(0, 2), (1, 2), (2, 2)]
    assert [r["step"] for r in report["meta_training"]] == [0, 1]
    assert {"train", "export", "curve", "eval", "perk steps (2)", "ftic steps (2)"} <= set(report["seconds"])
    assert {t["target"].split(" ")[0] for t in report["targets"]} == {"PERK"}
    assert report["commit"] and report["machine"] and report["recipe"]["meta_steps"] == 2
    markdown = (results / "tiny-study.md").read_text()
    assert "tiny notes" in markdown and "## Learning curve" in markdown and "python -m benchmarks.accuracy_study" in markdown


def test_report_rewrites_only_the_readme_section_between_its_markers(finished_study, tmp_path):
    root, path = finished_study
    readme = tmp_path / "README.md"
    readme.write_text("# intro\n<!-- tiny-study: begin -->\nold figures\n<!-- tiny-study: end -->\n## after\n")
    config = yaml.safe_load(path.read_text())
    config["readme"] = str(readme)
    # a cost stage's result, whose plan the README quotes against the 2 hours
    config["results_dir"] = str(tmp_path / "results")
    (tmp_path / "results").mkdir()
    plan = {"eval_perk": 1500.0, "total": 5400.0}
    cost = {"plan_seconds": plan, "issue_grid_seconds": {**plan, "total": 9000.0}}
    (tmp_path / "results" / "tiny-study-cost.json").write_text(json.dumps(cost))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("benchmarks.accuracy_study.cost_markdown", lambda cost: "")  # the stub has no measurements
        assert main(["--config", str(write_config(tmp_path / "with-readme.yaml", config)), "--stage", "report"]) == 0
    text = readme.read_text()
    assert "this YAML's study takes 90 min and issue 26's whole grid (20 problems at 16K included) 150 min" in text
    assert "PERK's evaluation, linear in the context's tokens, is 25 min" in text
    assert text.startswith("# intro\n<!-- tiny-study: begin -->\n") and text.endswith("<!-- tiny-study: end -->\n## after\n")
    assert "old figures" not in text
    report = json.loads((tmp_path / "results" / "tiny-study.json").read_text())
    perk_768 = next(r for r in report["by_length"] if r["method"] == "perk" and r["length_tokens"] == 768)
    assert f"| perk | {perk_768['exact_match']:.0f} % (n=4) |" in text  # the figures come from the report
    assert "step 2:" in text and "| issue 26 target | reached | met |" in text
    perk_depth_0 = next(r for r in report["by_depth"] if r["method"] == "perk" and r["depth_pct"] == 0)
    assert "| method | 0 % | 100 % |" in text and f"| perk | {perk_depth_0['exact_match']:.0f} % (n=4) |" in text
    met = sum(t["met"] is True for t in report["targets"])
    measured = sum(t["met"] is not None for t in report["targets"])
    assert f"{met} of the {measured} issue 26 targets measured here are met" in text
    # links are relative to the README's folder
    assert f"]({Path(os.path.relpath(tmp_path / 'results', tmp_path)) / 'tiny-study-curve.png'})" in text


def test_rerun_is_a_no_op_and_a_changed_recipe_is_refused(finished_study, tmp_path):
    root, path = finished_study
    eval_lines = (root / "runs" / "tiny-run" / "study" / "eval.jsonl").read_bytes()
    assert main(["--config", str(path), "--stage", "eval"]) == 0
    assert main(["--config", str(path), "--stage", "curve"]) == 0
    assert (root / "runs" / "tiny-run" / "study" / "eval.jsonl").read_bytes() == eval_lines
    changed = yaml.safe_load(path.read_text())
    changed["train"]["meta_lr"] = 0.01
    with pytest.raises(UsageError, match="meta_lr"):
        main(["--config", str(write_config(tmp_path / "changed.yaml", changed)), "--stage", "train"])


def test_export_is_bf16_and_loads_into_perk_model_and_perk_eval(finished_study, tmp_path):
    root, _ = finished_study
    export = root / "results" / "tiny-study-perk"
    stored = read_safetensors(export / "perk" / WEIGHTS_NAME)
    trained = read_safetensors(root / "runs" / "tiny-run" / "perk" / WEIGHTS_NAME)
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    model, tokenizer = tiny_model_and_tokenizer("llama")
    pm = PerkModel.from_pretrained(export / "perk", model, tokenizer)
    for name, value in pm.meta_parameters().items():
        assert value.dtype == torch.float32
        assert torch.equal(value.detach(), trained[name].to(torch.bfloat16).float()), name
    from perk.eval import main as eval_main

    out = tmp_path / "eval"
    assert eval_main(["--checkpoint", str(export), "--methods", "perk,zeroshot", "--n", "1", "--device", "cpu",
                      "--out", str(out)]) == 0
    assert {r["method"] for r in json.loads((out / "eval.json").read_text())["summary"]} == {"perk", "zeroshot"}


def test_interrupted_eval_resumes_where_it_stopped(tiny_model_dir, tmp_path, monkeypatch, finished_study):
    """Stop the eval stage after two chunks, tear its last line as a kill mid-write would: the
    rerun keeps the finished lines, redoes the rest, and ends as an uninterrupted evaluation."""
    root, _ = finished_study
    study = tmp_path / "study"
    (study / "runs").mkdir(parents=True)
    import shutil

    shutil.copytree(root / "runs" / "tiny-run", study / "runs" / "tiny-run", ignore=shutil.ignore_patterns("study"))
    path = write_config(tmp_path / "study.yaml", study_config(tiny_model_dir, study))
    assert main(["--config", str(path), "--stage", "export"]) == 0
    real_evaluate, calls = accuracy_study.evaluate, []

    def interrupted(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(accuracy_study, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["--config", str(path), "--stage", "eval"])
    lines_path = study / "runs" / "tiny-run" / "study" / "eval.jsonl"
    before = lines_path.read_bytes()
    assert len(before.splitlines()) == 4  # two chunks of two problems
    with open(lines_path, "ab") as fh:
        fh.write(b'{"key": "perk|768|None|4')  # torn
    monkeypatch.setattr(accuracy_study, "evaluate", real_evaluate)
    assert main(["--config", str(path), "--stage", "eval"]) == 0
    after = lines_path.read_bytes()
    assert after.startswith(before)
    resumed = read_jsonl(lines_path)
    assert len(resumed) == len({r["key"] for r in resumed}) == 3 * (4 + 4 + 4 + 3 + 2)
    timings = read_jsonl(study / "runs" / "tiny-run" / "study" / "timings.jsonl")
    assert [(t["stage"], t["completed"]) for t in timings] == [("export", True), ("eval", False), ("eval", True)]
    straight = {r["key"]: r for r in read_jsonl(root / "runs" / "tiny-run" / "study" / "eval.jsonl")}
    assert {r["key"]: (r["prediction"], r["exact_match"]) for r in resumed} == {
        k: (r["prediction"], r["exact_match"]) for k, r in straight.items()}


def test_unfinished_run_needs_resume_and_a_short_keep_is_refused(tiny_model_dir, tmp_path):
    config = study_config(tiny_model_dir, tmp_path)
    short = copy.deepcopy(config)
    short["train"]["keep_checkpoints"] = 2
    with pytest.raises(UsageError, match="keep_checkpoints"):
        main(["--config", str(write_config(tmp_path / "short.yaml", short)), "--stage", "train"])
    run = tmp_path / "runs" / "tiny-run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config["train"]))
    with pytest.raises(UsageError, match="--resume"):
        main(["--config", str(write_config(tmp_path / "study.yaml", config)), "--stage", "train"])


def test_cost_and_probe_stages_write_their_results(tiny_model_dir, tmp_path):
    path = write_config(tmp_path / "study.yaml", study_config(tiny_model_dir, tmp_path, length_multiples=[1], length_problems=[4], depths=[],
                                                                extra_lengths=[1536]))
    assert main(["--config", str(path), "--stage", "cost"]) == 0
    cost = json.loads((tmp_path / "results" / "tiny-study-cost.json").read_text())
    perk = cost["eval_seconds_per_problem"]["perk"]
    assert (perk["768"]["measured"], perk["1536"]["measured"]) == (True, False)
    assert perk["1536"]["cpu"] == pytest.approx(2 * perk["768"]["cpu"])
    plan = cost["plan_seconds"]  # from CPU seconds / threads (1), meta-steps assumed 2x faster
    assert plan["train_perk"] == pytest.approx(2 * cost["step_seconds"]["meta_step"]["cpu"] / 2.0)
    assert plan["total"] == pytest.approx(sum(v for k, v in plan.items() if k != "total"))
    measurements = tmp_path / "runs" / "tiny-run" / "study" / "cost.jsonl"
    before = measurements.read_bytes()
    assert main(["--config", str(path), "--stage", "cost"]) == 0  # measured once: a rerun only prices the plan
    assert measurements.read_bytes() == before
    assert json.loads((tmp_path / "results" / "tiny-study-cost.json").read_text())["plan_seconds"] == plan
    assert main(["--config", str(path), "--stage", "probe"]) == 0
    probes = json.loads((tmp_path / "results" / "tiny-study-probes.json").read_text())["probes"]
    assert probes["lower-inner-lr"]["overrides"] == {"perk.inner_lr": 0.3} and probes["lower-inner-lr"]["steps"] == 2
    saved = yaml.safe_load((tmp_path / "runs" / "tiny-run-probe-lower-inner-lr" / "config.yaml").read_text())
    assert saved["perk"]["inner_lr"] == 0.3 and saved["meta_steps"] == 2
    assert main(["--config", str(path), "--stage", "report"]) == 0  # the report shows the probes and the cost model
    report = json.loads((tmp_path / "results" / "tiny-study.json").read_text())
    assert report["probes"] == probes and report["cost"]["plan_seconds"] == plan
    markdown = (tmp_path / "results" / "tiny-study.md").read_text()
    assert "## Recipe probes" in markdown and "| lower-inner-lr | perk.inner_lr=0.3 | 2 |" in markdown


@pytest.mark.slow
def test_committed_export_loads_with_the_embedded_smollm2(smollm2_gguf):
    if not (COMMITTED_EXPORT / "perk" / WEIGHTS_NAME).is_file():
        pytest.skip("no committed accuracy-study export yet (benchmarks/results/accuracy-study-perk/)")
    model, tokenizer = smollm2_gguf
    pm = PerkModel.from_pretrained(COMMITTED_EXPORT / "perk", copy.deepcopy(model), tokenizer)
    assert sum(f.stat().st_size for f in COMMITTED_EXPORT.rglob("*") if f.is_file()) <= 12e6
    memory = pm.encode([["doc_0: Mary Event 1: Mary went to the kitchen."]])
    assert isinstance(pm.answer(memory, "Where is Mary?", max_new_tokens=4), str)


def test_equal_depth_scores_from_one_answer_to_all_do_not_meet_the_depth_target():
    length_rows = [{"method": m, "length_tokens": n, "exact_match": e} for m, n, e in
                   (("perk", 256, 8.0), ("ftic", 256, 84.0), ("perk", 4096, 8.0), ("ftic", 4096, 72.0))]
    depth_rows = [{"method": "perk", "depth_pct": d, "exact_match": 8.0} for d in (0, 50, 100)]
    depth = {answers: targets(length_rows, depth_rows, 256, 16, (), answers)[-1] for answers in (1, 4)}
    assert depth[1]["met"] is None and "one answer to every depth problem" in depth[1]["reached"]
    assert depth[4]["met"] is True and depth[4]["reached"] == "0.0"
    assert [t["met"] for t in targets(length_rows, depth_rows, 256, 16, (), 4)[:3]] == [False, False, False]
