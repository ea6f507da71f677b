"""FT-ICR: the prompt-based baseline fine-tuned with the same budget as PERK.

The same base model with a LoRA adapter of the same rank, trained on the same training problems
with the context *in the prompt* (cut to the model window) and the loss on the answer tokens.
The adapter is one flat buffer in the engine's layout, applied through the same injected layers
as PERK's memories, so both methods share every kernel.
"""

from __future__ import annotations

import torch

from perk.adapted_model import AdaptedModel
from perk.evaluate import context_prompt
from perk.segments import TokenBatch, answer_text, rows_to_batch


def ftic_batch(adapted: AdaptedModel, problems: list[dict]) -> TokenBatch:
    """Rows ``prompt(context, question) + answer + eos`` of one shared adapter, labelled on the
    answer; the loss weights make ``Σ weights·NLL`` the mean NLL over the batch's answer tokens."""
    tokenizer = adapted.tokenizer
    rows, targets = [], []
    for problem in problems:
        target = tokenizer(answer_text(tokenizer, problem["answer"]), add_special_tokens=False)["input_ids"]
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
