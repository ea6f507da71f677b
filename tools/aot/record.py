"""The launches the engine's ops make at the real shapes, recorded from the ops themselves.

The public ops run on CPU tensors of the target shapes (empty: nothing is computed) with every
Triton kernel replaced by a recorder, so the sweep compiles exactly what the launchers launch
(grids, constexprs, autotune keys, row splits, dtypes) instead of a copy of their logic that
would drift from them.

Why module globals are swapped, and only here: a Triton launch needs a GPU driver, and the
launchers read the device (its SM count, the backend it gets) to decide what to launch. Neither
Triton nor perk_kernels has a hook for "record instead of launch on a device you do not have"
(Triton's launch hooks fire after a compile on a real device; a hook for a developer tool in the
runtime ops is what keeping the tool out of the package avoids). So for the duration of
:func:`recording` — restored on exit, errors included — each module of ``KERNEL_MODULES`` has

* every ``*_kernel`` (a Triton ``JITFunction``, ``Autotuner`` or ``Heuristics``) replaced by a
  recorder;
* ``choose_backend`` answering ``"triton"`` (on CPU tensors the ops would pick the torch reference);
* ``target_programs`` answering twice the SM count of an H100 / H200 (row splits as on the device).

:func:`tools.aot.compile.expand` swaps ``device_capability`` the same way (:func:`patched`) while
a kernel's ``early_config_prune`` runs for each target.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

import torch

from tools.aot.targets import ACTIVATIONS, KERNEL_MODULES, MODELS, RANKS, SCENARIOS, SMS
from tools.shapes import ModelShape


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


def kernel_names(module) -> list[str]:
    """The Triton kernels of a module: its ``*_kernel`` names."""
    import triton

    kinds = (triton.runtime.JITFunction, triton.runtime.Autotuner, triton.runtime.Heuristics)
    return [n for n, v in vars(module).items() if n.endswith("_kernel") and isinstance(v, kinds)]


def patched(module: str, attr: str, value) -> contextlib.AbstractContextManager:
    """``module.attr`` set to ``value`` for the block (when the module has it), then restored."""
    target = importlib.import_module(module)
    if not hasattr(target, attr):
        return contextlib.nullcontext()
    return mock.patch.object(target, attr, value)


@contextlib.contextmanager
def recording(sink: list[Launch], use: list) -> Iterator[None]:
    """Every kernel of KERNEL_MODULES swapped for a recorder, ops forced onto the Triton path
    (see the module docstring for why, and for what exactly is swapped)."""
    with contextlib.ExitStack() as stack:
        for name in KERNEL_MODULES:
            for kernel in kernel_names(importlib.import_module(name)):
                stack.enter_context(patched(name, kernel, _Recorder(name, kernel, sink, use)))
            stack.enter_context(patched(name, "choose_backend", lambda backend, device, **kwargs: "triton"))
            stack.enter_context(patched(name, "target_programs", lambda device: 2 * SMS))
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
    from perk_kernels import lora_linear, adapter_rows

    layers = {(d_in, d_out, bias) for _, d_in, d_out, bias in model.projections()}
    for scenario in SCENARIOS:
        rows = scenario.n_adapters * scenario.rows_per_adapter
        ids = torch.arange(scenario.n_adapters).repeat_interleave(scenario.rows_per_adapter)
        by_adapter = adapter_rows(ids, scenario.n_adapters)
        for d_in, d_out, bias in sorted(layers):
            use[0] = f"lora_linear {scenario.name}"
            x = torch.empty(rows, d_in, dtype=dtype, requires_grad=scenario.backward)
            weight = torch.empty(d_out, d_in, dtype=dtype)
            b = torch.empty(d_out, dtype=dtype) if bias else None
            lora_a = torch.empty(scenario.n_adapters, rank, d_in, requires_grad=scenario.backward)
            lora_b = torch.empty(scenario.n_adapters, d_out, rank, requires_grad=scenario.backward)
            with torch.set_grad_enabled(scenario.backward):
                y = lora_linear(x, weight, b, lora_a, lora_b, 2.0, by_adapter)
            if scenario.backward:
                y.backward(torch.empty_like(y))


def _drive_adapter_ops(model: ModelShape, rank: int, use: list) -> None:
    """The inner step and the meta-gradient walk on one layer's adapters: fp32 flat (n_adapters, P)
    buffers split into the engine's groups (A then B of every projection)."""
    from perk_kernels import lora_inner_step, meta_grad_accumulate

    sizes = model.adapter_group_sizes(rank, n_layers=1)
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    n_adapters = 8
    phi, direction, g_plus, g_minus = (torch.empty(n_adapters, offsets[-1]) for _ in range(4))
    lr = torch.full((len(sizes),), 0.1)
    use[0] = "lora_inner_step"
    # The engine's steps: in place, with and without clipping (a differentiated step is the torch
    # reference, no kernel).
    for max_grad_norm in (None, 1.0):
        lora_inner_step(phi, direction, lr, offsets, weight_decay=0.01, max_grad_norm=max_grad_norm, inplace=True)
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
    with recording(sink, use):
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
