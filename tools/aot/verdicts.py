"""Pass or fail for every (kernel, config, dtype, target) row, the table and the per-rank summary."""

from __future__ import annotations

import importlib

from tools.aot.compile import Job, Row
from tools.aot.record import kernel_names
from tools.aot.targets import ACTIVATIONS, ARCHS, KERNEL_MODULES, RANKS, TENSOR_CORE_DTYPES


def verdict(row: Row) -> str:
    """"ok", or why the row fails; "pruned"/"smem" rows are configs the autotuner never runs."""
    if not row.pickable:
        return "pruned"
    result = row.result or {}
    if "error" in result:
        return "FAIL compile"
    arch = ARCHS[row.job.arch]
    if result["shared"] > arch.max_shared:
        return "smem"  # OutOfResources at launch: the autotuner skips it
    strict = row.act in TENSOR_CORE_DTYPES or not row.job.has_dot
    if result["spill"] and strict:
        return "FAIL spill"
    if row.job.has_dot and row.act in TENSOR_CORE_DTYPES:
        found = result["hgmma"] if arch.tensor_op == "HGMMA" else result["hmma"] + result["hgmma"]
        if not found:
            return f"FAIL no {arch.tensor_op}"
    return "ok"


def row_failures(rows: list[Row]) -> list[str]:
    """One line per failing row: where, why, and the compile error if there was one."""
    return [
        f"{r.job.kernel} {_variant(r.job)} {r.act} {r.job.arch} {r.job.config}: {verdict(r)}"
        + (f" ({r.result['error']})" if r.result and "error" in r.result else "")
        for r in rows
        if verdict(r).startswith("FAIL")
    ]


def launch_failures(rows: list[Row]) -> list[str]:
    """Launches left with no config that fits the target's shared memory."""
    fits: dict[tuple, bool] = {}
    for row in rows:
        if row.pickable and row.result and "error" not in row.result:
            for use in row.job.uses:
                key = (row.job.kernel, row.job.arch, use)
                fits[key] = fits.get(key, False) or row.result["shared"] <= ARCHS[row.job.arch].max_shared
    return [
        f"{kernel} on {arch} for {use}: no config fits in shared memory"
        for (kernel, arch, use), ok in fits.items()
        if not ok
    ]


def coverage_failures(jobs: list[Job]) -> list[str]:
    compiled = {(j.module, j.kernel) for j in jobs}
    return [
        f"{module}.{name} is never launched by the sweep: extend tools/aot/record.py"
        for module in KERNEL_MODULES
        for name in kernel_names(importlib.import_module(module))
        if (module, name) not in compiled
    ]


def _variant(job: Job) -> str:
    """The constexpr flags and layout that tell a kernel's launches apart (for the table)."""
    flags = [k for k, v in job.kwargs.items() if k.isupper() and v is True and not k.startswith(("EVEN", "BLOCK"))]
    unit = [name for name, v in zip(job.arg_names, job.args) if name.startswith("stride") and v == 1]
    parts = flags + ([f"{'/'.join(unit)}=1"] if unit else [])
    return ",".join(parts) or "-"


def _ranks(ranks: set) -> str:
    return ",".join(str(r) for r in sorted(ranks) if r) or "-"


def format_table(rows: list[Row]) -> str:
    header = ("kernel", "variant", "dtype", "arch", "config", "ranks", "regs", "spill B", "smem KB", "tensor ops",
              "verdict")  # fmt: skip
    lines = []
    order = sorted(rows, key=lambda r: (r.job.kernel, _variant(r.job), r.act, r.job.arch, r.job.config))
    for row in order:
        res = row.result or {}
        if not row.pickable or "error" in res:
            stats = ("-",) * 4
        else:
            tensor = f"HGMMA {res['hgmma']}" if res["hgmma"] else (f"HMMA {res['hmma']}" if res["hmma"] else "-")
            stats = (str(res["regs"]), str(res["spill"]), f"{res['shared'] / 1024:.0f}", tensor)
        kernel = row.job.kernel.lstrip("_").removesuffix("_kernel")
        where = (kernel, _variant(row.job), row.act, row.job.arch, row.job.config, _ranks(row.ranks))
        lines.append((*where, *stats, verdict(row)))
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def summary_by_rank(rows: list[Row]) -> str:
    """Per (rank, dtype, arch): pickable configs of the LoRA GEMMs, the worst registers and spills."""
    out = ["rank  dtype  arch   configs  fit smem  max regs  max spill B  tensor ops"]
    lora = [r for r in rows if r.pickable and r.result and "error" not in r.result and r.job.has_dot]
    for rank in RANKS:
        for act in ACTIVATIONS:
            for arch in ARCHS:
                sel = [r for r in lora if rank in r.ranks and r.act == act and r.job.arch == arch]
                if not sel:
                    continue
                fit = [r for r in sel if r.result["shared"] <= ARCHS[arch].max_shared]
                tc = sum(1 for r in fit if r.result["hgmma"] or r.result["hmma"])
                hg = sum(1 for r in fit if r.result["hgmma"])
                out.append(
                    f"{rank:<5} {act:<6} {arch:<6} {len(sel):<8} {len(fit):<9} "
                    f"{max(r.result['regs'] for r in fit) if fit else '-':<9} "
                    f"{max(r.result['spill'] for r in fit) if fit else '-':<12} "
                    f"{tc}/{len(fit)} tensor cores ({hg} HGMMA)"
                )
    return "\n".join(out)
