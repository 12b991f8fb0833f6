"""Packing token streams into fixed-length samples.

- causal: all documents of a split, each ended by the end-of-document id, are one
  stream cut into samples of `seq_len + 1` ids that overlap by one id, so every id
  after the first is a target exactly once. The tail shorter than a sample is dropped
  (its size is recorded in the manifest as `dropped_tokens`).
- mlm: RoBERTa-style "complete" samples: whole sentences (lines) are packed into
  `[bos] ... [eos]` of at most `seq_len` ids, padded with the pad id; a sample never
  spans two documents, and a sentence longer than a sample is cut.
"""
from __future__ import annotations

import numpy as np


def pack_causal(docs: list[np.ndarray], seq_len: int) -> tuple[np.ndarray, int]:
    """-> ([n, seq_len + 1] samples, number of trailing ids not in any sample)."""
    stream = np.concatenate(docs) if docs else np.zeros(0, dtype=np.uint32)
    n = max(0, (len(stream) - 1) // seq_len)
    if n == 0:
        return np.zeros((0, seq_len + 1), dtype=stream.dtype), len(stream)
    windows = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)[::seq_len][:n]
    return windows, len(stream) - 1 - n * seq_len


def _sentences(doc: np.ndarray, line_end: int) -> list[np.ndarray]:
    if line_end < 0:
        return [doc]
    cuts = np.flatnonzero(doc == line_end) + 1
    return [s for s in np.split(doc, cuts) if len(s)]


def pack_mlm(docs: list[np.ndarray], seq_len: int, bos: int, eos: int, pad: int,
             line_end: int) -> np.ndarray:
    cap = seq_len - 2
    if cap < 1:
        raise ValueError(f"--seq-len {seq_len}: masked-LM samples need at least 3 positions")
    rows: list[np.ndarray] = []

    def flush(parts):
        if parts:
            body = np.concatenate(parts)
            row = np.full(seq_len, pad, dtype=np.uint32)
            row[0], row[1:1 + len(body)], row[1 + len(body)] = bos, body, eos
            rows.append(row)

    for doc in docs:
        current, size = [], 0
        for sent in _sentences(doc, line_end):
            while len(sent) > cap:  # an over-long sentence fills samples of its own
                flush(current)
                current, size = [], 0
                flush([sent[:cap]])
                sent = sent[cap:]
            if size + len(sent) > cap:
                flush(current)
                current, size = [], 0
            current.append(sent)
            size += len(sent)
        flush(current)
    return np.stack(rows) if rows else np.zeros((0, seq_len), dtype=np.uint32)
