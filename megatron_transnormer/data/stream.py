"""TokenStream: batches of token ids for one data-parallel rank, resumable exactly.

Two modes:

- infinite (training): one reader per (data-parallel rank, loader worker); each epoch
  every reader owns a contiguous ~1/R share of the epoch's seeded shard sequence
  (see `order.py`), shuffled in windows that change every epoch, and its stream runs
  on into the next epoch without a break. Batch t of a rank comes from its worker
  t mod num_workers. The order is a pure function of (seed, epoch, layout, reader,
  position), so the state is the number of batches the training loop has taken.
  Resuming with another data-parallel size, worker count or micro-batch size
  continues the current epoch without repeating or dropping a sample: what the old
  readers had not yet delivered of the epochs they were in (exact, from their
  counters) is cut into equal contiguous shares for the new readers, who read it
  first and then go on with the next epoch under the new layout. Seed, shuffle and
  shuffle_buffer must match (they define the order); otherwise load_state_dict
  refuses with an error.
- finite (validation): one pass over the split in manifest order (or a seeded order
  with shuffle=True). Global batch g gives rank r the samples
  [g*dp*mb + r*mb, g*dp*mb + (r+1)*mb); every rank reads the whole (small) split and
  keeps its own. The last partial global batch is dropped, so every rank gets the same
  number of batches. The state is the number of samples consumed by all ranks; a pass
  resumes with any data-parallel size or worker count when that number is a whole
  number of the new global batches, and refuses otherwise.

Batches are `TokenBatch`es: `tokens`, a torch.LongTensor [micro_batch_size, sample_len]
(sample_len is seq_len + 1 for causal packing, inputs = tokens[:, :-1] and targets =
tokens[:, 1:], and seq_len for masked-LM packing), and `keys`, a LongTensor
[micro_batch_size, 2] naming each row's sample: (the epoch it was read in, 0 in finite
mode; its index in the split in manifest order). A key is the same in every layout,
with any number of workers and after any resume, so randomness seeded by it (a masked-LM
mask) does not depend on how the split is read. With data.skip_corrupt a skipped
shard's samples are missing from the stream and resuming is no longer exact; a reader
that finds no readable sample in a whole pass over the split (every shard corrupt)
raises a DataError naming the split and the last bad shard (`order.SkipGuard`).
"""
from __future__ import annotations

import hashlib
from itertools import islice
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatron_transnormer.data.manifest import DataError, load_dataset_info
from megatron_transnormer.data.order import Order, Reading, Shard, SkipGuard, reader_range, share

STATE_VERSION = 1
_ORDER_KEYS = ("split", "seed", "shuffle", "shuffle_buffer")
_LAYOUT_KEYS = ("dp_size", "num_workers", "micro_batch_size")


class TokenBatch(NamedTuple):
    """A micro-batch: `tokens` [micro_batch_size, sample_len] and `keys` [micro_batch_size, 2],
    each row's (epoch, index of its sample in the split); both torch.int64."""
    tokens: torch.Tensor
    keys: torch.Tensor


def _batch(samples: list[tuple[int, int, np.ndarray]]) -> TokenBatch:
    """A TokenBatch of (epoch, index, sample) triples."""
    epochs, indices, rows = zip(*samples)
    # np.array converts while it copies: half the time of np.stack then astype
    return TokenBatch(torch.from_numpy(np.array(rows, dtype=np.int64)),
                      torch.from_numpy(np.array((epochs, indices), dtype=np.int64).T.copy()))


def _stack(samples: Iterator[tuple[int, int, np.ndarray]], mb: int) -> Iterator[TokenBatch]:
    while len(batch := list(islice(samples, mb))) == mb:
        yield _batch(batch)


class _Plan:
    """Everything a reader needs; plain data so it travels to loader workers."""

    def __init__(self, order: Order, dp_rank, dp_size, workers, mb, infinite, pending, next_epoch, where=""):
        self.order = order
        self.where = where  # "<manifest>: split 'train'", for errors
        self.dp_rank, self.dp_size, self.workers, self.mb = dp_rank, dp_size, workers, mb
        self.infinite = infinite
        self.pending, self.next_epoch = pending, next_epoch

    # -- infinite mode
    def reader_segments(self, readers: int, reader: int, start: int) -> Iterator[tuple[int, int, int, int, int]]:
        """Reader `reader`'s segments from sample `start`: its share of the pending ones, then epochs."""
        for e, r, j, a, b in share(self.pending, readers, reader):
            if start < b - a:
                yield e, r, j, a + start, b
                start = 0
            else:
                start -= b - a
        length = reader_range(self.order.total, readers, reader)[1]
        epoch, start = self.next_epoch + start // length, start % length
        while True:
            yield epoch, readers, reader, start, length
            start = 0
            epoch += 1

    def _guard(self) -> SkipGuard:
        return SkipGuard(self.where, self.order.total, len(self.order.shards))

    def reader_samples(self, readers: int, reader: int, start: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, index, sample) of reader `reader`'s stream from sample `start`."""
        guard = self._guard()
        for e, r, j, a, b in self.reader_segments(readers, reader, start):
            n = 0
            for index, sample in self.order.segment(e, r, j, a, b, guard.skipped):
                n += 1
                yield e, index, sample
            guard.segment_read(b - a, n)

    def infinite_batches(self, role: int, first_batch: int) -> Iterator[TokenBatch]:
        readers = self.dp_size * self.workers
        samples = self.reader_samples(readers, self.dp_rank * self.workers + role, first_batch * self.mb)
        return _stack(samples, self.mb)

    # -- finite mode: the whole split in one order, global batches cut across ranks
    def finite_batches(self, role: int, position: int) -> Iterator[TokenBatch]:
        stride = self.dp_size * self.mb
        wanted = range(role, (self.order.total - position) // stride, self.workers)
        if not wanted:
            return
        first = position + wanted[0] * stride + self.dp_rank * self.mb
        guard, read = self._guard(), [0]

        def counted(segment):
            for index, x in segment:
                read[0] += 1
                yield 0, index, x
        samples = counted(self.order.segment(0, 1, 0, first, self.order.total, guard.skipped))
        for t in wanted:
            lo = position + t * stride + self.dp_rank * self.mb
            while first < lo:  # samples of other ranks and other workers
                if next(samples, None) is None:  # shards skipped as corrupt shortened the pass
                    guard.segment_read(self.order.total, read[0])
                    return
                first += 1
            batch = list(islice(samples, self.mb))
            first += self.mb
            if len(batch) < self.mb:
                guard.segment_read(self.order.total, read[0])
                return
            yield _batch(batch)


class _WorkerDataset(IterableDataset):
    def __init__(self, plan: _Plan, start: int):
        self.plan, self.start = plan, start

    def __iter__(self):
        info = get_worker_info()
        i = info.id if info is not None else 0
        plan, w = self.plan, self.plan.workers
        if plan.infinite:
            # The loader asks worker i for batches i, i+w, ...: rank batch start+i onwards.
            role = (self.start + i) % w
            first = self.start // w + (1 if role < self.start % w else 0)
            return plan.infinite_batches(role, first)
        return plan.finite_batches(i, self.start)


def replan(order: Order, state: dict) -> tuple[list, int]:
    """(pending segments, next epoch) left by a stream saved in `state`, for any new layout."""
    dp, workers, mb, k = state["dp_size"], state["num_workers"], state["micro_batch_size"], state["batches"]
    readers, pending, e0 = dp * workers, state["pending"], state["next_epoch"]
    left, current, touched = [], [], []
    for reader in range(readers):
        w = reader % workers
        consumed = (k // workers + (1 if w < k % workers else 0)) * mb
        for e, r, j, a, b in share(pending, readers, reader):
            take = min(consumed, b - a)
            consumed -= take
            if a + take < b:
                left.append([e, r, j, a + take, b])
        length = reader_range(order.total, readers, reader)[1]
        current.append((reader, e0 + consumed // length, consumed % length, length))
        if consumed:
            touched.append(e0 + (consumed - 1) // length)
    # every reader's share of the epochs up to the latest one any reader has entered
    last = max(touched) if touched else e0 - 1
    for reader, epoch, offset, length in current:
        for e in range(epoch, last + 1):
            a = offset if e == epoch else 0
            if a < length:
                left.append([e, readers, reader, a, length])
    return left, last + 1


class TokenStream:
    """Iterate batches of one split for one data-parallel rank; see the module docstring."""

    def __init__(self, data_cfg, split: str = "train", dp_rank: int = 0, dp_size: int = 1,
                 micro_batch_size: int = 1, seed: int = 1, shuffle: bool = True, infinite: bool = True,
                 num_workers: int | None = None, verify: bool | None = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.info = load_dataset_info(data_cfg.path)
        self.split = split
        entry = self.info.split(split)
        if getattr(data_cfg, "seq_len", 0) not in (0, self.info.seq_len):
            self.info.check_model(seq_len=data_cfg.seq_len)
        workers = data_cfg.num_workers if num_workers is None else num_workers
        if verify is None:
            verify = getattr(data_cfg, "verify", True)
        self.num_workers = workers
        shards = tuple(Shard(u, s["sha256"], int(s["samples"]))
                       for u, s in zip(self.info.shard_urls(split, getattr(data_cfg, "shards", "")),
                                       entry["shards"]))
        reading = Reading(self.info.sample_len, self.info.dtype, self.info.vocab_size, bool(verify),
                          bool(data_cfg.skip_corrupt))
        buffer = max(1, int(data_cfg.shuffle_buffer)) if shuffle else 1
        self._order = Order(shards, seed, bool(shuffle), buffer, reading)
        readers = dp_size * max(1, workers)
        if infinite and self._order.total < readers:
            raise DataError(f"{self.info.path}: split {split!r} has {self._order.total} samples, fewer than "
                            f"the {readers} readers (data-parallel size {dp_size} x loader workers "
                            f"{max(1, workers)})")
        self._plan = _Plan(self._order, dp_rank, dp_size, max(1, workers), micro_batch_size, infinite, [], 0,
                           where=f"{self.info.path}: split {split!r}")
        self._layout = {"split": split, "seed": seed, "shuffle": bool(shuffle), "shuffle_buffer": buffer,
                        "dp_size": dp_size, "num_workers": max(1, workers), "micro_batch_size": micro_batch_size}
        self._fingerprint = hashlib.sha256("".join(s.sha256 for s in shards).encode()).hexdigest()[:16]
        self._batches = 0  # infinite: batches handed out since the start (or the last layout change)
        self._position = 0  # finite: samples of the pass consumed by all ranks

    @property
    def infinite(self) -> bool:
        return self._plan.infinite

    def num_batches(self) -> int:
        """Batches per rank in one pass (finite mode)."""
        return self._order.total // (self._plan.dp_size * self._plan.mb)

    def __iter__(self) -> Iterator[TokenBatch]:
        plan = self._plan
        dataset = _WorkerDataset(plan, self._batches if plan.infinite else self._position)
        if self.num_workers > 0:
            source = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers))
        else:
            source = iter(dataset)
        stride = plan.dp_size * plan.mb
        for batch in source:
            # counted here, in the consumer, not where workers prefetch
            if plan.infinite:
                self._batches += 1
            else:
                self._position += stride
            yield batch
        if not plan.infinite:
            self._position = 0  # the next pass starts from the beginning

    def state_dict(self) -> dict:
        """Plain JSON data; the same on every data-parallel rank."""
        return {"version": STATE_VERSION, "mode": "infinite" if self.infinite else "finite",
                "dataset": self._fingerprint, "batches": self._batches, "position": self._position,
                "pending": [list(p) for p in self._plan.pending], "next_epoch": self._plan.next_epoch,
                **self._layout}

    def load_state_dict(self, state: dict) -> None:
        where = f"data state for split {self.split!r}"
        if state.get("mode") == "blend":
            raise DataError(f"{where}: saved from a blend of {len(state.get('weights', []))} datasets (data.blend), "
                            f"this run reads one (data.path); resume with the data settings it was saved with")
        if state.get("version") != STATE_VERSION:
            raise DataError(f"{where}: version {state.get('version')!r} is not {STATE_VERSION}")
        mode = "infinite" if self.infinite else "finite"
        if state.get("mode") != mode:
            raise DataError(f"{where}: saved from a {state.get('mode')} stream, this one is {mode}")
        if state.get("dataset") != self._fingerprint:
            raise DataError(f"{where}: saved for other shards (dataset {state.get('dataset')}, this "
                            f"{self.info.path} is {self._fingerprint}); data.path changed or was re-prepared")
        diff = [k for k in _ORDER_KEYS if state.get(k) != self._layout[k]]
        if diff:
            raise DataError(f"{where}: cannot continue the same sample order with a different "
                            + ", ".join(f"{k} (saved {state.get(k)!r}, now {self._layout[k]!r})" for k in diff))
        if not self.infinite:
            position = int(state["position"])
            stride = self._plan.dp_size * self._plan.mb
            if position % stride:
                raise DataError(f"{where}: {position} samples consumed is not a whole number of global "
                                f"batches of {stride} (dp_size x micro_batch_size); cannot continue the pass")
            self._position = position
            return
        if all(state.get(k) == self._layout[k] for k in _LAYOUT_KEYS):
            pending, next_epoch, batches = state["pending"], int(state["next_epoch"]), int(state["batches"])
        else:  # another layout: hand over what the old readers left of their epochs
            pending, next_epoch = replan(self._order, state)
            batches = 0
        self._plan.pending = [[int(x) for x in p] for p in pending]
        self._plan.next_epoch = next_epoch
        self._batches = batches
