"""benchmarks.report on small synthetic pytest-benchmark JSON files: tables, targets, plots."""

from __future__ import annotations

import json

import pytest

from benchmarks import report

GIB = 1 << 30
K = 1024


def _entry(name: str, seconds: float | None, **info) -> dict:
    """A pytest-benchmark entry as the suites write it (only the fields report.py reads)."""
    info.setdefault("status", "ok")
    info.setdefault("size", "full")
    info.setdefault("device", "NVIDIA H100 80GB HBM3")
    if seconds is not None:
        info["seconds"] = seconds
    return {"name": name, "group": None, "extra_info": info, "stats": {"mean": seconds or 0.0}}


def _encode(provider, rank, tokens, seconds, peak_gib, encode_seconds=None, status="ok", model="qwen2.5-0.5b"):
    return _entry(
        f"encode-{provider}-{rank}-{tokens}", seconds if status == "ok" else None, suite="encode_vs_prompt",
        model=model, provider=provider, rank=rank, tokens=tokens, status=status,
        peak_memory_bytes=None if peak_gib is None else int(peak_gib * GIB), peak_extra_bytes=7,
        encode_seconds=encode_seconds,
    )


def _meta(mode, unroll, tokens, seconds, peak_gib, status="ok"):
    return _entry(
        f"meta-{mode}-{unroll}-{tokens}", seconds if status == "ok" else None, suite="meta_step",
        model="qwen2.5-0.5b", provider="naive" if mode == "naive" else "perk", mode=mode, unroll_steps=unroll,
        tokens=tokens, status=status, peak_memory_bytes=None if peak_gib is None else int(peak_gib * GIB),
    )


def _gpu_results() -> list[dict]:
    return [
        _encode("prompt", None, 8 * K, 0.41, 1.36),
        _encode("prompt", None, 128 * K, 2.38, 6.96),
        _encode("perk", 256, 8 * K, 0.30, 3.0, encode_seconds=0.2),  # encode within 0.25 s and 4 GiB
        _encode("perk", 256, 128 * K, 5.2, 3.5, encode_seconds=5.0),  # too slow: 5 s > 3 s
        _encode("perk", 16, 8 * K, 0.2, 2.0, encode_seconds=0.1),
        _encode("perk", 16, 128 * K, 1.5, 2.1, encode_seconds=1.4),  # faster and leaner than prompt
        _encode("perk", 16, 1 << 20, 12.0, 2.1, encode_seconds=11.9),  # ≤ 16 s, memory within 10 % of 8K
        _encode("naive", 256, 8 * K, 1.3, 33.3, encode_seconds=1.2),
        _encode("naive", 256, 32 * K, None, None, status="oom"),
        _encode("perk", 16, 8 * K, 0.9, 0.5, encode_seconds=0.8, model="smollm2-135m"),
        _meta("fd", 1, 8 * K, 0.7, 5.0),
        _meta("fd", 2, 8 * K, 0.9, 5.2),  # ≤ 1 s, ≤ 8 GiB
        _meta("fd", 4, 8 * K, 1.3, 7.5),  # 1.5 × T=1: not flat
        _meta("first_order", 0, 8 * K, 0.4, 4.0),
        _meta("naive", 2, 2 * K, 2.3, 36.8),
        _meta("naive", 2, 8 * K, None, None, status="oom"),
        _entry("test_lora_linear[fused]", 0.0012, tflops=512.3, oom=False),
    ]


def _write(tmp_path, entries, name="h100.json", **top) -> str:
    path = tmp_path / name
    data = {"benchmarks": entries, "datetime": "2026-01-02T03:04:05", "machine_info": {}}
    path.write_text(json.dumps({**data, **top}))
    return str(path)


def test_tables_show_time_and_memory_oom_and_missing(tmp_path):
    path = _write(tmp_path, _gpu_results(), command="python -m benchmarks.run",
                  commit_info={"id": "0123456789abcdef", "dirty": True},
                  machine_info={"cpu": {"brand_raw": "AMD EPYC", "count": 2, "flags": ["avx2"]}})
    markdown = report.summary_markdown(report.load([path]), images={})
    assert markdown.startswith("# perk benchmarks — NVIDIA H100 80GB HBM3, 2026-01-02")
    assert "`python -m benchmarks.run`" in markdown
    assert ("Ran at: h100.json: commit 0123456789 (dirty), 2026-01-02T03:04:05, AMD EPYC (2 cores, native bf16: no)."
            in markdown)
    lines = markdown.splitlines()
    assert "| L | prompt-based generate | perk r=256 | perk r=16 | naive r=256 |" in lines
    assert "| 8K | 0.41 s / 1.36 GiB | 0.3 s / 3.00 GiB | 0.2 s / 2.00 GiB | 1.3 s / 33.30 GiB |" in lines
    assert "| 32K | — | — | — | OOM |" in lines
    assert "| 1M | — | — | 12 s / 2.10 GiB | — |" in lines
    assert "| L | prompt-based generate | perk r=16 |" not in lines  # smollm2 has no prompt column
    assert "| L | perk r=16 |" in lines and "| 8K | 0.9 s / 512 MiB |" in lines
    assert "| mode | 2K | 8K |" in lines
    assert "| fd T=4 | — | 1.3 s / 7.50 GiB |" in lines
    assert "| first_order | — | 0.4 s / 4.00 GiB |" in lines
    assert "| naive T=2 | 2.3 s / 36.80 GiB | OOM |" in lines
    assert "|  | test_lora_linear[fused] | 0.0012 s | tflops=512 |" in lines


def test_targets_are_checked_against_the_measured_figures(tmp_path):
    checks = report.target_checks(report.load([_write(tmp_path, _gpu_results())]).results)
    verdicts = [c.met for c in checks]
    # 8K r=256 met; 128K r=256 too slow; 128K r=16 beats prompt; 1M met; meta 8K T=2 met; not flat in T.
    assert verdicts == [True, False, True, True, True, False]
    assert checks[1].measured == "encode 5 s, peak 3.50 GiB"
    assert "T=1: 5.00 GiB, T=2: 5.20 GiB, T=4: 7.50 GiB" == checks[5].measured


def test_targets_not_measured_and_oom(tmp_path):
    entries = [
        _encode("perk", 256, 8 * K, None, None, status="oom"),
        _encode("perk", 16, 128 * K, 1.5, 2.1, encode_seconds=1.4),
        _encode("prompt", None, 128 * K, None, None, status="oom"),
    ]
    checks = report.target_checks(report.load([_write(tmp_path, entries)]).results)
    assert checks[0].met is False and checks[0].measured == "OOM"  # perk itself ran out of memory
    assert checks[1].met is None  # 128K at r=256 not run
    assert checks[2].met is True  # prompt-based OOM where perk ran


def test_small_sizes_skip_targets_and_cpu_memory_is_the_increase(tmp_path):
    entry = _encode("perk", 16, 512, 0.5, None, encode_seconds=0.4)
    entry["extra_info"].update(size="small", device="cpu", peak_memory_bytes=900 << 20, peak_extra_bytes=12 << 20)
    loaded = report.load([_write(tmp_path, [entry], name="cpu.json")])
    markdown = report.summary_markdown(loaded, images={})
    assert "not checked" in markdown
    assert "| 512 | 0.5 s / 12 MiB |" in markdown.splitlines()


def test_write_report_writes_markdown_and_plots(tmp_path):
    path = _write(tmp_path, _gpu_results())
    written = report.write_report([path], tmp_path / "out" / "summary")
    names = sorted(p.name for p in written)
    assert names == ["summary-encode.png", "summary-meta-step.png", "summary.md"]
    for png in written[1:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "![encode vs prompt](summary-encode.png)" in markdown
    assert "![meta-step](summary-meta-step.png)" in markdown


def test_merging_files_and_no_plot_without_results(tmp_path):
    meta_only = _write(tmp_path, [_meta("fd", 2, 1 * K, 0.1, 1.0)], name="meta.json")
    other = _write(tmp_path, [_entry("test_kernel", 0.5)], name="kernels.json")
    written = report.write_report([meta_only, other], tmp_path / "merged")
    assert sorted(p.name for p in written) == ["merged-meta-step.png", "merged.md"]
    markdown = written[0].read_text()
    assert "| fd T=2 | 0.1 s / 1.00 GiB |" in markdown and "test_kernel" in markdown
    assert "encode vs prompt" not in markdown.lower().split("## targets")[1]


def test_without_matplotlib_the_summary_says_how_to_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "plotting_available", lambda: False)
    written = report.write_report([_write(tmp_path, _gpu_results())], tmp_path / "bare")
    assert [p.name for p in written] == ["bare.md"]
    markdown = written[0].read_text()
    assert "![" not in markdown and "`python -m benchmarks.report h100.json` where it is" in markdown


def test_load_rejects_other_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="not a pytest-benchmark JSON"):
        report.load([path])
    with pytest.raises(ValueError, match="paths"):
        report.write_report([])
