"""The straightforward PERK implementation the benchmarks compare perk against.

This is how the official PERK code computes encoding and meta-training steps: PEFT LoRA adapters
(fp32, on a frozen base model of any dtype), the inner steps as plain autograd on HF's causal-LM
loss, and for meta-training the unrolled inner steps kept in autograd's graph
(``create_graph=True``, what ``higher``'s differentiable optimisers do) so that the meta-gradient
is one double backward through them. Nothing is fused, chunked or recomputed: the full
``[tokens, vocab]`` logits are materialised (and upcast to fp32 by HF's loss) and every unrolled
step's activations stay alive until the meta-backward. That is the point of the comparison.

Semantics match perk's (docs/design.md §2-§3): inner step n is ``φ ← φ − lr_n,k · d_n`` with ``d_n`` the SGD
or AdamW direction and ``lr_n,k = lr0 · exp(u[n, k])`` per step n and adapter tensor k; the last
``unroll_steps`` steps are differentiated through, earlier ones have their gradient treated as a
constant (truncated unrolling, the update itself stays differentiable in φ and lr).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch.func import functional_call

INNER_OPTIMIZERS = ("sgd", "adamw")


class NaivePerk:
    """PEFT LoRA on a frozen causal LM, with autograd inner loops.

    Args:
        model: a Hugging Face causal LM; wrapped in place by ``peft.get_peft_model`` (PEFT keeps
            the adapters in fp32 whatever the base dtype).
        rank, alpha, rslora, target_modules: the LoRA configuration (PEFT's meaning).
        inner_steps: N.
        inner_lr: lr0, the base rate of every inner step.
        optimizer: ``"sgd"`` or ``"adamw"`` (betas 0.9, 0.999, eps 1e-8, no weight decay).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        rank: int,
        alpha: float,
        rslora: bool,
        target_modules: tuple[str, ...],
        inner_steps: int,
        inner_lr: float,
        optimizer: str = "sgd",
    ):
        if optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {INNER_OPTIMIZERS}, got {optimizer!r}")
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an int >= 1, got {inner_steps!r}")
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        config = LoraConfig(
            r=rank, lora_alpha=alpha, use_rslora=rslora, lora_dropout=0.0,
            target_modules=[t for t in target_modules if t in present],
        )
        self.model = get_peft_model(model, config)
        self.model.eval()  # no dropout; gradients still flow to the adapters
        self.names = [name for name, p in self.model.named_parameters() if p.requires_grad]
        self.init = [p for name, p in self.model.named_parameters() if p.requires_grad]
        self.inner_steps = inner_steps
        self.optimizer = optimizer
        # u[n, k] of lr_{n,k} = lr0 · exp(u[n, k]), meta-learned like perk's.
        device = self.init[0].device
        self.log_lr = torch.zeros(inner_steps, len(self.init), device=device, requires_grad=True)
        self.base_lr = float(inner_lr)

    def meta_parameters(self) -> list[torch.Tensor]:
        """θ (the adapters' initial values) and the per-step rates' log-multipliers."""
        return [*self.init, self.log_lr]

    def _loss(self, adapters: list[torch.Tensor], input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        params = dict(zip(self.names, adapters))
        return functional_call(self.model, params, args=(), kwargs={"input_ids": input_ids, "labels": labels}).loss

    def _gradient(
        self, adapters: list[torch.Tensor], segments: torch.Tensor, micro_batch: int, create_graph: bool
    ) -> list[torch.Tensor]:
        """∇ of the mean token NLL over all ``segments``, accumulated over micro-batches of rows."""
        total = [torch.zeros_like(a) for a in adapters]
        for chunk in segments.split(micro_batch):
            # HF's loss is the chunk's mean: weight it by the chunk's share of the predicted tokens.
            share = chunk.shape[0] / segments.shape[0]
            loss = self._loss(adapters, chunk, chunk) * share
            grads = torch.autograd.grad(loss, adapters, create_graph=create_graph)
            total = [t + g for t, g in zip(total, grads)]
        return total

    def inner_loop(
        self, segments: torch.Tensor, *, unroll_steps: int, micro_batch: int | None = None
    ) -> list[torch.Tensor]:
        """N inner steps from θ on ``segments`` (rows, segment_len) of token ids; returns φ_N.

        ``unroll_steps`` = 0 is test-time encoding: nothing is kept for a meta-gradient and each
        step starts from detached adapters. Otherwise the last ``unroll_steps`` steps keep their
        graph (double backward later) and φ_N depends on θ and the rates.
        """
        if not 0 <= unroll_steps <= self.inner_steps:
            raise ValueError(f"unroll_steps must lie in [0, {self.inner_steps}], got {unroll_steps}")
        micro_batch = segments.shape[0] if micro_batch is None else micro_batch
        track = unroll_steps > 0
        phi = list(self.init) if track else [p.detach().requires_grad_(True) for p in self.init]
        moments: list[tuple[torch.Tensor, torch.Tensor]] = [(torch.zeros_like(p), torch.zeros_like(p)) for p in phi]
        rates = (self.log_lr if track else self.log_lr.detach()).exp() * self.base_lr
        for n in range(self.inner_steps):
            unrolled = n >= self.inner_steps - unroll_steps
            grads = self._gradient(phi, segments, micro_batch, create_graph=unrolled)
            with torch.set_grad_enabled(track):
                directions, moments = self._directions(grads, moments, n)
                phi = [p - rates[n, k] * d for k, (p, d) in enumerate(zip(phi, directions))]
            if not track:
                phi = [p.detach().requires_grad_(True) for p in phi]
        return phi

    def _directions(
        self, grads: list[torch.Tensor], moments: list[tuple[torch.Tensor, torch.Tensor]], step: int
    ) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        if self.optimizer == "sgd":
            return grads, moments
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        bias1, bias2 = 1 - beta1 ** (step + 1), 1 - beta2 ** (step + 1)
        moments = [(beta1 * m + (1 - beta1) * g, beta2 * s + (1 - beta2) * g * g) for g, (m, s) in zip(grads, moments)]
        directions = [(m / bias1) / ((s / bias2).sqrt() + eps) for m, s in moments]
        return directions, moments

    def encode(self, segments: torch.Tensor, micro_batch: int | None = None) -> list[torch.Tensor]:
        """Test-time encoding: N inner steps from θ; returns the adapted adapters (detached)."""
        return [p.detach() for p in self.inner_loop(segments, unroll_steps=0, micro_batch=micro_batch)]

    @torch.no_grad()
    def generate(self, adapters: list[torch.Tensor], input_ids: torch.Tensor, **generate_kwargs) -> torch.Tensor:
        """``model.generate`` from the base + ``adapters`` (e.g. from :meth:`encode`); θ is untouched.

        The adapters are swapped into PEFT's parameters by reference for the call (no copy).
        """
        saved = [p.data for p in self.init]
        try:
            for param, adapter in zip(self.init, adapters):
                param.data = adapter
            mask = torch.ones_like(input_ids)
            return self.model.generate(input_ids=input_ids, attention_mask=mask, **generate_kwargs)
        finally:
            for param, data in zip(self.init, saved):
                param.data = data

    def meta_gradient(
        self,
        segments: torch.Tensor,
        question_ids: torch.Tensor,
        question_labels: torch.Tensor,
        *,
        unroll_steps: int,
    ) -> list[torch.Tensor]:
        """∂L_out/∂(θ, u) by one double backward through the last ``unroll_steps`` inner steps."""
        if unroll_steps < 1:
            raise ValueError(f"unroll_steps must be >= 1 for a second-order meta-gradient, got {unroll_steps}")
        phi = self.inner_loop(segments, unroll_steps=unroll_steps)
        outer = self._loss(phi, question_ids, question_labels)
        return list(torch.autograd.grad(outer, self.meta_parameters()))
