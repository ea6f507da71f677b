"""The GPU path's bf16 fidelity on the tiny models, measured where the Triton kernels run.

    python benchmarks/bf16_interpreter_fidelity.py [--size full|test] [--families llama,qwen2,gpt2] [--out DIR]

encode, answer and the fd meta-gradient of PERK with a bf16 base model through the Triton kernels,
against the torch kernels in bf16 and the fp32 exact reference (tests/bf16_fidelity.py has the
engines and the comparisons). Without CUDA the kernels run through Triton's interpreter, whose
bf16 tests/triton_bf16_interpreter.py makes a GPU's; with CUDA, on the GPU. ``--size full``: N=3
inner steps, T=2 unrolled, adapters on every linear layer; ``--size test``: what make test runs
(tests/test_engine_triton.py). Writes ``bf16-interpreter-fidelity[-test].{json,md}`` with the
command, commit, date and machine. Interpreted, the full size takes a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for tests.* (the tiny models, the shim, the engines compared)

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Before perk_kernels is imported: Triton reads it when the kernels are decorated.
    os.environ["TRITON_INTERPRET"] = "1"
    from tests import triton_bf16_interpreter

    SHIM = triton_bf16_interpreter.install()
else:
    SHIM = "not used: the kernels run on the GPU"

import triton  # noqa: E402

from benchmarks.report import cpu_name, git_commit  # noqa: E402
from tests import bf16_fidelity  # noqa: E402
from tests.tiny_models import FAMILIES  # noqa: E402

COLUMNS = [  # (key in a pair's agreement, header, format)
    ("inner_losses_max_abs", "inner losses, max abs diff", "{:.1e}"),
    ("adapters_rel_error", "adapters, rel. error", "{:.1e}"),
    ("meta_loss_abs", "meta-loss, abs diff", "{:.1e}"),
    ("same_answers", "same answers", "{}"),
    ("cosine adapter_init", "cosine θ", "{:.5f}"),
    ("rel_error adapter_init", "rel. error θ", "{:.3f}"),
    ("cosine inner_lr_log", "cosine rates", "{:.6f}"),
    ("rel_error inner_lr_log", "rel. error rates", "{:.4f}"),
]


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
    cpu = cpu_name()
    load = ", load average %.1f %.1f %.1f at the start" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{load}; "
        f"torch {torch.__version__}, triton {triton.__version__} (interpreter)"
    )


def markdown(record: dict) -> str:
    config = record["config"]
    lines = [
        "# bf16 through the Triton kernels vs the torch kernels and the fp32 exact reference (tiny models)",
        "",
        f"`{record['command']}` — commit {record['commit']}, {record['date']}; {record['machine']}.",
        f"Triton interpreter bf16: {record['shim']}.",
        "",
        f"PERK config: rank {config['rank']}, alpha {config['alpha']}, {config['inner_steps']} inner SGD steps "
        f"(lr0 {config['inner_lr']}), {config['unroll_steps']} unrolled, fd meta-gradient with the automatic step, "
        f"{config['segment_len']}-token segments, adapters on {', '.join(config['target_modules'])}; "
        f"{record['n_problems']} problems (2 adapters), answers of {record['max_new_tokens']} greedy tokens. "
        "Engines (tests/bf16_fidelity.py): triton-bf16 = bf16 base model, Triton kernels (fp32 adapters rounded "
        "to bf16 for the tensor-core dots); torch-bf16 = bf16 base model, torch kernels (adapter term in fp32); "
        "exact-fp32 = the same bf16-rounded weights in fp32, eager attention, exact double backward.",
        "",
        "| model | pair | " + " | ".join(header for _, header, _ in COLUMNS) + " | seconds |",
        "|---" * (len(COLUMNS) + 3) + "|",
    ]
    for family, result in record["families"].items():
        for pair, agreement in result["pairs"].items():
            cells = [fmt.format(agreement[key]) for key, _, fmt in COLUMNS]
            lines.append(f"| {family} | {pair} | " + " | ".join(cells) + f" | {result['seconds']:.0f} |")
    lines += ["", "What the Triton path's own rounding does to the meta-gradient (cosine to exact-fp32, Triton vs torch kernels):", ""]
    for family, result in record["families"].items():
        triton_pair, torch_pair = (result["pairs"][f"{e} vs exact-fp32"] for e in ("triton-bf16", "torch-bf16"))
        lines.append(
            f"* {family}: θ {triton_pair['cosine adapter_init']:.5f} vs {torch_pair['cosine adapter_init']:.5f}, "
            f"rates {triton_pair['cosine inner_lr_log']:.6f} vs {torch_pair['cosine inner_lr_log']:.6f}"
        )
    lines += ["", "(seconds: the three engines of one model, the Triton one interpreted on a CPU.)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("full", "test"), default="full")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    config = bf16_fidelity.CONFIG if args.size == "full" else bf16_fidelity.TEST_CONFIG
    record = dict(
        command="python benchmarks/bf16_interpreter_fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv),
        commit=git_commit(mark_uncommitted=True) or "unknown", date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine(), shim=SHIM, config={k: v for k, v in vars(config).items()},
        n_problems=len(bf16_fidelity.PROBLEMS), max_new_tokens=3, families={},
    )  # fmt: skip
    for family in args.families.split(","):
        start = time.perf_counter()
        result = bf16_fidelity.measure(family, config, max_new_tokens=record["max_new_tokens"])
        record["families"][family] = dict(result, seconds=time.perf_counter() - start)
        print(f"{family}: {time.perf_counter() - start:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bf16-interpreter-fidelity" + ("-test" if args.size == "test" else "")
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(record))
    print(markdown(record))
    return record


if __name__ == "__main__":
    main()
