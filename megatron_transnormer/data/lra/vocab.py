"""Symbols to ids for the symbol tasks, as the S4-derived LRA code numbers them.

Ids 0, 1, 2 are `<pad>`, `<unk>`, `<eos>` (torchtext's `build_vocab_from_iterator` with
these specials first); then the symbols. A sequence is cut to `max_length - 1` symbols
and closed by `<eos>`, so a sample, `<eos>` included, is at most `max_length` ids; the
rest of the row is `<pad>`, which never occurs inside a sequence (so the real length of
a row is its count of non-pad ids).

- ListOps has a fixed vocabulary (`LISTOPS_SYMBOLS`): the generator's 15 symbols, so
  generated and official files share ids, and a symbol outside it is an error.
- Text and Retrieval are character level; their vocabulary is built from the training
  split (`char_vocab`): characters seen at least `min_freq` times in the training
  sequences (cut as above), by decreasing count, ties in character order; other
  characters map to `<unk>`.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
SPECIALS = (PAD, UNK, EOS)
PAD_ID, UNK_ID, EOS_ID = 0, 1, 2
LISTOPS_SYMBOLS = tuple("0123456789") + ("[MAX", "[MIN", "[MED", "[SM", "X")


def listops_tokens(source: str) -> list[str]:
    """LRA's ListOps tokenisation: parentheses deleted, `]` written `X`, split on whitespace."""
    return source.translate({ord("("): None, ord(")"): None, ord("]"): ord("X")}).split()


def listops_vocab() -> list[str]:
    return list(SPECIALS + LISTOPS_SYMBOLS)


def char_vocab(counts: Counter, min_freq: int) -> list[str]:
    kept = sorted((c for c, n in counts.items() if n >= min_freq), key=lambda c: (-counts[c], c))
    return list(SPECIALS) + kept


def count_chars(counts: Counter, text: str, max_length: int) -> None:
    """Count the characters of `text` as far as a sample keeps them."""
    counts.update(text[:max_length - 1])


class Encoder:
    """Symbols (characters or ListOps tokens) to a fixed-length row of ids."""

    def __init__(self, vocab: list[str]):
        self.vocab = list(vocab)
        self.index = {s: i for i, s in enumerate(self.vocab)}
        if len(self.index) != len(self.vocab):
            raise ValueError("vocabulary holds a symbol twice")

    def ids(self, symbols: Iterable[str]) -> list[int]:
        get = self.index.get
        return [get(s, UNK_ID) for s in symbols]

    def row(self, symbols, max_length: int, out: np.ndarray) -> tuple[int, bool]:
        """Write the ids of `symbols[:max_length - 1]` + `<eos>` + padding into `out`
        ([max_length]); returns (length, whether the sequence was cut)."""
        kept = symbols[:max_length - 1]
        n = len(kept)
        out[:n] = self.ids(kept)
        out[n] = EOS_ID
        out[n + 1:] = PAD_ID
        return n + 1, len(symbols) > n
