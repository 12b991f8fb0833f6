"""The sample order: a pure function of (seed, epoch, layout, reader, position).

Nothing here keeps hidden state, so a stream is resumed from counters alone.

- Epoch e puts the shards in a seeded order; their samples, concatenated, are the
  epoch's sequence of T samples.
- With R readers (data-parallel ranks x loader workers), reader j owns a contiguous
  range of that sequence, T // R samples long (the first T % R readers one more), so
  every sample of the epoch has exactly one reader and all readers finish an epoch
  together. A range covers about 1/R of the shards.
- Inside its range a reader shuffles consecutive windows of `buffer` positions with a
  permutation seeded by (seed, epoch, R, j, window).

A `Segment` (epoch, R, j, a, b) is positions [a, b) of such a range: reading it means
skipping whole shards by their sample counts from the manifest, skipping samples in
the first shard, and starting in the middle of one window.

Samples travel with their index in the split in manifest order (the samples of the
shards before theirs in the manifest, plus their place in their shard), which no
order, layout or resume changes: per-sample randomness keyed by it is the same
however the split is read.

With `skip_corrupt` a shard that fails to read is skipped with a warning. A reader
that has gone through a whole split's worth of positions without one readable sample
stops with a DataError (`SkipGuard`) instead of skipping on forever, epoch after epoch.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Iterator

import numpy as np

from megatron_transnormer.data.manifest import DataError
from megatron_transnormer.data.shards import read_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    url: str
    sha256: str
    samples: int


@dataclass(frozen=True)
class Reading:
    """How shards are read: what a sample is and what to do with a bad shard."""
    sample_len: int
    dtype: str
    vocab_size: int
    verify: bool = True
    skip_corrupt: bool = False


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_shards)
    return _rng(seed, epoch, 0x5A4D).permutation(num_shards)


def reader_range(total: int, readers: int, reader: int) -> tuple[int, int]:
    """(start, length) of a reader's share of `total` positions."""
    base, extra = divmod(total, readers)
    return reader * base + min(reader, extra), base + (1 if reader < extra else 0)


def range_parts(shards: list[Shard], order, start: int, length: int) -> list[tuple[Shard, int, int, int]]:
    """(shard, first, end, index) sample ranges covering positions [start, start + length) of
    `order`, where `shards` is the whole split in manifest order and `index` is the index
    of the shard's sample 0 in it."""
    indices = np.cumsum([0] + [s.samples for s in shards])
    parts, pos, stop = [], 0, start + length
    for i in order:
        shard = shards[i]
        lo, hi = max(start - pos, 0), min(stop - pos, shard.samples)
        if lo < hi:
            parts.append((shard, lo, hi, int(indices[i])))
        pos += shard.samples
        if pos >= stop:
            break
    return parts


class SkipGuard:
    """Ends a reader that data.skip_corrupt would keep going without a sample: every shard
    of the split is corrupt (or every one this reader is given). `skipped` collects the
    skipped shards' errors (the last one is kept) as the reader's segments are read;
    `segment_read` counts the positions of each segment that gave no sample and raises
    once they reach a whole split, `total` positions: one pass for a single reader."""

    def __init__(self, where: str, total: int, shards: int):
        self.where, self.total, self.shards = where, total, shards
        self.skipped: deque = deque(maxlen=1)
        self.dry = 0  # positions in a row that gave no sample

    def segment_read(self, positions: int, samples: int) -> None:
        self.dry = 0 if samples else self.dry + positions
        if self.dry >= self.total and self.skipped:
            raise DataError(f"{self.where}: no readable sample in a whole pass over the split ({self.total} "
                            f"samples in {self.shards} shards): every shard read was corrupt and skipped "
                            f"(data.skip_corrupt); the last: {self.skipped[-1]}")


def _sequential(parts, start: int, reading: Reading, skipped=None) -> Iterator[tuple[int, np.ndarray]]:
    """(index in the split, sample) of `parts` in order, from position `start` of their
    concatenation. `skipped`: a list (or deque) that collects the errors of shards skipped."""
    for shard, lo, hi, index in parts:
        if start >= hi - lo:
            start -= hi - lo
            continue
        first = lo + start
        start = 0
        try:
            samples = read_samples(shard.url, shard.sha256, reading.sample_len, reading.dtype, shard.samples,
                                   reading.verify)
            for i, sample in enumerate(samples):
                if i < first:
                    continue
                if i >= hi:
                    samples.close()
                    break
                top = int(sample.max())
                if top >= reading.vocab_size:
                    raise DataError(f"{shard.url}: sample {i} holds token id {top}, outside the manifest's "
                                    f"vocabulary of {reading.vocab_size}")
                yield index + i, sample
        except DataError as e:
            if not reading.skip_corrupt:
                raise
            log.warning("skipping corrupt shard (data.skip_corrupt): %s", e)
            if skipped is not None:
                skipped.append(str(e))


def iter_range(parts, key: tuple, buffer: int, start: int, stop: int,
               reading: Reading, skipped=None) -> Iterator[tuple[int, np.ndarray]]:
    """(index, sample) at positions [start, stop) of `parts` shuffled in windows of `buffer`
    (none when buffer <= 1)."""
    total = sum(hi - lo for _, lo, hi, _ in parts)
    stop = min(stop, total)
    if start >= stop:
        return
    if buffer <= 1:
        yield from islice(_sequential(parts, start, reading, skipped), stop - start)
        return
    window = start // buffer
    source = _sequential(parts, window * buffer, reading, skipped)
    while window * buffer < stop:
        base = window * buffer
        size = min(buffer, total - base)
        held = list(islice(source, size))
        perm = _rng(*key, window).permutation(size)
        for pos in range(max(start - base, 0), min(size, stop - base)):
            i = perm[pos]
            if i < len(held):  # a shard skipped as corrupt leaves the window short
                yield held[i]
        window += 1


@dataclass(frozen=True)
class Order:
    """The shards of a split and how they are shuffled; builds segments' sample streams."""
    shards: tuple
    seed: int
    shuffle: bool
    buffer: int
    reading: Reading

    @property
    def total(self) -> int:
        return sum(s.samples for s in self.shards)

    def segment(self, epoch: int, readers: int, reader: int, a: int, b: int,
                skipped=None) -> Iterator[tuple[int, np.ndarray]]:
        """(index in the split, sample) at positions [a, b) of reader `reader` of `readers` in
        `epoch`; `skipped` collects the errors of shards skipped as corrupt (SkipGuard.skipped)."""
        order = shard_order(len(self.shards), self.seed, epoch, self.shuffle)
        start, length = reader_range(self.total, readers, reader)
        parts = range_parts(list(self.shards), order, start, length)
        buffer = self.buffer if self.shuffle else 1
        return iter_range(parts, (self.seed, epoch, readers, reader), buffer, a, b, self.reading, skipped)


def share(pending: list, readers: int, reader: int) -> list:
    """A reader's contiguous share of a list of segments [epoch, R, j, a, b]."""
    total = sum(b - a for *_, a, b in pending)
    start, length = reader_range(total, readers, reader)
    out, pos, stop = [], 0, start + length
    for e, r, j, a, b in pending:
        lo, hi = max(start - pos, 0), min(stop - pos, b - a)
        if lo < hi:
            out.append([e, r, j, a + lo, a + hi])
        pos += b - a
    return out
