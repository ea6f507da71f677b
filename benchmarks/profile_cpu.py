"""Where perk's CPU encode spends its time: torch.profiler over one inner step, one thread.

    python -m benchmarks.profile_cpu --out benchmarks/results/NAME-profile.json [--tokens 1024] [--dtype auto]

SmolLM2-135M architecture at its real size (random weights), the encode settings of
``test_cpu_speed.py`` but N = 1 step (every step costs the same); a warm-up encode first. Writes the
top operators by self CPU time and the named costs ``cpu_report.py --profile`` shows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("PERK_BENCH_SIZE", "cpu")

import torch  # noqa: E402
from benchmarks.conftest import ENGINE_BACKEND, build_model, byte_tokenizer, context_text  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from perk.config import PerkConfig  # noqa: E402
from perk.engine import PerkModel  # noqa: E402
from perk.models import resolve_base_dtype  # noqa: E402

# Named costs: (label, operator / autograd-function names whose self CPU time they sum).
COSTS = [
    ("matmuls of the projections and the LM head (aten::mm)", ("aten::mm",)),
    ("LoRA expand added to the base output (aten::addmm)", ("aten::addmm",)),
    ("attention (bmm, baddbmm, softmax and its backward)",
     ("aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data")),
    ("SiLU and its backward", ("aten::silu", "aten::silu_backward")),
    ("copies and dtype casts (aten::copy_)", ("aten::copy_",)),
    ("elementwise mul / add / cat (RoPE, SiLU·up, RMSNorm, residuals, gradient sums)",
     ("aten::mul", "aten::add", "aten::add_", "aten::mul_", "aten::cat", "aten::neg", "aten::addcmul")),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dtype = resolve_base_dtype(args.dtype, "cpu")
    config = PerkConfig(rank=16, alpha=16.0, rslora=True, segment_len=128, inner_steps=1, unroll_steps=1,
                        inner_optimizer="adamw", inner_lr=1e-3, micro_batch_tokens=1024)
    pm = PerkModel.from_base(build_model("smollm2-135m", dtype=dtype), byte_tokenizer(), config, backend=ENGINE_BACKEND)
    text = context_text(args.tokens)
    pm.encode(text)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        pm.encode(text)
    events = prof.key_averages()
    self_s = {e.key: e.self_cpu_time_total / 1e6 for e in events}
    total_s = {e.key: e.cpu_time_total / 1e6 for e in events}
    total = sum(self_s.values())
    costs = [(label, sum(self_s.get(n, 0.0) for n in names)) for label, names in COSTS]
    # Autograd functions of ours: their whole time (operators inside included, so these overlap the above).
    for label, name in (("  of all the above: the fused cross-entropy loss (forward with its gradient)",
                         "_FusedLinearCrossEntropy"),):
        if name in total_s:
            costs.append((label, total_s[name]))
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    result = dict(
        what=f"one inner step of a {args.tokens}-token encode, base model in {str(dtype)[6:]}, one thread",
        command="python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        total_seconds=total, costs=costs,
        top_ops=[(e.key, e.count, e.self_cpu_time_total / 1e6) for e in top],
    )
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
