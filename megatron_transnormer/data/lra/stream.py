"""The training loop's stream of LRA batches: `LRASplit` epochs, with a position to resume from.

    stream = LRAStream(data_cfg, split="train", dp_rank=r, dp_size=n, micro_batch_size=b, seed=s,
                       shuffle=True, infinite=True)
    for batch in stream: ...                 # LRABatch; epoch after epoch when infinite
    state = stream.state_dict()              # JSON: (epoch, batches taken in it) and the layout
    stream.load_state_dict(state)            # the next iteration continues from there

It has the token stream's interface (`data/stream.py`), so the loop keeps one code path:
training shuffles with drop_last (every rank the same number of batches, each epoch in
another order), evaluation passes over every sample once (filler rows labelled -100, see
reader.py). A batch is counted when the consumer takes it, so a checkpoint written between
two updates records exactly the batches trained on; `LRASplit.batches(epoch, start)`
resumes from that count without reading the skipped samples' labels again.
"""
from __future__ import annotations

from typing import Iterator

from megatron_transnormer.data.manifest import DataError
from megatron_transnormer.data.lra.reader import LRABatch, LRASplit

STATE_VERSION = 1
_ORDER_KEYS = ("split", "seed", "shuffle", "dp_size", "micro_batch_size")


class LRAStream:
    def __init__(self, data_cfg, split: str = "train", dp_rank: int = 0, dp_size: int = 1,
                 micro_batch_size: int = 1, seed: int = 1, shuffle: bool = True, infinite: bool = True):
        self.split, self.infinite = split, infinite
        self.reader = LRASplit(data_cfg.path, split, micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed,
                               shuffle=shuffle, drop_last=infinite, verify=getattr(data_cfg, "verify", True))
        self.info = self.reader.info
        shards = self.info.dataset.split(self.info.resolve_split(split))["shards"]
        self._fingerprint = "".join(s["sha256"][:8] for s in shards)[:64]
        self._layout = {"split": split, "seed": seed, "shuffle": bool(shuffle), "dp_size": dp_size,
                        "micro_batch_size": micro_batch_size}
        self.epoch = 0  # infinite: the epoch being read
        self.batch = 0  # batches of it taken

    def num_batches(self) -> int:
        """Batches per rank in one pass."""
        return self.reader.num_batches

    def __iter__(self) -> Iterator[LRABatch]:
        while True:
            for batch in self.reader.batches(self.epoch, self.batch):
                self.batch += 1  # counted when taken (see the module docstring)
                yield batch
            self.batch = 0
            if not self.infinite:
                return  # the next pass starts from the beginning
            self.epoch += 1

    def state_dict(self) -> dict:
        """Plain JSON data; the same on every data-parallel rank."""
        return {"version": STATE_VERSION, "kind": "lra", "dataset": self._fingerprint, "epoch": self.epoch,
                "batch": self.batch, **self._layout}

    def load_state_dict(self, state: dict) -> None:
        where = f"data state for split {self.split!r}"
        if state.get("kind") != "lra" or state.get("version") != STATE_VERSION:
            raise DataError(f"{where}: not an LRA stream's state (version {STATE_VERSION}); the checkpoint was "
                            f"written by a run on other data")
        if state.get("dataset") != self._fingerprint:
            raise DataError(f"{where}: saved for other shards; data.path changed or {self.info.path} was "
                            f"re-prepared")
        diff = [k for k in _ORDER_KEYS if state.get(k) != self._layout[k]]
        if diff:
            raise DataError(f"{where}: cannot continue the same sample order with a different "
                            + ", ".join(f"{k} (saved {state.get(k)!r}, now {self._layout[k]!r})" for k in diff))
        batch = int(state["batch"])
        if not 0 <= batch <= self.reader.num_batches:
            raise DataError(f"{where}: batch {batch} is outside the epoch's {self.reader.num_batches}")
        self.epoch, self.batch = int(state["epoch"]), batch
