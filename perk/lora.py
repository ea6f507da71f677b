"""LoRA injection: target linear layers read their adapters from the engine, per forward call.

The engine never edits modules between inner steps. Each target ``nn.Linear`` (or GPT-2
``Conv1D``) is swapped once for a :class:`LoraLinear` that shares its frozen weight and bias and
reads the adapter tensors of the current forward from an :class:`AdapterContext` shared by every
injected layer. An inner step then only makes new adapter tensors and hands them to the context.

All adapters of a batch live in ONE flat buffer ``(n_adapters, P)``; the :class:`AdapterLayout`
maps it to per-module views ``A (n_adapters, r, d_in)`` and ``B (n_adapters, d_out, r)``. Optimiser
and meta-gradient arithmetic runs on the flat buffer (a few large ops); the layers read views.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import perk_kernels
from perk_kernels import AdapterRows, adapter_rows


@dataclass(frozen=True)
class LoraModuleSpec:
    """One injected layer: its dotted path in the model and its shapes.

    ``fan_in_fan_out`` is True for GPT-2 ``Conv1D``, whose weight is stored (d_in, d_out).
    """

    name: str
    d_in: int
    d_out: int
    fan_in_fan_out: bool


class AdapterLayout:
    """Where each module's A and B live in a flat adapter buffer ``(n_adapters, P)``.

    Module ``m`` owns ``A`` (flattened ``r × d_in``) followed by ``B`` (flattened ``d_out × r``).
    Tensor groups (the unit of learned inner learning rates) are ``2m`` for A and ``2m + 1`` for B.
    """

    def __init__(self, modules: list[LoraModuleSpec], rank: int):
        if not modules:
            raise ValueError("modules must be non-empty: no target module was found in the model")
        self.modules = list(modules)
        self.rank = rank
        shapes: list[tuple[int, int]] = []
        for spec in self.modules:
            shapes += [(rank, spec.d_in), (spec.d_out, rank)]
        self.shapes = shapes  # per tensor group, the (rows, cols) of one adapter's matrix
        self.sizes = [rows * cols for rows, cols in shapes]
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.n_params = self.offsets[-1]

    @property
    def n_groups(self) -> int:
        return len(self.sizes)

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.modules]

    def expand(self, table: torch.Tensor) -> torch.Tensor:
        """(n, G) per-group values (e.g. learning rates) → (n, P) per flat element (differentiable)."""
        return perk_kernels.expand_group_table(table, self.offsets)

    def tensor_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views ``[A_0, B_0, A_1, B_1, …]`` of ``flat`` (n_adapters, P), each (n_adapters, rows, cols)."""
        if flat.dim() != 2 or flat.shape[1] != self.n_params:
            raise ValueError(f"flat must be (n_adapters, {self.n_params}), got shape {tuple(flat.shape)}")
        return [
            flat[:, start:end].unflatten(1, shape)
            for start, end, shape in zip(self.offsets[:-1], self.offsets[1:], self.shapes)
        ]

    def module_views(self, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(A_m, B_m), …]`` views of ``flat``, in module order."""
        views = self.tensor_views(flat)
        return list(zip(views[0::2], views[1::2]))

    def signature(self) -> list[list]:
        """JSON-able description, to check that saved adapters fit a model."""
        return [[s.name, s.d_in, s.d_out, s.fan_in_fan_out] for s in self.modules]


class AdapterContext:
    """What the injected layers read during one forward: adapter tensors and row → adapter ids.

    ``adapters`` is None outside :meth:`active`: the layers then compute the plain base layer.
    ``row_adapters`` gives the adapter of every row (sequence) of the batch (None: all use
    adapter 0); the rows of each adapter (:func:`perk_kernels.adapter_rows`) are found once per
    input shape and reused by every layer.
    """

    def __init__(self, scale: float, backend: str | None = None):
        self.scale = float(scale)
        self.backend = backend
        self.adapters: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.row_adapters: torch.Tensor | None = None
        self._adapter_rows: tuple[torch.Size, AdapterRows] | None = None

    @contextlib.contextmanager
    def active(
        self,
        adapters: list[tuple[torch.Tensor, torch.Tensor]],
        row_adapters: torch.Tensor | None = None,
        *,
        backend: str | None = None,
    ):
        """Make every injected layer apply ``adapters`` inside the ``with`` block.

        Args:
            adapters: per module, ``(A (n_adapters, r, d_in), B (n_adapters, d_out, r))``.
            row_adapters: (batch,) int64, the adapter of each row (sequence), or None for adapter 0.
            backend: kernel backend for this block (overrides the context's default).
        """
        if self.adapters is not None:
            raise RuntimeError("an adapter context is already active (nested activation)")
        saved_backend = self.backend
        self.adapters, self.row_adapters, self._adapter_rows = adapters, row_adapters, None
        if backend is not None:
            self.backend = backend
        try:
            yield self
        finally:
            self.adapters, self.row_adapters, self._adapter_rows = None, None, None
            self.backend = saved_backend

    def adapter_rows(self, leading_shape: torch.Size, n_adapters: int) -> AdapterRows | None:
        """Row → adapter metadata for inputs of leading shape ``(batch, seq)``; cached per shape."""
        if self.row_adapters is None or n_adapters == 1:
            return None
        if self._adapter_rows is None or self._adapter_rows[0] != leading_shape:
            ids = self.row_adapters.view(-1, *([1] * (len(leading_shape) - 1))).expand(leading_shape)
            self._adapter_rows = (leading_shape, adapter_rows(ids, n_adapters))
        return self._adapter_rows[1]


class LoraLinear(nn.Module):
    """A frozen linear layer (``nn.Linear`` or GPT-2 ``Conv1D``) plus the context's adapter.

    Shares the original layer's ``weight`` and ``bias`` parameters (same state-dict names).
    """

    def __init__(self, base: nn.Module, index: int, context: AdapterContext):
        super().__init__()
        if isinstance(base, Conv1D):
            self.fan_in_fan_out = True
            self.in_features, self.out_features = base.weight.shape
        elif isinstance(base, nn.Linear):
            self.fan_in_fan_out = False
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            raise TypeError(f"base must be nn.Linear or transformers Conv1D, got {type(base).__name__}")
        self.weight = base.weight
        self.bias = base.bias
        self.index = index
        self.context = context

    def dense_weight(self) -> torch.Tensor:
        """The (d_out, d_in) weight (a transposed view for Conv1D)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.context
        if context.adapters is None:
            return nn.functional.linear(x, self.dense_weight(), self.bias)
        lora_a, lora_b = context.adapters[self.index]
        by_adapter = context.adapter_rows(x.shape[:-1], lora_a.shape[0])
        return perk_kernels.lora_linear(
            x, self.dense_weight(), self.bias, lora_a, lora_b, context.scale, by_adapter, backend=context.backend
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, index={self.index}"


def inject_lora(model: nn.Module, target_modules: tuple[str, ...], context: AdapterContext) -> list[LoraModuleSpec]:
    """Swap every target layer of ``model`` (in place) for a :class:`LoraLinear` reading ``context``.

    A layer is a target when the last part of its dotted name is in ``target_modules`` (PEFT's
    rule) and it is an ``nn.Linear`` or ``Conv1D``. Returns the specs in injection order, which
    is the order of the adapter layout.
    """
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ValueError("model already has LoRA layers injected (pass a fresh base model)")
    targets = set(target_modules)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, (nn.Linear, Conv1D))
    ]
    if not found:
        raise ValueError(f"no module of the model matches target_modules={sorted(targets)}")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in found:
        if module is output:
            # The losses and generation read the LM head's weight directly (fused cross-entropy),
            # so an adapter there would never get a gradient yet change every answer.
            raise ValueError(f"target_modules: {name!r} is the model's output layer (LM head), which cannot take an adapter")
    specs = []
    for index, (name, module) in enumerate(found):
        layer = LoraLinear(module, index, context)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        specs.append(LoraModuleSpec(name, layer.in_features, layer.out_features, layer.fan_in_fan_out))
    return specs
