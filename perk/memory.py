"""Memory: the adapters written by encoding contexts, and their export in PEFT's on-disk format."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from perk.inner_loop import PerkStats
from perk.lora import AdapterLayout

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class Memory:
    """Adapters of ``n_adapters`` encoded contexts (one each), as one flat fp32 buffer.

    flat: (n_adapters, P) adapter tensors; :attr:`layout` maps it to each module's A and B.
    layout: the module layout of the model that wrote it.
    rank, alpha, rslora, target_modules: the LoRA hyper-parameters (for the PEFT export).
    base_model_name_or_path: the base model the adapters belong to.
    inner_losses: (inner_steps, n_adapters) mean context NLL before each inner step.
    context_tokens: (n_adapters,) tokens predicted in each context's segments.
    stats: what the encode call that wrote it did (all its contexts together; None when loaded
        or selected).
    """

    flat: torch.Tensor
    layout: AdapterLayout
    rank: int
    alpha: float
    rslora: bool
    target_modules: tuple[str, ...]
    base_model_name_or_path: str | None = None
    inner_losses: torch.Tensor | None = None
    context_tokens: torch.Tensor | None = None
    stats: PerkStats | None = None

    @property
    def n_adapters(self) -> int:
        return self.flat.shape[0]

    def __len__(self) -> int:
        return self.n_adapters

    def select(self, index: int) -> Memory:
        """The memory of context ``index`` alone."""
        self._check_index(index)
        pick = slice(index, index + 1)
        return Memory(
            self.flat[pick], self.layout, self.rank, self.alpha, self.rslora, self.target_modules,
            self.base_model_name_or_path,
            None if self.inner_losses is None else self.inner_losses[:, pick],
            None if self.context_tokens is None else self.context_tokens[pick],
        )

    def adapters(self, index: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module path: (A (r, d_in), B (d_out, r))}`` of context ``index`` (views)."""
        self._check_index(index)
        pairs = self.layout.module_views(self.flat[index : index + 1])
        return {name: (a[0], b[0]) for name, (a, b) in zip(self.layout.names, pairs)}

    def save_peft(self, directory: str | Path, index: int | None = None) -> list[Path]:
        """Write the adapter(s) in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``).

        One adapter per directory, as PEFT expects: a memory of one context (or ``index`` given)
        is written into ``directory``; a memory of several contexts with ``index=None`` writes
        one sub-directory per context, ``directory/adapter_<i>``. Returns the directories
        written. The files load with ``peft.PeftModel.from_pretrained(base_model, directory)``.
        """
        directory = Path(directory)
        if index is not None or self.n_adapters == 1:
            self._write_peft(directory, 0 if index is None else index)
            return [directory]
        written = [directory / f"adapter_{i}" for i in range(self.n_adapters)]
        for i, sub in enumerate(written):
            self._write_peft(sub, i)
        return written

    def _write_peft(self, directory: Path, index: int) -> None:
        self._check_index(index)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, (a, b) in self.adapters(index).items():
            # PEFT names: <peft wrapper>.<LoraModel>.<module path>.lora_A.weight (its nn.Linear(d_in, r)).
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().float().contiguous().cpu()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().float().contiguous().cpu()
        save_file(tensors, str(directory / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        present = {name.rsplit(".", 1)[-1] for name in self.layout.names}
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "use_rslora": self.rslora,
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": sorted(t for t in self.target_modules if t in present),
            # GPT-2's Conv1D stores weights (d_in, d_out); the adapter shapes are the same.
            "fan_in_fan_out": any(spec.fan_in_fan_out for spec in self.layout.modules),
            "base_model_name_or_path": self.base_model_name_or_path,
            "inference_mode": True,
        }
        (directory / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2))

    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not 0 <= index < self.n_adapters:
            raise ValueError(f"index must lie in [0, {self.n_adapters}), got {index}")
