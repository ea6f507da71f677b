"""The dataset command line: python -m perk.data generate|stats."""

from __future__ import annotations

import subprocess
import sys

import pytest

from perk.cli import run_main
from perk.data import main
from perk.tasks import read_jsonl
from tests.test_tasks_lengths import TOKENIZERS


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    TOKENIZERS["bpe"]().save_pretrained(path)
    return str(path)


def test_generate_then_stats(tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "qa2.jsonl"
    argv = ["generate", "--task", "babilong/qa2", "--length", "2k", "--n", "7", "--seed", "3", "--out", str(out),
            "--tokenizer", tokenizer_dir, "--depth", "50", "--no_order_markers", "--doc_tokens", "64"]
    assert main(argv) == 0
    records = read_jsonl(out)
    assert len(records) == 7
    assert all(r["length_tokens"] == 2048 and abs(r["depth"] - 0.5) <= 0.05 for r in records)
    assert not any(r["order_markers"] or "Event" in " ".join(r["support"]) for r in records)
    assert "wrote 7 problems" in capsys.readouterr().out
    assert main(["stats", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "7 problems" in summary and "babilong/qa2: 7 problems" in summary and "target lengths: 2048" in summary


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["generate", "--task", "babilong/qa9", "--length", "1k", "--n", "2", "--out", "x.jsonl"], 2, "invalid choice"),
        (["generate", "--task", "babilong/qa1", "--length", "8q", "--n", "2", "--out", "x.jsonl"], 2, "8q"),
        (["generate", "--task", "babilong/qa1", "--length", "1k", "--n", "0", "--out", "x.jsonl"], 2, "positive"),
        (["generate", "--task", "babilong/qa1", "--length", "1k", "--n", "2", "--out", "x.jsonl", "--depth", "101"], 2,
         "percentage from 0 to 100"),
        (["generate", "--task", "babilong/qa1", "--length", "40", "--n", "2", "--out", "{tmp}/x.jsonl",
          "--tokenizer", "{tok}"], 1, "too short"),
        (["generate", "--task", "babilong/qa1", "--length", "1k", "--n", "2", "--out", "{tmp}/no/dir/x.jsonl",
          "--tokenizer", "{tok}"], 1, "does not exist"),
        (["generate", "--task", "babilong/qa1", "--length", "1k", "--n", "2", "--out", "{tmp}/x.jsonl",
          "--tokenizer", "{tmp}/missing"], 1, "missing"),
        (["stats", "{tmp}/missing.jsonl"], 1, "does not exist"),
        (["generate", "--task", "babilong/qa1", "--length", "1k", "--n", "2", "--out", "x.jsonl", "--doc-tokens", "64"],
         2, "unknown flag --doc-tokens: did you mean --doc_tokens?"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_status(tmp_path, tokenizer_dir, capsys, argv, status, message):
    argv = [arg.format(tmp=tmp_path, tok=tokenizer_dir) for arg in argv]
    assert exit_status(argv) == status
    error = capsys.readouterr().err
    assert error.startswith("perk.data: error:") and message in error and error.count("\n") == 1
    assert not list(tmp_path.glob("**/*.jsonl*"))


def exit_status(argv: list[str]) -> int:
    """The exit status of ``python -m perk.data`` with these arguments."""
    return run_main(main, argv, prog="perk.data")


def test_module_entry_point_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "perk.data", "stats", str(tmp_path / "missing.jsonl")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and result.stderr.startswith("perk.data: error:")


def test_generate_lists_and_writes_the_api_retrieval_task(tmp_path, tokenizer_dir, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "longgorilla/stdlib" in capsys.readouterr().out
    out = tmp_path / "api.jsonl"
    argv = ["generate", "--task", "longgorilla/stdlib", "--length", "3k", "--n", "3", "--out", str(out),
            "--tokenizer", tokenizer_dir, "--depth", "50"]
    assert main(argv) == 0
    records = read_jsonl(out)
    assert [r["task"] for r in records] == ["longgorilla/stdlib"] * 3
    assert all(r["question"].startswith("Instruction: Write an API implementation that ") for r in records)
    assert main(["stats", str(out)]) == 0
    assert "longgorilla/stdlib: 3 problems" in capsys.readouterr().out
