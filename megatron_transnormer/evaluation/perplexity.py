"""Perplexity per token and per word, so runs with different tokenizers compare.

Word perplexity divides the summed negative log-likelihood of a split by the number
of whitespace-separated words of that split's original text (`words` in the manifest)
instead of by its number of tokens: exp(sum_nll / words). A model with a word-level
tokenizer (`--tokenizer word`, fairseq's WikiText-103 vocabulary) predicts one token
per word plus one </s> per line, which is the stream the paper's word-level numbers
are computed on: compare its per-token perplexity with them.

When only part of a split is evaluated, the mean token NLL stands for the split's and
is scaled by its tokens per word: ppl_word = exp(mean_token_nll * tokens / words).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class PerplexityReport:
    nll_sum: float  # nats, over the evaluated tokens
    tokens: int  # evaluated (predicted) tokens
    split_tokens: int  # tokens of the whole tokenized split
    split_words: int  # words of the split's original text

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def token_ppl(self) -> float:
        return token_perplexity(self.nll_sum, self.tokens)

    @property
    def word_ppl(self) -> float:
        return word_perplexity(self.mean_nll, self.split_tokens, self.split_words)

    @property
    def coverage(self) -> float:
        return self.tokens / self.split_tokens

    def as_dict(self) -> dict:
        return {"loss": self.mean_nll, "ppl_token": self.token_ppl, "ppl_word": self.word_ppl,
                "tokens": self.tokens, "coverage": self.coverage}


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def token_perplexity(nll_sum: float, tokens: int) -> float:
    if tokens <= 0:
        raise ValueError(f"token perplexity needs at least one token, got {tokens}")
    return _exp(nll_sum / tokens)


def word_perplexity(mean_token_nll: float, split_tokens: int, split_words: int) -> float:
    """exp(mean_token_nll * split_tokens / split_words); the full-split case is exp(nll_sum / words)."""
    if split_words <= 0 or split_tokens <= 0:
        raise ValueError(f"word perplexity needs positive counts, got tokens={split_tokens} words={split_words}")
    return _exp(mean_token_nll * split_tokens / split_words)


def report(nll_sum: float, tokens: int, info, split: str) -> PerplexityReport:
    """Build a report from summed NLL and evaluated tokens, with the split's counts from `info`
    (a DatasetInfo)."""
    return PerplexityReport(float(nll_sum), int(tokens), info.split_tokens(split), info.split_words(split))
