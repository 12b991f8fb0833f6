"""Dataset blending: training batches mixed from several prepared datasets by weight.

`data.blend: ["0.7 data/web", "0.3 data/books"]` trains on both datasets, as Megatron-LM's
`--data-path 0.7 web 0.3 books` and GPT-NeoX's `train-data-weights` do.

The mix. Every data-parallel rank fills each row of its micro-batches from the dataset
whose share has fallen furthest below its weight (Megatron-LM's greedy blending rule):
with counts C_d of samples taken so far by all ranks, the next row comes from the d
that maximises w_d * (sum(C) + dp) - C_d, and then C_d grows by dp. The choice depends
on the counts only, so every rank makes the same one (each rank reads its own part of
that dataset), no row ever needs a random draw, and after any n rows per rank each
dataset's count is within one row per rank of w_d * n * dp.

Each dataset is read by its own `TokenStream` (one sample per batch; its seed is
train.seed + its position in the blend), which keeps that stream's guarantees: its
epochs are read whole, in a seeded order, and resume exactly, also with another
data-parallel size or loader worker count. The blend's state is the global counts
plus each stream's state; resuming with another layout hands every stream over on
its own and continues the counts, so the mix goes on where it was. Weights and datasets
must stay as they were saved (a changed blend is refused naming what changed).

Sample keys (`TokenBatch.keys`, which seed per-sample randomness such as a masked-LM
mask) carry the dataset's position in the blend in the epoch column's high bits
(epoch + d * 2**32), so samples of two datasets never share a key; dataset 0's keys are
its own stream's.

Validation reads each dataset's validation split on its own (`blend_datasets` gives
the datasets); the training loop reports each and their token-weighted total.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator, NamedTuple

import torch

from megatron_transnormer.config.schema import ConfigError, blend_entries
from megatron_transnormer.data.manifest import DataError, DatasetInfo, load_dataset_info
from megatron_transnormer.data.stream import TokenBatch, TokenStream

STATE_VERSION = 1
KEY_SHIFT = 32  # dataset d's keys: (epoch + d << KEY_SHIFT, index)

# What every blended dataset must share with the first: the model reads them as one
# stream of samples of one vocabulary.
_SAME = ("vocab_size", "seq_len", "sample_len", "dtype", "packing", "special")


class BlendDataset(NamedTuple):
    name: str  # for metric keys: the folder's name, made unique with its position
    path: str
    weight: float  # normalised: the weights sum to 1
    info: DatasetInfo


def _tokenizer_id(info: DatasetInfo):
    t = info.manifest.get("tokenizer", {})
    return t.get("sha256") or {k: v for k, v in t.items() if k != "file"}


def _names(paths: list[str]) -> list[str]:
    base = [os.path.basename(os.path.normpath(p)) or "data" for p in paths]
    base = [os.path.splitext(b)[0] if b.endswith(".json") else b for b in base]
    return [b if base.count(b) == 1 else f"{b}_{i}" for i, b in enumerate(base)]


def blend_datasets(data_cfg) -> list[BlendDataset]:
    """data.blend's datasets with normalised weights, their manifests read and checked to
    be one vocabulary and sample shape. Raises DataError naming the entry."""
    try:
        entries = blend_entries(data_cfg.blend)
    except ConfigError as e:
        raise DataError(str(e)) from None
    if not entries:
        raise DataError("data.blend: empty")
    total = sum(w for w, _ in entries)
    out = []
    for i, ((w, path), name) in enumerate(zip(entries, _names([p for _, p in entries]))):
        try:
            info = load_dataset_info(path)
        except DataError as e:
            raise DataError(f"data.blend[{i}]: {str(e).removeprefix('data.path: ')}") from None
        if "classification" in info.manifest:
            raise DataError(f"data.blend[{i}]: {info.path} is a classification dataset; blending mixes "
                            f"token datasets (language modelling)")
        if out:
            first = out[0].info
            for key in _SAME:
                if info.manifest.get(key) != first.manifest.get(key):
                    raise DataError(f"data.blend[{i}]: {info.path} has {key} {info.manifest.get(key)!r}, but "
                                    f"data.blend[0] ({first.path}) has {first.manifest.get(key)!r}; blended "
                                    f"datasets must be prepared alike (same tokenizer, --seq-len and packing)")
            if _tokenizer_id(info) != _tokenizer_id(first):
                raise DataError(f"data.blend[{i}]: {info.path} was tokenized with another tokenizer than "
                                f"data.blend[0] ({first.path}); prepare it with --tokenizer pointing at that "
                                f"dataset's tokenizer file")
        out.append(BlendDataset(name, path, w / total, info))
    return out


def dataset_config(data_cfg, path: str):
    """The data settings for one blended dataset read on its own."""
    return dataclasses.replace(data_cfg, path=path, blend=[])


def next_dataset(counts: list[int], weights: list[float], step: int) -> int:
    """The dataset the next row comes from: the one furthest below its share once `step`
    more samples (one per data-parallel rank) are taken; ties go to the first."""
    total = sum(counts) + step
    deficits = [w * total - c for w, c in zip(weights, counts)]
    return max(range(len(deficits)), key=lambda d: (deficits[d], -d))


class BlendStream:
    """Training batches of one data-parallel rank from several datasets; the infinite
    TokenStream's interface (iterate, state_dict, load_state_dict)."""

    infinite = True

    def __init__(self, data_cfg, split: str = "train", dp_rank: int = 0, dp_size: int = 1,
                 micro_batch_size: int = 1, seed: int = 1, shuffle: bool = True, infinite: bool = True,
                 num_workers: int | None = None, verify: bool | None = None):
        if not infinite:
            raise ValueError("BlendStream mixes training batches; validate each dataset on its own")
        self.datasets = blend_datasets(data_cfg)
        self.split = split
        self.weights = [d.weight for d in self.datasets]
        self.dp_size, self.mb = dp_size, micro_batch_size
        self.streams = [TokenStream(dataset_config(data_cfg, d.path), split, dp_rank=dp_rank, dp_size=dp_size,
                                    micro_batch_size=1, seed=seed + i, shuffle=shuffle, infinite=True,
                                    num_workers=num_workers, verify=verify)
                        for i, d in enumerate(self.datasets)]
        self.info = self.datasets[0].info
        self.counts = [0] * len(self.datasets)  # samples taken from each dataset by all ranks

    def __iter__(self) -> Iterator[TokenBatch]:
        sources = [None] * len(self.streams)  # started when first drawn from
        while True:
            tokens, keys = [], []
            for _ in range(self.mb):
                d = next_dataset(self.counts, self.weights, self.dp_size)
                if sources[d] is None:
                    sources[d] = iter(self.streams[d])
                row = next(sources[d])
                self.counts[d] += self.dp_size
                tokens.append(row.tokens)
                keys.append(row.keys + torch.tensor([d << KEY_SHIFT, 0]))
            yield TokenBatch(torch.cat(tokens), torch.cat(keys))

    def state_dict(self) -> dict:
        """Plain JSON data; the same on every data-parallel rank."""
        return {"version": STATE_VERSION, "mode": "blend", "weights": list(self.weights), "counts": list(self.counts),
                "dp_size": self.dp_size, "micro_batch_size": self.mb,
                "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        where = f"data state for split {self.split!r}"
        if state.get("mode") != "blend":
            raise DataError(f"{where}: saved from a single dataset (data.path), this run blends "
                            f"{len(self.datasets)} (data.blend); resume with the data settings it was saved with")
        if state.get("version") != STATE_VERSION:
            raise DataError(f"{where}: blend state version {state.get('version')!r} is not {STATE_VERSION}")
        saved = [float(w) for w in state["weights"]]
        if len(saved) != len(self.weights) or any(abs(a - b) > 1e-12 for a, b in zip(saved, self.weights)):
            raise DataError(f"{where}: saved for a blend of {len(saved)} datasets with weights {_describe(saved)}, "
                            f"this run blends {len(self.weights)} with {_describe(self.weights)}; the mix cannot "
                            f"continue with other datasets or weights")
        for i, (stream, sub) in enumerate(zip(self.streams, state["streams"])):
            try:  # each stream checks that its dataset is the one saved (by its shards' checksums)
                stream.load_state_dict(sub)
            except DataError as e:
                raise DataError(f"data.blend[{i}] ({self.datasets[i].path}): {e}") from None
        self.counts = [int(c) for c in state["counts"]]


def _describe(weights) -> str:
    return "[" + ", ".join(f"{w:.4g}" for w in weights) + "]"
