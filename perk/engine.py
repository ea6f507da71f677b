"""PerkModel: PERK on a frozen Hugging Face causal LM — meta-parameters, encode, meta-gradients.

Reads top to bottom like the algorithm (docs/design.md §1, §3):

* :meth:`PerkModel.encode` — contexts → segments → N inner steps from the meta-learned init θ,
  one adapter per context, all contexts in the same forward passes (batched LoRA);
* :meth:`PerkModel.answer` — greedy answers from the base model + an adapter, no context in the prompt;
* :meth:`PerkModel.meta_loss` / :meth:`PerkModel.meta_gradient` — the outer loss after the inner
  loop and its gradient for every meta-parameter (θ, per-step per-group inner rates, token weighting).

The base model with its injected LoRA layers is an :class:`~perk.adapted_model.AdaptedModel`
(shared with the baselines); the inner loop is :mod:`perk.inner_loop`, the meta-gradient modes
:mod:`perk.meta_gradient`. A forward/backward pass over context segments holds at most
``micro_batch_tokens`` tokens of activations at once; what outlives a pass is adapter-sized.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import save
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from perk.adapted_model import AdaptedModel
from perk.checkpoint import read_safetensors, write_folder_atomic
from perk.config import PerkConfig
from perk.distributed import group_size, shard_rows
from perk.inner_loop import PerkStats, inner_loop
from perk.memory import Memory
from perk.meta_gradient import check_outer_loss, meta_gradient
from perk.segments import TokenBatch, context_segments, question_answer_batch, validate_context
from perk.weighting import TokenWeighting

CONFIG_NAME = "perk_config.json"
WEIGHTS_NAME = "perk_meta.safetensors"
FORMAT_VERSION = 1

__all__ = ["PerkModel", "PerkStats", "load_tensors", "read_pretrained"]


class PerkModel:
    """PERK's meta-parameters on an :class:`~perk.adapted_model.AdaptedModel`. Build with
    :meth:`from_base` or :meth:`from_pretrained`.

    ``adapted`` is the base model with its LoRA layers (its ``model``, ``tokenizer`` and adapter
    ``layout`` are also reachable here); the meta-parameters are the adapter init θ, the log
    inner rates u and, with token weighting, the weighting MLP (:meth:`meta_parameters`).
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
        self.config = config
        self.adapted = AdaptedModel(
            model, tokenizer, rank=config.rank, scale=config.lora_scale, target_modules=config.target_modules,
            dtype=config.torch_dtype, micro_batch_tokens=config.micro_batch_tokens,
            stop_at_newline=config.answer_stop_at_newline, backend=backend,
        )
        generator = torch.Generator().manual_seed(config.seed)
        self.adapter_init = self.adapted.initial_adapter(generator).requires_grad_()
        self.inner_lr_log = torch.zeros(
            config.inner_steps, self.layout.n_groups, dtype=self.dtype, device=self.device, requires_grad=True
        )
        self.weighting = None
        if config.token_weighting:
            d_model = model.get_output_embeddings().weight.shape[1]
            self.weighting = TokenWeighting(d_model, config.weighting_hidden, dtype=self.dtype, generator=generator)
            self.weighting.to(self.device)

    @property
    def model(self) -> PreTrainedModel:
        return self.adapted.model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.adapted.tokenizer

    @property
    def layout(self):
        """The :class:`~perk.lora.AdapterLayout` of the flat adapter buffers."""
        return self.adapted.layout

    @property
    def device(self) -> torch.device:
        return self.adapted.device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of adapters and meta-parameters (float32, or float64 in gradient checks)."""
        return self.adapted.dtype

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

    # ------------------------------------------------------------------------------------------
    # Public API: encode, answer, meta_loss, meta_gradient
    # ------------------------------------------------------------------------------------------

    def encode(self, contexts: str | list[str | list[str]], *, process_group=None, group=None) -> Memory:
        """Write contexts into adapters, one each: N inner steps from θ, no graph kept.

        ``contexts`` is a list of contexts, each a str or a list of str documents (so
        ``["a", "b"]`` is two contexts and ``[["a", "b"]]`` one context of two documents); a
        lone str is one context. All contexts are encoded in the same forward passes and get the
        same adapters as one at a time. The memory's ``stats`` tell what the call did.

        ``process_group`` (a ``torch.distributed`` process group, e.g.
        ``torch.distributed.group.WORLD``): shard the contexts' segment rows over the group's
        ranks, which must all call ``encode`` with the same contexts and meta-parameters. Each
        rank runs the forward and backward passes of its share of the rows only (1/K of the
        activations); every inner step all-reduces the inner gradient and losses, so every rank
        returns the memory one process would (up to float summation order). ``group`` is its
        former name, still accepted (with a DeprecationWarning).
        """
        if group is not None:
            warnings.warn("PerkModel.encode(group=...) is now encode(process_group=...)", DeprecationWarning, stacklevel=2)
            process_group = process_group if process_group is not None else group
        start = time.perf_counter()
        segments = self._segments([contexts] if isinstance(contexts, str) else contexts)
        local = segments
        if group_size(process_group) > 1:
            local = shard_rows(segments, torch.distributed.get_rank(process_group), group_size(process_group))
        else:
            process_group = None  # one process: the plain path
        with torch.no_grad():
            phi, _, stats = inner_loop(
                self.adapted, self.config, self.adapter_init, self.inner_learning_rates(), local,
                self._token_weights(local), process_group=process_group,
            )
        stats.context_tokens = segments.n_tokens
        stats.seconds = time.perf_counter() - start
        return Memory(
            phi, self.layout, self.config.rank, self.config.alpha, self.config.rslora,
            self.config.target_modules, self.base_model_name_or_path,
            inner_losses=stats.inner_losses, context_tokens=segments.tokens_per_adapter(), stats=stats,
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
        prompts = [self.adapted.question_prompt(q, max_new_tokens) for q in questions]
        answers = self.adapted.generate(prompts, memory.flat.to(self.device, self.dtype), max_new_tokens=max_new_tokens)
        return answers[0] if single else answers

    def meta_loss(self, problems: list[dict]) -> tuple[torch.Tensor, PerkStats]:
        """Mean answer NLL over ``problems`` after the inner loop (forward only, no graph), and
        the call's stats."""
        start = time.perf_counter()
        segments, answers = self._problem_batches(problems)
        with torch.no_grad():
            phi, _, stats = inner_loop(
                self.adapted, self.config, self.adapter_init, self.inner_learning_rates(), segments,
                self._token_weights(segments),
            )
            losses = self.adapted.loss_and_grad(answers, phi, grad=False).losses
        check_outer_loss(losses)
        loss = losses.sum()
        stats.outer_loss, stats.seconds = float(loss), time.perf_counter() - start
        return loss, stats

    def meta_gradient(self, problems: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor], PerkStats]:
        """``(meta_loss, {name: ∂loss/∂name}, stats)`` for every meta-parameter (``config.meta_grad``).

        The loss is the mean answer NLL over problems; the gradient flows back through the last
        ``unroll_steps`` inner steps (docs/design.md §3): ``fd`` (central finite differences), ``exact``
        (autograd double backward; eager attention and the torch kernels for the call) or
        ``first_order`` (no Hessian term); see :func:`perk.meta_gradient.meta_gradient`.
        """
        start = time.perf_counter()
        segments, answers = self._problem_batches(problems)
        features = None if self.weighting is None else self.adapted.features(segments)
        weights = None if features is None else self.weighting(features).detach()
        rates = self.inner_learning_rates().detach()
        loss, meta, stats = meta_gradient(
            self.adapted, self.config, self.adapter_init, rates, segments, answers, weights
        )
        # Chain rule to the meta-parameters: α = lr0·exp(u) gives ∂u = α ⊙ ∂α; w = MLP(features).
        grads = {"adapter_init": meta.init, "inner_lr_log": meta.lr * rates}
        if self.weighting is not None:
            params = dict(self.weighting.named_parameters())
            with torch.enable_grad():
                weighting_grads = torch.autograd.grad(
                    self.weighting(features), list(params.values()), grad_outputs=meta.token_weights
                )
            grads.update({f"weighting.{name}": g for name, g in zip(params, weighting_grads)})
        stats.outer_loss, stats.seconds = float(loss), time.perf_counter() - start
        return loss, grads, stats

    # ------------------------------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------------------------------

    def _token_weights(self, segments: TokenBatch) -> torch.Tensor | None:
        """(rows, seq) token weights w_t(ω) of the segments, no graph; None when weighting is off."""
        if self.weighting is None:
            return None
        with torch.no_grad():
            return self.weighting(self.adapted.features(segments))

    def _segments(self, contexts: list) -> TokenBatch:
        if not isinstance(contexts, (list, tuple)) or not contexts:
            raise TypeError("contexts must be a str or a non-empty list of contexts")
        segments = context_segments(self.tokenizer, list(contexts), self.config.segment_len, self.adapted.filler_id)
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
            self.tokenizer, [p["question"] for p in problems], [p["answer"] for p in problems],
            self.adapted.window, self.adapted.filler_id,
        )
        # The outer loss is the mean over problems of each problem's mean answer NLL.
        answers.loss_weights /= len(problems)
        return segments, answers.to(self.device)


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
