"""python -m perk.train on a tiny model: config, checkpoints, resume, errors.

In-process (``main(argv)`` / ``run_main``) where a subprocess adds nothing; ``python -m perk.train``
itself is run by the kill-and-resume test (which needs a process to kill) and by one error case."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from perk.cli import UsageError, run_main
from perk.train import PERK_DIR, main, parse_args
from perk.trainer import batch_indices
from tests.tiny_models import save_tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PERK_KERNELS_BACKEND": "torch", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    # In-process runs use the plain-torch kernels: the Triton interpreter is too slow for whole
    # training runs (the kernels themselves are tested against it op by op).
    monkeypatch.setenv("PERK_KERNELS_BACKEND", "torch")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


def tiny_args(model_dir, runs_dir, name="run", steps=3, context_tokens=1024):
    return [
        "--model", str(model_dir), "--runs_dir", str(runs_dir), "--name", name, "--device", "cpu",
        "--meta_steps", str(steps), "--meta_batch", "2", "--checkpoint_every", "1", "--eval_batch", "2",
        "--max_new_tokens", "3", "--data.context_tokens", str(context_tokens), "--data.train_problems", "6",
        "--data.eval_problems", "2", "--perk.rank", "2", "--perk.segment_len", "64", "--perk.inner_steps", "2",
        "--perk.unroll_steps", "1", "--perk.micro_batch_tokens", "512",
        # fixed, not "auto": the bf16 probe's verdict may differ between processes on a busy machine
        "--base_dtype", "float32",
    ]


def train_tiny_run(root: Path, *extra: str, **args_kwargs) -> Path:
    """A finished in-process perk.train run of a tiny Llama under ``root``: ``tiny_args`` with
    ``args_kwargs``, then ``extra`` flags. Returns the run directory."""
    model_dir = save_tiny_model("llama", root / "model")
    os.environ["PERK_KERNELS_BACKEND"] = "torch"
    try:
        assert main([*tiny_args(model_dir, root / "runs", **args_kwargs), *extra]) == 0
    finally:
        del os.environ["PERK_KERNELS_BACKEND"]
    return root / "runs" / "run"


def run_cli(module, args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_help_lists_every_key_with_default_and_meaning(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for key in ("--meta_steps", "--data.task", "--data.context_tokens", "--perk.rank", "--perk.meta_grad",
                "--perk.inner_lr", "--resume", "--config"):
        assert key in text
    assert "optimizer steps of meta-training (and of FT-ICR training) (default: 24)" in text


def test_yaml_config_and_overrides(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("meta_steps: 7\ndata:\n  task: babilong/qa2\nperk:\n  rank: 4\n")
    _, config = parse_args(["--config", str(config_file), "--perk.rank", "8", "--device", "cpu"])
    assert config.meta_steps == 7 and config.data.task == "babilong/qa2" and config.perk.rank == 8


def test_data_position_is_a_function_of_the_step():
    seen = [i for step in range(6) for i in batch_indices(step, 4, 8, seed=3)]
    assert sorted(seen[:8]) == list(range(8)) and sorted(seen[8:16]) == list(range(8))
    assert seen[:8] != seen[8:16], "every epoch has its own order"
    assert batch_indices(4, 4, 8, seed=3) == seen[16:20]


def test_short_run_writes_checkpoints_metrics_and_results(tiny_model_dir, tmp_path, capsys):
    assert main(tiny_args(tiny_model_dir, tmp_path)) == 0
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in lines] == [("perk", 0), ("perk", 1), ("perk", 2),
                                                        ("ftic", 0), ("ftic", 1), ("ftic", 2)]
    assert all(r["loss"] > 0 for r in lines) and "inner_first" in lines[0]
    assert (run / "config.yaml").is_file() and (run / PERK_DIR / "perk_meta.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000005", "step-00000006"]
    results = json.loads((run / "results.json").read_text())
    assert {r["method"] for r in results["summary"]} == {"perk", "zeroshot", "ftic"}
    assert "| perk |" in capsys.readouterr().out and (run / "results.md").is_file()


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path, capsys):
    args = ["--methods", "perk,ftic"]
    assert main(tiny_args(tiny_model_dir, tmp_path, "straight", steps=8, context_tokens=768) + args) == 0

    # python -m perk.train itself, killed with SIGKILL after its first checkpoint, then resumed
    victim = subprocess.Popen(
        [sys.executable, "-m", "perk.train", *tiny_args(tiny_model_dir, tmp_path, "killed", steps=8, context_tokens=768), *args],
        env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:
        if checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir()):
            break
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / PERK_DIR).exists(), "killed before the end"

    capsys.readouterr()
    assert main(["--resume", "--name", "killed", "--runs_dir", str(tmp_path)]) == 0
    assert "resuming from step-" in capsys.readouterr().out
    for name in ("perk/perk_meta.safetensors", "ftic_adapter.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "killed" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after kill + resume"
    straight_metrics = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    resumed_metrics = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(l).items() if k not in ("seconds", "tok_s")} for l in lines]  # noqa: E731
    assert strip(straight_metrics) == strip(resumed_metrics)


def test_corrupt_latest_checkpoint_falls_back_with_a_message(tiny_model_dir, tmp_path, capsys):
    assert main(tiny_args(tiny_model_dir, tmp_path, steps=3) + ["--methods", "perk"]) == 0
    newest = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    (newest / "tensors.safetensors").write_bytes(b"garbage")
    capsys.readouterr()
    with pytest.warns(UserWarning, match="does not match its checksum"):
        assert main(["--resume", "--name", "run", "--runs_dir", str(tmp_path)]) == 0
    assert "resuming from step-00000002" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data.task", "babilong/qa9"], "data.task must be one of"),
        (["--meta_steps", "many"], "--meta_steps"),
        (["--model", "/nonexistent/model"], "no such file"),
        (["--config", "/nonexistent.yaml"], "no such file"),
        (["--perk.meta_grad", "second"], "meta_grad must be one of"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tiny_model_dir, tmp_path, capsys, extra, message):
    code = run_main(main, tiny_args(tiny_model_dir, tmp_path) + extra, prog="perk.train")
    err = capsys.readouterr().err
    assert code != 0
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("perk.train: error: ")
    assert not (tmp_path / "run").exists(), "a failed start must not leave a run behind"


def test_module_entry_point_reports_a_misspelt_flag_in_one_line(tiny_model_dir, tmp_path):
    """``python -m perk.train``: exit status 2 and one line on stderr naming the right spelling."""
    out = run_cli("perk.train", tiny_args(tiny_model_dir, tmp_path) + ["--meta-steps", "2"])
    assert out.returncode == 2
    assert out.stderr == "perk.train: error: unknown flag --meta-steps: did you mean --meta_steps?\n"
    assert not (tmp_path / "run").exists()


def test_existing_run_is_never_overwritten(tiny_model_dir, tmp_path, capsys):
    assert main(tiny_args(tiny_model_dir, tmp_path, steps=1) + ["--methods", "perk"]) == 0
    before = (tmp_path / "run" / "results.json").read_bytes()
    capsys.readouterr()
    assert run_main(main, tiny_args(tiny_model_dir, tmp_path, steps=1), prog="perk.train") != 0
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "run" / "results.json").read_bytes() == before


OFFICIAL = Path(__file__).parent / "data" / "official"


def test_train_on_official_files_with_support_targets(tiny_model_dir, tmp_path, capsys):
    argv = tiny_args(tiny_model_dir, tmp_path, "official", steps=1) + [
        "--methods", "perk", "--data.train_file", str(OFFICIAL / "student_records_recall.json"),
        "--data.eval_file", str(OFFICIAL / "babilong_array.json"), "--data.eval_problems", "1",
        "--data.support_targets", "true",
    ]
    assert main(argv) == 0
    run = tmp_path / "official"
    assert "data: 4 training and 1 held-out problems" in capsys.readouterr().out
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    (prediction,) = json.loads((run / "results.json").read_text())["predictions"]
    # Held out: the first problem of the array, trained and generated as a support-then-answer
    # target, scored on its output part.
    assert prediction["answer"] == "garden" and prediction["task"] == "babilong_array"
    assert "problems of " in (run / "results.md").read_text()


def test_a_train_file_without_eval_file_holds_out_its_last_problems(tmp_path):
    from perk.problems import make_problems

    _, config = parse_args(["--device", "cpu", "--data.train_file", str(OFFICIAL / "babilong.jsonl"),
                            "--data.eval_problems", "1", "--data.support_targets", "true"])
    adapted = SimpleNamespace(tokenizer=tiny_tokenizer(), window=1024)  # what the window checks use
    train, held_out = make_problems(config, adapted)
    assert [p["question"] for p in train] == ["Where is Daniel?", "Where is the apple?"]
    assert [p["question"] for p in held_out] == ["Where is John?"]
    assert held_out[0]["answer"] == (
        "<support>John Event 1: John travelled to the bathroom.</support>\n<output>bathroom</output>"
    )
    _, config = parse_args(["--device", "cpu", "--data.train_file", str(OFFICIAL / "babilong.jsonl")])
    with pytest.raises(UsageError, match="holds 3 problems, too few to hold out data.eval_problems=20"):
        make_problems(config, adapted)
    with pytest.raises(UsageError, match="data.train_file: no such file"):
        parse_args(["--device", "cpu", "--data.train_file", str(tmp_path / "missing.jsonl")])
