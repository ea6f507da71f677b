"""python -m perk.check_meta_grad on tiny models: the spread over problems and fd steps, the exit
status from the 10th percentile, and a saved run's meta-parameters (``--checkpoint``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import perk.check_meta_grad as check_meta_grad
from perk.check_meta_grad import main, percentile, perk_models, saved_meta_parameters
from perk.cli import run_main
from perk.runs import read_run_config
from tests.test_train_cli import train_tiny_run
from tests.tiny_models import save_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    monkeypatch.setenv("PERK_KERNELS_BACKEND", "torch")


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    return save_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished one-step perk.train run of a tiny Llama, its meta-parameters moved off their init."""
    return train_tiny_run(tmp_path_factory.mktemp("check-run"), "--methods", "perk", steps=1, context_tokens=800)


def check_args(model_dir, *extra):
    return ["--model", str(model_dir), "--device", "cpu", "--perk.rank", "4", "--perk.segment_len", "32",
            "--perk.inner_steps", "3", "--perk.unroll_steps", "2", "--perk.inner_lr", "1.0",
            "--context_tokens", "600", "--problems", "2", *extra]  # byte-level tokens: a qa1 story needs ~460


def table(out: str) -> dict[str, list[str]]:
    """The printed table's rows by "mode step", as their cells."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    return {f"{r[0]} {r[1]}": r for r in rows[1:]}


def test_percentile_interpolates_between_order_statistics():
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([0.0, 10.0], 0.1) == pytest.approx(1.0)
    assert percentile([5.0], 0.1) == 5.0


def test_reports_the_spread_of_every_mode_and_passes_in_bf16(tiny_gpt2_dir, capsys):
    assert main(check_args(tiny_gpt2_dir, "--base_dtype", "bfloat16", "--min_cosine", "0.99")) == 0
    out = capsys.readouterr().out
    rows = table(out)
    assert set(rows) == {"exact -", "fd auto", "fd auto x0.5", "fd auto x2", "first_order -"}, rows
    assert "base model in bfloat16" in out and "2 problem(s), one at a time" in out
    median, p10, minimum = (float(c) for c in rows["fd auto"][2:5])
    assert 0.99 <= minimum <= p10 <= median <= 1.0
    assert "the run's mode (fd): 10th percentile of the θ cosine over 2 problem(s)" in out
    stability = out.split("stability of the reference")[1].split("\n")[0]
    median, minimum = (float(stability.split(word)[1].split(",")[0]) for word in ("median ", "min "))
    assert 0.99 <= minimum <= median <= 1.0  # a tiny model's reference is smooth at bf16's resolution
    assert "turns within a bf16 rounding" not in out


def test_fails_when_the_10th_percentile_is_below_min_cosine(tiny_gpt2_dir, capsys):
    # a step of 30 (‖φ‖ is ~5) is all truncation error
    code = main(check_args(tiny_gpt2_dir, "--base_dtype", "bfloat16", "--perk.fd_epsilon", "30", "--fd_scales", ""))
    out = capsys.readouterr().out
    assert code == 1 and "BELOW --min_cosine 0.95" in out
    assert set(table(out)) == {"exact -", "fd 30", "first_order -"}


def test_says_where_the_reference_itself_is_unstable(tiny_gpt2_dir, capsys, monkeypatch):
    monkeypatch.setattr(check_meta_grad, "reference_stability", lambda *args: {"adapter_init": 0.5, "inner_lr_log": 0.9})
    code = main(check_args(tiny_gpt2_dir, "--base_dtype", "bfloat16", "--perk.fd_epsilon", "30", "--fd_scales", ""))
    out = capsys.readouterr().out
    assert code == 1 and "median 0.5000, min 0.5000" in out
    assert "on 2 problem(s) the reference itself turns within a bf16 rounding of the state" in out
    assert "2 of them below --min_cosine" in out


@pytest.mark.parametrize("native", [False, True])
def test_bf16_products_are_emulated_only_on_a_cpu_without_native_bf16(tiny_gpt2_dir, capsys, monkeypatch, native):
    monkeypatch.setattr(check_meta_grad, "cpu_has_native_bf16", lambda: native)
    entered = []
    real = check_meta_grad.emulate_bf16_matmuls
    monkeypatch.setattr(check_meta_grad, "emulate_bf16_matmuls", lambda enabled: entered.append(enabled) or real(enabled))
    assert main(check_args(tiny_gpt2_dir, "--base_dtype", "bfloat16", "--fd_scales", "", "--problems", "1")) == 0
    out = capsys.readouterr().out
    assert ("this CPU has no native bf16" in out) is not native
    assert entered and set(entered) == {not native}


def test_checks_a_saved_runs_meta_parameters(trained_run, capsys):
    config = read_run_config(trained_run)
    saved = saved_meta_parameters(trained_run)
    reference, checked = perk_models(config, torch.bfloat16, "cpu", saved)
    for model in (reference, checked):
        for name, tensor in model.meta_parameters().items():
            assert torch.equal(tensor.detach(), saved[name])
    assert reference.model.dtype == torch.float32 and checked.model.dtype == torch.bfloat16
    # the reference holds the checked model's bf16-rounded weights
    assert torch.equal(reference.model.lm_head.weight, checked.model.lm_head.weight.float())
    assert not torch.equal(saved["inner_lr_log"], torch.zeros_like(saved["inner_lr_log"])), "trained state expected"

    code = main(["--checkpoint", str(trained_run), "--base_dtype", "bfloat16", "--problems", "2",
                 "--fd_scales", "", "--min_cosine", "0.5", "--context_tokens", "800"])
    out = capsys.readouterr().out
    assert code == 0 and f"the meta-parameters of {trained_run}" in out and "2 problem(s)" in out


@pytest.mark.parametrize(
    "args, message",
    [(["--checkpoint", "/nonexistent"], "not a finished perk.train run"),
     (["--fd_scales", "1,-2"], "expected comma-separated positive numbers")],
)
def test_bad_input_is_one_line(args, message, capsys):
    assert run_main(main, args, prog="perk.check_meta_grad") == 2
    assert message in capsys.readouterr().err


def test_entry_point_refuses_a_hyphenated_flag():
    """``python -m perk.check_meta_grad``: exit status 2 and one line naming the right spelling."""
    result = subprocess.run([sys.executable, "-m", "perk.check_meta_grad", "--min-cosine", "0.9"], capture_output=True,
                            text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert result.stderr == "perk.check_meta_grad: error: unknown flag --min-cosine: did you mean --min_cosine?\n"
