"""Every config of perk, dataclasses with working defaults: :class:`PerkConfig` (the engine),
:class:`DataConfig` (a run's problems) and :class:`TrainConfig` (a run of ``python -m perk.train``).

Each field is declared with :func:`field`, which carries its meaning for ``--help``
(:mod:`perk.cli` lists every key with its default); ``__post_init__`` checks the values (the
command line runs it again after overrides). Nothing here imports the command-line layer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from perk.models import DEFAULT_MODEL
from perk.tasks import TASKS


def field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help text for ``--help`` (mutable and dataclass defaults copied)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


# ----------------------------------------------------------------------------------------------
# The checks of the configs' __post_init__ (a TypeError or ValueError naming the key)
# ----------------------------------------------------------------------------------------------


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


# Default LoRA targets: every attention and MLP projection of the Llama family (Llama, Qwen2,
# Mistral, SmolLM) and of GPT-2 (whose fused qkv `c_attn` and both `c_proj` are Conv1D layers).
# Only the names present in a model are used; matching follows PEFT (the module's last name).
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")
DEFAULT_TARGETS = LLAMA_TARGETS + GPT2_TARGETS

META_GRAD_MODES = ("fd", "exact", "first_order")
FD_FLOAT32_POLICIES = ("auto", "unrolled", "never")
INNER_OPTIMIZERS = ("sgd", "adamw")
NONFINITE_POLICIES = ("raise", "skip")
METHODS = ("perk", "zeroshot", "ftic")  # the methods a run compares (perk.methods)
THREADS_HELP = ("CPU threads per process (0: OMP_NUM_THREADS if set, else the physical cores this process may use, "
                "divided among the torchrun processes on the machine)")
# lr0 when `inner_lr` is None. SGD on a rank-16 LoRA needs large rates (the loss is a mean token
# NLL per context, whose gradients are small); AdamW's normalised steps need small ones. SGD's 0.7
# sits below the rate at which SmolLM2-135M's inner losses start to oscillate.
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
    With a bf16/fp16 base model, ``fd_float32`` says where ``fd`` runs the base model in fp32:
    ``"auto"`` runs the last T inner steps, the outer pass and the probes in fp32 on contexts that
    need it (under ``perk.meta_gradient.FLOAT32_BELOW_TOKENS`` tokens per adapter, or segments under
    ``FLOAT32_BELOW_SEGMENT_TOKENS``: ``float32_passes_needed``), ``"unrolled"``
    always, ``"never"`` never (every pass in the base dtype).

    Token weighting (``token_weighting``, off by default) puts a meta-learned weight in (0, 2) on
    every context token's NLL, from an MLP (``weighting_hidden`` units) on the base model's
    hidden state (see :mod:`perk.weighting`).

    Resources: ``micro_batch_tokens`` bounds how many segment tokens one forward/backward holds
    (gradients are accumulated over chunks), so activation memory does not grow with the context.
    Adapters and meta-parameters are kept in ``dtype`` (float32 unless float64 is asked for,
    e.g. in gradient checks); the base model keeps its own dtype.
    """

    rank: int = field(16, "LoRA rank r")
    alpha: float = field(16.0, "LoRA alpha (scale alpha/r, or alpha/sqrt(r) with rslora)")
    rslora: bool = field(False, "rank-stabilised LoRA scaling")
    target_modules: tuple[str, ...] = field(DEFAULT_TARGETS, "names of the linear layers that get an adapter")
    segment_len: int = field(128, "tokens per context segment")
    inner_steps: int = field(4, "inner SGD steps N that write the context into the adapter")
    unroll_steps: int = field(2, "last T inner steps the meta-gradient flows through")
    inner_lr: float | None = field(None, "initial inner learning rate lr0 (none: 0.7 for sgd, 1e-3 for adamw)")
    inner_optimizer: str = field("sgd", "inner optimizer: sgd or adamw (adamw: the meta-gradient treats Adam's moments as constants)")
    inner_weight_decay: float = field(0.0, "decoupled weight decay of the inner steps")
    inner_max_grad_norm: float | None = field(None, "per-adapter gradient clipping of the inner steps (none: off)")
    adam_betas: tuple[float, float] = field((0.9, 0.999), "AdamW betas of the inner steps")
    adam_eps: float = field(1e-8, "AdamW epsilon of the inner steps")
    meta_grad: str = field("fd", "Hessian-vector products of the meta-gradient: fd, exact or first_order")
    fd_epsilon: float | None = field(None, "finite-difference step of the fd mode (none: chosen from the base model's dtype and the adapter's norm)")
    fd_float32: str = field("auto", "fd with a bf16/fp16 base: last T steps, outer pass and probes in fp32 on short contexts or segments (auto), always (unrolled) or never")
    token_weighting: bool = field(False, "meta-learn weights on the context tokens' losses")
    weighting_hidden: int = field(32, "hidden units of the token-weighting MLP")
    micro_batch_tokens: int = field(4096, "segment tokens per forward/backward (bounds activation memory)")
    on_nonfinite: str = field("raise", "a non-finite inner loss: raise, or skip the step with a warning")
    answer_stop_at_newline: bool = field(True, "stop generated answers at the first newline")
    dtype: str = field("float32", "dtype of adapters and meta-parameters: float32 or float64")
    seed: int = field(0, "seed of the adapter initialisation")

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
        _check_choice("fd_float32", self.fd_float32, FD_FLOAT32_POLICIES)
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


@dataclass
class DataConfig:
    """The problems of a run: generated (task, length, seed, formatting) or read from dataset
    files (``perk.problems`` makes them)."""

    task: str = field("babilong/qa1", f"task to train and evaluate on: {', '.join(TASKS)}")
    context_tokens: int = field(256, "context length of every problem, in the base model's tokens")
    train_problems: int = field(256, "training problems: generated, or the first ones of data.train_file")
    eval_problems: int = field(
        20, "held-out problems for the final evaluation: generated (another seed), the first ones of "
        "data.eval_file, or the last ones of data.train_file"
    )
    order_markers: bool = field(True, "prefix bAbI facts with per-actor event counters ('Mary Event 3: ...')")
    doc_index: bool = field(True, "prefix every document with its index ('doc_12: ...')")
    seed: int = field(0, "seed of the training problems (held-out problems use seed + 1)")
    train_file: str | None = field(
        None, "train on this dataset file instead of generated problems: JSONL, a JSON array or object, or a "
        "Student Records database with questions (the official PERK data as it comes)"
    )
    eval_file: str | None = field(
        None, "evaluate on this dataset file (default: generated problems; with data.train_file, its last "
        "data.eval_problems, held out from training)"
    )
    support_targets: bool = field(
        False, "train on the official '<support>facts</support>\\n<output>answer</output>' targets (problems "
        "with supporting facts) and score the output part"
    )

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"data.task must be one of {', '.join(TASKS)}, got {self.task!r}")
        for name in ("context_tokens", "train_problems", "eval_problems"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")

    def describe(self) -> str:
        """What the problems are, for the results' header."""
        if self.train_file is None:
            return f"{self.task}, {self.context_tokens}-token contexts"
        return f"problems of {self.train_file}"


@dataclass
class TrainConfig:
    """A run of ``python -m perk.train`` (docs/design.md §7): base model, run directory,
    meta-training and FT-ICR budgets, evaluation, the problems (``data``) and the engine (``perk``)."""

    model: str = field(DEFAULT_MODEL, "base model: alias, local HF directory or .gguf file")
    name: str = field("default", "run name: results go to <runs_dir>/<name>/")
    runs_dir: str = field("runs", "folder of all runs")
    device: str = field("auto", "cpu, cuda, or auto (cuda when available)")
    threads: int = field(0, THREADS_HELP)
    base_dtype: str = field("auto", "dtype of the frozen base model: float32, bfloat16, or auto (bf16 on cuda, and on a cpu whose bf16 matmuls measure fast)")
    meta_steps: int = field(24, "optimizer steps of meta-training (and of FT-ICR training)")
    meta_batch: int = field(2, "problems per meta-training step (one adapter each)")
    meta_lr: float = field(3e-3, "Adam learning rate of the adapter init (and token weighting)")
    inner_lr_meta_lr: float = field(0.01, "Adam learning rate of the log inner learning rates (u in lr0·exp(u))")
    warmup_steps: int = field(4, "linear warm-up steps of the learning rate (then cosine decay to 10%)")
    max_grad_norm: float = field(1.0, "clip the global norm of each step's gradient")
    ftic_lr: float = field(1e-3, "Adam learning rate of the FT-ICR LoRA")
    checkpoint_every: int = field(10, "write a checkpoint every this many steps")
    keep_checkpoints: int = field(2, "how many of the newest checkpoints to keep")
    methods: tuple[str, ...] = field(METHODS, "methods evaluated at the end: perk, zeroshot, ftic")
    max_new_tokens: int = field(8, "greedy answer length limit at evaluation")
    eval_batch: int = field(4, "contexts encoded together at evaluation")
    data: DataConfig = field(DataConfig(), "problems")
    # One unrolled step keeps a CPU meta-step short; clipping the inner gradients keeps learned
    # inner rates from diverging.
    perk: PerkConfig = field(PerkConfig(unroll_steps=1, inner_max_grad_norm=1.0), "the PERK engine")

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty list of {', '.join(METHODS)}, got {self.methods}")
        if self.base_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"base_dtype must be auto, float32, bfloat16 or float16, got {self.base_dtype!r}")
        check_run_name(self.name)
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: all physical cores), got {self.threads}")
        for name in ("meta_steps", "meta_batch", "checkpoint_every", "keep_checkpoints", "max_new_tokens", "eval_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        # A negative clip norm would flip every gradient (ascent), a NaN rate poison the checkpoints.
        for name in ("meta_lr", "inner_lr_meta_lr", "ftic_lr", "max_grad_norm"):
            _check_positive(name, getattr(self, name))


RUN_NAME_PUNCTUATION = "._-+=@,"


def check_run_name(name: str) -> None:
    """A run name is one plain folder name: letters, digits and ``._-+=@,``, starting with a letter or
    digit (so never ``.``, ``..``, a path, an absolute path, empty, or with a newline): the run
    directory ``<runs_dir>/<name>`` then cannot be outside ``runs_dir``."""
    plain = name[:1].isalnum() and all(c.isalnum() or c in RUN_NAME_PUNCTUATION for c in name)
    if not plain or len(name) > 128 or not name.isprintable():
        raise ValueError(
            f"name must be one plain folder name (letters, digits and {RUN_NAME_PUNCTUATION}, starting with a "
            f"letter or digit, at most 128 characters), got {name!r}"
        )


def gpu_defaults() -> TrainConfig:
    """Defaults scaled for one GPU: longer contexts, bigger meta-batches, more steps."""
    return TrainConfig(
        meta_steps=300, meta_batch=8, checkpoint_every=50, eval_batch=16,
        data=DataConfig(context_tokens=1024, train_problems=4096, eval_problems=200),
        perk=PerkConfig(unroll_steps=2, inner_max_grad_norm=1.0, micro_batch_tokens=32768),
    )
