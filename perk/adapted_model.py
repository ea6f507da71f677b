"""AdaptedModel: a frozen Hugging Face causal LM with injected LoRA layers, for any flat adapter.

What PERK and the prompt-based baselines (zero-shot, FT-ICR) share: the base model, its
tokenizer, the adapter layout, and three operations on a flat adapter buffer ``(n_adapters, P)``:

* :meth:`AdaptedModel.loss_and_grad` — Σ weighted token NLL per adapter of a token batch, and its
  gradient w.r.t. the adapters (accumulated over ``micro_batch_tokens`` chunks);
* :meth:`AdaptedModel.generate` — greedy continuations of prompts, one adapter per prompt or one
  for all (or none: the base model);
* :meth:`AdaptedModel.adapter_active` — a context manager for any other forward.

Losses never materialise logits: the decoder's last hidden states go through
``perk_kernels.fused_linear_cross_entropy`` with the output embedding.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

import perk_kernels
from perk import prompts
from perk.attention import cpu_segment_attention
from perk.lora import AdapterContext, AdapterLayout, inject_lora
from perk.segments import IGNORE_INDEX, TokenBatch


@dataclass
class PassResult:
    """One pass of :meth:`AdaptedModel.loss_and_grad` over a token batch.

    losses: (n_adapters,) Σ loss_weight·(token weight)·NLL per adapter (with a graph if asked).
    grad: (n_adapters, P) its gradient w.r.t. the adapters, or None.
    token_losses: (rows, seq) per-token NLL, detached, or None.
    """

    losses: torch.Tensor
    grad: torch.Tensor | None
    token_losses: torch.Tensor | None


class AdaptedModel:
    """A frozen causal LM whose target layers read a flat LoRA adapter buffer per forward.

    The base model is modified in place (its target layers become :class:`~perk.lora.LoraLinear`,
    which compute the plain layer when no adapter is active) and frozen. ``dtype`` is the dtype
    of adapters (float32, or float64 in gradient checks); the base model keeps its own.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        rank: int,
        scale: float,
        target_modules: tuple[str, ...],
        dtype: torch.dtype,
        micro_batch_tokens: int,
        stop_at_newline: bool,
        backend: str | None = None,
    ):
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.context = AdapterContext(scale, backend)
        self.layout = AdapterLayout(inject_lora(model, target_modules, self.context), rank)
        self.device = model.get_output_embeddings().weight.device
        self.dtype = dtype
        self.micro_batch_tokens = micro_batch_tokens
        self.stop_at_newline = stop_at_newline
        self.window = prompts.model_window(model, tokenizer)  # the context window in tokens
        self.filler_id = prompts.filler_id(model, tokenizer)  # right padding of loss batches

    @property
    def backend(self) -> str | None:
        """Kernel backend of the injected layers and losses (None: automatic)."""
        return self.context.backend

    def initial_adapter(self, generator: torch.Generator) -> torch.Tensor:
        """A (P,) adapter as LoRA initialises one: A ~ U(±1/√d_in) (PEFT's Kaiming-uniform), B = 0."""
        flat = torch.zeros(1, self.layout.n_params, dtype=self.dtype)
        for spec, (a, _) in zip(self.layout.modules, self.layout.module_views(flat)):
            bound = 1.0 / math.sqrt(spec.d_in)
            a.uniform_(-bound, bound, generator=generator)
        return flat[0].to(self.device)

    def adapter_active(self, adapter: torch.Tensor | None, row_adapters: torch.Tensor | None = None):
        """Context manager: the model's forward applies the flat ``adapter`` (n, P) (None: the
        plain base model); ``row_adapters`` (batch,) gives each row's adapter when n > 1."""
        if adapter is None:
            return contextlib.nullcontext()
        views = self.layout.module_views(adapter.to(self.device, self.dtype))
        return self.context.active(views, row_adapters)

    # ------------------------------------------------------------------------------------------
    # Losses and gradients
    # ------------------------------------------------------------------------------------------

    def loss_and_grad(
        self,
        batch: TokenBatch,
        adapter: torch.Tensor,
        *,
        grad: bool = True,
        create_graph: bool = False,
        token_weights: torch.Tensor | None = None,
        keep_token_losses: bool = False,
    ) -> PassResult:
        """Σ_tokens loss_weight·(token weight)·NLL per adapter at ``adapter`` (n_adapters, P), in
        chunks of ``micro_batch_tokens``; with ``grad``, also its gradient w.r.t. the adapters
        (accumulated over chunks; ``create_graph`` keeps the graph for double backward).

        Without ``grad`` the losses carry a graph only if ``adapter`` does (the exact outer loss).
        Row r of ``batch`` uses adapter ``batch.row_adapters[r]``.
        """
        n_adapters = adapter.shape[0]
        if grad and not create_graph:
            adapter = adapter.detach().requires_grad_()
        track = grad or adapter.requires_grad
        with torch.set_grad_enabled(track):
            views = self.layout.tensor_views(adapter)  # the layers' inputs, and what grads are taken of
        modules = list(zip(views[0::2], views[1::2]))
        flat_grad = torch.zeros_like(adapter, requires_grad=False) if grad else None
        losses = torch.zeros(n_adapters, dtype=self.dtype, device=self.device)
        token_losses = torch.zeros_like(batch.loss_weights, dtype=self.dtype) if keep_token_losses else None
        head = self.model.get_output_embeddings()
        for rows in batch.chunks(self.micro_batch_tokens):
            row_adapters = batch.row_adapters[rows] if n_adapters > 1 else None
            with torch.set_grad_enabled(track), self.context.active(modules, row_adapters):
                hidden = self.hidden(batch.input_ids[rows])  # (rows, seq, d_model)
                nll = perk_kernels.fused_linear_cross_entropy(
                    hidden.flatten(0, 1), head.weight, batch.labels[rows].flatten(),
                    bias=head.bias, ignore_index=IGNORE_INDEX, backend=self.backend,
                ).view(hidden.shape[:2])  # (rows, seq) fp32, or fp64 for a fp64 model
                weighted = nll.to(self.dtype) * batch.loss_weights[rows].to(self.dtype)
                if token_weights is not None:
                    weighted = weighted * token_weights[rows]
                row_losses = weighted.sum(1)
                chunk_loss = row_losses.sum()
            if keep_token_losses:
                token_losses[rows] = nll.detach().to(self.dtype)
            losses = losses.index_add(0, batch.row_adapters[rows], row_losses)
            if grad:
                chunk_grads = torch.autograd.grad(
                    chunk_loss, views, create_graph=create_graph, allow_unused=True, materialize_grads=True
                )
                if create_graph:
                    flat_grad = flat_grad + torch.cat([g.flatten(1) for g in chunk_grads], 1)
                else:
                    torch._foreach_add_(self.layout.tensor_views(flat_grad), chunk_grads)
        if grad and not create_graph:
            losses = losses.detach()
        return PassResult(losses, flat_grad, token_losses)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Last hidden states of the decoder stack (after its final norm): no logits computed."""
        with cpu_segment_attention(self.model):
            return self.model.base_model(input_ids=input_ids, use_cache=False)[0]

    def features(self, batch: TokenBatch) -> torch.Tensor:
        """(rows, seq, d_model) base-model hidden states of ``batch``, adapters off, no graph."""
        with torch.no_grad():
            parts = [self.hidden(batch.input_ids[rows]) for rows in batch.chunks(self.micro_batch_tokens)]
        if not parts:  # no rows (a rank's share of a context shorter than the process group)
            d_model = self.model.get_output_embeddings().weight.shape[1]
            return torch.zeros(0, batch.input_ids.shape[1], d_model, dtype=self.model.dtype, device=self.device)
        return torch.cat(parts)

    @contextlib.contextmanager
    def kernel_backend(self, backend: str):
        """Run the block with the kernels of ``backend``; restore the previous choice after."""
        saved, self.context.backend = self.context.backend, backend
        try:
            yield
        finally:
            self.context.backend = saved

    # ------------------------------------------------------------------------------------------
    # Prompts and generation
    # ------------------------------------------------------------------------------------------

    def generate(self, prompt_rows: list[list[int]], adapter: torch.Tensor | None, max_new_tokens: int = 32) -> list[str]:
        """Greedy continuations of the token-id prompts ``prompt_rows``, stripped (and cut at a newline when
        ``stop_at_newline``). ``adapter``: None for the base model alone, a flat (1, P) adapter
        for every prompt, or (len(prompt_rows), P), one per prompt. Prompt plus ``max_new_tokens``
        must fit the model window (a ValueError: no position exists past it)."""
        prompts.check_fits_window(max(len(p) for p in prompt_rows), max_new_tokens, self.window)
        pad = prompts.pad_id(self.tokenizer)
        input_ids, attention_mask = prompts.left_pad(prompt_rows, pad, self.device)
        row_adapters = None
        if adapter is not None and adapter.shape[0] > 1:
            if adapter.shape[0] != len(prompt_rows):
                raise ValueError(f"adapter has {adapter.shape[0]} prompt_rows for {len(prompt_rows)} prompts")
            row_adapters = torch.arange(len(prompt_rows), device=self.device)
        generation = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=prompts.stop_token_ids(self.tokenizer, self.stop_at_newline), pad_token_id=pad, bos_token_id=None,
        )
        with torch.no_grad(), self.adapter_active(adapter, row_adapters):
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation)
        texts = self.tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
        if self.stop_at_newline:
            texts = [t.split("\n", 1)[0] for t in texts]
        return [t.strip() for t in texts]

    def question_prompt(self, question: str, max_new_tokens: int = 0) -> list[int]:
        """Token ids of the prompt that asks ``question`` (no context), as answers are trained
        (:func:`perk.prompts.question_prompt`: a ValueError when it and ``max_new_tokens`` do not fit)."""
        return prompts.question_prompt(self.tokenizer, question, self.window, max_new_tokens)
