"""Batches of a prepared LRA split for one data-parallel rank.

The order is the token loader's (`order.py`, reused, not copied): epoch e puts the
shards in an order seeded by (seed, e), rank r of R reads a contiguous 1/R of that
sequence and shuffles it in windows of `shuffle_buffer` samples keyed by (seed, e, R, r,
window). So an epoch's batches are a pure function of (seed, epoch, dp_size, dp_rank),
every sample of the split belongs to exactly one rank, and a rank resumes mid-epoch from
a batch count alone (`start`). Without shuffling (evaluation) the ranks read contiguous
ranges of the split in manifest order.

Every rank gets the same number of batches of `batch_size` rows, so collectives line
up:
- `drop_last` (the default when shuffling): each rank yields (total // R) // batch_size
  batches; the samples past them (fewer than R x batch_size + R) wait for another epoch,
  whose order differs.
- otherwise (the default for evaluation): every sample is yielded once, and rows that fill
  up the last batches repeat a real sample of the rank with label IGNORE_LABEL and index
  -1, so sums over rows with label >= 0 count each sample of the split exactly once.

Labels come from the `.label` arrays beside the shards, read (and checked against the
manifest's sha256) once, by each sample's index in the split.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from itertools import islice
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch

from megatron_transnormer.data.manifest import DataError
from megatron_transnormer.data.order import Order, Reading, Shard, reader_range
from megatron_transnormer.data.lra.info import LRAInfo, load_lra_info

IGNORE_LABEL = -100  # filler rows; the value torch's cross_entropy ignores by default
SHUFFLE_BYTES = 256 << 20  # default shuffle window: this much of a rank's rows held at once


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class LRABatch(NamedTuple):
    """One micro-batch; every tensor is int64.

    tokens [B, L] ids (pixel tasks: intensities 0-255), padded with the manifest's pad id
    after `lengths` [B] real ids; labels [B] (IGNORE_LABEL on filler rows); indices [B]
    each row's sample in the split in manifest order (-1 on filler rows). Retrieval: the
    second document in tokens2 / lengths2 (None for the other tasks)."""
    tokens: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    tokens2: Optional[torch.Tensor] = None
    lengths2: Optional[torch.Tensor] = None

    def padding_mask(self, second: bool = False) -> torch.Tensor:
        """[B, L] bool, True at real ids (of tokens2 with second=True)."""
        tokens, lengths = (self.tokens2, self.lengths2) if second else (self.tokens, self.lengths)
        return torch.arange(tokens.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)


def read_labels(info: LRAInfo, split: str, verify: bool = True) -> np.ndarray:
    """The labels of a split's samples in manifest order, checked (count, sha256, range)."""
    out = []
    for shard in info.dataset.split(split)["shards"]:
        path = os.path.join(info.dataset.root, shard["labels"]["name"])
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise DataError(f"{path}: cannot read the label file ({e})") from None
        if verify and hashlib.sha256(data).hexdigest() != shard["labels"]["sha256"]:
            raise DataError(f"{path}: sha256 mismatch with the manifest: corrupt or replaced label file")
        if len(data) != 2 * shard["samples"]:
            raise DataError(f"{path}: {len(data)} bytes, expected {shard['samples']} uint16 labels")
        labels = np.frombuffer(data, dtype="<u2").astype(np.int64)
        if labels.size and labels.max() >= info.num_classes:
            raise DataError(f"{path}: label {int(labels.max())} outside 0..{info.num_classes - 1}")
        out.append(labels)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


class LRASplit:
    """A split of a prepared LRA dataset, read for rank `dp_rank` of `dp_size`."""

    def __init__(self, path: str, split: str, batch_size: int, *, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 1, shuffle: bool | None = None, drop_last: bool | None = None,
                 shuffle_buffer: int = 0, verify: bool = True):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.info = info = load_lra_info(path)
        self.split = split
        stored = info.resolve_split(split)
        entry = info.dataset.split(stored)
        self.shuffle = (split == "train") if shuffle is None else bool(shuffle)
        self.drop_last = self.shuffle if drop_last is None else bool(drop_last)
        self.batch_size, self.dp_rank, self.dp_size, self.seed = batch_size, dp_rank, dp_size, seed
        shards = tuple(Shard(u, s["sha256"], int(s["samples"]))
                       for u, s in zip(info.dataset.shard_urls(stored), entry["shards"]))
        sample_len = info.dataset.sample_len
        reading = Reading(sample_len, info.dataset.dtype, info.vocab_size, bool(verify))
        buffer = shuffle_buffer or max(1, SHUFFLE_BYTES // (2 * sample_len))
        self._order = Order(shards, seed, self.shuffle, buffer if self.shuffle else 1, reading)
        self.labels = read_labels(info, stored, verify)
        self.total = self._order.total
        self._start, self._share = reader_range(self.total, dp_size, dp_rank)
        if self.drop_last:
            self.num_batches = (self.total // dp_size) // batch_size
            if not self.num_batches:
                raise DataError(f"{info.path}: split {split!r} has {self.total} samples, fewer than a batch "
                                f"of {batch_size} for each of {dp_size} data-parallel ranks")
        else:
            self.num_batches = _ceil_div(_ceil_div(self.total, dp_size), batch_size)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[LRABatch]:
        """This rank's batches of `epoch`, from batch `start` (a resume) on."""
        if not 0 <= start <= self.num_batches:
            raise ValueError(f"start batch {start} is not in [0, {self.num_batches}]")
        bs = self.batch_size
        end = min(self.num_batches * bs, self._share)
        samples = self._order.segment(epoch if self.shuffle else 0, self.dp_size, self.dp_rank,
                                      min(start * bs, end), end)
        filler = None
        for _ in range(start, self.num_batches):
            rows = list(islice(samples, bs))
            if rows:
                filler = rows[-1]
            elif filler is None:  # a rank with no sample of its own (fewer samples than ranks)
                filler = self._first_sample()
            yield self._batch(rows, bs - len(rows), filler)

    def _first_sample(self) -> tuple[int, np.ndarray]:
        plain = dataclasses.replace(self._order, shuffle=False, buffer=1)
        return next(plain.segment(0, 1, 0, 0, 1))

    def _batch(self, rows: list, fill: int, filler) -> LRABatch:
        indices = [i for i, _ in rows] + [-1] * fill
        data = np.array([r for _, r in rows] + [filler[1]] * fill, dtype=np.int64)
        labels = np.array([self.labels[i] for i, _ in rows] + [IGNORE_LABEL] * fill, dtype=np.int64)
        L, pad = self.info.max_length, self.info.pad_id
        parts = [data[:, k * L:(k + 1) * L] for k in range(self.info.inputs)]
        lengths = [(p != pad).sum(1) if pad >= 0 else np.full(len(p), L) for p in parts]
        tensor = torch.from_numpy
        second = (tensor(np.ascontiguousarray(parts[1])), tensor(lengths[1].astype(np.int64))) \
            if self.info.inputs == 2 else (None, None)
        return LRABatch(tensor(np.ascontiguousarray(parts[0])), tensor(lengths[0].astype(np.int64)),
                        tensor(labels), tensor(np.array(indices, dtype=np.int64)), *second)


def lra_batches(path: str, split: str, batch_size: int, *, epoch: int = 0, start: int = 0, dp_rank: int = 0,
                dp_size: int = 1, seed: int = 1, shuffle: bool | None = None, drop_last: bool | None = None,
                shuffle_buffer: int = 0, verify: bool = True) -> Iterator[LRABatch]:
    """One epoch of a prepared LRA split (a dataset folder or its manifest.json) for one
    data-parallel rank; see `LRASplit` and the module docstring."""
    reader = LRASplit(path, split, batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed, shuffle=shuffle,
                      drop_last=drop_last, shuffle_buffer=shuffle_buffer, verify=verify)
    return reader.batches(epoch, start)
