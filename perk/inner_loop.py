"""The inner loop of docs/design.md §2: N steps of the inner optimizer write contexts into adapters.

Every context gets its own adapter, all starting at the meta-learned init θ and stepped together
in the same forward passes (batched LoRA) on the flat buffer ``φ (n_adapters, P)``:

    φ_{n+1} = φ_n − α_n ⊙ (D_n(g_n) + λ φ_n),      g_n = ∇_φ L_in(φ_n)

with the update rules D_n of :class:`InnerOptimizer`. Every step is one call of
``perk_kernels.lora_inner_step``, the home of SGD's rule (the clip factor, the weight decay, the
step) and of the clip factor's derivative (``perk_kernels.inner_step_clip_jvp``), which the
meta-gradient's walk back (:mod:`perk.meta_gradient`) uses. The loop can keep what the walk back
needs of each step (:class:`InnerStepRecord`, adapter-sized), or build the autograd graph of its
last steps (``exact`` mode).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import perk_kernels
from perk.adapted_model import AdaptedModel
from perk.config import PerkConfig
from perk.distributed import all_reduce_sum_
from perk.segments import TokenBatch


@dataclass
class PerkStats:
    """What one encode / meta_loss / meta_gradient call did (for progress bars and logs).

    inner_losses: (inner_steps, n_contexts) mean context NLL (token-weighted when weighting is on)
        at φ_n, before step n.
    outer_loss: mean answer NLL after the inner loop (None for encode).
    context_tokens: context tokens predicted per pass, all contexts together.
    passes: forward(+backward) passes over the context segments (inner steps + fd passes).
    skipped_steps: (step, context) pairs skipped for a non-finite loss (``on_nonfinite="skip"``).
    seconds: wall time of the call.
    """

    inner_losses: torch.Tensor
    outer_loss: float | None
    context_tokens: int
    passes: int
    skipped_steps: list[tuple[int, int]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Context tokens processed per second, counting every pass over them."""
        return self.context_tokens * self.passes / max(self.seconds, 1e-9)


@dataclass
class InnerStepRecord:
    """What the walk-back needs of inner step n (adapter-sized tensors only).

    direction: (n_adapters, P) d_n (0 for adapters whose step was skipped: their rate had no effect).
    lr: (n_adapters, G) the rates used (0 for adapters whose step was skipped).
    phi: (n_adapters, P) φ_n, kept for unrolled steps only.
    precondition: the diagonal part of ∂D/∂g, (n_adapters, 1) or (n_adapters, P), None for the
        identity; unrolled steps only.
    clip_grad: (n_adapters, P) g_n, kept for unrolled SGD steps with clipping on.
    clip_coef: (n_adapters, 1) k = c / ((‖g‖ + 10⁻⁶)‖g‖) for clipped adapters, 0 for the others.
    """

    direction: torch.Tensor
    lr: torch.Tensor
    phi: torch.Tensor | None = None
    precondition: torch.Tensor | None = None
    clip_grad: torch.Tensor | None = None
    clip_coef: torch.Tensor | None = None

    def hessian_input(self, w: torch.Tensor) -> torch.Tensor:
        """``u = (∂D/∂g) w``: the vector whose Hessian product the step's Jacobian needs."""
        if self.clip_grad is not None:  # SGD's clip factor, differentiated (precondition is c)
            return perk_kernels.inner_step_clip_jvp(self.clip_grad, self.precondition, self.clip_coef, w)
        return w if self.precondition is None else self.precondition * w


class InnerOptimizer:
    """The inner update rule (SGD or AdamW) on flat adapters; see the module docstring.

    :meth:`step` takes one step with ``perk_kernels.lora_inner_step``, the home of SGD's rule
    (clipping, weight decay, the step) and of its derivative; AdamW hands it its normalised
    direction (no clipping) for the decay and the step. ``step`` may be given gradients that carry
    a graph (``exact`` mode): the clip factor is then differentiated by autograd, and Adam's
    statistics are detached, so every mode differentiates the same function.
    """

    def __init__(self, config: PerkConfig, group_offsets: list[int], backend: str | None):
        self.kind = config.inner_optimizer
        self.weight_decay = float(config.inner_weight_decay)
        self.max_grad_norm = config.inner_max_grad_norm if self.kind == "sgd" else None
        self.betas = config.adam_betas
        self.eps = config.adam_eps
        self.group_offsets = group_offsets
        self.backend = backend
        self.first_moment: torch.Tensor | None = None
        self.second_moment: torch.Tensor | None = None

    def step(
        self, grad: torch.Tensor, phi: torch.Tensor, lr: torch.Tensor, step: int, *, record: bool, unrolled: bool,
        differentiable: bool,
    ) -> tuple[torch.Tensor, InnerStepRecord | None]:
        """φ_{n+1} for the gradient ``grad`` at ``phi`` (both (n_adapters, P)) with rates ``lr``
        (n_adapters, G), step ``step`` ≥ 0, and (with ``record``) what the walk-back needs of the
        step (φ and ∂D/∂g when ``unrolled``). ``differentiable``: a new φ with the step's graph;
        otherwise ``phi`` is updated in place (one fused pass) and returned."""
        precondition = None
        if self.kind == "sgd":
            rule_input = grad  # lora_inner_step clips it
        else:
            rule_input, precondition = self._adam_direction(grad, step, need_derivative=unrolled and record)
        step_record = self._record(rule_input, phi, lr, precondition, unrolled) if record else None
        phi = perk_kernels.lora_inner_step(
            phi, rule_input, lr, self.group_offsets, weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm, inplace=not differentiable, backend=self.backend,
        )
        return phi, step_record

    def _adam_direction(self, grad: torch.Tensor, step: int, *, need_derivative: bool):
        """(m̂ / (√ŝ + eps), its derivative ∂/∂g or None), the moments updated."""
        beta1, beta2 = self.betas
        if self.first_moment is None:
            self.first_moment = torch.zeros_like(grad.detach())
            self.second_moment = torch.zeros_like(grad.detach())
        # Few passes over the (n, P) buffers: on a CPU each is a trip through memory.
        moment = torch.lerp(grad, self.first_moment, beta1)  # β1·m + (1 − β1)·g, differentiable in g
        detached = grad.detach()
        self.second_moment.mul_(beta2).addcmul_(detached, detached, value=1 - beta2)
        self.first_moment = moment.detach()
        bias1, bias2 = 1 - beta1 ** (step + 1), 1 - beta2 ** (step + 1)
        # bias1·(√(v / bias2) + ε), the whole denominator of d = m / (bias1·(√v̂ + ε)).
        denominator = self.second_moment.sqrt().mul_(bias1 / math.sqrt(bias2)).add_(bias1 * self.eps)
        return moment / denominator, (1 - beta1) / denominator if need_derivative else None

    def _record(self, rule_input, phi, lr, precondition, unrolled) -> InnerStepRecord:
        """d_n (before the step writes φ) and, for unrolled steps, φ_n and ∂D/∂g."""
        rule_input, phi = rule_input.detach(), phi.detach()
        clip = coef = None
        if self.max_grad_norm is not None:
            clip, coef = perk_kernels.inner_step_clip(rule_input, self.max_grad_norm)
        direction = perk_kernels.inner_step_direction(phi, rule_input, weight_decay=self.weight_decay, clip=clip)
        if not unrolled:
            return InnerStepRecord(direction, lr.detach())
        if clip is not None:  # kept whenever clipping is on (not only where it acts): deciding would sync the host
            return InnerStepRecord(direction, lr.detach(), phi.clone(), clip, rule_input, coef)
        return InnerStepRecord(direction, lr.detach(), phi.clone(), None if precondition is None else precondition.detach())


def inner_loop(
    adapted: AdaptedModel,
    config: PerkConfig,
    init: torch.Tensor,
    lr: torch.Tensor,
    segments: TokenBatch,
    token_weights: torch.Tensor | None,
    *,
    record_from: int | None = None,
    differentiable: bool = False,
    process_group=None,
    before_step: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, list[InnerStepRecord], PerkStats]:
    """N inner steps from ``init`` (P,) with rates ``lr`` (N, G) over ``segments``; returns φ_N
    (n_adapters, P), the step records and the stats.

    ``record_from``: keep the records of docs/design.md §3 (d_n for every step, φ_n and ∂D/∂g for
    steps n ≥ record_from). ``differentiable`` (``exact`` mode): steps n ≥ N − T build their
    graph (create_graph), earlier ones use detached gradients; φ_N then carries the graph to
    ``init``, ``lr`` and ``token_weights``. Otherwise nothing is differentiated.

    ``process_group`` (a torch.distributed process group): ``segments`` (and ``token_weights``) are this
    rank's share of the rows, with loss weights normalised over all ranks' rows; each step
    all-reduces the inner gradient and losses, so the sum is the whole gradient and every rank
    (clipping included) takes the step one process would take on all rows. ``stats.context_tokens``
    then counts this rank's rows only.

    ``before_step(n)``, when given, is called before step n's pass (the meta-gradient uses it to
    switch the base model to fp32 for its last steps).
    """
    if process_group is not None and differentiable:
        raise ValueError("a context sharded over a process group is encoded without a graph (differentiable=False)")
    n_adapters = segments.n_adapters
    if not differentiable:
        lr, init = lr.detach(), init.detach()
    phi = init.unsqueeze(0).repeat(n_adapters, 1)
    optimizer = InnerOptimizer(config, adapted.layout.offsets, adapted.backend)
    records: list[InnerStepRecord] = []
    # Per-step results stay on the device until the loop ends: one host sync per call, not per step.
    losses = torch.zeros(config.inner_steps, n_adapters, dtype=adapted.dtype, device=adapted.device)
    nonfinite = torch.zeros(config.inner_steps, n_adapters, dtype=torch.bool, device=adapted.device)
    for n in range(config.inner_steps):
        if before_step is not None:
            before_step(n)
        unrolled = differentiable and n >= config.inner_steps - config.unroll_steps
        result = adapted.loss_and_grad(
            segments, phi if unrolled else phi.detach(), create_graph=unrolled,
            token_weights=token_weights if unrolled or token_weights is None else token_weights.detach(),
        )
        grad, step_losses = result.grad, result.losses
        if process_group is not None:  # this rank's share of the sums → the whole sums, before anything reads them
            grad, step_losses = all_reduce_sum_([grad, step_losses], process_group)
        step_lr = lr[n].unsqueeze(0).expand(n_adapters, -1)
        # A row sum is non-finite where any element is (or where finite ones overflow, a step as unusable).
        nonfinite[n] = ~(step_losses.isfinite() & grad.sum(1).isfinite())
        keep = None
        if config.on_nonfinite == "skip":  # a zero step for those adapters
            keep = ~nonfinite[n].unsqueeze(1)
            grad, step_lr = torch.where(keep, grad, 0.0), step_lr * keep.to(step_lr.dtype)
        # φ ← φ − α ⊙ d: without a graph one fused pass over every tensor group, in place in the flat
        # buffer; with one (exact mode) the same rule in differentiable ops, which autograd goes through.
        phi, record = optimizer.step(
            grad, phi, step_lr, n, record=record_from is not None,
            unrolled=record_from is not None and n >= record_from, differentiable=differentiable,
        )
        losses[n] = step_losses.detach()
        if record is not None:
            if keep is not None:  # a skipped adapter's rate was 0: its step does not depend on α
                record.direction = torch.where(keep, record.direction, 0.0)
            records.append(record)
    skipped = _report_nonfinite(config, nonfinite.cpu())
    stats = PerkStats(losses.cpu(), None, segments.n_tokens, config.inner_steps, skipped)
    return phi, records, stats


def _report_nonfinite(config: PerkConfig, nonfinite: torch.Tensor) -> list[tuple[int, int]]:
    """Raise (``on_nonfinite="raise"``), or warn about the skipped (step, context) pairs."""
    skipped = [tuple(pair) for pair in nonfinite.nonzero().tolist()]
    if not skipped:
        return []
    step = skipped[0][0]
    contexts = [c for s, c in skipped if s == step]
    message = f"non-finite inner loss or gradient at inner step {step} for context(s) {contexts}"
    if config.on_nonfinite == "raise":
        raise FloatingPointError(message + " (set on_nonfinite='skip' to skip such steps)")
    warnings.warn(f"{message}: step skipped ({len(skipped)} (step, context) pairs in all)", RuntimeWarning, stacklevel=4)
    return skipped
