"""The convergence study's report (``benchmarks.meta_grad_convergence``) from its progress lines."""

import json

import pytest

from benchmarks.meta_grad_convergence import completed_steps, parse_args, write_report


def progress_lines(curves: dict[str, list[float]], exact_match: dict[str, float] | None = None) -> list[dict]:
    lines = [{"arm": arm, "step": 0, "kind": "held_out", "held_out_loss": curve[0]} for arm, curve in curves.items()]
    for arm, curve in curves.items():
        lines += [{"arm": arm, "step": s, "kind": "step", "train_loss": 0.0, "grad_norm": 1.0, "held_out_loss": loss,
                   "step_seconds": 10.0 * s, "eval_seconds": 1.0} for s, loss in enumerate(curve) if s > 0]
    for arm, match in (exact_match or {}).items():
        lines.append({"arm": arm, "step": len(curves[arm]) - 1, "kind": "exact_match", "exact_match": match})
    return lines


def test_report_measures_the_gap_to_the_reference_and_writes_the_readme_section(tmp_path):
    reference = [6.0, 5.0, 4.0, 4.0, 2.0]  # drop 4 nats
    curves = {"exact-fp32": reference, "fd-bf16": [6.0, 5.0, 4.0, 4.0, 3.0],  # mean |gap| 0.2 = 5% of the drop
              "first_order-bf16": [6.0, 5.5, 5.0, 5.0, 4.0]}  # 0.5+1+1+2 = 4.5 / 5 = 0.9 = 22.5%
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- meta-grad-convergence: begin -->\nold\n<!-- meta-grad-convergence: end -->\nafter\n")
    args = parse_args(["--steps", "4", "--out", str(tmp_path)])
    summary = write_report(args, progress_lines(curves, {"exact-fp32": 0.5, "fd-bf16": 0.5, "first_order-bf16": 0.25}), readme)
    assert not summary["partial"] and summary["steps"] == 4
    assert summary["gap_over_drop"]["fd-bf16"] == pytest.approx(0.05)
    assert summary["gap_over_drop"]["first_order-bf16"] == pytest.approx(0.225)
    assert summary["drop_over_reference_drop"]["first_order-bf16"] == pytest.approx(0.5)
    assert summary["mean_step_seconds"]["fd-bf16"] == pytest.approx(25.0)
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert "| fd-bf16 | 6.0000 | 3.0000 | 3.0000 | 0.75 | 0.050 | yes | 0.500 | 25 |" in text
    assert "| first_order-bf16 | 6.0000 | 4.0000 | 4.0000 | 0.50 | 0.225 | no | 0.250 | 25 |" in text
    assert "**partial" not in text
    saved = json.loads((tmp_path / "meta-grad-convergence.json").read_text())
    assert saved["curves"]["fd-bf16"] == curves["fd-bf16"] and (tmp_path / "meta-grad-convergence.png").stat().st_size > 0


def test_a_partial_study_reports_the_steps_every_arm_finished(tmp_path):
    curves = {"exact-fp32": [6.0, 5.0, 4.0], "fd-bf16": [6.0, 5.0, 4.5], "first_order-bf16": [6.0, 5.5]}
    progress = progress_lines(curves)
    assert completed_steps(progress) == 1
    args = parse_args(["--steps", "30", "--out", str(tmp_path)])
    readme = tmp_path / "README.md"
    readme.write_text("<!-- meta-grad-convergence: begin -->\n<!-- meta-grad-convergence: end -->\n")
    summary = write_report(args, progress, readme)
    assert summary["partial"] and summary["steps"] == 1 and summary["exact_match"] == {}
    assert summary["gap_over_drop"]["first_order-bf16"] == pytest.approx(0.25)  # (0 + 0.5) / 2 / 1
    assert "partial: 1 of 30 steps" in readme.read_text()
    assert "| first_order-bf16 | 6.0000 | 5.5000 | 5.5000 | 0.50 | 0.250 | no | – |" in readme.read_text()


def test_a_report_without_progress_says_to_run_the_study(tmp_path):
    with pytest.raises(SystemExit, match="no progress"):
        write_report(parse_args(["--out", str(tmp_path)]), [], tmp_path / "README.md")


def test_a_reference_that_never_decreases_is_an_error_not_a_ratio(tmp_path):
    curves = {name: [6.0, 6.5] for name in ("exact-fp32", "fd-bf16", "first_order-bf16")}
    with pytest.raises(SystemExit, match="did not decrease"):
        write_report(parse_args(["--steps", "1", "--out", str(tmp_path)]), progress_lines(curves), tmp_path / "README.md")
