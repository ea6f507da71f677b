"""PerkModel: a frozen Hugging Face causal LM whose LoRA adapter is written by test-time SGD.

Reads top to bottom like the algorithm (DESIGN §1, §4):

* :meth:`PerkModel.encode` — contexts → segments → N inner steps from the meta-learned init θ,
  one adapter per context, all contexts in the same forward passes (batched LoRA);
* :meth:`PerkModel.answer` — greedy answers from the base model + an adapter, no context in the prompt;
* :meth:`PerkModel.meta_loss` / :meth:`PerkModel.meta_gradient` — the outer loss after the inner
  loop and its gradient for every meta-parameter (θ, per-step per-group inner rates, token weighting).

Losses never materialise logits: the decoder's last hidden states go through
``perk_kernels.fused_linear_cross_entropy`` with the output embedding. A forward/backward pass
over context segments holds at most ``micro_batch_tokens`` tokens of activations at once; what
outlives a pass is adapter-sized (gradients, the stored φ_n and d_n of DESIGN §4).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

import perk_kernels
from perk.checkpoint import read_safetensors, write_folder_atomic
from perk.config import PerkConfig
from perk.lora import AdapterContext, AdapterLayout, inject_lora
from perk.memory import Memory
from perk.meta_gradient import InnerOptimizer, InnerStepRecord, walk_back, warn_adam_constants
from perk.segments import (
    IGNORE_INDEX,
    TokenBatch,
    context_segments,
    prompt_ids,
    question_answer_batch,
    validate_context,
)
from perk.weighting import TokenWeighting

CONFIG_NAME = "perk_config.json"
WEIGHTS_NAME = "perk_meta.safetensors"
FORMAT_VERSION = 1


@dataclass
class PerkStats:
    """What the last encode / meta_loss / meta_gradient call did (for progress bars and logs).

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
class _PassResult:
    losses: torch.Tensor  # (n_adapters,) Σ loss_weight·ℓ per adapter (with graph if asked)
    grad: torch.Tensor | None  # (n_adapters, P) ∇_φ of Σ losses
    token_losses: torch.Tensor | None  # (rows, seq) per-token NLL, detached


class PerkModel:
    """A frozen causal LM with PERK memory. Build with :meth:`from_base` or :meth:`from_pretrained`.

    The base model is modified in place (its target layers become :class:`~perk.lora.LoraLinear`,
    which compute the plain layer when no adapter is active) and frozen.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: PerkConfig | None = None,
        *,
        backend: str | None = None,
    ):
        config = PerkConfig() if config is None else config
        if not isinstance(config, PerkConfig):
            raise TypeError(f"config must be a PerkConfig, got {type(config).__name__}")
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = config
        self.backend = backend
        self.context = AdapterContext(config.lora_scale, backend)
        self.layout = AdapterLayout(inject_lora(model, config.target_modules, self.context), config.rank)
        self.device = model.get_output_embeddings().weight.device
        self.dtype = config.torch_dtype
        generator = torch.Generator().manual_seed(config.seed)
        self.adapter_init = self._initial_adapter(generator).to(self.device).requires_grad_()
        self.inner_lr_log = torch.zeros(
            config.inner_steps, self.layout.n_groups, dtype=self.dtype, device=self.device, requires_grad=True
        )
        self.weighting = None
        if config.token_weighting:
            d_model = model.get_output_embeddings().weight.shape[1]
            self.weighting = TokenWeighting(d_model, config.weighting_hidden, dtype=self.dtype, generator=generator)
            self.weighting.to(self.device)
        self.last_stats: PerkStats | None = None

    # ------------------------------------------------------------------------------------------
    # Construction and persistence
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_base(
        cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: PerkConfig | None = None, **kwargs
    ) -> PerkModel:
        """Wrap a (fresh) base model and its tokenizer; meta-parameters at their initial values."""
        return cls(model, tokenizer, config, **kwargs)

    def save_pretrained(self, directory: str | Path) -> None:
        """Save the config and the meta-parameters (safetensors); the base model is only referenced.

        The folder appears whole or not at all (assembled aside, then renamed into place), so
        its existence means a complete save even after a crash or a full disk.
        """
        description = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "base_model_name_or_path": self.base_model_name_or_path,
            "layout": self.layout.signature(),
        }
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.meta_parameters().items()}
        write_folder_atomic(directory, {WEIGHTS_NAME: save(tensors), CONFIG_NAME: json.dumps(description, indent=2).encode()})

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **kwargs,
    ) -> PerkModel:
        """Load what :meth:`save_pretrained` wrote; the base model is loaded with
        :func:`perk.models.load_base_model` from the saved reference unless given."""
        directory = Path(directory)
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither")
        description, config, saved = read_pretrained(directory)
        if model is None:
            from perk.models import load_base_model

            reference = description["base_model_name_or_path"]
            if not reference:
                raise ValueError(f"{directory}: no base model reference was saved; pass model and tokenizer")
            model, tokenizer = load_base_model(reference)
        perk_model = cls(model, tokenizer, config, **kwargs)
        if perk_model.layout.signature() != description["layout"]:
            raise ValueError(f"{directory}: the saved adapter layout does not match this base model")
        load_tensors(perk_model.meta_parameters(), saved, source=str(directory / WEIGHTS_NAME))
        return perk_model

    @property
    def base_model_name_or_path(self) -> str | None:
        return getattr(self.model.config, "_name_or_path", None) or None

    def meta_parameters(self) -> dict[str, torch.Tensor]:
        """Every meta-learned tensor, live (an optimizer may update them in place).

        ``adapter_init`` (P,): θ, the flat adapter init (see :attr:`layout`); ``inner_lr_log``
        (N, G): u, the inner rates being ``lr0·exp(u)``; ``weighting.*``: the token-weighting MLP.
        """
        params = {"adapter_init": self.adapter_init, "inner_lr_log": self.inner_lr_log}
        if self.weighting is not None:
            params.update({f"weighting.{k}": v for k, v in self.weighting.named_parameters()})
        return params

    def inner_learning_rates(self) -> torch.Tensor:
        """(N, G) α = lr0·exp(u), with the graph to u."""
        return self.config.base_inner_lr * self.inner_lr_log.exp()

    def _initial_adapter(self, generator: torch.Generator) -> torch.Tensor:
        """θ as LoRA initialises it: A ~ U(±1/√d_in) (PEFT's Kaiming-uniform), B = 0."""
        flat = torch.zeros(1, self.layout.n_params, dtype=self.dtype)
        for spec, (a, _) in zip(self.layout.modules, self.layout.module_views(flat)):
            bound = 1.0 / math.sqrt(spec.d_in)
            a.uniform_(-bound, bound, generator=generator)
        return flat[0]

    # ------------------------------------------------------------------------------------------
    # Public API: encode, answer, meta_loss, meta_gradient
    # ------------------------------------------------------------------------------------------

    def encode(self, context: str | list) -> Memory:
        """Write context(s) into adapters: N inner steps from θ, no graph kept.

        ``context`` is one context (a str, or a list of str documents) or several contexts (a list
        whose items are lists of documents, or strs when mixed with lists); see :meth:`encode_many`
        for a list of plain-string contexts. Several contexts are encoded in the same forward
        passes, one adapter each, and give the same adapters as one at a time.
        """
        if isinstance(context, (list, tuple)) and any(isinstance(c, (list, tuple)) for c in context):
            return self.encode_many(list(context))
        return self.encode_many([context])

    def encode_many(self, contexts: list[str | list[str]]) -> Memory:
        """Encode several contexts at once (``contexts[i]`` a str or a list of documents)."""
        start = time.perf_counter()
        segments = self._segments(contexts)
        with torch.no_grad():
            phi, _, stats = self._inner_loop(segments, self._token_weights(segments, differentiable=False))
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats
        return Memory(
            phi, self.layout, self.config.rank, self.config.alpha, self.config.rslora,
            self.config.target_modules, self.base_model_name_or_path,
            inner_losses=stats.inner_losses, context_tokens=segments.tokens_per_adapter(),
        )

    def answer(self, memory: Memory, question: str | list[str], max_new_tokens: int = 32) -> str | list[str]:
        """Greedy answer(s) of the base model + the memory's adapter, without the context.

        A memory of one context answers any number of questions (str → str, list → list); a memory
        of k contexts answers a list of k questions, question i from adapter i.
        """
        if not isinstance(memory, Memory):
            raise TypeError(f"memory must be a Memory, got {type(memory).__name__}")
        if memory.layout.signature() != self.layout.signature():
            raise ValueError("memory was written for another model (its adapter layout differs)")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        single = isinstance(question, str)
        questions = [question] if single else question
        if not isinstance(questions, (list, tuple)) or not questions:
            raise TypeError("question must be a str or a non-empty list of str")
        if memory.n_adapters > 1 and len(questions) != memory.n_adapters:
            raise ValueError(
                f"a memory of {memory.n_adapters} contexts needs one question per context, got {len(questions)}"
            )
        prompts = [self.question_prompt(q, max_new_tokens) for q in questions]
        flat = memory.flat.to(self.device, self.dtype)
        answers = self.generate(prompts, flat, max_new_tokens=max_new_tokens)
        return answers[0] if single else answers

    def question_prompt(self, question: str, max_new_tokens: int = 0) -> list[int]:
        """Token ids of the prompt that asks ``question`` (no context), as answers are trained.

        A ValueError when the question is empty, or when the prompt plus ``max_new_tokens``
        generated tokens would not fit the model window (positions past it do not exist).
        """
        ids = prompt_ids(self.tokenizer, question, self.window)
        self._check_fits_window(len(ids), max_new_tokens)
        return ids

    def _check_fits_window(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens + max_new_tokens > self.window:
            raise ValueError(
                f"a prompt of {prompt_tokens} tokens plus max_new_tokens={max_new_tokens} exceed the model window "
                f"({self.window}): ask for at most {self.window - prompt_tokens} new tokens"
            )

    def generate(self, prompts: list[list[int]], adapter: torch.Tensor | None, max_new_tokens: int = 32) -> list[str]:
        """Greedy continuations of token-id ``prompts``, stripped (and cut at a newline when
        ``config.answer_stop_at_newline``). ``adapter``: None for the base model alone, a flat
        (1, P) adapter for every prompt, or (len(prompts), P), one per prompt. Prompt plus
        ``max_new_tokens`` must fit the model window (a ValueError: no position exists past it)."""
        self._check_fits_window(max(len(p) for p in prompts), max_new_tokens)
        input_ids, attention_mask = self._left_pad(prompts)
        sequence_adapters = None
        if adapter is not None and adapter.shape[0] > 1:
            if adapter.shape[0] != len(prompts):
                raise ValueError(f"adapter has {adapter.shape[0]} rows for {len(prompts)} prompts")
            sequence_adapters = torch.arange(len(prompts), device=self.device)
        generation = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self._stop_token_ids(),
            pad_token_id=self.pad_id, bos_token_id=None,
        )
        with torch.no_grad(), self.adapter_active(adapter, sequence_adapters):
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation)
        texts = self.tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
        if self.config.answer_stop_at_newline:
            texts = [t.split("\n", 1)[0] for t in texts]
        return [t.strip() for t in texts]

    def adapter_active(self, adapter: torch.Tensor | None, sequence_adapters: torch.Tensor | None = None):
        """Context manager: the model's forward applies the flat ``adapter`` (n, P) (None: the
        plain base model); ``sequence_adapters`` picks each sequence's row when n > 1."""
        if adapter is None:
            return contextlib.nullcontext()
        views = self.layout.module_views(adapter.to(self.device, self.dtype))
        return self.context.active(views, sequence_adapters)

    def initial_adapter(self, seed: int) -> torch.Tensor:
        """A fresh (P,) adapter initialised as LoRA does (A random, B = 0), e.g. for a baseline."""
        return self._initial_adapter(torch.Generator().manual_seed(seed)).to(self.device)

    def adapter_loss_and_grad(self, batch: TokenBatch, adapter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ loss_weights·NLL per adapter of ``batch`` under the flat ``adapter`` (n, P), and its
        gradient w.r.t. ``adapter`` (accumulated over ``micro_batch_tokens`` chunks)."""
        result = self._pass(batch, adapter.detach().to(self.device, self.dtype), grad=True)
        return result.losses, result.grad

    def meta_loss(self, problems: list[dict]) -> torch.Tensor:
        """Mean answer NLL over ``problems`` after the inner loop (forward only, no graph)."""
        start = time.perf_counter()
        segments, answers = self._problem_batches(problems)
        with torch.no_grad():
            phi, _, stats = self._inner_loop(segments, self._token_weights(segments, differentiable=False))
            losses = self._pass(answers, phi, grad=False).losses
        self._check_outer(losses)
        loss = losses.sum()
        stats.outer_loss, stats.seconds = float(loss), time.perf_counter() - start
        self.last_stats = stats
        return loss

    def meta_gradient(self, problems: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(meta_loss, {name: ∂loss/∂name})`` for every meta-parameter (see ``config.meta_grad``).

        The loss is the mean answer NLL over problems; the gradient flows back through the last
        ``unroll_steps`` inner steps (DESIGN §4). ``exact`` uses autograd double backward (eager
        attention and the torch kernels for the call); ``fd`` central finite differences;
        ``first_order`` no Hessian term.
        """
        start = time.perf_counter()
        segments, answers = self._problem_batches(problems)
        warn_adam_constants(self.config)
        if self.config.meta_grad == "exact":
            loss, grads, stats = self._meta_gradient_exact(segments, answers)
        else:
            loss, grads, stats = self._meta_gradient_walk_back(segments, answers)
        stats.outer_loss, stats.seconds = float(loss.detach()), time.perf_counter() - start
        self.last_stats = stats
        return loss.detach(), grads

    # ------------------------------------------------------------------------------------------
    # The inner loop and the two meta-gradient paths
    # ------------------------------------------------------------------------------------------

    def _inner_loop(
        self,
        segments: TokenBatch,
        token_weights: torch.Tensor | None,
        *,
        record_from: int | None = None,
        differentiable: bool = False,
    ) -> tuple[torch.Tensor, list[InnerStepRecord], PerkStats]:
        """N inner steps from θ over ``segments``; returns φ_N, step records and stats.

        ``record_from``: keep the records of DESIGN §4 (d_n for every step, φ_n and P_n for
        steps n ≥ record_from). ``differentiable`` (``exact`` mode): steps n ≥ N − T build
        their graph (create_graph), earlier ones use detached gradients; φ_N then carries the
        graph to the meta-parameters.
        """
        config = self.config
        n_adapters = segments.n_adapters
        lr = self.inner_learning_rates()
        if not differentiable:
            lr = lr.detach()
        phi = self.adapter_init.unsqueeze(0).repeat(n_adapters, 1)
        if not differentiable:
            phi = phi.detach()
        optimizer = InnerOptimizer(config)
        records: list[InnerStepRecord] = []
        losses = torch.zeros(config.inner_steps, n_adapters, dtype=self.dtype)
        skipped: list[tuple[int, int]] = []
        for n in range(config.inner_steps):
            unrolled = differentiable and n >= config.inner_steps - config.unroll_steps
            result = self._pass(
                segments, phi if unrolled else phi.detach(), grad=True, create_graph=unrolled,
                token_weights=token_weights if unrolled else _detach(token_weights),
            )
            grad, step_lr = result.grad, lr[n].unsqueeze(0).expand(n_adapters, -1)
            bad = ~(result.losses.isfinite() & result.grad.isfinite().all(1))
            if bad.any():
                grad, step_lr = self._handle_nonfinite(n, bad, grad, step_lr, skipped)
            direction, record = optimizer.step(
                grad, phi, step_lr, n, record=record_from is not None,
                unrolled=record_from is not None and n >= record_from,
            )
            losses[n] = result.losses.detach().cpu()
            if record is not None:
                records.append(record)
            # φ ← φ − α ⊙ d. Without a graph: one fused launch over every tensor group, in place
            # in the flat buffer. With one (exact mode): the same update as differentiable ops on
            # the flat buffer (α expanded from groups to elements), which autograd goes through.
            if differentiable:
                phi = phi - self.layout.expand(step_lr).to(phi.dtype) * direction
            else:
                perk_kernels.lora_inner_step(
                    phi, direction, step_lr, self.layout.offsets, inplace=True, backend=self.context.backend
                )
        stats = PerkStats(losses, None, segments.n_tokens, config.inner_steps, skipped)
        return phi, records, stats

    def _handle_nonfinite(self, step, bad, grad, step_lr, skipped):
        """Raise, or skip the step for the adapters whose inner loss or gradient is not finite."""
        contexts = bad.nonzero().flatten().tolist()
        message = f"non-finite inner loss or gradient at inner step {step} for context(s) {contexts}"
        if self.config.on_nonfinite == "raise":
            raise FloatingPointError(message + " (set on_nonfinite='skip' to skip such steps)")
        warnings.warn(message + ": step skipped", RuntimeWarning, stacklevel=4)
        skipped += [(step, c) for c in contexts]
        keep = (~bad).unsqueeze(1)
        return torch.where(keep, grad, 0.0), step_lr * keep.to(step_lr.dtype)

    def _meta_gradient_walk_back(self, segments: TokenBatch, answers: TokenBatch):
        """``fd`` / ``first_order``: forward records adapter-sized state, then walk back (§4)."""
        config = self.config
        unroll = config.unroll_steps if config.meta_grad == "fd" else 0
        features = None if self.weighting is None else self._features(segments)
        weights = None if features is None else self.weighting(features).detach()
        with torch.no_grad():
            phi, records, stats = self._inner_loop(segments, weights, record_from=config.inner_steps - unroll)
        outer = self._pass(answers, phi, grad=True)
        self._check_outer(outer.losses)

        def gradient_at(point):
            result = self._pass(
                segments, point, grad=True, token_weights=weights, keep_token_losses=weights is not None
            )
            if not (result.grad.isfinite().all() and result.losses.isfinite().all()):
                raise FloatingPointError("non-finite inner gradient in a finite-difference pass of the meta-gradient")
            return result.grad, result.token_losses

        meta = walk_back(
            records, outer.grad, gradient_at, group_offsets=self.layout.offsets,
            weight_decay=config.inner_weight_decay, compute_dtype=self.model.dtype, fd_epsilon=config.fd_epsilon,
            token_weight_scale=None if weights is None else segments.loss_weights.to(self.dtype),
            row_adapters=segments.row_adapters, backend=self.context.backend,
        )
        stats.passes += 2 * unroll
        grads = {
            "adapter_init": meta.init,
            # α = lr0·exp(u): ∂u = α · Σ_adapters ∂α
            "inner_lr_log": meta.lr.sum(1) * self.inner_learning_rates().detach(),
        }
        if self.weighting is not None:
            with torch.enable_grad():
                weighting_grads = torch.autograd.grad(
                    self.weighting(features), list(self.weighting.parameters()), grad_outputs=meta.token_weights
                )
            grads.update({f"weighting.{k}": g for (k, _), g in zip(self.weighting.named_parameters(), weighting_grads)})
        return outer.losses.sum(), grads, stats

    def _meta_gradient_exact(self, segments: TokenBatch, answers: TokenBatch):
        """``exact``: autograd through the unrolled steps (double backward), the reference mode."""
        with _eager_attention(self.model), self._kernel_backend("torch"), torch.enable_grad():
            weights = self._token_weights(segments, differentiable=True)
            phi, _, stats = self._inner_loop(segments, weights, differentiable=True)
            loss = self._pass(answers, phi, grad=False).losses.sum()
            self._check_outer(loss.detach().unsqueeze(0))
            params = self.meta_parameters()
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, materialize_grads=True)
        return loss, dict(zip(params, grads)), stats

    # ------------------------------------------------------------------------------------------
    # One pass over a token batch
    # ------------------------------------------------------------------------------------------

    def _pass(
        self,
        batch: TokenBatch,
        phi: torch.Tensor,
        *,
        grad: bool,
        create_graph: bool = False,
        token_weights: torch.Tensor | None = None,
        keep_token_losses: bool = False,
    ) -> _PassResult:
        """Σ_tokens loss_weight·(token weight)·NLL per adapter at adapters ``phi`` (n_adapters, P),
        in chunks of ``micro_batch_tokens``; with ``grad``, also its gradient w.r.t. φ (accumulated
        over chunks; ``create_graph`` keeps the graph for double backward).

        Without ``grad`` the losses carry a graph only if ``phi`` does (the ``exact`` outer loss).
        """
        n_adapters = phi.shape[0]
        if grad and not create_graph:
            phi = phi.detach().requires_grad_()
        track = grad or phi.requires_grad
        with torch.set_grad_enabled(track):
            views = self.layout.tensor_views(phi)  # the layers' inputs, and what grads are taken of
        adapters = list(zip(views[0::2], views[1::2]))
        flat_grad = torch.zeros_like(phi, requires_grad=False) if grad else None
        losses = torch.zeros(n_adapters, dtype=self.dtype, device=self.device)
        token_losses = torch.zeros_like(batch.loss_weights, dtype=self.dtype) if keep_token_losses else None
        head = self.model.get_output_embeddings()
        for rows in batch.chunks(self.config.micro_batch_tokens):
            sequence_adapters = batch.row_adapters[rows] if n_adapters > 1 else None
            with torch.set_grad_enabled(track), self.context.active(adapters, sequence_adapters):
                hidden = self._hidden(batch.input_ids[rows])  # (rows, seq, d_model)
                nll = perk_kernels.fused_linear_cross_entropy(
                    hidden.flatten(0, 1), head.weight, batch.labels[rows].flatten(),
                    bias=head.bias, ignore_index=IGNORE_INDEX, backend=self.context.backend,
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
        return _PassResult(losses, flat_grad, token_losses)

    def _hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Last hidden states of the decoder stack (after its final norm): no logits computed."""
        with _segment_attention(input_ids.device):
            return self.model.base_model(input_ids=input_ids, use_cache=False)[0]

    # ------------------------------------------------------------------------------------------
    # Token weighting
    # ------------------------------------------------------------------------------------------

    def _features(self, segments: TokenBatch) -> torch.Tensor:
        """(rows, seq, d_model) base-model hidden states of the segments, adapters off, no graph."""
        with torch.no_grad():
            return torch.cat(
                [self._hidden(segments.input_ids[rows]) for rows in segments.chunks(self.config.micro_batch_tokens)]
            )

    def _token_weights(self, segments: TokenBatch, *, differentiable: bool) -> torch.Tensor | None:
        """(rows, seq) token weights w_t(ω), or None when weighting is off."""
        if self.weighting is None:
            return None
        features = self._features(segments)
        with torch.set_grad_enabled(differentiable):
            return self.weighting(features)

    # ------------------------------------------------------------------------------------------
    # Inputs and helpers
    # ------------------------------------------------------------------------------------------

    def _segments(self, contexts: list) -> TokenBatch:
        if not isinstance(contexts, (list, tuple)) or not contexts:
            raise TypeError("contexts must be a non-empty list of contexts")
        segments = context_segments(self.tokenizer, list(contexts), self.config.segment_len, self.filler_id)
        return segments.to(self.device)

    def _problem_batches(self, problems: list[dict]) -> tuple[TokenBatch, TokenBatch]:
        """Context segments and answer rows of a meta-batch (problem i → adapter i)."""
        if not isinstance(problems, (list, tuple)) or not problems:
            raise TypeError("problems must be a non-empty list of dicts")
        for i, problem in enumerate(problems):
            if not isinstance(problem, dict):
                raise TypeError(f"problems[{i}] must be a dict, got {type(problem).__name__}")
            missing = {"context", "question", "answer"} - set(problem)
            if missing:
                raise ValueError(f"problems[{i}] lacks {sorted(missing)}")
            validate_context(problem["context"], name=f"problems[{i}]['context']")
        segments = self._segments([p["context"] for p in problems])
        answers = question_answer_batch(
            self.tokenizer, [p["question"] for p in problems], [p["answer"] for p in problems], self.window,
            self.filler_id,
        )
        # The outer loss is the mean over problems of each problem's mean answer NLL.
        answers.loss_weights /= len(problems)
        return segments, answers.to(self.device)

    def _check_outer(self, losses: torch.Tensor) -> None:
        if not losses.isfinite().all():
            raise FloatingPointError(f"non-finite outer loss {losses.tolist()}")

    @property
    def window(self) -> int:
        """The model's context window in tokens."""
        config = self.model.config
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(config, name, None)
            if value:
                return int(value)
        return int(self.tokenizer.model_max_length)

    @property
    def filler_id(self) -> int:
        """Token id for right padding of loss batches. Causal attention never lets a real token
        see right padding, so any id works; one other than the model's pad id keeps transformers
        from warning that an attention mask is missing (none is needed, and SDPA stays causal)."""
        pad = self.model.config.pad_token_id
        candidates = (self.tokenizer.eos_token_id, self.tokenizer.bos_token_id, 0, 1)
        return next(c for c in candidates if c is not None and c != pad)

    @property
    def pad_id(self) -> int:
        """Left-padding id for generation (the tokenizer's pad, else eos)."""
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def _stop_token_ids(self) -> list[int]:
        """eos, plus the newline token when answers stop at a newline and it is a single token."""
        stops = [self.tokenizer.eos_token_id]
        if self.config.answer_stop_at_newline:
            newline = self.tokenizer("\n", add_special_tokens=False)["input_ids"]
            if len(newline) == 1:
                stops += newline
        return stops

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row)
            attention_mask[i, width - len(row) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    @contextlib.contextmanager
    def _kernel_backend(self, backend: str):
        saved, self.context.backend = self.context.backend, backend
        try:
            yield
        finally:
            self.context.backend = saved


def load_tensors(live: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy ``saved`` into the ``live`` tensors after checking what ``copy_`` would let through:
    the same names, the same shapes (no broadcasting) and finite values. ValueError otherwise."""
    if set(saved) != set(live):
        raise ValueError(f"{source}: tensors {sorted(saved)} do not match the expected {sorted(live)}")
    for name, tensor in live.items():
        value = saved[name]
        if value.shape != tensor.shape:
            raise ValueError(
                f"{source}: {name} has shape {tuple(value.shape)}, expected {tuple(tensor.shape)} (saved for another "
                "model or config?)"
            )
        _check_finite(value, f"{source}: {name}")
    with torch.no_grad():
        for name, tensor in live.items():
            tensor.copy_(saved[name])


def read_pretrained(directory: str | Path) -> tuple[dict, PerkConfig, dict[str, torch.Tensor]]:
    """(description, config, tensors) of a :meth:`PerkModel.save_pretrained` folder, checked
    without a base model: readable files, a valid config, finite tensors. FileNotFoundError or
    ValueError naming the file otherwise (what fits which base model is checked on loading)."""
    directory = Path(directory)
    description = _read_description(directory / CONFIG_NAME)
    try:
        config = PerkConfig.from_dict(description["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{directory / CONFIG_NAME}: {err}") from None
    tensors = read_safetensors(directory / WEIGHTS_NAME)
    for name, tensor in tensors.items():
        _check_finite(tensor, f"{directory / WEIGHTS_NAME}: {name}")
    return description, config, tensors


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if not (tensor.is_floating_point() and bool(tensor.isfinite().all())):
        raise ValueError(f"{what} is not finite (NaN or inf values) or not floating point")


def _read_description(path: Path) -> dict:
    """The perk_config.json of a saved model, checked for what :func:`read_pretrained` reads."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (not a complete PerkModel.save_pretrained folder)")
    try:
        description = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    required = ("format_version", "config", "layout")
    if not isinstance(description, dict) or any(k not in description for k in required):
        keys = sorted(description) if isinstance(description, dict) else type(description).__name__
        raise ValueError(f"{path}: lacks {', '.join(required)} (found {keys})")
    if description["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {description['format_version']!r}")
    if not isinstance(description["config"], dict):
        raise ValueError(f"{path}: config must be a mapping")
    description.setdefault("base_model_name_or_path", None)
    return description


def _segment_attention(device: torch.device):
    """SDPA's backend for passes over segments: on CPU its math path. At segment lengths (128 tokens)
    torch's CPU flash-attention kernel is the slower one, forward and backward: on SmolLM2-135M in
    bf16 (1K tokens, one step) a pass took 17-22 s with it against 13.5 s with the math path."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


@contextlib.contextmanager
def _eager_attention(model: PreTrainedModel):
    """Run the block with eager (twice-differentiable) attention; restore the model's choice after."""
    current = model.config._attn_implementation
    if current == "eager":
        yield
        return
    if not hasattr(model, "set_attn_implementation"):
        raise RuntimeError(
            f"meta_grad='exact' needs eager attention and this transformers version cannot switch "
            f"{type(model).__name__} from {current!r}; load the model with attn_implementation='eager'"
        )
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(current)
