"""Fast token counting for building contexts of a target length.

Tokenising every context in full would cost tens of millions of tokens per dataset, so the
generators count a context as the sum of its pieces' counts: haystack sentences are counted once
per (tokenizer, sentence pool), facts, words and document prefixes once and memoised.

Why a sum of pieces is (nearly) exact: the tokenizers we target (byte-level BPE as in GPT-2,
SmolLM, Qwen, Llama 3; SentencePiece-style Metaspace; WordPiece) never merge across a space
followed by a word. A piece that follows other text after a space is counted as what it adds
there: ``count("." + " " + piece) - count(".")``. That is ``count(" " + piece)`` for byte-level
BPE, and avoids counting a spurious word-start marker for Metaspace tokenizers that prepend one
to every text. Tests check the sums against full tokenisations with several tokenizer types.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

_BATCH = 4096
# A short text that ends in its own token: what follows it after a space starts a new one.
_ANCHOR = "."
# Past this many memoised strings new ones are counted but not kept.
_MEMO_LIMIT = 500_000


class TokenCounter:
    """Counts tokens (no special tokens) of text pieces with one tokenizer, memoising repeats.

    A piece is counted either ``following`` other text after a single space (as inside a
    document), or opening a text (as the first piece of a document).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(
                f"tokenizer must be a transformers PreTrainedTokenizerBase, got {type(tokenizer).__name__}"
            )
        self.tokenizer = tokenizer
        self._memo: dict[tuple[bool, str], int] = {}
        self._anchor_tokens = self._tokenize([_ANCHOR])[0]

    @property
    def name(self) -> str:
        """The tokenizer's name or path (recorded in each problem)."""
        return str(getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__)

    def _tokenize(self, texts: Sequence[str]) -> list[int]:
        counts: list[int] = []
        for start in range(0, len(texts), _BATCH):
            encoded = self.tokenizer(
                list(texts[start : start + _BATCH]),
                add_special_tokens=False,
                return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]
            counts.extend(len(ids) for ids in encoded)
        return counts

    def count_many(self, texts: Sequence[str], *, following: bool = False) -> list[int]:
        """Token counts of many pieces, tokenised in batches (not memoised)."""
        if not following:
            return self._tokenize(texts)
        return [n - self._anchor_tokens for n in self._tokenize([f"{_ANCHOR} {text}" for text in texts])]

    def count(self, text: str, *, following: bool = False) -> int:
        """Token count of one piece, memoised (for the few distinct facts and prefixes)."""
        key = (following, text)
        cached = self._memo.get(key)
        if cached is None:
            cached = self.count_many([text], following=following)[0]
            self._remember({key: cached})
        return cached

    def count_words(self, texts: Sequence[str], *, following: bool) -> list[int]:
        """Token counts of texts of words separated by single spaces, as sums of memoised word
        counts (every word after the first ``following``; the first one too if ``following``).
        For texts that are all different but made of few distinct words, like student records."""
        keyed = [
            [(following, words[0])] + [(True, word) for word in words[1:]]
            for words in (text.split(" ") for text in texts)
        ]
        missing = sorted({key for keys in keyed for key in keys if key not in self._memo})
        fresh = {}
        for flag in (False, True):
            pieces = [text for following_, text in missing if following_ is flag]
            fresh.update(zip([(flag, piece) for piece in pieces], self.count_many(pieces, following=flag)))
        self._remember(fresh)
        known = self._memo
        return [sum(fresh[key] if key in fresh else known[key] for key in keys) for keys in keyed]

    def _remember(self, counts: dict[tuple[bool, str], int]) -> None:
        if len(self._memo) < _MEMO_LIMIT:
            self._memo.update(counts)
