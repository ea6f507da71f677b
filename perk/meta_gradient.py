"""Inner update rules and the meta-gradient walk-back of DESIGN §4, on flat adapter buffers.

All tensors here are flat: adapters ``φ (n_adapters, P)``, learning-rate tables ``(n_adapters, G)``
over the tensor groups of an :class:`~perk.lora.AdapterLayout`. An inner step is

    φ_{n+1} = φ_n − α_n ⊙ d_n,      d_n = P_n ⊙ g_n + (rest, constant in φ) + λ φ_n

with ``g_n = ∇_φ L_in(φ_n)``, α_n the per-group rates expanded to elements, and P_n the part of
the update rule that multiplies the current gradient, treated as a constant in the meta-backward:

* SGD: ``d = c·g + λφ``; ``P = c``, the per-adapter clip factor ``min(1, max_norm / ‖g‖)`` (1 if
  no clipping). The clip factor is a constant: its dependence on φ is not differentiated.
* AdamW: ``m ← β1·m + (1−β1)·g``, ``s ← β2·s + (1−β2)·g²``, ``d = m̂ / (√ŝ + eps) + λφ``.
  Adam's moment statistics are constants of the meta-backward: the earlier steps' part of m
  and the whole denominator √ŝ + eps do not carry derivatives, only the current gradient's
  share of m does, so ``P = (1−β1) / ((1−β1ⁿ⁺¹)(√ŝ + eps))`` (elementwise).

Its transposed Jacobian is ``J_nᵀ v = v − H_n u − λ α_n⊙v`` with ``u = P_n ⊙ α_n ⊙ v`` and H_n the
Hessian of L_in at φ_n. Walking back from ``v_N = ∇ L_out(φ_N)``:

* ``∂L/∂α_n = −⟨d_n, v_{n+1}⟩`` per (adapter, group), every step;
* unrolled steps (the last T): ``v_n = J_nᵀ v_{n+1}``, with ``H u`` by a central finite difference
  of two first-order passes, per adapter ``‖u‖·[g(φ+εû) − g(φ−εû)]/2ε`` (û = u/‖u‖);
* truncated steps: the gradient term is a constant, ``v_n = v_{n+1} − λ α_n⊙v_{n+1}``;
* ``∂L/∂θ = Σ_adapters v_0`` (every adapter starts at the shared init θ).

A token-weighting model (weights w_t on the inner token NLLs, ``g = Σ_t c_t w_t ∇ℓ_t``) gets
``∂L/∂w_t = −c_t ⟨∇ℓ_t(φ_n), u⟩`` from every unrolled step, which the same two passes give as
``c_t ‖u‖ [ℓ_t(φ+εû) − ℓ_t(φ−εû)]/2ε``. ``first_order`` mode is the same walk with no unrolled step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import perk_kernels
from perk.config import PerkConfig


@dataclass
class InnerStepRecord:
    """What the walk-back needs of inner step n (adapter-sized tensors only).

    direction: (n_adapters, P) d_n.
    lr: (n_adapters, G) the rates used (0 for adapters whose step was skipped).
    phi: (n_adapters, P) φ_n, kept for unrolled steps only.
    precondition: P_n, (n_adapters, 1) or (n_adapters, P), unrolled steps only.
    """

    direction: torch.Tensor
    lr: torch.Tensor
    phi: torch.Tensor | None = None
    precondition: torch.Tensor | None = None


@dataclass
class MetaGradient:
    """Result of :func:`walk_back`.

    init: (P,) ∂L/∂θ.  lr: (N, n_adapters, G) ∂L/∂α.  token_weights: (rows, seq) ∂L/∂w or None.
    """

    init: torch.Tensor
    lr: torch.Tensor
    token_weights: torch.Tensor | None


class InnerOptimizer:
    """The inner update rule (SGD or AdamW) on flat adapters; see the module docstring.

    ``direction`` may be given gradients that carry a graph (``exact`` mode): the clip factor and
    Adam's statistics are detached there too, so every mode differentiates the same function.
    """

    def __init__(self, config: PerkConfig):
        self.kind = config.inner_optimizer
        self.weight_decay = float(config.inner_weight_decay)
        self.max_grad_norm = config.inner_max_grad_norm
        self.betas = config.adam_betas
        self.eps = config.adam_eps
        self.first_moment: torch.Tensor | None = None
        self.second_moment: torch.Tensor | None = None

    def direction(self, grad: torch.Tensor, phi: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d_n, P_n)`` for the gradient ``grad`` at ``phi`` (both (n_adapters, P)), step ``step`` ≥ 0."""
        if self.kind == "sgd":
            precondition = self._clip_factor(grad)
            direction = precondition * grad
        else:
            beta1, beta2 = self.betas
            if self.first_moment is None:
                self.first_moment = torch.zeros_like(grad.detach())
                self.second_moment = torch.zeros_like(grad.detach())
            moment = beta1 * self.first_moment + (1 - beta1) * grad
            self.second_moment = beta2 * self.second_moment + (1 - beta2) * grad.detach().square()
            self.first_moment = moment.detach()
            bias1 = 1 - beta1 ** (step + 1)
            denominator = (self.second_moment / (1 - beta2 ** (step + 1))).sqrt_().add_(self.eps)
            direction = moment / (bias1 * denominator)
            precondition = (1 - beta1) / (bias1 * denominator)
        if self.weight_decay:
            direction = direction + self.weight_decay * phi
        return direction, precondition

    def _clip_factor(self, grad: torch.Tensor) -> torch.Tensor:
        if self.max_grad_norm is None:
            return torch.ones(grad.shape[0], 1, dtype=grad.dtype, device=grad.device)
        norm = grad.detach().norm(dim=1, keepdim=True)
        return (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)


def walk_back(
    records: list[InnerStepRecord],
    outer_grad: torch.Tensor,
    gradient_at: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    *,
    group_index: torch.Tensor,
    group_sizes: torch.Tensor,
    weight_decay: float,
    fd_epsilon: float,
    token_weight_scale: torch.Tensor | None = None,
    row_adapters: torch.Tensor | None = None,
    backend: str | None = None,
) -> MetaGradient:
    """The reverse pass of DESIGN §4 with finite-difference Hessian-vector products.

    Args:
        records: one per inner step, in order; steps with ``phi`` set are unrolled.
        outer_grad: (n_adapters, P) v_N = ∇_φ L_out(φ_N); not modified.
        gradient_at: ``φ ↦ (∇_φ L_in(φ), per-token losses or None)``, one first-order pass.
        group_index: (P,) tensor group of each element; group_sizes: (G,) elements per group.
        weight_decay: λ of the update rule.
        fd_epsilon: ε of the central difference (along unit vectors, per adapter).
        token_weight_scale: (rows, seq) c_t·w-free factor of each token in L_in (its loss
            weight), to return ∂L/∂w; None when there is no token weighting.
        row_adapters: (rows,) adapter of each context row (with ``token_weight_scale``).
        backend: kernel backend of ``perk_kernels.meta_grad_accumulate`` (None: automatic).
    """
    v = outer_grad.clone()
    n_steps = len(records)
    lr_grad = torch.zeros(n_steps, v.shape[0], group_sizes.numel(), dtype=v.dtype, device=v.device)
    token_grad = None if token_weight_scale is None else torch.zeros_like(token_weight_scale)
    split_sizes = group_sizes.tolist()

    def by_group(flat: torch.Tensor) -> list[torch.Tensor]:
        return list(flat.split(split_sizes, dim=1))  # (n_adapters, size_k) views of the flat buffer

    v_groups = by_group(v)  # updated in place through these views
    for n in reversed(range(n_steps)):
        record = records[n]
        scaled = record.lr[:, group_index].to(v.dtype) * v  # α_n ⊙ v_{n+1}
        # One fused op per step: ∂α_n = −⟨d_n, v_{n+1}⟩ per group (with v before its update),
        # then v ← v − ‖u‖/2ε · (g⁺ − g⁻) for unrolled steps.
        if record.phi is not None:
            u = record.precondition * scaled  # (n_adapters, P)
            norm = u.norm(dim=1, keepdim=True)
            unit = u / norm.clamp_min(torch.finfo(u.dtype).tiny)
            grad_plus, losses_plus = gradient_at(record.phi + fd_epsilon * unit)
            grad_minus, losses_minus = gradient_at(record.phi - fd_epsilon * unit)
            coef = norm / (2 * fd_epsilon)  # (n_adapters, 1)
            perk_kernels.meta_grad_accumulate(
                v_groups, by_group(record.direction), by_group(grad_plus), by_group(grad_minus), coef.view(-1),
                lr_grad[n], backend=backend,
            )
            if token_grad is not None:
                token_coef = coef.squeeze(1)[row_adapters].unsqueeze(1).to(token_grad.dtype)
                token_grad.sub_(token_weight_scale * token_coef * (losses_plus - losses_minus))
        else:
            perk_kernels.meta_grad_accumulate(
                v_groups, by_group(record.direction), None, None, None, lr_grad[n], backend=backend
            )
        if weight_decay:
            v.sub_(weight_decay * scaled)
    return MetaGradient(v.sum(0), lr_grad, token_grad)
