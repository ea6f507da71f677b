"""Token batches of the engine: context segments (inner loss) and question/answer rows (outer loss).

Both are :class:`TokenBatch` objects: right-padded token rows, labels already shifted onto the
positions that predict them (``labels[:, t]`` is the target of position ``t``; -100 is ignored),
the adapter of each row, and per-position loss weights such that ``Σ weights · NLL`` is the sum
over adapters of each adapter's mean token NLL. With right padding and causal attention no real
token ever sees a pad, so no attention mask is needed and position ids start at 0 in every row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
# Appended to every document before tokenisation: documents packed into one segment stay apart.
DOCUMENT_SEPARATOR = "\n"


@dataclass
class TokenBatch:
    """Right-padded rows of tokens with shifted labels and loss weights.

    input_ids: (rows, seq) int64.
    labels: (rows, seq) int64, the next token each position predicts, IGNORE_INDEX where none.
    row_adapters: (rows,) int64, the adapter (problem) each row belongs to; rows are grouped by it.
    loss_weights: (rows, seq) float32, ``1 / (tokens of the row's adapter)`` on labelled positions.
    n_adapters: number of adapters the rows index.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    row_adapters: torch.Tensor
    loss_weights: torch.Tensor
    n_adapters: int

    @property
    def n_tokens(self) -> int:
        """Labelled positions in the batch."""
        return int((self.labels != IGNORE_INDEX).sum())

    def tokens_per_adapter(self) -> torch.Tensor:
        """(n_adapters,) int64, labelled positions of each adapter."""
        counts = (self.labels != IGNORE_INDEX).sum(1)
        zeros = torch.zeros(self.n_adapters, dtype=torch.int64, device=counts.device)
        return zeros.index_add_(0, self.row_adapters, counts)

    def chunks(self, max_tokens: int):
        """Consecutive row slices of at most ``max_tokens`` tokens (at least one row each)."""
        rows_per_chunk = max(1, max_tokens // self.input_ids.shape[1])
        for start in range(0, self.input_ids.shape[0], rows_per_chunk):
            yield slice(start, start + rows_per_chunk)

    def select(self, rows: slice) -> TokenBatch:
        """The batch of rows ``rows`` only, for the same adapters and with the same loss weights
        (still normalised over the whole batch)."""
        return TokenBatch(
            self.input_ids[rows], self.labels[rows], self.row_adapters[rows], self.loss_weights[rows], self.n_adapters
        )

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(
            self.input_ids.to(device), self.labels.to(device), self.row_adapters.to(device),
            self.loss_weights.to(device), self.n_adapters,
        )


def validate_context(context: object, name: str = "context") -> list[str]:
    """A context as a non-empty list of documents, or a TypeError/ValueError naming ``name``."""
    documents = [context] if isinstance(context, str) else context
    if not isinstance(documents, (list, tuple)):
        raise TypeError(f"{name} must be a str or a list of str, got {type(context).__name__}")
    if not all(isinstance(d, str) for d in documents):
        bad = next(type(d).__name__ for d in documents if not isinstance(d, str))
        raise TypeError(f"{name} must be a str or a list of str, got a list containing {bad}")
    if not any(d.strip() for d in documents):
        raise ValueError(f"{name} is empty or whitespace only")
    return [d for d in documents if d.strip()]


def pack_documents(documents: list[list[int]], segment_len: int) -> list[list[int]]:
    """Greedy packing of tokenised documents into segments of at most ``segment_len`` tokens.

    A document that fits in the current segment is appended whole; one that does not starts a
    new segment; only documents longer than a segment are split (into full segments, and a
    remainder that later documents may join).
    """
    segments: list[list[int]] = []
    current: list[int] = []
    for tokens in documents:
        if len(current) + len(tokens) <= segment_len:
            current = current + tokens
            continue
        if current:
            segments.append(current)
        n_full = len(tokens) // segment_len if len(tokens) > segment_len else 0
        segments += [tokens[i * segment_len : (i + 1) * segment_len] for i in range(n_full)]
        current = tokens[n_full * segment_len :]
    if current:
        segments.append(current)
    return segments


def rows_to_batch(
    rows: list[list[int]], targets: list[list[bool]], row_adapters: list[int], n_adapters: int, pad_id: int
) -> TokenBatch:
    """Right-pad token rows; position t is labelled with token t+1 where ``targets[row][t+1]``."""
    seq = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), seq), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), seq), IGNORE_INDEX, dtype=torch.int64)
    for i, (tokens, is_target) in enumerate(zip(rows, targets)):
        input_ids[i, : len(tokens)] = torch.tensor(tokens)
        mask = torch.tensor(is_target[1:], dtype=torch.bool)
        labels[i, : len(tokens) - 1] = torch.where(mask, torch.tensor(tokens[1:]), IGNORE_INDEX)
    adapters = torch.tensor(row_adapters, dtype=torch.int64)
    labelled = labels != IGNORE_INDEX
    counts = torch.zeros(n_adapters, dtype=torch.int64).index_add_(0, adapters, labelled.sum(1))
    if (counts == 0).any():
        empty = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"no token to predict for problem(s) {empty}: each needs at least 2 tokens")
    loss_weights = labelled.float() / counts[adapters].unsqueeze(1).float()
    return TokenBatch(input_ids, labels, adapters, loss_weights, n_adapters)


def _pad_id(tokenizer: PreTrainedTokenizerBase, pad_id: int | None) -> int:
    if pad_id is not None:
        return pad_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an eos token")
    return pad


def context_segments(
    tokenizer: PreTrainedTokenizerBase, contexts: list[str | list[str]], segment_len: int, pad_id: int | None = None
) -> TokenBatch:
    """Segments of several contexts (adapter ``i`` for context ``i``), for the inner loss.

    Each document is tokenised with ``DOCUMENT_SEPARATOR`` appended and no special tokens,
    then packed by :func:`pack_documents`. Every labelled position (all but each segment's
    first token and padding) is an inner-loss target. Rows are right-padded with ``pad_id``
    (default: the tokenizer's pad token); its value never matters under causal attention.
    """
    if not isinstance(contexts, (list, tuple)) or not contexts:
        raise ValueError("contexts must be a non-empty list")
    rows: list[list[int]] = []
    adapters: list[int] = []
    for index, context in enumerate(contexts):
        documents = validate_context(context, name="context" if len(contexts) == 1 else f"context[{index}]")
        # verbose=False: documents longer than the model window are expected here (they get split).
        tokenised = text_ids(tokenizer, [d + DOCUMENT_SEPARATOR for d in documents], verbose=False)
        segments = pack_documents(tokenised, segment_len)
        rows += segments
        adapters += [index] * len(segments)
    targets = [[True] * len(r) for r in rows]
    return rows_to_batch(rows, targets, adapters, len(contexts), _pad_id(tokenizer, pad_id))


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str | list[str], **kwargs) -> list[int] | list[list[int]]:
    """Token ids of data text (documents, questions, answers), no special tokens added and none
    parsed: a ``<|im_end|>`` written in a question or a document is text, never the control token
    that would close the chat turn."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True, **kwargs)["input_ids"]


def _user_turn(question: str, context: str | None) -> str:
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    if not question.strip():
        raise ValueError("question is empty or whitespace only")
    body = f"Question: {question}"
    return body if context is None else f"{context}\n\n{body}"


def build_prompt(tokenizer: PreTrainedTokenizerBase, question: str, context: str | None = None) -> str:
    """The prompt text for ``question``: the chat template's user turn when the tokenizer has one,
    else ``"Question: …\\nAnswer:"``. With ``context``, it is placed before the question (the
    prompt-based baselines use this; PERK itself answers without the context)."""
    body = _user_turn(question, context)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": body}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{body}\nAnswer:"


def answer_text(tokenizer: PreTrainedTokenizerBase, answer: str) -> str:
    """How an answer follows the prompt: as the assistant turn (chat) or after a space."""
    return answer if getattr(tokenizer, "chat_template", None) else f" {answer}"


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, question: str, context: str | None = None) -> list[int]:
    """Token ids of :func:`build_prompt`: the template's markup with its control tokens, the
    question and context (data) as text only (:func:`text_ids`)."""
    body = _user_turn(question, context)
    text = build_prompt(tokenizer, question, context)
    start = text.find(body)
    if start < 0:
        raise ValueError("the tokenizer's chat template does not insert the user's message verbatim")
    markup = tokenizer([text[:start], text[start + len(body) :]], add_special_tokens=False)["input_ids"]
    return markup[0] + text_ids(tokenizer, body) + markup[1]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str, max_len: int) -> list[int]:
    """Token ids of the prompt of ``question``, or a ValueError when longer than ``max_len``."""
    ids = prompt_token_ids(tokenizer, question)
    if len(ids) > max_len:
        raise ValueError(f"question is {len(ids)} tokens as a prompt, longer than the model window ({max_len})")
    return ids


def question_answer_batch(
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    answers: list[str],
    max_len: int,
    pad_id: int | None = None,
) -> TokenBatch:
    """Rows ``prompt + answer + eos`` (row ``i`` uses adapter ``i``), labelled on the answer and eos.

    Raises a ValueError when a row is longer than ``max_len`` (the model window).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token (needed to end answers)")
    rows, targets = [], []
    for i, (question, answer) in enumerate(zip(questions, answers, strict=True)):
        if not isinstance(answer, str):
            raise TypeError(f"answer must be a str, got {type(answer).__name__}")
        prompt = prompt_ids(tokenizer, question, max_len)
        target = text_ids(tokenizer, answer_text(tokenizer, answer)) + [eos]
        if len(prompt) + len(target) > max_len:
            raise ValueError(
                f"problem {i}: question + answer are {len(prompt) + len(target)} tokens, "
                f"longer than the model window ({max_len})"
            )
        rows.append(prompt + target)
        targets.append([False] * len(prompt) + [True] * len(target))
    return rows_to_batch(rows, targets, list(range(len(rows))), len(rows), _pad_id(tokenizer, pad_id))
