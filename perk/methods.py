"""The methods compared: PERK, zero-shot and FT-ICR; answering held-out problems with each, scored alike.

Methods:

* ``perk`` — encode the context into the meta-learned adapter, answer without the context.
* ``zeroshot`` — the base model with the context in the prompt (truncated to the window; the
  prediction records it).
* ``ftic`` — FT-ICR: the prompt-based baseline fine-tuned with the same budget as PERK. The same
  base model with a LoRA adapter of the same rank, trained on the same training problems with the
  context *in the prompt* (cut to the model window) and the loss on the answer tokens
  (:func:`ftic_loss_and_grad`). The adapter is one flat buffer in the engine's layout, applied
  through the same injected layers as PERK's memories, so both methods share every kernel.

Every method is scored by exact match and token F1 of its greedy answer and, when the problem
has a closed answer set, by constrained choice: the choice with the highest log-likelihood after
the prompt (an instruct model with the context in its prompt tends to answer in sentences, which
exact match counts as wrong). Answers trained in the official support-then-answer form
(``<support>…</support>\n<output>…</output>``) are scored on their output part, the gold answer's
and the prediction's alike (perk.tasks.answer_part).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from perk.adapted_model import AdaptedModel
from perk.config import METHODS
from perk.engine import PerkModel
from perk.report import Prediction
from perk.segments import TokenBatch, answer_text, prompt_token_ids, rows_to_batch, text_ids
from perk.tasks import answer_part, exact_match, f1



def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def context_prompt(adapted: AdaptedModel, problem, reserve: int) -> tuple[list[int], bool]:
    """Prompt tokens with the context before the question, cut to fit the model window less
    ``reserve`` tokens; True when the context had to be cut (its oldest tokens are dropped)."""
    tokenizer = adapted.tokenizer
    question = problem["question"]
    documents = problem["context"]
    context = "\n".join(documents) if isinstance(documents, (list, tuple)) else documents
    budget = adapted.window - reserve
    overhead = len(prompt_token_ids(tokenizer, question, context=""))
    context_ids = text_ids(tokenizer, context)
    truncated = False
    while True:
        ids = prompt_token_ids(tokenizer, question, context=context)
        if len(ids) <= budget:
            return ids, truncated
        # Keep the most recent context tokens that fit; re-tokenising decoded text can shift a
        # few tokens, so shrink until the whole prompt fits.
        keep = max(0, min(len(context_ids), budget - overhead) - (8 if truncated else 0))
        if keep == 0 and truncated:
            raise ValueError(f"the question alone does not fit the model window ({adapted.window} tokens)")
        context_ids = context_ids[len(context_ids) - keep :]
        context = tokenizer.decode(context_ids)
        truncated = True


def ftic_batch(adapted: AdaptedModel, problems: list[dict]) -> TokenBatch:
    """FT-ICR training rows ``prompt(context, question) + answer + eos`` of one shared adapter,
    labelled on the answer; the loss weights make ``Σ weights·NLL`` the mean NLL over the batch's
    answer tokens."""
    tokenizer = adapted.tokenizer
    rows, targets = [], []
    for problem in problems:
        target = text_ids(tokenizer, answer_text(tokenizer, problem["answer"]))
        target = target + [tokenizer.eos_token_id]
        prompt, _ = context_prompt(adapted, problem, reserve=len(target))
        rows.append(prompt + target)
        targets.append([False] * len(prompt) + [True] * len(target))
    return rows_to_batch(rows, targets, [0] * len(rows), 1, adapted.filler_id)


def ftic_loss_and_grad(adapted: AdaptedModel, adapter: torch.Tensor, problems: list[dict]) -> tuple[float, torch.Tensor]:
    """Mean answer NLL of ``problems`` under the FT-ICR ``adapter`` (1, P), and its gradient."""
    batch = ftic_batch(adapted, problems).to(adapted.device)
    result = adapted.loss_and_grad(batch, adapter.to(adapted.device, adapted.dtype))
    return float(result.losses.sum()), result.grad


def choice_log_likelihoods(
    adapted: AdaptedModel, prompt: list[int], choices: list[str], adapter: torch.Tensor | None
) -> torch.Tensor:
    """(n_choices,) log p(choice + eos | prompt) under the base model (+ ``adapter`` (1, P))."""
    tokenizer = adapted.tokenizer
    eos = tokenizer.eos_token_id
    targets = [text_ids(tokenizer, answer_text(tokenizer, c)) + [eos] for c in choices]
    rows = [prompt + t for t in targets]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), adapted.filler_id, dtype=torch.int64)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)  # right padding: pads never precede a real token
    input_ids = input_ids.to(adapted.device)
    with torch.no_grad(), adapted.adapter_active(adapter):
        logits = adapted.model(input_ids=input_ids).logits.float()
    log_probs = logits.log_softmax(-1)
    scores = torch.zeros(len(rows))
    for i, target in enumerate(targets):
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(target), device=adapted.device)
        picked = log_probs[i, positions, torch.tensor(target, device=adapted.device)]
        scores[i] = picked.sum().cpu()
    return scores


def answer_budget(tokenizer, problems: Sequence[dict], max_new_tokens: int) -> int:
    """``max_new_tokens``, raised to the longest gold answer (+2) when answers are support-then-answer
    targets: generation cut off before the ``<output>`` part could never be scored right."""
    targets = [p["answer"] for p in problems if "<output>" in p["answer"]]
    if not targets:
        return max_new_tokens
    longest = max(len(ids) for ids in text_ids(tokenizer, targets))
    return max(max_new_tokens, longest + 2)


# The prompt-based methods keep this many tokens free beyond the answer length limit (context_prompt).
PROMPT_SLACK = 8


def check_problem_fits(adapted: AdaptedModel, problem: dict, *, answer_tokens: int | None) -> None:
    """ValueError unless ``problem`` fits the model window in every method: its question prompt
    (with an empty context, as the prompt-based methods start, the longest) followed by its answer
    and eos (``answer_tokens`` None: a training problem), or by ``answer_tokens`` generated tokens
    and the prompt-based methods' slack (an evaluated one)."""
    tokenizer = adapted.tokenizer
    prompt = len(prompt_token_ids(tokenizer, problem["question"], context=""))
    if answer_tokens is None:
        answer = len(text_ids(tokenizer, answer_text(tokenizer, problem["answer"]))) + 1
        if prompt + answer > adapted.window:
            raise ValueError(f"question + answer are {prompt} + {answer} tokens, longer than the model window "
                             f"({adapted.window})")
    elif prompt + answer_tokens + PROMPT_SLACK > adapted.window:
        raise ValueError(f"the question is {prompt} tokens as a prompt: with an answer of up to {answer_tokens} tokens "
                         f"(and {PROMPT_SLACK} spare) it does not fit the model window ({adapted.window})")


def _scored(method: str, problem: dict, text: str, choice: str | None, truncated: bool) -> Prediction:
    answer = answer_part(problem["answer"])
    predicted = answer_part(text)
    return Prediction(
        method=method,
        task=problem.get("task", "custom"),
        length_tokens=int(problem.get("length_tokens") or problem.get("context_tokens") or 0),
        depth=problem.get("depth"),
        question=problem["question"],
        answer=answer,
        prediction=text,
        exact_match=exact_match(predicted, answer),
        f1=f1(predicted, answer),
        choice=choice,
        truncated=truncated,
    )


def evaluate_perk(pm: PerkModel, problems: Sequence[dict], *, max_new_tokens: int, batch_size: int,
                  progress: tqdm | None = None) -> list[Prediction]:
    """Encode each context (``batch_size`` at a time, one adapter each) and answer from memory."""
    predictions = []
    for batch in _batches(problems, batch_size):
        memory = pm.encode([p["context"] for p in batch])
        texts = pm.answer(memory, [p["question"] for p in batch], max_new_tokens=max_new_tokens)
        for i, (problem, text) in enumerate(zip(batch, texts)):
            choice = None
            if problem.get("choices"):
                prompt = pm.adapted.question_prompt(problem["question"])
                scores = choice_log_likelihoods(pm.adapted, prompt, problem.get("choices"), memory.flat[i : i + 1])
                choice = problem["choices"][int(scores.argmax())]
            predictions.append(_scored("perk", problem, text, choice, truncated=False))
        if progress is not None:
            progress.update(len(batch))
    return predictions


def evaluate_prompted(adapted: AdaptedModel, problems: Sequence[dict], *, method: str, adapter: torch.Tensor | None,
                      max_new_tokens: int, progress: tqdm | None = None) -> list[Prediction]:
    """The context in the prompt, answered by the base model (+ ``adapter`` for FT-ICR)."""
    predictions = []
    for problem in problems:
        prompt, truncated = context_prompt(adapted, problem, reserve=max_new_tokens + PROMPT_SLACK)
        text = adapted.generate([prompt], adapter, max_new_tokens=max_new_tokens)[0]
        choice = None
        if problem.get("choices"):
            scores = choice_log_likelihoods(adapted, prompt, problem.get("choices"), adapter)
            choice = problem["choices"][int(scores.argmax())]
        predictions.append(_scored(method, problem, text, choice, truncated))
        if progress is not None:
            progress.update(1)
    return predictions


def evaluate(pm: PerkModel, problems: Sequence[dict], methods: Sequence[str], *, ftic_adapter: torch.Tensor | None = None,
             max_new_tokens: int = 8, batch_size: int = 4, desc: str = "eval", progress: bool = True) -> list[Prediction]:
    """Every method on every problem, with one progress bar (unless ``progress`` is False), in the
    order method by method, problems in order."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {METHODS}")
    if "ftic" in methods and ftic_adapter is None:
        raise ValueError("method 'ftic' needs the FT-ICR adapter trained by perk.train")
    predictions: list[Prediction] = []
    with tqdm(total=len(problems) * len(methods), desc=desc, unit="problem", dynamic_ncols=True,
              **({} if progress else {"disable": True})) as bar:
        for method in methods:
            bar.set_postfix(method=method)
            if method == "perk":
                predictions += evaluate_perk(pm, problems, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                             progress=bar)
            else:
                adapter = ftic_adapter if method == "ftic" else None
                predictions += evaluate_prompted(pm.adapted, problems, method=method, adapter=adapter,
                                                 max_new_tokens=max_new_tokens, progress=bar)
    return predictions
