"""The meta-gradient (docs/design.md §3): the walk back through the inner loop, on flat adapter buffers.

All tensors here are flat: adapters ``φ (n_adapters, P)``, learning-rate tables ``(n_adapters, G)``
over the tensor groups of an :class:`~perk.lora.AdapterLayout`. An inner step (docs/design.md §2,
:mod:`perk.inner_loop`) is

    φ_{n+1} = φ_n − α_n ⊙ (D_n(g_n) + λ φ_n),      g_n = ∇_φ L_in(φ_n)

with D_n the update rule's map from the current gradient to the step direction, whose derivative
``Jg = ∂D/∂g`` (symmetric for SGD with clipping, ``perk_kernels.inner_step_clip_jvp``, and for
AdamW with its statistics held constant, an approximation warned about once at run time) the
forward records (:meth:`perk.inner_loop.InnerStepRecord.hessian_input`). The step's transposed
Jacobian is ``J_nᵀ v = v − H_n u − λ α_n⊙v`` with ``u = Jg (α_n ⊙ v)`` and H_n the Hessian of L_in
at φ_n. Walking back from ``v_N = ∇ L_out(φ_N)``:

* ``∂L/∂α_n = −⟨d_n, v_{n+1}⟩`` per (adapter, group), every step (d_n = D_n(g_n) + λφ_n);
* unrolled steps (the last T): ``v_n = J_nᵀ v_{n+1}``, with ``H u`` by a central finite difference
  of two first-order passes, per adapter ``‖u‖·[g(φ+εû) − g(φ−εû)]/2ε`` (û = u/‖u‖, ε from
  :func:`fd_step`);
* truncated steps: the gradient term is a constant, ``v_n = v_{n+1} − λ α_n⊙v_{n+1}``;
* ``∂L/∂θ = Σ_adapters v_0`` (every adapter starts at the shared init θ).

A token-weighting model (weights w_t on the inner token NLLs, ``g = Σ_t c_t w_t ∇ℓ_t``) gets
``∂L/∂w_t = −c_t ⟨∇ℓ_t(φ_n), u⟩`` from every unrolled step, which the same two passes give as
``c_t ‖u‖ [ℓ_t(φ+εû) − ℓ_t(φ−εû)]/2ε``. ``first_order`` mode is the same walk with no unrolled step.

The finite-difference step (:func:`fd_step`): the central difference errs by ``O(ε²)`` from
curvature (truncation) plus ``O(δ/ε)`` from the rounding of the two gradients in the forward's
compute dtype (δ its machine epsilon), so the error is smallest at ``ε ∝ δ^(1/3)·x_c`` with x_c the
scale over which the gradient's curvature changes (the classic rule for numerical derivatives,
e.g. Numerical Recipes §5.7). perk takes ``x_c = max(‖φ_n‖, 1)`` per adapter, and δ at least
fp32's: Hugging Face models run their norms and softmax in fp32 even in a float64 model, and
gradients accumulate in fp32. The constant κ in ``ε = κ·δ^(1/3)·x_c`` was measured on
SmolLM2-135M (see :data:`FD_STEP_SCALE`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

import perk_kernels
from perk.adapted_model import AdaptedModel
from perk.attention import eager_attention
from perk.config import PerkConfig
from perk.inner_loop import InnerStepRecord, PerkStats, inner_loop
from perk.segments import TokenBatch


# κ of fd_step. On SmolLM2-135M (rank 8 and 32, bf16 base) the fd meta-gradient is at the bf16
# ceiling (the cosine of exact double backward in bf16 to the fp32 reference) for ε between
# 0.004·‖φ‖ and 0.013·‖φ‖; κ·δ_bf16^(1/3) = 0.04 · 0.198 puts ε at 0.008·‖φ‖, inside that range.
FD_STEP_SCALE = 0.04
# Contexts shorter than this (tokens per adapter) get fp32 passes in fd (see float32_from): tiny
# contexts of 42-47 tokens needed them, 256-token ones did not; nothing was measured in between.
FLOAT32_BELOW_TOKENS = 128
# Segments shorter than this get them too: 256-token contexts cut into 32-token segments fell short of
# the fidelity targets in bf16 (fd at half its step did better: truncation) and met them with the fp32
# passes; 128-token segments met them without. 64 lies between the two lengths measured.
FLOAT32_BELOW_SEGMENT_TOKENS = 64
_warned_adam_constants = False
_warned_short_contexts = False


def fd_step(phi: torch.Tensor, compute_dtype: torch.dtype, fd_epsilon: float | None = None) -> torch.Tensor:
    """(n_adapters, 1) ε of the central difference at the adapters ``phi`` (n_adapters, P).

    ``fd_epsilon`` overrides the rule; otherwise ``ε = κ·δ^(1/3)·max(‖φ‖, 1)`` per adapter, with δ
    the machine epsilon of ``compute_dtype`` (the base model's), at least fp32's (module docstring).
    """
    if fd_epsilon is not None:
        return torch.full((phi.shape[0], 1), float(fd_epsilon), dtype=phi.dtype, device=phi.device)
    roundoff = max(torch.finfo(compute_dtype).eps, torch.finfo(torch.float32).eps)
    scale = phi.norm(dim=1, keepdim=True).clamp_min(1.0)
    return FD_STEP_SCALE * roundoff ** (1 / 3) * scale


@contextlib.contextmanager
def scaled_fd_step(scale: float) -> Iterator[None]:
    """Inside the block, the automatic fd step (:func:`fd_step` without ``fd_epsilon``) is ``scale``
    times its rule: how robust a meta-gradient is to its step (perk.check_meta_grad, benchmarks)."""
    global FD_STEP_SCALE
    rule = FD_STEP_SCALE
    FD_STEP_SCALE = rule * scale
    try:
        yield
    finally:
        FD_STEP_SCALE = rule


@dataclass
class MetaGradient:
    """The outer loss's gradient w.r.t. what the inner loop is a function of.

    init: (P,) ∂L/∂θ.  lr: (N, G) ∂L/∂α.  token_weights: (rows, seq) ∂L/∂w or None. θ and α are
    shared by every adapter, so their gradients are sums over the adapters.
    """

    init: torch.Tensor
    lr: torch.Tensor
    token_weights: torch.Tensor | None


def warn_adam_constants(config: PerkConfig) -> None:
    """Warn once per process that AdamW's moment statistics are constants of the meta-gradient."""
    global _warned_adam_constants
    if config.inner_optimizer != "adamw" or config.meta_grad == "first_order" or _warned_adam_constants:
        return
    _warned_adam_constants = True
    warnings.warn(
        "inner_optimizer='adamw': the meta-gradient treats Adam's moment statistics as constants "
        "(only the current gradient's share of the first moment is differentiated), so it is an "
        "approximation of the meta-loss gradient; inner_optimizer='sgd' (with or without clipping) "
        "is differentiated exactly",
        RuntimeWarning,
        stacklevel=3,
    )


def walk_back(
    records: list[InnerStepRecord],
    outer_grad: torch.Tensor,
    gradient_at: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    *,
    group_offsets: list[int],
    weight_decay: float,
    compute_dtype: torch.dtype,
    fd_epsilon: float | None = None,
    token_weight_scale: torch.Tensor | None = None,
    row_adapters: torch.Tensor | None = None,
    backend: str | None = None,
) -> MetaGradient:
    """The reverse pass of docs/design.md §3 with finite-difference Hessian-vector products.

    Args:
        records: one per inner step, in order; steps with ``phi`` set are unrolled.
        outer_grad: (n_adapters, P) v_N = ∇_φ L_out(φ_N); not modified.
        gradient_at: ``φ ↦ (∇_φ L_in(φ), per-token losses or None)``, one first-order pass.
        group_offsets: G+1 column offsets of the tensor groups (``AdapterLayout.offsets``).
        weight_decay: λ of the update rule.
        compute_dtype: dtype of the forward passes (the base model's), for the automatic ε.
        fd_epsilon: ε of the central difference (along unit vectors, per adapter); None picks
            it per adapter and step with :func:`fd_step`.
        token_weight_scale: (rows, seq) c_t·w-free factor of each token in L_in (its loss
            weight), to return ∂L/∂w; None when there is no token weighting.
        row_adapters: (rows,) adapter of each context row (with ``token_weight_scale``).
        backend: kernel backend of ``perk_kernels.meta_grad_accumulate`` (None: automatic).
    """
    v = outer_grad.clone()
    n_steps = len(records)
    lr_grad = torch.zeros(n_steps, v.shape[0], len(group_offsets) - 1, dtype=v.dtype, device=v.device)
    token_grad = None if token_weight_scale is None else torch.zeros_like(token_weight_scale)
    for n in reversed(range(n_steps)):
        record = records[n]
        scaled = perk_kernels.expand_group_table(record.lr, group_offsets).to(v.dtype) * v  # α_n ⊙ v_{n+1}
        # One fused op per step: ∂α_n = −⟨d_n, v_{n+1}⟩ per group (with v before its update),
        # then v ← v − ‖u‖/2ε · (g⁺ − g⁻) for unrolled steps.
        if record.phi is not None:
            u = record.hessian_input(scaled)  # (n_adapters, P)
            norm = u.norm(dim=1, keepdim=True)
            unit = u / norm.clamp_min(torch.finfo(u.dtype).tiny)
            step = fd_step(record.phi, compute_dtype, fd_epsilon)  # (n_adapters, 1)
            grad_plus, losses_plus = gradient_at(record.phi + step * unit)
            grad_minus, losses_minus = gradient_at(record.phi - step * unit)
            coef = norm / (2 * step)  # (n_adapters, 1)
            perk_kernels.meta_grad_accumulate(
                v, record.direction, grad_plus, grad_minus, coef.view(-1), lr_grad[n], group_offsets, backend=backend
            )
            if token_grad is not None:
                token_coef = coef.squeeze(1)[row_adapters].unsqueeze(1).to(token_grad.dtype)
                token_grad.sub_(token_weight_scale * token_coef * (losses_plus - losses_minus))
        else:
            perk_kernels.meta_grad_accumulate(
                v, record.direction, None, None, None, lr_grad[n], group_offsets, backend=backend
            )
        if weight_decay:
            v.sub_(weight_decay * scaled)
    return MetaGradient(v.sum(0), lr_grad.sum(1), token_grad)


def low_precision(adapted: AdaptedModel) -> bool:
    return adapted.model.dtype in (torch.bfloat16, torch.float16)


def short_in_low_precision(adapted: AdaptedModel, segments: TokenBatch) -> bool:
    """A bf16/fp16 base model and an adapter with fewer than :data:`FLOAT32_BELOW_TOKENS` context
    tokens: where bf16 meta-gradients lose their Hessian term (float32_from, warn_short_contexts)."""
    return low_precision(adapted) and int(segments.tokens_per_adapter().min()) < FLOAT32_BELOW_TOKENS


def float32_passes_needed(tokens_per_adapter: int, segment_len: int) -> bool:
    """Where ``fd_float32="auto"`` runs fd's unrolled passes in fp32 (a bf16/fp16 base): an adapter with
    fewer than :data:`FLOAT32_BELOW_TOKENS` context tokens, or segments shorter than
    :data:`FLOAT32_BELOW_SEGMENT_TOKENS`."""
    return tokens_per_adapter < FLOAT32_BELOW_TOKENS or segment_len < FLOAT32_BELOW_SEGMENT_TOKENS


def warn_short_contexts(adapted: AdaptedModel, config: PerkConfig, segments: TokenBatch) -> None:
    """Warn once per process where a bf16/fp16 meta-gradient cannot be trusted: contexts under
    :data:`FLOAT32_BELOW_TOKENS` tokens per adapter. There the fp32 meta-gradient is sensitive to
    the rounding of the first inner steps (measured: cosines near 0 for every bf16 mode, ``exact``
    included, at a meta-trained θ), which the fp32 passes of ``fd`` do not reach."""
    global _warned_short_contexts
    if _warned_short_contexts or config.meta_grad == "first_order" or not short_in_low_precision(adapted, segments):
        return
    _warned_short_contexts = True
    warnings.warn(
        f"a context of under {FLOAT32_BELOW_TOKENS} tokens with a {str(adapted.model.dtype).removeprefix('torch.')} "
        "base model: the meta-gradient there can be far from its fp32 value whatever the mode (its first inner "
        "steps' rounding changes it; benchmarks/results/meta-grad-fidelity.md); a float32 base model "
        "(--base_dtype float32) computes it in fp32",
        RuntimeWarning,
        stacklevel=3,
    )


def meta_gradient(
    adapted: AdaptedModel,
    config: PerkConfig,
    init: torch.Tensor,
    lr: torch.Tensor,
    segments: TokenBatch,
    answers: TokenBatch,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MetaGradient, PerkStats]:
    """The outer loss ``Σ answers' weighted NLL`` after the inner loop from ``init`` (P,) with rates
    ``lr`` (N, G) and token weights ``token_weights`` (rows, seq) over ``segments``, and its
    gradient w.r.t. those three, by
    ``config.meta_grad``: the walk back of docs/design.md §3 (``fd``, ``first_order``) or autograd
    through the unrolled steps (``exact``). Row r of ``answers`` is asked of adapter r's context.
    """
    warn_adam_constants(config)
    warn_short_contexts(adapted, config, segments)
    init, lr = init.detach(), lr.detach()
    token_weights = None if token_weights is None else token_weights.detach()
    mode = _exact if config.meta_grad == "exact" else _walk_back
    return mode(adapted, config, init, lr, segments, answers, token_weights)


def float32_from(adapted: AdaptedModel, config: PerkConfig, segments: TokenBatch) -> int | None:
    """The inner step from which ``fd`` runs its passes with the base model in fp32 (None: never).

    Only a bf16/fp16 base model has passes to move, and ``config.fd_float32`` says which: its last
    T inner steps, the outer pass and the finite-difference probes run in fp32, with fp32's smaller
    step, while the first N − T steps stay in the base dtype. ``"auto"`` does so where
    :func:`float32_passes_needed` says: short contexts, where the Hessian term of the meta-gradient
    is about as large as the first-order one and changes over a shorter scale than the bf16 step ε
    resolves (the fp32 passes recover most, not all, of the fidelity lost there), and short segments
    (measurements: ``benchmarks/results/meta-grad-fidelity.md``).
    """
    if not low_precision(adapted) or config.fd_float32 == "never":
        return None
    if config.fd_float32 == "auto" and not float32_passes_needed(
        int(segments.tokens_per_adapter().min()), config.segment_len
    ):
        return None
    return config.inner_steps - config.unroll_steps


@contextlib.contextmanager
def float32_base(model: torch.nn.Module) -> Iterator[None]:
    """The base model's bf16/fp16 parameters in fp32 inside the block, in their own dtype after.
    Their values do not change (bf16 and fp16 are exact in fp32): only the compute precision does."""
    low = [p for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)]
    dtypes = [p.dtype for p in low]
    for p in low:
        p.data = p.data.float()
    try:
        yield
    finally:
        for p, dtype in zip(low, dtypes):
            p.data = p.data.to(dtype)


def _walk_back(adapted, config, init, lr, segments, answers, token_weights):
    """``fd`` / ``first_order``: the forward records adapter-sized state, then walk back (§4)."""
    with contextlib.ExitStack() as precision:
        start = float32_from(adapted, config, segments) if config.meta_grad == "fd" else None

        def before_step(n):
            if n == start:
                precision.enter_context(float32_base(adapted.model))

        result = _walk_back_passes(adapted, config, init, lr, segments, answers, token_weights, before_step)
    return result


def _walk_back_passes(adapted, config, init, lr, segments, answers, token_weights, before_step):
    unroll = config.unroll_steps if config.meta_grad == "fd" else 0
    with torch.no_grad():
        phi, records, stats = inner_loop(
            adapted, config, init, lr, segments, token_weights, record_from=config.inner_steps - unroll,
            before_step=before_step,
        )
    before_step(config.inner_steps)  # the outer pass and the walk back's passes
    outer = adapted.loss_and_grad(answers, phi)
    check_outer_loss(outer.losses)

    finite = torch.ones((), dtype=torch.bool, device=adapted.device)  # checked once, after the walk

    def gradient_at(point):
        result = adapted.loss_and_grad(
            segments, point, token_weights=token_weights, keep_token_losses=token_weights is not None
        )
        finite.logical_and_(result.grad.isfinite().all() & result.losses.isfinite().all())
        return result.grad, result.token_losses

    grads = walk_back(
        records, outer.grad, gradient_at, group_offsets=adapted.layout.offsets, weight_decay=config.inner_weight_decay,
        compute_dtype=adapted.model.dtype, fd_epsilon=config.fd_epsilon,
        token_weight_scale=None if token_weights is None else segments.loss_weights.to(adapted.dtype),
        row_adapters=segments.row_adapters, backend=adapted.backend,
    )
    if not finite:
        raise FloatingPointError("non-finite inner gradient in a finite-difference pass of the meta-gradient")
    stats.passes += 2 * unroll
    return outer.losses.sum(), grads, stats


def _exact(adapted, config, init, lr, segments, answers, token_weights):
    """``exact``: autograd through the unrolled steps (double backward), the reference mode.
    Eager attention and the torch kernels for the call: both are twice differentiable."""
    leaves = [init.requires_grad_(), lr.requires_grad_()]
    if token_weights is not None:
        leaves.append(token_weights.requires_grad_())
    with eager_attention(adapted.model), adapted.kernel_backend("torch"), torch.enable_grad():
        phi, _, stats = inner_loop(adapted, config, init, lr, segments, token_weights, differentiable=True)
        loss = adapted.loss_and_grad(answers, phi, grad=False).losses.sum()
        check_outer_loss(loss.detach().unsqueeze(0))
        grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    token_grad = grads[2] if token_weights is not None else None
    return loss.detach(), MetaGradient(grads[0], grads[1], token_grad), stats


def check_outer_loss(losses: torch.Tensor) -> None:
    """FloatingPointError unless every adapter's outer loss is finite (one host sync)."""
    if not losses.isfinite().all():
        raise FloatingPointError(f"non-finite outer loss {losses.tolist()}")
