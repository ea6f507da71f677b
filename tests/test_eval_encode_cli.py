"""python -m perk.eval and perk.encode on a tiny trained run: outputs, and one-line errors.

In-process (``run_main(main, argv)``) where a subprocess adds nothing; one error case of each runs
``python -m perk.eval`` / ``python -m perk.encode`` itself (exit status and stderr)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from perk import eval as perk_eval
from perk import encode as perk_encode
from perk.cli import run_main
from perk.tasks import generate, write_jsonl
from tests.test_train_cli import train_tiny_run
from tests.tiny_models import save_tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    monkeypatch.setenv("PERK_KERNELS_BACKEND", "torch")  # whole runs: the interpreter is too slow


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("eval-run"), steps=1)


def test_eval_writes_table_json_and_plots(trained_run, tmp_path, capsys):
    out = tmp_path / "eval"
    code = run_main(perk_eval.main, ["--checkpoint", str(trained_run), "--lengths", "1024,1280", "--depths", "0,100",
                                     "--n", "1", "--out", str(out), "--max_new_tokens", "2"])
    assert code == 0
    results = json.loads((out / "eval.json").read_text())
    # Rows are grouped by where the first supporting fact really landed (a 1K-byte context full
    # of facts cannot put the last move at depth 0), so the expected groups come from the
    # predictions themselves: one problem per requested length x depth, for each method.
    predictions = results["predictions"]
    assert len(predictions) == 3 * 2 * 2
    expected = {(p["method"], p["length_tokens"], round(p["depth"] * 100)) for p in predictions}
    summary = results["summary"]
    assert {(r["method"], r["length_tokens"], r["depth_pct"]) for r in summary} == expected
    assert {m for m, _, _ in expected} == {"perk", "zeroshot", "ftic"}
    assert {n for _, n, _ in expected} == {1024, 1280}
    assert sum(r["n"] for r in summary) == len(predictions)
    for name in ("eval.md", "eval_vs_length.png", "eval_vs_depth.png"):
        assert (out / name).stat().st_size > 0
    assert "| perk |" in capsys.readouterr().out


def test_eval_on_a_users_jsonl(trained_run, tmp_path):
    data = tmp_path / "mine.jsonl"
    write_jsonl(data, generate("student_records/relation", 2, 1024, tiny_tokenizer(), seed=5))
    out = tmp_path / "eval"
    code = run_main(perk_eval.main, ["--checkpoint", str(trained_run), "--data", str(data), "--methods", "perk",
                                     "--out", str(out), "--max_new_tokens", "2"])
    assert code == 0
    predictions = json.loads((out / "eval.json").read_text())["predictions"]
    assert len(predictions) == 2 and all(p["choice"] in ("yes", "no") for p in predictions)


def test_eval_reads_an_official_student_records_database(trained_run, tmp_path):
    data = Path(__file__).parent / "data" / "official" / "student_records_recall.json"
    out = tmp_path / "eval"
    code = run_main(perk_eval.main, ["--checkpoint", str(trained_run), "--data", str(data), "--methods", "perk",
                                     "--out", str(out), "--max_new_tokens", "2"])
    assert code == 0
    predictions = json.loads((out / "eval.json").read_text())["predictions"]
    assert [p["answer"] for p in predictions] == ["Alma Reyes", "Drama & Theatre Arts", "28", "Junior"]
    assert {p["task"] for p in predictions} == {"student_records_recall"}


def test_encode_answers_from_a_file_and_saves_a_peft_adapter(trained_run, tmp_path, capsys):
    context = tmp_path / "story.txt"
    context.write_text("Mary went to the kitchen.\n\nJohn took the apple.\n\nMary travelled to the garden.\n")
    code = run_main(perk_encode.main, ["--checkpoint", str(trained_run), "--context", str(context),
                                       "--question", "Where is Mary?", "--question", "Who took the apple?",
                                       "--save_memory", str(tmp_path / "memory"), "--max_new_tokens", "3"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("Q: ") == 2 and "encoded" in out
    config = json.loads((tmp_path / "memory" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (tmp_path / "memory" / "adapter_model.safetensors").is_file()


def _cli(module, args):
    env = {**os.environ, "PERK_KERNELS_BACKEND": "torch", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)


@pytest.mark.parametrize(
    "cli, args, message",
    [
        (perk_eval, ["--lengths", "1x"], "malformed lengths"),
        (perk_eval, ["--task", "babilong/qa7"], "invalid choice"),
        (perk_eval, ["--data", "/nonexistent.jsonl"], "no such file"),
        (perk_eval, ["--methods", "perk,oracle"], "malformed methods"),
        (perk_eval, ["--max-new-tokens", "2"], "unknown flag --max-new-tokens: did you mean --max_new_tokens?"),
        (perk_encode, ["--context", "/nonexistent.txt", "--question", "q"], "no such file"),
        (perk_encode, ["--context", "x.txt", "--question", "q", "--save-memory", "m"],
         "unknown flag --save-memory: did you mean --save_memory?"),
    ],
)
def test_bad_input_is_one_line(trained_run, capsys, cli, args, message):
    code = run_main(cli.main, ["--checkpoint", str(trained_run), *args], prog="perk.x")
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("perk.x: error: ")


def test_encode_entry_point_reports_bad_input_in_one_line(trained_run):
    result = _cli("perk.encode", ["--checkpoint", str(trained_run), "--context", "/nonexistent.txt", "--question", "q"])
    assert result.returncode == 2
    assert result.stderr == "perk.encode: error: --context: no such file: /nonexistent.txt\n"


def test_checkpoint_of_another_base_model_is_refused(trained_run, tmp_path):
    before = sorted(p.name for p in trained_run.iterdir())
    other = save_tiny_model("gpt2", tmp_path / "gpt2")
    result = _cli("perk.eval", ["--checkpoint", str(trained_run), "--model", str(other), "--n", "1"])
    assert result.returncode != 0 and "does not fit base model" in result.stderr
    assert "Traceback" not in result.stderr
    # transformers' own "Loading weights" progress bar may precede it; the error is one line.
    assert len([line for line in result.stderr.splitlines() if line.startswith("perk.eval: error:")]) == 1
    assert sorted(p.name for p in trained_run.iterdir()) == before, "nothing written on a refused checkpoint"
