"""Markdown summary and plots from pytest-benchmark JSON files of the benchmark suites.

    python -m benchmarks.report RESULTS.json [MORE.json …] [--out STEM]

writes ``STEM.md`` (default STEM: the first file without ``.json``), ``STEM-encode.png`` and
``STEM-meta-step.png`` (time and peak memory against context length, log-log). Results of the
``encode_vs_prompt`` and ``meta_step`` suites are read from each benchmark's ``extra_info`` (see
``benchmarks/conftest.py``); every other benchmark is listed with its mean time. The issue's
targets are checked when the results are of the full (GPU) sizes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tools.shapes import QWEN2_5_0_5B

GIB = 1 << 30
MIB = 1 << 20
ENCODE_PROVIDERS = (("prompt", None), ("perk", 256), ("perk", 16), ("naive", 256))
META_MODES = ("fd", "exact", "first_order", "naive")
PLOT_UNROLL = 2  # the meta-step plot shows T = 2 (and first_order)
TARGET_MODEL = QWEN2_5_0_5B.name
MEMORY_NOTE = (
    "peak memory is torch.cuda.max_memory_allocated over the call (absolute: weights included) on a GPU, "
    "and on CPU the increase of the process's peak RSS over the call"
)
SAME_MEMORY_TOLERANCE = 0.10  # "the same memory": within 10 %
OTHER_EXTRAS = ("tflops", "gbps", "peak_extra_bytes", "oom")  # shown for the other suites' benchmarks


@dataclass(frozen=True)
class Result:
    """One benchmark of the encode_vs_prompt / meta_step suites (a pytest-benchmark entry)."""

    suite: str
    model: str
    provider: str
    tokens: int
    status: str
    seconds: float | None
    memory_bytes: int | None  # see MEMORY_NOTE: the absolute peak on GPU, the call's increase on CPU
    rank: int | None = None
    mode: str | None = None
    unroll_steps: int | None = None
    encode_seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def series(self) -> str:
        """The line a result belongs to in tables and plots."""
        if self.suite == "meta_step":
            return "first_order" if self.mode == "first_order" else f"{self.mode} T={self.unroll_steps}"
        if self.provider == "prompt":
            return "prompt-based generate"
        return f"{self.provider} r={self.rank}"


@dataclass(frozen=True)
class Report:
    """Everything read from the JSON files."""

    results: list[Result]
    others: list[dict]  # other suites' pytest-benchmark entries
    device: str
    size: str
    date: str
    commands: list[str]
    provenance: list[str]  # per file: commit, time, machine


@dataclass(frozen=True)
class TargetCheck:
    target: str
    measured: str
    met: bool | None  # None: not measured


def _result(entry: dict) -> Result:
    info = entry["extra_info"]
    memory_key = "peak_extra_bytes" if info.get("device") == "cpu" else "peak_memory_bytes"
    return Result(
        suite=info["suite"], model=info["model"], provider=info["provider"], tokens=int(info["tokens"]),
        status=info.get("status", "ok"), seconds=info.get("seconds"), memory_bytes=info.get(memory_key),
        rank=info.get("rank"), mode=info.get("mode"), unroll_steps=info.get("unroll_steps"),
        encode_seconds=info.get("encode_seconds"),
    )


def load(paths: Iterable[str | Path]) -> Report:
    """Read one or more pytest-benchmark JSON files (e.g. a suite split over several runs)."""
    results, others, devices, sizes, dates, commands, provenance = [], [], set(), set(), [], [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "benchmarks" not in data:
            raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks')")
        dates.append(str(data.get("datetime", ""))[:10])
        provenance.append(_provenance(Path(path).name, data))
        if data.get("command"):
            commands.append(data["command"])
        for entry in data["benchmarks"]:
            info = entry.get("extra_info", {})
            devices.add(info.get("device", "?"))
            if info.get("suite") in ("encode_vs_prompt", "meta_step"):
                results.append(_result(entry))
                sizes.add(info.get("size", "?"))
            else:
                others.append(entry)
    return Report(
        results, others, ", ".join(sorted(devices)) or "?", ", ".join(sorted(sizes)) or "?",
        max(dates) if dates else "?", commands, provenance,
    )


def _provenance(name: str, data: dict) -> str:
    """``NAME: commit C, TIME, CPU (cores, native bf16)`` from pytest-benchmark's commit and machine info."""
    commit, machine = data.get("commit_info", {}), data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    flags = set(cpu.get("flags", []))
    bf16 = f", {native_bf16_text(flags)}" if flags else ""
    return (f"{name}: commit {str(commit.get('id', '?'))[:10]}{' (dirty)' if commit.get('dirty') else ''}, "
            f"{data.get('datetime', '?')}, {cpu.get('brand_raw') or machine.get('processor') or '?'} "
            f"({cpu.get('count', '?')} cores{bf16})")


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------


def format_length(tokens: int) -> str:
    """4096 → "4K", 1048576 → "1M", 1000 → "1000"."""
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if tokens % scale == 0:
            return f"{tokens // scale}{unit}"
    return str(tokens)


def format_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def format_seconds(s: float | None) -> str:
    return "?" if s is None else f"{s:.3g} s"


def cell(result: Result | None) -> str:
    """``time / peak memory`` of a result, ``OOM``, or ``—`` when not run."""
    if result is None:
        return "—"
    if not result.ok:
        return "OOM" if result.status == "oom" else result.status
    return f"{format_seconds(result.seconds)} / {format_bytes(result.memory_bytes)}"


README = Path(__file__).resolve().parents[1] / "README.md"
# CPU flags of native bf16 dot products (oneDNN's fast path); without them torch emulates bf16 matmuls
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def native_bf16_text(flags: set[str]) -> str:
    """``native bf16: yes|no`` for a CPU's flags."""
    return f"native bf16: {'yes' if flags & NATIVE_BF16_FLAGS else 'no'}"


def cpu_name() -> str:
    """The CPU's model name and whether it multiplies bf16 natively (``/proc/cpuinfo``; the
    platform's processor string elsewhere): a CPU timing means little without it."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    lines = info.splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    name = name or platform.processor() or platform.machine()
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    return name + (f" ({native_bf16_text(flags)})" if flags else "")


def git_commit(mark_uncommitted: bool = False) -> str:
    """The checkout's short commit, the results files' provenance ('' outside a git checkout); with
    ``mark_uncommitted``, followed by " (uncommitted changes)" where tracked files differ from it."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=README.parent, check=False, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    head = git("rev-parse", "--short", "HEAD")
    if mark_uncommitted and head and git("status", "--porcelain", "--untracked-files=no"):
        head += " (uncommitted changes)"
    return head


def write_readme_section(name: str, text: str, readme: Path = README) -> bool:
    """Replace what README.md holds between ``<!-- {name}: begin -->`` and ``<!-- {name}: end -->``
    with ``text`` (the README's generated figures); False where the markers are missing."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    content = readme.read_text()
    if begin not in content or end not in content:
        return False
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{text.strip()}\n{end}{tail}")
    return True


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _find(results: list[Result], **fields) -> Result | None:
    for result in results:
        if all(getattr(result, k) == v for k, v in fields.items()):
            return result
    return None


def encode_tables(results: list[Result]) -> str:
    """Per base model: rows L, columns providers, cells ``time / peak`` (encode+answer, or generate)."""
    encode = [r for r in results if r.suite == "encode_vs_prompt"]
    parts = []
    for model in sorted({r.model for r in encode}):
        mine = [r for r in encode if r.model == model]
        columns = [(p, rank) for p, rank in ENCODE_PROVIDERS if _find(mine, provider=p, rank=rank)]
        header = ["L"] + [_find(mine, provider=p, rank=rank).series for p, rank in columns]
        rows = [
            [format_length(n)] + [cell(_find(mine, tokens=n, provider=p, rank=rank)) for p, rank in columns]
            for n in sorted({r.tokens for r in mine})
        ]
        parts.append(f"**{model}**\n\n" + markdown_table(header, rows))
    return "\n\n".join(parts)


def meta_step_table(results: list[Result]) -> str:
    """Rows (mode, T), columns L, cells ``time / peak``."""
    meta = [r for r in results if r.suite == "meta_step"]
    if not meta:
        return ""
    lengths = sorted({r.tokens for r in meta})
    keys = sorted({(r.mode, r.unroll_steps) for r in meta}, key=lambda k: (META_MODES.index(k[0]), k[1]))
    rows = [
        [_find(meta, mode=mode, unroll_steps=t).series]
        + [cell(_find(meta, mode=mode, unroll_steps=t, tokens=n)) for n in lengths]
        for mode, t in keys
    ]
    return markdown_table(["mode"] + [format_length(n) for n in lengths], rows)


def others_table(others: list[dict]) -> str:
    """The other suites' benchmarks: group, name, mean time, and their headline extra_info."""
    rows = []
    for entry in sorted(others, key=lambda e: (e.get("group") or "", e["name"])):
        info = entry.get("extra_info", {})
        extras = [_format_extra(key, info[key]) for key in OTHER_EXTRAS if info.get(key) not in (None, False)]
        mean = format_seconds(entry["stats"]["mean"])
        rows.append([entry.get("group") or "", entry["name"], mean, ", ".join(extras)])
    return markdown_table(["group", "benchmark", "mean", "extra"], rows) if rows else ""


def _format_extra(key: str, value: object) -> str:
    if key.endswith("bytes"):
        return f"{key}={format_bytes(value)}"
    return f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"


# ----------------------------------------------------------------------------------------------
# Targets of the issue (one H100, Qwen2.5-0.5B architecture)
# ----------------------------------------------------------------------------------------------


def _within(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def _all(*checks: bool | None) -> bool | None:
    return None if any(c is None for c in checks) else all(checks)


def _encode_check(results, tokens: int, rank: int, max_seconds: float, max_bytes: float) -> TargetCheck:
    r = _find(results, suite="encode_vs_prompt", model=TARGET_MODEL, provider="perk", rank=rank, tokens=tokens)
    target = f"perk encode {format_length(tokens)}, r={rank}: ≤ {max_seconds:g} s and ≤ {max_bytes / GIB:g} GiB"
    if r is None or not r.ok:
        return TargetCheck(target, cell(r), None if r is None else False)
    met = _all(_within(r.encode_seconds, max_seconds), _within(r.memory_bytes, max_bytes))
    return TargetCheck(target, f"encode {format_seconds(r.encode_seconds)}, peak {format_bytes(r.memory_bytes)}", met)


def _faster_than_prompt(results, tokens: int, rank: int) -> TargetCheck:
    target = f"perk encode+answer {format_length(tokens)}, r={rank}: faster than prompt-based generate, less memory"
    perk = _find(results, suite="encode_vs_prompt", model=TARGET_MODEL, provider="perk", rank=rank, tokens=tokens)
    prompt = _find(results, suite="encode_vs_prompt", model=TARGET_MODEL, provider="prompt", tokens=tokens)
    if perk is None or prompt is None or not perk.ok:
        return TargetCheck(target, f"perk {cell(perk)}; prompt {cell(prompt)}", None if perk is None else False)
    if not prompt.ok:  # prompt-based inference ran out of memory where perk did not
        return TargetCheck(target, f"perk {cell(perk)}; prompt OOM", True)
    met = _all(
        None if perk.seconds is None or prompt.seconds is None else perk.seconds < prompt.seconds,
        None if perk.memory_bytes is None or prompt.memory_bytes is None else perk.memory_bytes < prompt.memory_bytes,
    )
    return TargetCheck(target, f"perk {cell(perk)}; prompt {cell(prompt)}", met)


def _same_memory(a: Result | None, b: Result | None) -> bool | None:
    if a is None or b is None or a.memory_bytes is None or b.memory_bytes is None:
        return None
    return a.memory_bytes <= b.memory_bytes * (1 + SAME_MEMORY_TOLERANCE)


def _million_check(results) -> TargetCheck:
    target = "perk encode 1M, r=16: ≤ 16 s with the same peak memory as 8K (within 10 %)"
    big = _find(results, suite="encode_vs_prompt", model=TARGET_MODEL, provider="perk", rank=16, tokens=1 << 20)
    small = _find(results, suite="encode_vs_prompt", model=TARGET_MODEL, provider="perk", rank=16, tokens=8192)
    if big is None or not big.ok:
        return TargetCheck(target, cell(big), None if big is None else False)
    measured = f"encode {format_seconds(big.encode_seconds)}, peak {format_bytes(big.memory_bytes)}"
    measured += f" (8K: {format_bytes(small.memory_bytes) if small else '—'})"
    return TargetCheck(target, measured, _all(_within(big.encode_seconds, 16.0), _same_memory(big, small)))


def _meta_checks(results) -> list[TargetCheck]:
    def fd(t):
        return _find(results, suite="meta_step", mode="fd", unroll_steps=t, tokens=8192)

    target = "meta-step 8K, T=2, fd: ≤ 1 s and ≤ 8 GiB"
    r = fd(2)
    if r is None or not r.ok:
        speed = TargetCheck(target, cell(r), None if r is None else False)
    else:
        speed = TargetCheck(target, cell(r), _all(_within(r.seconds, 1.0), _within(r.memory_bytes, 8 * GIB)))
    peaks = {t: fd(t) for t in (1, 2, 4)}
    measured = ", ".join(f"T={t}: {format_bytes(p.memory_bytes) if p and p.ok else cell(p)}" for t, p in peaks.items())
    flat = _same_memory(peaks[4], peaks[1]) if all(p and p.ok for p in peaks.values()) else None
    return [speed, TargetCheck("meta-step 8K, fd: peak memory flat in T (T=4 within 10 % of T=1)", measured, flat)]


def target_checks(results: list[Result]) -> list[TargetCheck]:
    """The issue's targets for the engine, each with the measured figure."""
    return [
        _encode_check(results, 8192, 256, 0.25, 4 * GIB),
        _encode_check(results, 128 * 1024, 256, 3.0, 4 * GIB),
        _faster_than_prompt(results, 128 * 1024, 16),
        _million_check(results),
        *_meta_checks(results),
    ]


def targets_table(report: Report) -> str:
    if report.size != "full":
        return (
            f"_The targets are for the full sizes on one H100; these results are `{report.size}` sizes, "
            "so they are not checked._"
        )
    verdicts = {True: "met", False: "**not met**", None: "not measured"}
    rows = [[c.target, c.measured, verdicts[c.met]] for c in target_checks(report.results)]
    return markdown_table(["target", "measured", "verdict"], rows)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def _plot(
    path: Path, title: str, panels: list[tuple[str, list[Result]]], series: Callable[[Result], str], on_cpu: bool
) -> bool:
    """One row per panel (title, results), columns time and peak memory, log-log; False if empty."""
    panels = [(name, [r for r in rows if r.ok and r.seconds is not None]) for name, rows in panels]
    panels = [(name, rows) for name, rows in panels if rows]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

    labels = sorted({series(r) for name, rows in panels for r in rows})
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # one colour per series everywhere
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4 * len(panels)), squeeze=False)
    for (name, rows), (ax_time, ax_memory) in zip(panels, axes):
        lengths = sorted({r.tokens for r in rows})
        for label in sorted({series(r) for r in rows}):
            mine = sorted((r for r in rows if series(r) == label), key=lambda r: r.tokens)
            style = dict(marker="o", label=label, color=colors[label])
            ax_time.plot([r.tokens for r in mine], [r.seconds for r in mine], **style)
            with_memory = [r for r in mine if r.memory_bytes]  # a CPU increase of 0 has no log
            if with_memory:
                ax_memory.plot([r.tokens for r in with_memory], [r.memory_bytes / GIB for r in with_memory], **style)
        memory_label = "peak RSS increase (GiB)" if on_cpu else "peak memory (GiB)"
        for ax, ylabel in ((ax_time, "time (s)"), (ax_memory, memory_label)):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator(lengths))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_length(int(x))))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{name}: {ylabel.split(' (')[0]}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_encode(report: Report, path: Path) -> bool:
    encode = [r for r in report.results if r.suite == "encode_vs_prompt"]
    panels = [
        (model, [r for r in encode if r.model == model])
        for model in sorted({r.model for r in encode})
    ]
    title = f"perk encode + answer vs prompt-based generate (16 new tokens) — {report.device}, {report.date}"
    return _plot(path, title, panels, lambda r: r.series, report.device == "cpu")


def plot_meta_step(report: Report, path: Path) -> bool:
    meta = [
        r for r in report.results
        if r.suite == "meta_step" and (r.mode == "first_order" or r.unroll_steps == PLOT_UNROLL)
    ]
    title = f"one meta-training step (gradient through T={PLOT_UNROLL} of N=4 inner steps)"
    title += f" — {report.device}, {report.date}"
    return _plot(path, title, [(TARGET_MODEL, meta)], lambda r: r.series, report.device == "cpu")


# ----------------------------------------------------------------------------------------------
# The whole report
# ----------------------------------------------------------------------------------------------


def summary_markdown(report: Report, images: dict[str, str]) -> str:
    """The summary: header (device, date, command), targets, tables, plots (``images``: name → file)."""
    lines = [
        f"# perk benchmarks — {report.device}, {report.date}",
        "",
        f"Sizes: `{report.size}`. Command: " + ("; ".join(f"`{c}`" for c in report.commands) or "?") + ".",
        "Ran at: " + ("; ".join(report.provenance) or "?") + ".",
        f"Cells are `mean time / peak memory`: {MEMORY_NOTE} (see benchmarks/README.md). "
        "OOM: out of memory; —: not run.",
        "",
        "## Targets",
        "",
        targets_table(report),
    ]
    encode = encode_tables(report.results)
    if encode:
        lines += ["", "## Encode vs prompt (context of L tokens → 16 answer tokens)", "", encode]
        if "encode" in images:
            lines += ["", f"![encode vs prompt]({images['encode']})"]
    meta = meta_step_table(report.results)
    if meta:
        lines += ["", "## Meta-step (one problem, N = 4 inner steps, gradient through the last T)", "", meta]
        if "meta_step" in images:
            lines += ["", f"![meta-step]({images['meta_step']})"]
    others = others_table(report.others)
    if others:
        lines += ["", "## Other benchmarks", "", others]
    return "\n".join(lines) + "\n"


def plotting_available() -> bool:
    """matplotlib is importable (the GPU machine may lack it; the JSON can be plotted elsewhere)."""
    return importlib.util.find_spec("matplotlib") is not None


def write_report(paths: list[str | Path], stem: str | Path | None = None) -> list[Path]:
    """Write ``STEM.md`` and the PNG plots next to it; returns the files written."""
    if not paths:
        raise ValueError("paths must name at least one pytest-benchmark JSON file")
    stem = Path(stem) if stem is not None else Path(paths[0]).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    report = load(paths)
    written, images = [], {}
    can_plot = plotting_available()
    for key, plot in (("encode", plot_encode), ("meta_step", plot_meta_step)) if can_plot else ():
        path = stem.parent / f"{stem.name}-{key.replace('_', '-')}.png"
        if plot(report, path):
            written.append(path)
            images[key] = path.name
    markdown = summary_markdown(report, images)
    if not can_plot:
        markdown += (
            "\n_No plots: matplotlib is not installed here; `python -m benchmarks.report "
            + " ".join(Path(p).name for p in paths) + "` where it is draws them._\n"
        )
    path = stem.parent / f"{stem.name}.md"
    path.write_text(markdown)
    return [path, *written]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s)")
    parser.add_argument("--out", help="output stem (default: the first JSON file without .json)")
    args = parser.parse_args(argv)
    for path in write_report(args.json, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
