"""Evaluation summaries: grouping, percentages, markdown table and plot files."""

import json

from perk.report import Prediction, accuracy_table, summarize, write_results


def _prediction(method, length, depth, correct, choice=None, truncated=False):
    return Prediction(
        method=method, task="babilong/qa1", length_tokens=length, depth=depth, question="Where is Mary?",
        answer="kitchen", prediction="kitchen" if correct else "the garden", exact_match=correct,
        f1=1.0 if correct else 0.0, choice=choice, truncated=truncated,
    )


def test_summary_groups_and_scores():
    predictions = [
        _prediction("perk", 1024, 0.0, True, "kitchen"),
        _prediction("perk", 1024, 1.0, False, "kitchen"),
        _prediction("perk", 2048, 0.0, False, "garden"),
        _prediction("zeroshot", 1024, 0.0, False, "garden", truncated=True),
    ]
    rows = {(r["method"], r["length_tokens"]): r for r in summarize(predictions)}
    assert rows[("perk", 1024)]["exact_match"] == 50.0
    assert rows[("perk", 1024)]["choice_accuracy"] == 100.0
    assert rows[("perk", 2048)]["choice_accuracy"] == 0.0
    assert rows[("zeroshot", 1024)]["truncated"] == 1
    by_depth = summarize(predictions, by=("depth_pct",))
    assert {(r["method"], r["depth_pct"]): r["n"] for r in by_depth} == {
        ("perk", 0): 2, ("perk", 100): 1, ("zeroshot", 0): 1}
    table = accuracy_table(summarize(predictions))
    assert "| perk | babilong/qa1 | 1K | 2 | 50.0 | 50.0 | 100.0 | 0 |" in table


def test_write_results_files(tmp_path):
    predictions = [_prediction(m, n, d, (n + int(d * 4)) % 3 == 0, "kitchen")
                   for m in ("perk", "ftic") for n in (1024, 2048) for d in (0.0, 0.5, 1.0)]
    rows, table = write_results(tmp_path, "eval", predictions, by_depth=True, header="# title\n\n")
    assert {p.name for p in tmp_path.iterdir()} == {"eval.json", "eval.md", "eval_vs_length.png", "eval_vs_depth.png"}
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["summary"] == rows and len(saved["predictions"]) == len(predictions)
    assert (tmp_path / "eval.md").read_text() == "# title\n\n" + table
    assert (tmp_path / "eval_vs_length.png").read_bytes()[:4] == b"\x89PNG"
