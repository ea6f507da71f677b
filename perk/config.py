"""PerkConfig: every knob of the PERK engine, with working defaults."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from perk.fields import field as option

# Default LoRA targets: every attention and MLP projection of the Llama family (Llama, Qwen2,
# Mistral, SmolLM) and of GPT-2 (whose fused qkv `c_attn` and both `c_proj` are Conv1D layers).
# Only the names present in a model are used; matching follows PEFT (the module's last name).
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")
DEFAULT_TARGETS = LLAMA_TARGETS + GPT2_TARGETS

META_GRAD_MODES = ("fd", "exact", "first_order")
INNER_OPTIMIZERS = ("sgd", "adamw")
NONFINITE_POLICIES = ("raise", "skip")
# lr0 when `inner_lr` is None. SGD on a rank-16 LoRA needs large rates; AdamW's normalised steps
# need small ones. Measured with this engine's loss (mean token NLL per context) on SmolLM2-135M,
# rank 16, 256-token qa1 contexts: over 4 steps 0.3 lowered the context loss by 0.16 nats, 1.0 by
# 1.2 (then oscillated at step 6), 3.0 diverged at step 3. 0.7 sits below the oscillation.
DEFAULT_INNER_LR = {"sgd": 0.7, "adamw": 1e-3}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class PerkConfig:
    """Configuration of a PERK model (docs/design.md §2-§5).

    LoRA: ``rank``, ``alpha`` and ``rslora`` give the scale ``alpha / rank`` (or
    ``alpha / sqrt(rank)`` with rsLoRA, as in PEFT); ``target_modules`` are module names matched
    like PEFT does (a module whose last dotted name is listed; one string is split at commas).

    Inner loop: the context is cut into segments of ``segment_len`` tokens, ``inner_steps`` (N)
    steps of ``inner_optimizer`` are taken on the mean token NLL of each context. The learning
    rate of step n and tensor group k is ``inner_lr · exp(u[n, k])`` with ``u`` meta-learned
    (starting at 0); every LoRA A and every LoRA B of every module is its own group.
    ``inner_weight_decay`` (λ, decoupled: ``φ ← φ − lr·(d + λφ)``) and ``inner_max_grad_norm``
    (per-adapter global-norm clipping) are optional.

    Meta-gradient: the outer loss is differentiated through the last ``unroll_steps`` (T) inner
    steps only; ``meta_grad`` picks how the Hessian-vector products are formed: ``"fd"``
    (central finite difference of two first-order passes, step ``fd_epsilon``), ``"exact"``
    (autograd double backward; switches the model to eager attention and the torch kernels for
    the call) or ``"first_order"`` (no Hessian term). SGD steps, gradient clipping included, are
    differentiated exactly; with ``inner_optimizer="adamw"`` Adam's moment statistics are treated
    as constants of the meta-backward, an approximation warned about once at run time (see
    :mod:`perk.meta_gradient`). ``fd_epsilon`` is the length of the finite-difference step along a
    unit vector per adapter; None (the default) picks it from the base model's compute dtype and
    the adapter's norm (``perk.meta_gradient.fd_step``: ε = 0.008·‖φ‖ for a bf16 model, 0.004·‖φ‖
    for fp16, 0.0002·‖φ‖ for fp32 and fp64), so no precision needs tuning; a number overrides it.

    Token weighting (``token_weighting``, off by default) puts a meta-learned weight in (0, 2) on
    every context token's NLL, from an MLP (``weighting_hidden`` units) on the base model's
    hidden state (see :mod:`perk.weighting`).

    Resources: ``micro_batch_tokens`` bounds how many segment tokens one forward/backward holds
    (gradients are accumulated over chunks), so activation memory does not grow with the context.
    Adapters and meta-parameters are kept in ``dtype`` (float32 unless float64 is asked for,
    e.g. in gradient checks); the base model keeps its own dtype.
    """

    rank: int = option(16, "LoRA rank r")
    alpha: float = option(16.0, "LoRA alpha (scale alpha/r, or alpha/sqrt(r) with rslora)")
    rslora: bool = option(False, "rank-stabilised LoRA scaling")
    target_modules: tuple[str, ...] = option(DEFAULT_TARGETS, "names of the linear layers that get an adapter")
    segment_len: int = option(128, "tokens per context segment")
    inner_steps: int = option(4, "inner SGD steps N that write the context into the adapter")
    unroll_steps: int = option(2, "last T inner steps the meta-gradient flows through")
    inner_lr: float | None = option(None, "initial inner learning rate lr0 (none: 0.7 for sgd, 1e-3 for adamw)")
    inner_optimizer: str = option("sgd", "inner optimizer: sgd or adamw (adamw: the meta-gradient treats Adam's moments as constants)")
    inner_weight_decay: float = option(0.0, "decoupled weight decay of the inner steps")
    inner_max_grad_norm: float | None = option(None, "per-adapter gradient clipping of the inner steps (none: off)")
    adam_betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas of the inner steps")
    adam_eps: float = option(1e-8, "AdamW epsilon of the inner steps")
    meta_grad: str = option("fd", "Hessian-vector products of the meta-gradient: fd, exact or first_order")
    fd_epsilon: float | None = option(None, "finite-difference step of the fd mode (none: chosen from the base model's dtype and the adapter's norm)")
    token_weighting: bool = option(False, "meta-learn weights on the context tokens' losses")
    weighting_hidden: int = option(32, "hidden units of the token-weighting MLP")
    micro_batch_tokens: int = option(4096, "segment tokens per forward/backward (bounds activation memory)")
    on_nonfinite: str = option("raise", "a non-finite inner loss: raise, or skip the step with a warning")
    answer_stop_at_newline: bool = option(True, "stop generated answers at the first newline")
    dtype: str = option("float32", "dtype of adapters and meta-parameters: float32 or float64")
    seed: int = option(0, "seed of the adapter initialisation")

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):  # one name, or names comma-separated as on the command line
            self.target_modules = [t.strip() for t in self.target_modules.split(",")]
        self.target_modules = tuple(self.target_modules)
        self.adam_betas = tuple(self.adam_betas)
        _check_int("rank", self.rank, minimum=1)
        _check_int("segment_len", self.segment_len, minimum=2)
        _check_int("inner_steps", self.inner_steps, minimum=0)
        _check_int("unroll_steps", self.unroll_steps, minimum=0)
        _check_int("micro_batch_tokens", self.micro_batch_tokens, minimum=1)
        _check_int("weighting_hidden", self.weighting_hidden, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        _check_choice("meta_grad", self.meta_grad, META_GRAD_MODES)
        _check_choice("inner_optimizer", self.inner_optimizer, INNER_OPTIMIZERS)
        _check_choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        _check_choice("dtype", self.dtype, tuple(DTYPES))
        _check_positive("alpha", self.alpha)
        if self.fd_epsilon is not None:
            _check_positive("fd_epsilon", self.fd_epsilon)
        _check_positive("adam_eps", self.adam_eps)
        if self.inner_lr is not None:
            _check_positive("inner_lr", self.inner_lr)
        if self.inner_max_grad_norm is not None:
            _check_positive("inner_max_grad_norm", self.inner_max_grad_norm)
        if not isinstance(self.inner_weight_decay, (int, float)) or not 0 <= self.inner_weight_decay < math.inf:
            raise ValueError(f"inner_weight_decay must be a finite float >= 0, got {self.inner_weight_decay!r}")
        if self.unroll_steps > self.inner_steps:
            raise ValueError(
                f"unroll_steps ({self.unroll_steps}) must be <= inner_steps ({self.inner_steps})"
            )
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of names, got {self.target_modules!r}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two floats in [0, 1), got {self.adam_betas!r}")

    @property
    def lora_scale(self) -> float:
        """The LoRA output scale: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def base_inner_lr(self) -> float:
        """lr0: ``inner_lr``, or the optimizer's default when it is None."""
        return DEFAULT_INNER_LR[self.inner_optimizer] if self.inner_lr is None else float(self.inner_lr)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PerkConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown PerkConfig fields: {unknown}")
        return cls(**values)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {value}")
