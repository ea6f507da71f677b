"""What every benchmark suite shares: device and size selection, peak memory, OOM capture, budget.

Sizes: ``PERK_BENCH_SIZE=small|full|cpu`` (default ``full`` with CUDA, ``small`` without) picks each
suite's size table; ``PERK_BENCH_LENGTHS=4K,8K`` keeps only those context lengths (the suites
that have context lengths). ``cpu`` is opt-in and runs only the encode-vs-prompt and cpu-speed
suites, at the real SmolLM2-135M size on a CPU (minutes per provider and length; the other suites skip).
``PERK_BENCH_DEADLINE`` (Unix time, set by ``benchmarks/run.py``)
skips every benchmark that starts after it, and any size predicted to end after it.

Memory (``extra_info["memory_method"]`` says which):

* CUDA: ``torch.cuda.max_memory_allocated()`` over the call after resetting the peak, i.e. the
  absolute peak of tensors allocated by torch on the device (model weights included), as the
  issue's anchors count it; ``peak_extra_bytes`` is that peak minus what was allocated at the start.
* CPU: the process's peak resident set size over the call (``VmHWM`` of /proc/self/status after
  resetting it by writing 5 to /proc/self/clear_refs; Linux). Just before, ``malloc_trim(0)`` hands
  the free memory glibc keeps back to the OS, so that what the call allocates shows up in RSS
  (already-resident free pages would hide it). ``peak_memory_bytes`` counts the whole process
  (model, Python, libraries); ``peak_extra_bytes`` (above the RSS at the call's start) is the
  comparable figure. glibc's allocator is otherwise left as a user's process has it, so the peak
  also counts the free memory glibc keeps. ``PERK_BENCH_CPU_MALLOC=pinned`` pins its mmap threshold
  at 128 KiB instead (this harness's method before 2026-12-02): every freed tensor then leaves RSS
  and the peak counts live tensors, but the next one faults its pages in again, which added 16 s to
  a 1K-token encode (perk 40.8 s against 22.8 s; the naive PEFT baseline 56.4 s against 36.6 s): a
  pinned run is for memory, not time.

CUDA work is synchronised inside the timed function. A CUDA (or CPU allocator) out-of-memory error
is recorded as ``status="oom"`` with a meaningless no-op timing, and larger sizes of the same
series are then recorded as OOM without being run (``oom_inferred``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # One intra-op thread unless OMP_NUM_THREADS says otherwise: on a shared 2-core CI machine two
    # OpenMP threads that lose their core spin at every barrier (a meta-step suite measured 82 s
    # with two threads against 9 s with one while other jobs ran). CPU sizes check the harness and
    # the format; their timings are not the product's figures.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    # The kernel suites run their Triton provider through the interpreter on CPU; it must be set
    # before perk_kernels is first imported, which a conftest precedes. The engine suites pass
    # backend="torch" explicitly (see ENGINE_BACKEND), so they are not slowed by it. At the ``cpu``
    # size (no kernel suite runs) the engines take the product's own automatic choice instead.
    if os.environ.get("PERK_BENCH_SIZE") != "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.report import format_length  # noqa: E402,F401 — the suites name their sizes like the summary
from perk.models import resolve_base_dtype  # noqa: E402
from perk.tasks import parse_length  # noqa: E402
from tests.tiny_models import tiny_tokenizer  # noqa: E402
from tools.shapes import QWEN2_5_0_5B, SMOLLM2_135M  # noqa: E402

SIZES = ("small", "full", "cpu")
SIZE = os.environ.get("PERK_BENCH_SIZE") or ("full" if CUDA else "small")
if SIZE not in SIZES:
    raise ValueError(f"PERK_BENCH_SIZE must be one of {SIZES}, got {SIZE!r}")
# The suites that have a ``cpu`` size; the others skip at it.
CPU_SIZE_SUITES = ("test_encode_vs_prompt.py", "test_cpu_speed.py")
DEVICE = torch.device("cuda" if CUDA else "cpu")
DEVICE_NAME = torch.cuda.get_device_name() if CUDA else "cpu"
# Base models in bf16 on GPU (as served); fp32 on CPU (the interpreter and many CPU ops lack bf16).
MODEL_DTYPE = torch.bfloat16 if CUDA else torch.float32
# perk's base model at the ``cpu`` size: the dtype the product picks on this machine (``base_dtype=auto``).
PERK_DTYPE = resolve_base_dtype("auto", DEVICE) if SIZE == "cpu" else MODEL_DTYPE
# perk's engine: the automatic choice (the Triton kernels on CUDA; on a CPU the torch ops, with the
# bf16 path of perk_kernels.lora_linear over a bf16 base) where the product would make it; the torch
# reference on CPU at the other sizes, where the automatic choice would be Triton's (slow)
# interpreter because TRITON_INTERPRET is set above.
ENGINE_BACKEND = None if CUDA or SIZE == "cpu" else "torch"
# CPU: ``PERK_BENCH_CPU_MALLOC=pinned`` pins glibc's mmap threshold at 128 KiB, so that every freed
# tensor above it leaves RSS at once: the peak then counts live tensors, not the free memory glibc
# keeps (which grows with the number of micro-batches), but every large tensor faults its pages in
# anew, so such a run's times are not the product's. ``default`` (the default) leaves glibc alone.
CPU_MALLOC = os.environ.get("PERK_BENCH_CPU_MALLOC") or "default"
if CPU_MALLOC not in ("default", "pinned"):
    raise ValueError(f"PERK_BENCH_CPU_MALLOC must be 'default' or 'pinned', got {CPU_MALLOC!r}")
if not CUDA and CPU_MALLOC == "pinned":
    _M_MMAP_THRESHOLD = -3
    ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
MEMORY_METHOD = (
    "torch.cuda.max_memory_allocated over the call (absolute, model weights included)"
    if CUDA
    else "peak RSS of the process over the call (VmHWM after malloc_trim(0) and a /proc/self/clear_refs reset; "
    f"glibc malloc {CPU_MALLOC})"
)
# GPU: sizes predicted under this many seconds get a warm-up call and ROUNDS_FAST rounds;
# slower ones a single cold round (Triton kernels are compiled by a series' first, small size).
FAST_CALL_S = 1.0
ROUNDS_FAST = 3
# No single call predicted longer than this is started (PERK_BENCH_MAX_CALL_S overrides).
MAX_CALL_S = float(os.environ.get("PERK_BENCH_MAX_CALL_S") or (900.0 if SIZE == "cpu" else 120.0))


# ----------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------


def _length_filter() -> set[int] | None:
    text = os.environ.get("PERK_BENCH_LENGTHS", "").strip()
    if not text:
        return None
    return {parse_length(part.strip()) for part in text.split(",") if part.strip()}


def context_lengths(full: list[int | str], small: list[int | str], cpu: list[int | str] | None = None) -> list[int]:
    """The context lengths of a suite at the current SIZE, filtered by ``PERK_BENCH_LENGTHS``."""
    table = {"full": full, "small": small, "cpu": small if cpu is None else cpu}[SIZE]
    lengths = [parse_length(x) for x in table]
    keep = _length_filter()
    return [n for n in lengths if keep is None or n in keep]


# ----------------------------------------------------------------------------------------------
# Models, tokenizer, contexts
# ----------------------------------------------------------------------------------------------

# The real architectures (random weights: values do not change speed), from tools/shapes.py.
# On CPU: the same families shrunk so the whole suite runs in minutes on two cores.
SMALL_OVERRIDES = {
    "qwen2.5-0.5b": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024),
    "smollm2-135m": dict(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=3,
                         num_key_value_heads=1, vocab_size=512),
}
ARCHITECTURES = {shape.name: shape.transformers_config() for shape in (QWEN2_5_0_5B, SMOLLM2_135M)}


def model_config(name: str, *, min_positions: int = 0):
    """The transformers config of architecture ``name`` at the current SIZE.

    ``max_position_embeddings`` is raised to ``min_positions`` when needed: RoPE positions are
    computed on the fly, the field only bounds what callers check against.
    """
    from transformers import LlamaConfig, Qwen2Config

    if name not in ARCHITECTURES:
        raise ValueError(f"name must be one of {sorted(ARCHITECTURES)}, got {name!r}")
    values = dict(ARCHITECTURES[name])
    if SIZE == "small":
        values.update(SMALL_OVERRIDES[name])
    values["max_position_embeddings"] = max(values["max_position_embeddings"], min_positions)
    config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}[values.pop("family")]
    tokenizer = byte_tokenizer()
    return config_class(
        **values, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_model(
    name: str, *, attn_implementation: str = "sdpa", min_positions: int = 0, dtype: torch.dtype = MODEL_DTYPE
):
    """A random-init causal LM of architecture ``name``, built directly on DEVICE in ``dtype``."""
    from transformers import AutoModelForCausalLM

    config = model_config(name, min_positions=min_positions)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if CUDA else []), DEVICE:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=1)
def byte_tokenizer():
    """The offline byte-level tokenizer of the tests: one token per byte, so a context of exactly
    L tokens is L ASCII characters. Its 259 ids fit any vocabulary; token values do not change speed."""
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = 1 << 40  # contexts are far longer than its nominal window
    return tokenizer


_WORDS = ("mary", "john", "sandra", "daniel", "went", "moved", "to", "the", "kitchen", "garden", "office",
          "hallway", "bathroom", "bedroom", "picked", "up", "dropped", "milk", "apple", "football", "and", "then")


@functools.lru_cache(maxsize=4)
def context_text(n_tokens: int) -> str:
    """A deterministic English-like context that is ``n_tokens`` tokens once perk appends its document
    separator (a newline): ``n_tokens − 1`` ASCII characters of the byte-level tokenizer."""
    if n_tokens < 2:
        raise ValueError(f"n_tokens must be >= 2, got {n_tokens}")
    rng = random.Random(n_tokens)
    words: list[str] = []
    length = 0
    while length < n_tokens:
        words.append(rng.choice(_WORDS))
        length += len(words[-1]) + 1
    return " ".join(words)[: n_tokens - 1]


class ModelSlot:
    """Holds one benchmark model at a time, so a peak memory counts one model's weights only.

    Benchmarks ask for ``get(key, build)``; a new key frees the previous model first.
    """

    def __init__(self) -> None:
        self.key: object = None
        self.value: object = None

    def get(self, key: object, build: Callable[[], object]) -> object:
        if key != self.key:
            self.clear()
            self.value, self.key = build(), key
        return self.value

    def clear(self) -> None:
        self.key = self.value = None
        free_memory()


@pytest.fixture(scope="session")
def model_slot():
    slot = ModelSlot()
    yield slot
    slot.clear()


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _proc_status_bytes(field_name: str) -> int:
    match = re.search(rf"^{field_name}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field_name} line")
    return int(match.group(1)) * 1024


def _cpu_peak_supported() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        return True
    except OSError:
        return False


CPU_PEAK_SUPPORTED = not CUDA and _cpu_peak_supported()
if not CUDA and not CPU_PEAK_SUPPORTED:
    MEMORY_METHOD = "none: /proc/self/clear_refs is not writable here (peak memory is recorded as null)"


def _start_peak() -> int | None:
    """Reset the peak counter; return the memory in use now (None: no peak measurement here)."""
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    if not CPU_PEAK_SUPPORTED:
        return None
    _trim_heap()
    _CLEAR_REFS.write_text("5")
    return _proc_status_bytes("VmRSS")


def _trim_heap() -> None:
    """Return glibc's free heap memory to the OS (see "Memory" above); a no-op without glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _read_peak() -> int | None:
    if CUDA:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _proc_status_bytes("VmHWM") if CPU_PEAK_SUPPORTED else None


def time_kernel(benchmark, run, rounds: int) -> bool:
    """The kernel suites' measurement: one warm-up call (it compiles and autotunes, and creates
    cuBLAS's workspace, none of which should count), the CUDA peak of one more call beyond what was
    allocated before it (``peak_extra_bytes``; None on CPU), then ``rounds`` timed calls. A CUDA OOM
    is recorded as ``oom`` (timing a no-op: pytest-benchmark allows one ``pedantic`` per test), not
    raised; returns whether the calls ran."""
    benchmark.extra_info.update(device=DEVICE_NAME, size=SIZE, oom=False, peak_extra_bytes=None)
    try:
        run()
        if CUDA:  # on CPU the kernel suites record no peak (tiny sizes; RSS would show nothing)
            before = _start_peak()
            run()
            benchmark.extra_info["peak_extra_bytes"] = _read_peak() - before
    except torch.cuda.OutOfMemoryError:
        free_memory()
        benchmark.extra_info["oom"] = True
        benchmark.pedantic(lambda: None, rounds=1)
        return False
    benchmark.pedantic(run, rounds=rounds)
    return True


@dataclass
class CallRecord:
    """What the timed calls of one benchmark saw: wall times (synchronised), peaks, OOM."""

    seconds: list[float] = field(default_factory=list)
    # The process's CPU time per call: on a busy shared CPU machine it counts the work done, where
    # wall time also counts the waits for a core (with one intra-op thread, the fairer comparison).
    cpu_seconds: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    peak_extra_bytes: int | None = None
    oom: bool = False

    @contextlib.contextmanager
    def track(self):
        start_bytes = _start_peak()
        start, start_cpu = time.perf_counter(), time.process_time()
        yield
        peak = _read_peak()  # synchronises first: the time below includes all queued CUDA work
        self.seconds.append(time.perf_counter() - start)
        self.cpu_seconds.append(time.process_time() - start_cpu)
        if peak is not None:
            self.peak_bytes = max(self.peak_bytes or 0, peak)
            self.peak_extra_bytes = max(self.peak_extra_bytes or 0, peak - start_bytes)


class PhaseTimer:
    """Synchronised wall times of named parts of a benchmarked call (``with phases("encode"): …``);
    :func:`run_benchmark` reports their means over the measured rounds as ``<name>_seconds``."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        synchronize()
        start = time.perf_counter()
        yield
        synchronize()
        self.seconds.setdefault(name, []).append(time.perf_counter() - start)


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA OOM, or the CPU allocator failing to allocate."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


# ----------------------------------------------------------------------------------------------
# Budget: series history, OOM inference, deadline
# ----------------------------------------------------------------------------------------------


def _deadline() -> float | None:
    value = os.environ.get("PERK_BENCH_DEADLINE")
    return float(value) if value else None


class Budget:
    """Outcomes of each series (one provider over growing sizes) and the suite's deadline.

    A size is a tuple of numbers that grow together with cost (e.g. ``(tokens, unroll_steps)``);
    an OOM at size s predicts an OOM at every size ≥ s componentwise. A run's time is predicted
    from the series' largest smaller size that ran, scaled linearly in the first component.
    """

    def __init__(self, deadline: float | None, max_call_seconds: float):
        self.deadline = deadline
        self.max_call_seconds = max_call_seconds
        self.outcomes: dict[str, list[tuple[tuple[float, ...], float | None]]] = {}

    def record(self, series: str, size: tuple[float, ...], seconds: float | None) -> None:
        """``seconds`` None records an OOM."""
        self.outcomes.setdefault(series, []).append((size, seconds))

    def oom_below(self, series: str, size: tuple[float, ...]) -> tuple[float, ...] | None:
        """A size ≤ ``size`` at which the series ran out of memory, if any."""
        for done, seconds in self.outcomes.get(series, []):
            if seconds is None and all(a <= b for a, b in zip(done, size)):
                return done
        return None

    def predict(self, series: str, size: tuple[float, ...]) -> float | None:
        ran = [
            (done, s) for done, s in self.outcomes.get(series, [])
            if s is not None and all(a <= b for a, b in zip(done, size))
        ]
        if not ran:
            return None
        done, seconds = max(ran)
        return seconds * size[0] / done[0]

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()

    def skip_reason(self, predicted: float | None, calls: int) -> str | None:
        """Why a benchmark predicted to take ``predicted`` s per call (``calls`` calls) must not run."""
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            return "benchmark time budget spent"
        if predicted is None:
            return None
        if predicted > self.max_call_seconds:
            return f"predicted {predicted:.0f} s per call > PERK_BENCH_MAX_CALL_S={self.max_call_seconds:.0f}"
        if remaining is not None and predicted * calls > remaining:
            return f"predicted {predicted * calls:.0f} s > {remaining:.0f} s left of the time budget"
        return None


BUDGET = Budget(_deadline(), MAX_CALL_S)


def pytest_collection_modifyitems(config, items):
    """At the ``cpu`` size only the suites that have one run."""
    if SIZE != "cpu":
        return
    skip = pytest.mark.skip(reason=f"PERK_BENCH_SIZE=cpu runs only {', '.join(CPU_SIZE_SUITES)}")
    for item in items:
        if item.path.name not in CPU_SIZE_SUITES:
            item.add_marker(skip)


def pytest_runtest_setup(item):
    """Past the deadline, no benchmark of any suite starts."""
    remaining = BUDGET.remaining()
    if "benchmark" in getattr(item, "fixturenames", ()) and remaining is not None and remaining <= 0:
        pytest.skip("benchmark time budget spent (PERK_BENCH_DEADLINE)")


@pytest.hookimpl(tryfirst=True)
def pytest_benchmark_generate_json(config, benchmarks, include_data, machine_info, commit_info):
    """Leave out a benchmark cut off before its first round (Ctrl-C, ``timeout -s INT``):
    pytest-benchmark would fail on its empty statistics and save none of the finished ones."""
    benchmarks[:] = [bench for bench in benchmarks if bench]


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """The command that produced the file (``benchmarks/run.py`` passes its own)."""
    output_json["command"] = os.environ.get("PERK_BENCH_COMMAND") or " ".join(
        ["pytest", *config.invocation_params.args]
    )


def pytest_benchmark_update_machine_info(config, machine_info):
    import transformers

    machine_info["perk"] = {
        "device": DEVICE_NAME,
        "size": SIZE,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "memory_method": MEMORY_METHOD,
    }


# ----------------------------------------------------------------------------------------------
# Running one benchmark
# ----------------------------------------------------------------------------------------------


def run_benchmark(
    benchmark,
    fn: Callable[[], object],
    *,
    series: str,
    size: tuple[float, ...],
    tokens: int,
    dtype: torch.dtype | str,
    info: dict,
    phases: PhaseTimer | None = None,
) -> CallRecord | None:
    """Time ``fn`` (no arguments) with pytest-benchmark and record the shared ``extra_info``.

    ``series`` names the provider's run over growing ``size`` (first component: tokens, used to
    predict time); ``info`` is merged into ``extra_info`` (suite, model, provider, …), and so are
    the mean ``<name>_seconds`` of the ``phases`` that ``fn`` timed. Returns the
    calls' record, or None when the size was recorded as OOM without running. Skips (pytest.skip)
    what the time budget cannot fit.
    """
    benchmark.extra_info.update(
        device=DEVICE_NAME, dtype=str(dtype).replace("torch.", ""), size=SIZE, tokens=tokens,
        memory_method=MEMORY_METHOD, status="ok", **info,
    )
    oom_at = BUDGET.oom_below(series, size)
    if oom_at is not None:
        benchmark.extra_info.update(status="oom", oom_inferred=f"out of memory at smaller size {oom_at}")
        benchmark.pedantic(lambda: None, rounds=1)
        return None
    predicted = BUDGET.predict(series, size)
    fast = CUDA and (predicted is None or predicted < FAST_CALL_S)
    warmup_rounds, rounds = (1, ROUNDS_FAST) if fast else (0, 1)
    reason = BUDGET.skip_reason(predicted, warmup_rounds + rounds)
    if reason is not None:
        pytest.skip(reason)

    record = CallRecord()

    def timed() -> None:
        if record.oom:  # later rounds after an OOM: nothing to measure
            return
        try:
            with record.track():
                fn()
        except Exception as error:  # noqa: BLE001 — only OOM is swallowed, see below
            if not is_out_of_memory(error):
                raise
            record.oom = True

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    if record.oom:
        free_memory()
        benchmark.extra_info.update(status="oom")
        BUDGET.record(series, size, None)
        return record
    measured = record.seconds[warmup_rounds:]
    mean = sum(measured) / len(measured)
    cpu_measured = record.cpu_seconds[warmup_rounds:]
    benchmark.extra_info.update(
        seconds=mean, tokens_per_s=tokens / mean, cpu_seconds=sum(cpu_measured) / len(cpu_measured),
        peak_memory_bytes=record.peak_bytes, peak_extra_bytes=record.peak_extra_bytes,
    )
    for name, seconds in (phases.seconds if phases else {}).items():
        benchmark.extra_info[f"{name}_seconds"] = sum(seconds[warmup_rounds:]) / len(seconds[warmup_rounds:])
    BUDGET.record(series, size, mean)
    return record
