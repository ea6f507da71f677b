"""Markdown summary of the CPU speed suite (``test_cpu_speed.py``) and of a CPU profile.

    python -m benchmarks.cpu_report RESULTS.json [MORE.json …] [--before BASE.json …]
        [--profile PROFILE.json] --out STEM

writes ``STEM.md``: the machine, the commands, commits and dates of the JSON files, the matmul
roofline, perk vs naive PEFT per dtype pair (min and median of the rounds), perk's fraction of the
roofline, the thread scaling, the meta-step of ``make run``, and (``--before``) the same rows of an
earlier commit measured on the same machine; ``--profile`` adds the top costs that
``python -m benchmarks.profile_cpu`` wrote.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from benchmarks.report import NATIVE_BF16_FLAGS

GB = 1e9


def _rows(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """(benchmark rows, per-file headers) of pytest-benchmark JSON files."""
    rows, files = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        commit = data.get("commit_info", {})
        files.append(dict(
            path=Path(path).name, command=data.get("command", "?"), date=data.get("datetime", "?"),
            commit=f"{commit.get('id', '?')[:10]}{' (dirty)' if commit.get('dirty') else ''}",
            machine=data.get("machine_info", {}),
        ))
        for entry in data["benchmarks"]:
            info = entry.get("extra_info", {})
            if info.get("suite") == "cpu_speed":
                stats = entry.get("stats", {})
                cpu = info.get("cpu_seconds") or [None]
                rows.append(dict(info, min=stats.get("min"), median=stats.get("median"), rounds=stats.get("rounds"),
                                 cpu_min=min(cpu) if cpu[0] is not None else None))
    return rows, files


def _find(rows: list[dict], **fields) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in fields.items()):
            return row
    return None


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _gb(value: float | None) -> str:
    return "—" if value is None else f"{value / GB:.2f} GB"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if not a or not b else f"{a / b:.2f}"


def _table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def _length(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def machine_text(files: list[dict]) -> str:
    info = files[0]["machine"] if files else {}
    cpu = info.get("cpu", {})
    perk = info.get("perk", {})
    flags = set(cpu.get("flags", []))
    bf16 = "native bf16 dot products (avx512_bf16 or AMX)" if flags & NATIVE_BF16_FLAGS else (
        "no native bf16 (no avx512_bf16 / AMX flag: torch emulates bf16 matmuls)")
    return (f"{cpu.get('brand_raw', platform.processor() or '?')}, {cpu.get('count', '?')} logical CPUs, {bf16}; "
            f"torch {perk.get('torch', '?')}, transformers {perk.get('transformers', '?')}")


def report(rows: list[dict], files: list[dict], before: list[dict], profile: dict | None) -> str:
    parts = ["# perk on a CPU, measured fairly (`benchmarks/test_cpu_speed.py`)", ""]
    parts.append(f"Machine: {machine_text(files)}.")
    parts.append("")
    for f in files:
        parts.append(f"* `{f['path']}`: {f['date']}, commit {f['commit']}:\n  `{f['command']}`")
    parts.append("")
    parts.append("SmolLM2-135M architecture at its real size; LoRA r=16, α=16, rsLoRA, all linear layers; "
                 "N=4 inner AdamW steps; 128-token segments; 1024 tokens per forward/backward for perk and "
                 "naive PEFT (`benchmarks/naive_perk.py`, fp32 adapters whatever the base dtype). One intra-op "
                 "thread unless a row says otherwise. Times in seconds: min and median of the rounds (a warm-up call "
                 "first where the model was just built, except at 4K); extra peak = the peak RSS increase over "
                 "the rounds (glibc's allocator untouched).")
    parts.append("")

    roofline = {r["dtype"]: r for r in rows if r.get("kind") == "roofline"}
    if roofline:
        parts += ["## Roofline: the model's matmuls alone (torch `mm`, one thread)", ""]
        parts.append(_table(
            ["dtype", "one 1K-token pass (fwd + input-grad matmuls) s", "GFLOP/s"],
            [[d, f"{r['pass_seconds']:.2f}", f"{r['gflops']:.0f}"] for d, r in roofline.items()],
        ))
        parts.append("")

    encode = [r for r in rows if r.get("kind") == "encode"]
    for dtype in dict.fromkeys(r["dtype"] for r in encode):
        parts += [f"## Encode, base model in {dtype} for both (adapters fp32)", ""]
        lines = []
        for tokens in sorted({r["tokens"] for r in encode if r["dtype"] == dtype}):
            perk = _find(encode, provider="perk", dtype=dtype, tokens=tokens, threads=1)
            naive = _find(encode, provider="naive", dtype=dtype, tokens=tokens, threads=1)
            roof = roofline.get(dtype)
            bound = roof["pass_seconds"] * (perk or {}).get("inner_steps", 4) * tokens / 1024 if roof else None
            lines.append([
                _length(tokens), f"{_s((perk or {}).get('min'))} / {_s((perk or {}).get('median'))}",
                f"{_s((naive or {}).get('min'))} / {_s((naive or {}).get('median'))}",
                f"**{_ratio((naive or {}).get('median'), (perk or {}).get('median'))}** "
                f"({_ratio((naive or {}).get('min'), (perk or {}).get('min'))})",
                f"{_s((perk or {}).get('cpu_min'))} / {_s((naive or {}).get('cpu_min'))}",
                f"{_gb((perk or {}).get('peak_extra_bytes'))} / {_gb((naive or {}).get('peak_extra_bytes'))}",
                "—" if bound is None or not perk else f"{bound:.2f} s: {100 * bound / perk['min']:.0f} %",
                "—" if bound is None or not naive else f"{100 * bound / naive['min']:.0f} %",
                "—" if bound is None or not naive else f"{200 * bound / naive['min']:.0f} %",
            ])
        parts.append(_table(
            ["tokens", "perk s (min / median)", "naive s (min / median)", "naive ÷ perk (median (min))",
             "CPU s, min: perk / naive",
             "extra peak perk / naive", f"{dtype} roofline: time, perk's fraction", "naive's fraction",
             "2x the naive needs"],
            lines,
        ))
        parts.append("")
        parts.append("The roofline is the matmuls of the N forward and input-gradient passes alone, at torch's own "
                     "`mm` rate: an upper bound on any engine that does this arithmetic in this dtype. Where \"2x the "
                     "naive needs\" is over 100 %, 2x the same-precision naive run is out of reach without doing "
                     "less arithmetic.")
        parts.append("")
        threaded = [r for r in encode if r["dtype"] == dtype and r["threads"] > 1 and r["provider"] == "perk"]
        for row in threaded:
            one = _find(encode, provider="perk", dtype=dtype, tokens=row["tokens"], threads=1)
            parts.append(f"perk {_length(row['tokens'])} encode on {row['threads']} threads: "
                         f"{_s(row['min'])} / {_s(row['median'])} s (min / median), "
                         f"**{_ratio((one or {}).get('min'), row['min'])}x** the one-thread min "
                         f"({_ratio((one or {}).get('median'), row['median'])}x the median).")
            parts.append("")

    meta = [r for r in rows if r.get("kind") == "meta_step"]
    if meta:
        first = meta[0]
        parts += [f"## Meta-step of `make run` (fd, T={first['unroll_steps']} of N={first['inner_steps']} "
                  f"{first['inner_optimizer']} steps, r={first['rank']}, {first['problems']} problems × "
                  f"{first['tokens']} tokens, {first['dtype']} base)", ""]
        naive = next((r for r in meta if r["provider"] == "naive"), None)
        lines = [[
            r["provider"], r["mode"], str(r["threads"]), f"{_s(r['min'])} / {_s(r['median'])}", _s(r.get("cpu_min")),
            _ratio(naive["median"], r["median"]) if naive and r["provider"] == "perk" and r["threads"] == naive["threads"] else "",
            _gb(r.get("peak_extra_bytes")),
        ] for r in meta]
        parts.append(_table(["provider", "meta-gradient", "threads", "s (min / median)", "CPU s (min)",
                             "naive ÷ perk (median, same threads)", "extra peak"], lines))
        parts.append("")
        roof = roofline.get(first["dtype"])
        fd = [r for r in meta if r["provider"] == "perk" and r["mode"] == "fd"]
        if roof and fd:
            # fd: N inner passes plus two probe passes per unrolled step, each a forward and an
            # input-gradient backward over every problem's context (the question passes are small).
            passes = first["inner_steps"] + 2 * first["unroll_steps"]
            bound = roof["pass_seconds"] * passes * first["problems"] * first["tokens"] / 1024
            best = min(r["cpu_min"] for r in fd if r.get("cpu_min"))
            parts.append(f"Roofline of an fd meta-step: {passes} context passes × {first['problems'] * first['tokens']} "
                         f"tokens at the {first['dtype']} `mm` rate = **{bound:.1f} CPU s** of matmuls; perk spends "
                         f"{best:.1f} CPU s ({100 * bound / best:.0f} % of it). A 3x faster fd meta-step than perk's "
                         f"best here would need {best / 3:.1f} CPU s, {100 * bound / (best / 3):.0f} % of the roofline.")
            parts.append("")

    if before:
        parts += ["## The same rows before this work (same machine)", ""]
        lines = []
        for old in before:
            key = {k: old.get(k) for k in ("kind", "provider", "dtype", "tokens", "threads")}
            new = _find(rows, **key)
            label = f"{old['kind']} {old['provider']} {old['dtype']} {_length(old['tokens'])} {old['threads']} thread(s)"
            lines.append([label, f"{_s(old['min'])} / {_s(old['median'])}",
                          "—" if not new else f"{_s(new['min'])} / {_s(new['median'])}",
                          _ratio(old["median"], (new or {}).get("median"))])
        parts.append(_table(["row", "before s (min / median)", "now s (min / median)", "before ÷ now (median)"], lines))
        parts.append("")

    if profile:
        parts += [f"## Where perk's time goes ({profile['what']})", "", f"    {profile['command']}", ""]
        total = profile["total_seconds"]
        parts.append(_table(
            ["cost", "self CPU s", "share"],
            [[name, f"{s:.2f}", f"{100 * s / total:.0f} %"] for name, s in profile["costs"]],
        ))
        parts.append("")
        parts.append(f"Top operators (self CPU, total {total:.2f} s):")
        parts.append("")
        parts.append(_table(["operator", "calls", "self CPU s"],
                            [[name, str(calls), f"{s:.2f}"] for name, calls, s in profile["top_ops"]]))
        parts.append("")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--before", nargs="*", default=[])
    parser.add_argument("--profile")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    rows, files = _rows(args.results)
    before, before_files = _rows(args.before) if args.before else ([], [])
    profile = json.loads(Path(args.profile).read_text()) if args.profile else None
    text = report(rows, files + before_files, before, profile)
    Path(args.out).with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
