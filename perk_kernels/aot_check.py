"""GPU readiness without a GPU: compile every Triton kernel the engine launches, ahead of time.

``python -m perk_kernels.aot_check`` compiles, for sm_90 and sm_80, every Triton kernel of
``perk_kernels`` x autotune config x activation dtype (bf16, fp16, fp32; ``--activations tf32``
adds fp32 with TF32 matmuls, which the engine never turns on) x constexpr variant that the engine
can launch at the shapes of Qwen2.5-0.5B and SmolLM2-135M (LoRA ranks 16, 64, 256), prints a table
(registers, spill bytes, shared memory, tensor-core instructions) and exits with status 1 when:

* a kernel fails to compile;
* a config the autotuner can pick spills registers (a stack frame) for bf16/fp16 activations, or
  any config of a kernel without ``tl.dot`` does (fp32 activations are reported, not failed:
  their dot products have no tensor cores, so the tiles only run correct and slow);
* a bf16/fp16 ``tl.dot`` kernel has no tensor-core instructions in its SASS (HGMMA on sm_90,
  HMMA on sm_80);
* a launch has no config within the target's shared memory (the autotuner skips those that
  exceed it; a fixed-config kernel has nowhere to go);
* a ``*_kernel`` of ``perk_kernels`` is never compiled (the sweep must grow with the package).

Where nvcc exists it also compiles csrc/ (compile only, sm_90) and fails on errors in our code.

How the launches are found, so that the sweep follows the launchers instead of copying them: the
public ops run on CPU tensors of the real shapes with every Triton kernel swapped for a recorder
(nothing executes; ``choose_backend`` answers "triton", the device has an H100/H200's 132 SMs).
Each recorded launch is expanded into the configs the kernel's own ``early_config_prune`` keeps,
its heuristics applied, specialised by Triton's own binder (16-byte alignment, divisibility by
16, integers equal to 1), and compiled with ``triton.compile`` for a ``GPUTarget`` in a process
pool. Identical specialisations compile once. The Triton cache makes a second run fast; the
SASS summaries (cuobjdump) are cached beside it, in ``<triton cache>/perk_aot``.

Kernels are compiled with ``TRITON_INTERPRET`` unset (the interpreter's kernels cannot be
compiled): run under it, this module re-executes itself without it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import importlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

KERNEL_MODULES = (
    "perk_kernels.lora_linear",
    "perk_kernels.lora_inner_step",
    "perk_kernels.fused_linear_cross_entropy",
    "perk_kernels.meta_grad_accumulate",
)
RANKS = (16, 64, 256)
SMS = 132  # H100 / H200: sizes the launchers' row splits as on the real device
# Activation dtypes; "tf32" is fp32 with torch.backends.cuda.matmul.allow_tf32 (tl.dot in TF32).
ACTIVATIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
TENSOR_CORE_DTYPES = ("bf16", "fp16")  # must use tensor cores and must not spill


@dataclass(frozen=True)
class Arch:
    name: str
    capability: int
    max_shared: int  # bytes of shared memory one block may use (dynamic, opt-in)
    tensor_op: str  # the SASS instruction a bf16 tl.dot must become


ARCHS = {
    "sm_90": Arch("sm_90", 90, 232448, "HGMMA"),
    "sm_80": Arch("sm_80", 80, 166912, "HMMA"),
}


@dataclass(frozen=True)
class ModelShape:
    name: str
    d_model: int
    d_ff: int
    d_kv: int  # width of k_proj / v_proj (kv heads x head dim)
    vocab: int
    qkv_bias: bool

    def projections(self) -> list[tuple[str, int, int, bool]]:
        """(layer, d_in, d_out, bias) of every LoRA target (attention and MLP projections)."""
        d, f, kv, b = self.d_model, self.d_ff, self.d_kv, self.qkv_bias
        return [
            ("q_proj", d, d, b), ("k_proj", d, kv, b), ("v_proj", d, kv, b), ("o_proj", d, d, False),
            ("gate_proj", d, f, False), ("up_proj", d, f, False), ("down_proj", f, d, False),
        ]  # fmt: skip


MODELS = (
    ModelShape("qwen2.5-0.5b", 896, 4864, 128, 151936, True),
    ModelShape("smollm2-135m", 576, 1536, 192, 49152, False),
)


@dataclass(frozen=True)
class Scenario:
    """How the engine calls a LoRA layer: adapters, rows per adapter, and whether it backpropagates."""

    name: str
    n_adapters: int
    rows_per_adapter: int
    backward: bool


SCENARIOS = (
    Scenario("meta-batch", 8, 512, True),  # meta-training: 8 problems x 4 segments of 128 tokens
    Scenario("encode", 1, 2048, True),  # test-time encoding of one context
    Scenario("prefill", 1, 37, False),  # answering: the question's tokens (any count)
    Scenario("decode", 1, 1, False),  # answering: one token per step
)


# ----------------------------------------------------------------------------------------------
# Recording the launches
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorArg:
    """What Triton's binder reads of a tensor argument: its dtype and its address's alignment."""

    dtype: torch.dtype
    aligned: bool

    device = torch.device("cuda")

    def data_ptr(self) -> int:
        return 0 if self.aligned else 8

    @staticmethod
    def ptr_range() -> int:
        return 0


@dataclass
class Launch:
    module: str
    kernel: str
    args: tuple
    kwargs: dict
    use: tuple  # (op, model, rank, activation dtype)


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the call instead of running it."""

    def __init__(self, module: str, name: str, sink: list[Launch], use: list):
        self.module, self.name, self.sink, self.use = module, name, sink, use

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            args = tuple(TensorArg(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args)
            self.sink.append(Launch(self.module, self.name, args, kwargs, tuple(self.use)))

        return launch


def _kernel_names(module) -> list[str]:
    import triton

    kinds = (triton.runtime.JITFunction, triton.runtime.Autotuner, triton.runtime.Heuristics)
    return [n for n, v in vars(module).items() if n.endswith("_kernel") and isinstance(v, kinds)]


@contextlib.contextmanager
def _patched(module: str, attr: str, value) -> Iterator[None]:
    """``module.attr`` set to ``value`` (when the module has it) for the block."""
    target = importlib.import_module(module)
    if not hasattr(target, attr):
        yield
        return
    saved = getattr(target, attr)
    setattr(target, attr, value)
    try:
        yield
    finally:
        setattr(target, attr, saved)


@contextlib.contextmanager
def _recording(sink: list[Launch], use: list) -> Iterator[None]:
    """Every kernel of KERNEL_MODULES swapped for a recorder, ops forced onto the Triton path."""
    with contextlib.ExitStack() as stack:
        for name in KERNEL_MODULES:
            for kernel in _kernel_names(importlib.import_module(name)):
                stack.enter_context(_patched(name, kernel, _Recorder(name, kernel, sink, use)))
            stack.enter_context(_patched(name, "choose_backend", lambda backend, device, **kwargs: "triton"))
            stack.enter_context(_patched(name, "target_programs", lambda device: 2 * SMS))
        yield


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _drive_lora_linear(model: ModelShape, rank: int, dtype: torch.dtype, use: list) -> None:
    from perk_kernels import lora_linear, lora_segments

    layers = {(d_in, d_out, bias) for _, d_in, d_out, bias in model.projections()}
    for scenario in SCENARIOS:
        rows = scenario.n_adapters * scenario.rows_per_adapter
        ids = torch.arange(scenario.n_adapters).repeat_interleave(scenario.rows_per_adapter)
        segments = lora_segments(ids, scenario.n_adapters)
        for d_in, d_out, bias in sorted(layers):
            use[0] = f"lora_linear {scenario.name}"
            x = torch.empty(rows, d_in, dtype=dtype, requires_grad=scenario.backward)
            weight = torch.empty(d_out, d_in, dtype=dtype)
            b = torch.empty(d_out, dtype=dtype) if bias else None
            lora_a = torch.empty(scenario.n_adapters, rank, d_in, requires_grad=scenario.backward)
            lora_b = torch.empty(scenario.n_adapters, d_out, rank, requires_grad=scenario.backward)
            with torch.set_grad_enabled(scenario.backward):
                y = lora_linear(x, weight, b, lora_a, lora_b, 2.0, segments)
            if scenario.backward:
                y.backward(torch.empty_like(y))


def _drive_adapter_ops(model: ModelShape, rank: int, use: list) -> None:
    """The inner step and the meta-gradient walk on one layer's adapters: fp32 flat (n_adapters, P)
    buffers split into the engine's groups (A then B of every projection)."""
    from perk_kernels import lora_inner_step, meta_grad_accumulate

    sizes = [s for _, d_in, d_out, _ in model.projections() for s in (rank * d_in, d_out * rank)]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    n_adapters = 8
    phi, direction, g_plus, g_minus = (torch.empty(n_adapters, offsets[-1]) for _ in range(4))
    lr = torch.full((len(sizes),), 0.1)
    use[0] = "lora_inner_step"
    for max_grad_norm in (None, 1.0):
        lora_inner_step(phi, direction, lr, offsets, max_grad_norm=max_grad_norm, inplace=True)
    # Out of place and differentiated (unrolled steps of an op user; the engine's are in place).
    params = phi.detach().requires_grad_()
    lr_param = lr.clone().requires_grad_()
    for max_grad_norm in (None, 1.0):
        out = lora_inner_step(params, direction, lr_param, offsets, max_grad_norm=max_grad_norm)
        out.backward(torch.empty_like(out))
    use[0] = "meta_grad_accumulate"
    lr_grad = torch.zeros(n_adapters, len(sizes))
    meta_grad_accumulate(phi, direction, g_plus, g_minus, torch.ones(n_adapters), lr_grad, offsets, backend="triton")
    meta_grad_accumulate(phi, direction, None, None, None, lr_grad, offsets, backend="triton")


def _drive_cross_entropy(model: ModelShape, dtype: torch.dtype, use: list) -> None:
    """The two row kernels of fused_linear_cross_entropy on one chunk's logits (the GEMMs are torch's)."""
    flce = importlib.import_module("perk_kernels.fused_linear_cross_entropy")

    use[0] = "fused_linear_cross_entropy"
    logits = torch.empty(2, model.vocab, dtype=dtype)  # (rows of a chunk, vocab)
    labels = torch.zeros(2, dtype=torch.int64)
    lse, loss = torch.empty(2), torch.empty(2)
    flce.cross_entropy_lse_loss(logits, labels, -100, lse, loss)
    for row_scale in (None, torch.ones(2)):  # row scales: a trained LM head's recompute
        flce.cross_entropy_dlogits_(logits, labels, lse, -100, row_scale=row_scale)


def record_launches(ranks=RANKS, activations=tuple(ACTIVATIONS)) -> list[Launch]:
    """Every Triton launch the engine's ops make at the real model shapes, recorded, not run."""
    sink: list[Launch] = []
    use = ["", "", 0, ""]
    with _recording(sink, use):
        for model in MODELS:
            use[1] = model.name
            for act in activations:
                use[2], use[3] = 0, act
                with _tf32(act == "tf32"):
                    if act != "tf32":
                        _drive_cross_entropy(model, ACTIVATIONS[act], use)
                    for rank in ranks:
                        use[2] = rank
                        _drive_lora_linear(model, rank, ACTIVATIONS[act], use)
            use[3] = "fp32"
            for rank in ranks:
                use[2] = rank
                _drive_adapter_ops(model, rank, use)
    return sink


# ----------------------------------------------------------------------------------------------
# Expanding launches into compile jobs
# ----------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One compile: a kernel specialised as Triton's runtime would, for one target."""

    module: str
    kernel: str
    arch: str
    args: tuple
    kwargs: dict
    config: str  # the autotune config ("-" for a fixed launch)
    has_dot: bool
    uses: set = field(default_factory=set)  # (op, model, rank, activation dtype)
    key: str = ""
    arg_names: tuple = ()


@dataclass
class Row:
    """One (kernel, config, activation dtype, target) of the table, with the ranks that reach it."""

    job: Job
    act: str
    ranks: set
    pickable: bool  # kept by the kernel's early_config_prune
    result: dict | None = None


def _jit_function(kernel):
    import triton

    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


_BINDERS: dict = {}


def _specialize(jit_fn, arch: Arch, args: tuple, kwargs: dict):
    """(options, signature, constexprs, attrs) exactly as Triton's runtime would compile the call."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    cache_key = (id(jit_fn), arch.name)
    if cache_key not in _BINDERS:
        backend = make_backend(GPUTarget("cuda", arch.capability, 32))
        _BINDERS[cache_key] = (backend, create_function_from_signature(jit_fn.signature, jit_fn.params, backend))
    backend, binder = _BINDERS[cache_key]
    bound, specialization, options = binder(*args, **kwargs)
    return jit_fn._pack_args(backend, kwargs, bound, specialization, options)


def _config_name(config) -> str:
    k = config.kwargs
    tile = "x".join(str(k[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_R", "BLOCK_K") if b in k)
    return f"{tile} w{config.num_warps} s{config.num_stages}"


def _fixed_name(kwargs: dict) -> str:
    blocks = "x".join(str(v) for k, v in kwargs.items() if k.startswith("BLOCK"))
    return f"{blocks} w{kwargs.get('num_warps', 4)} s{kwargs.get('num_stages', 3)}"


def expand(launches: list[Launch], archs: list[Arch]) -> tuple[list[Job], list[Row]]:
    """Unique compile jobs and the table rows they serve (pruned configs get rows, not jobs)."""
    import triton

    jobs: dict[str, Job] = {}
    rows: dict[tuple, Row] = {}
    for launch in launches:
        kernel = getattr(importlib.import_module(launch.module), launch.kernel)
        jit_fn = _jit_function(kernel)
        named = dict(zip(jit_fn.arg_names, launch.args))
        has_dot = "tl.dot(" in jit_fn.src
        rank, act = launch.use[2], launch.use[3]
        for arch in archs:
            if isinstance(kernel, triton.runtime.Autotuner):
                kept = kernel.configs
                if kernel.early_config_prune:
                    with _patched(launch.module, "device_capability", lambda device: divmod(arch.capability, 10)):
                        kept = kernel.early_config_prune(kernel.configs, named, **launch.kwargs)
                variants = [(c.all_kwargs(), _config_name(c), c in kept) for c in kernel.configs]
                inner = kernel.fn
            else:
                variants = [({}, _fixed_name(launch.kwargs), True)]
                inner = kernel
            for config_kwargs, name, pickable in variants:
                kwargs = {**launch.kwargs, **config_kwargs}
                if isinstance(inner, triton.runtime.Heuristics):
                    for attr, heuristic in inner.values.items():
                        kwargs[attr] = heuristic({**named, **kwargs})
                if pickable:
                    options, signature, constexprs, attrs = _specialize(jit_fn, arch, launch.args, kwargs)
                    key = repr((launch.module, launch.kernel, arch.name, signature, sorted(constexprs.items()),
                                sorted(attrs.items()), options))  # fmt: skip
                    job = jobs.setdefault(key, Job(
                        launch.module, launch.kernel, arch.name, launch.args, kwargs, name, has_dot,
                        key=key, arg_names=tuple(jit_fn.arg_names),
                    ))  # fmt: skip
                    job.uses.add(launch.use)
                else:  # pruned: a row without a compile
                    job = Job(launch.module, launch.kernel, arch.name, (), {}, name, has_dot, key=f"pruned {name}")
                row_key = (job.key, launch.kernel, arch.name, act, pickable)
                row = rows.setdefault(row_key, Row(job, act, set(), pickable))
                row.ranks.add(rank)
    return list(jobs.values()), list(rows.values())


# ----------------------------------------------------------------------------------------------
# Compiling (in worker processes)
# ----------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    import triton

    path = Path(triton.knobs.cache.dir) / "perk_aot"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sass_summary(cubin: bytes) -> dict:
    """Registers, stack frame (spill) bytes and tensor-core instruction counts of a cubin."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "-res-usage", "-sass", f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return {
        "regs": int(usage[1]),
        "spill": int(usage[2]) + int(usage[4]),
        "static_shared": int(usage[3]),
        "hgmma": len(re.findall(r"\bHGMMA\.", out)),
        "hmma": len(re.findall(r"\bHMMA\.", out)),
    }


def compile_job(job: Job) -> dict:
    """Compile one job; the metadata plus its SASS summary, or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arch = ARCHS[job.arch]
    start = time.perf_counter()
    try:
        jit_fn = _jit_function(getattr(importlib.import_module(job.module), job.kernel))
        options, signature, constexprs, attrs = _specialize(jit_fn, arch, job.args, job.kwargs)
        target = GPUTarget("cuda", arch.capability, 32)
        source = ASTSource(jit_fn, signature, constexprs, attrs)
        compiled = triton.compile(source, target=target, options=options.__dict__)
        cached = _cache_dir() / f"{compiled.hash}.json"
        if cached.exists():
            summary = json.loads(cached.read_text())
        else:
            summary = _sass_summary(compiled.asm["cubin"])
            cached.write_text(json.dumps(summary))
        result = {**summary, "shared": compiled.metadata.shared}
    except Exception as e:  # noqa: BLE001 - every failure is reported in the table
        result = {"error": _describe(e)}
    result["seconds"] = time.perf_counter() - start
    return result


def _describe(error: Exception) -> str:
    """One line for a compile error: Triton's point at the source line ("at 20:45: `code`"), and the cause."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    where = ""
    if len(lines) >= 3 and lines[-1].strip() == "^":  # CompilationError: "at L:C:", the source, a caret
        where = f" {lines[0].rstrip(':')} `{lines[-2].strip()}`"
        lines = []
    cause = _describe(error.__cause__) if error.__cause__ else (lines[-1] if lines else "")
    return f"{type(error).__name__}{where}: {cause}"[:400]


def _quiet() -> None:
    # Triton 3.9 warns that its FP-fusion default will change; the check compiles with the default.
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")


def compile_all(jobs: list[Job], workers: int, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    # Largest tiles first: the longest compiles start early and the pool drains evenly.
    order = sorted(range(len(jobs)), key=lambda i: (not jobs[i].has_dot, -_tile_area(jobs[i])))
    results: list[dict] = [{}] * len(jobs)
    if workers <= 1:
        _quiet()
        for done, i in enumerate(order, 1):
            results[i] = compile_job(jobs[i])
            if progress:
                progress(done, len(jobs))
        return results
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_quiet) as pool:
        futures = {pool.submit(compile_job, jobs[i]): i for i in order}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            results[futures[future]] = future.result()
            if progress:
                progress(done, len(jobs))
    return results


def _tile_area(job: Job) -> int:
    k = job.kwargs
    return k.get("BLOCK_M", 1) * max(k.get("BLOCK_N", 1), k.get("BLOCK_Q", 1)) * k.get("num_warps", 4)


# ----------------------------------------------------------------------------------------------
# Verdicts and the table
# ----------------------------------------------------------------------------------------------


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
        f"{module}.{name} is never launched by the sweep: extend perk_kernels/aot_check.py"
        for module in KERNEL_MODULES
        for name in _kernel_names(importlib.import_module(module))
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


# ----------------------------------------------------------------------------------------------
# csrc (compile only)
# ----------------------------------------------------------------------------------------------

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _csrc_commands(out_dir: Path) -> list[list[str]] | str:
    """The compile-only commands for csrc/, or why they cannot run here."""
    from torch.utils.cpp_extension import include_paths

    nvcc = shutil.which("nvcc") or next(
        (str(p) for p in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc",) if p.exists()), None
    )
    if nvcc is None:
        return "nvcc not found"
    if not CSRC.is_dir():
        return "no csrc/ next to perk_kernels (installed package)"
    includes = [f"-I{p}" for p in include_paths()]
    # The CPU wheel of torch lacks this generated header, which the CUDA headers include.
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in include_paths()):
        stub = out_dir / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        includes.append(f"-I{out_dir / 'stub'}")
    import sysconfig

    includes.append(f"-I{sysconfig.get_paths()['include']}")
    defines = ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    sources = sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp"))
    return [
        [nvcc, "-c", str(src), "-o", str(out_dir / f"{src.name}.o"), "-std=c++20", "-O0",
         "-gencode", "arch=compute_90,code=sm_90", *includes, *defines]  # fmt: skip
        for src in sources
    ]


def _csrc_key(commands: list[list[str]]) -> str:
    h = hashlib.sha256(torch.__version__.encode())
    h.update(subprocess.run([commands[0][0], "--version"], capture_output=True, text=True).stdout.encode())
    for path in sorted(CSRC.iterdir()):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:32]


def start_csrc_check() -> Callable[[], tuple[str, list[str]]]:
    """Start compiling csrc/ in the background; the returned function waits: (status line, failures)."""
    out_dir = Path(tempfile.mkdtemp(prefix="perk_csrc_"))
    commands = _csrc_commands(out_dir)
    if isinstance(commands, str):
        shutil.rmtree(out_dir, ignore_errors=True)
        return lambda: (f"csrc: skipped ({commands})", [])
    cached = _cache_dir() / f"csrc-{_csrc_key(commands)}.json"
    if cached.exists():
        shutil.rmtree(out_dir, ignore_errors=True)
        return lambda: (json.loads(cached.read_text())["status"] + " (cached)", [])
    start = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in commands]

    def wait() -> tuple[str, list[str]]:
        failures, notes = [], []
        for cmd, proc in zip(commands, procs):
            output = proc.communicate()[0]
            if proc.returncode == 0:
                continue
            ours = [line for line in output.splitlines() if "error" in line and str(CSRC) in line]
            name = Path(cmd[2]).name
            if ours:
                failures += [f"csrc {name}: {line}" for line in ours[:10]]
            else:
                first = next((line for line in output.splitlines() if "error" in line), output[-300:])
                notes.append(f"{name} not checked (errors outside csrc/ only: {first.strip()})")
        shutil.rmtree(out_dir, ignore_errors=True)
        seconds = time.perf_counter() - start
        if failures:
            return f"csrc: FAIL ({len(failures)} errors in csrc/)", failures
        status = f"csrc: compiles with nvcc for sm_90 (done {seconds:.0f} s in)"
        if notes:
            status = f"csrc: {'; '.join(notes)}"
        if not notes:
            cached.write_text(json.dumps({"status": "csrc: compiles with nvcc for sm_90"}))
        return status, []

    return wait


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def run(
    archs: list[str], ranks: tuple[int, ...], activations: tuple[str, ...], workers: int, csrc: bool, table: bool
) -> int:
    start = time.perf_counter()
    wait_csrc = start_csrc_check() if csrc else (lambda: ("csrc: skipped (--no-csrc)", []))
    launches = record_launches(ranks, activations)
    jobs, rows = expand(launches, [ARCHS[a] for a in archs])
    targets = ", ".join(archs)
    print(f"{len(launches)} launches recorded -> {len(jobs)} compile jobs ({targets}), {workers} workers", flush=True)

    def progress(done: int, total: int) -> None:
        if done % 50 == 0 or done == total:
            print(f"  compiled {done}/{total} ({time.perf_counter() - start:.0f} s)", flush=True)

    results = compile_all(jobs, workers, progress)
    by_key = {job.key: res for job, res in zip(jobs, results)}
    for row in rows:
        row.result = by_key.get(row.job.key) if row.pickable else None
    if table:
        print(format_table(rows))
    print()
    print(summary_by_rank(rows))
    failures = [
        f"{r.job.kernel} {_variant(r.job)} {r.act} {r.job.arch} {r.job.config}: {verdict(r)}"
        + (f" ({r.result['error']})" if r.result and "error" in r.result else "")
        for r in rows
        if verdict(r).startswith("FAIL")
    ]
    failures += launch_failures(rows) + coverage_failures(jobs)
    csrc_status, csrc_failures = wait_csrc()
    failures += csrc_failures
    print(csrc_status)
    slowest = max(results, key=lambda r: r.get("seconds", 0), default={})
    elapsed = time.perf_counter() - start
    print(f"{len(jobs)} kernels compiled in {elapsed:.0f} s (slowest {slowest.get('seconds', 0):.1f} s)")
    for failure in failures:
        print("FAIL:", failure)
    print("GPU readiness: " + ("FAILED" if failures else "ok"))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perk_kernels.aot_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=",".join(ARCHS), help="targets, comma separated (default: %(default)s)")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)), help="LoRA ranks (default: %(default)s)")
    dtypes = "/".join(ACTIVATIONS)
    parser.add_argument("--activations", default="bf16,fp16,fp32", help=f"of {dtypes} (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPUs)")
    parser.add_argument("--no-csrc", action="store_true", help="skip the nvcc compile of csrc/")
    parser.add_argument("--no-table", action="store_true", help="print only the summary and the failures")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # The kernels were decorated for the interpreter: compile in a fresh process without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "perk_kernels.aot_check", *sys.argv[1:]], env=env).returncode
    from triton.knobs import nvidia

    if not nvidia.ptxas.path or not nvidia.cuobjdump.path:
        print("GPU readiness: skipped (Triton found no ptxas / cuobjdump)")
        return 0
    _quiet()
    ranks = tuple(int(r) for r in args.ranks.split(","))
    activations = tuple(args.activations.split(","))
    return run(args.arch.split(","), ranks, activations, args.workers, not args.no_csrc, not args.no_table)


if __name__ == "__main__":
    sys.exit(main())
