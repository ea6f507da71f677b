"""Launches → compile jobs (the configs each kernel's autotuner can pick, specialised as Triton's
runtime would), compiled for a ``GPUTarget`` in a process pool."""

from __future__ import annotations

import concurrent.futures
import importlib
import json
import multiprocessing
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from tools.aot.record import Launch, patched
from tools.aot.sass import sass_summary
from tools.aot.targets import ARCHS, Arch, cache_dir


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
                    with patched(launch.module, "device_capability", lambda device: divmod(arch.capability, 10)):
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
        cached = cache_dir() / f"{compiled.hash}.json"
        if cached.exists():
            summary = json.loads(cached.read_text())
        else:
            summary = sass_summary(compiled.asm["cubin"])
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


def quiet() -> None:
    # Triton 3.9 warns that its FP-fusion default will change; the check compiles with the default.
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")


def compile_all(jobs: list[Job], workers: int, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    # Largest tiles first: the longest compiles start early and the pool drains evenly.
    order = sorted(range(len(jobs)), key=lambda i: (not jobs[i].has_dot, -_tile_area(jobs[i])))
    results: list[dict] = [{}] * len(jobs)
    if workers <= 1:
        quiet()
        for done, i in enumerate(order, 1):
            results[i] = compile_job(jobs[i])
            if progress:
                progress(done, len(jobs))
        return results
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=quiet) as pool:
        futures = {pool.submit(compile_job, jobs[i]): i for i in order}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            results[futures[future]] = future.result()
            if progress:
                progress(done, len(jobs))
    return results


def _tile_area(job: Job) -> int:
    k = job.kwargs
    return k.get("BLOCK_M", 1) * max(k.get("BLOCK_N", 1), k.get("BLOCK_Q", 1)) * k.get("num_warps", 4)

