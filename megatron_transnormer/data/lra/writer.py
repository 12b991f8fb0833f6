"""Writing a prepared LRA dataset: shards of token rows, a label array beside each shard,
and the manifest.

The shards are the project's (`shards.write_shard`): a tar of `.tokens` members, one
fixed-length row of little-endian ids per sample, so the loader's reading and ordering
(`order.py`) apply unchanged. The label of sample i of `train-00003.tar` is element i of
`train-00003.label`, a raw little-endian `uint16` array (no header) whose name and sha256
the manifest keeps in the shard's entry. A Retrieval row is its two documents one after
the other, each `max_length` ids.

The manifest is the token-dataset manifest (`manifest.py`: same format and version, it
loads with `load_dataset_info`) plus a `classification` section that says how to read
the rows; `info.py` checks it.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from megatron_transnormer.data.manifest import FORMAT, VERSION, DataError, write_manifest
from megatron_transnormer.data.shards import write_shard

TOKEN_DTYPE = "uint16"  # ids < 65536: every LRA vocabulary, and 8-bit pixels
LABEL_DTYPE = "uint16"
LABEL_EXT = "label"
# `manifest.py` knows two packings; "mlm" is the one whose samples are single padded
# sequences of seq_len ids, which a classification row is. Training tells the two apart by
# the `classification` section.
PACKING = "mlm"
DEFAULT_SHARD_SAMPLES = 512


def _write_labels(path: str, labels: np.ndarray) -> dict:
    data = np.ascontiguousarray(labels, dtype=np.dtype(LABEL_DTYPE).newbyteorder("<")).tobytes()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return {"name": os.path.basename(path), "sha256": hashlib.sha256(data).hexdigest()}


class SplitWriter:
    """Rows and labels of one split, written a shard at a time (memory: one shard)."""

    def __init__(self, output: str, split: str, row_length: int, num_classes: int, pad_id: int,
                 shard_samples: int = DEFAULT_SHARD_SAMPLES):
        if shard_samples < 1:
            raise DataError(f"--shard-samples {shard_samples}: must be >= 1")
        self.output, self.split, self.pad_id, self.num_classes = output, split, pad_id, num_classes
        self.rows = np.zeros((shard_samples, row_length), dtype=np.dtype(TOKEN_DTYPE))
        self.labels = np.zeros(shard_samples, dtype=np.int64)
        self.fill = 0
        self.shards: list[dict] = []
        self.class_counts = [0] * num_classes
        self.truncated = 0
        self.tokens = 0

    def next_row(self) -> np.ndarray:
        """The row the next sample is written into (call `add` after filling it)."""
        return self.rows[self.fill]

    def add(self, label: int, truncated: bool = False) -> None:
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} outside 0..{self.num_classes - 1}")
        self.labels[self.fill] = label
        self.class_counts[label] += 1
        self.truncated += bool(truncated)
        self.fill += 1
        if self.fill == len(self.rows):
            self._flush()

    def _flush(self) -> None:
        if not self.fill:
            return
        rows = self.rows[:self.fill]
        key = f"{self.split}-{len(self.shards):05d}"
        entry = write_shard(os.path.join(self.output, f"{key}.tar"), rows, key, TOKEN_DTYPE)
        entry["tokens"] = int(rows.size if self.pad_id < 0 else (rows != self.pad_id).sum())
        entry["labels"] = _write_labels(os.path.join(self.output, f"{key}.{LABEL_EXT}"), self.labels[:self.fill])
        self.tokens += entry["tokens"]
        self.shards.append(entry)
        self.fill = 0

    def close(self, **extra) -> dict:
        """The split's manifest entry; `extra` adds keys (its source, how it was drawn)."""
        self._flush()
        samples = sum(s["samples"] for s in self.shards)
        if not samples:
            raise DataError(f"split {self.split}: no samples")
        return {"shards": self.shards, "samples": samples, "tokens": self.tokens, "words": 0,
                "class_counts": self.class_counts, "truncated": self.truncated, **extra}


def write_lra_manifest(output: str, *, task: str, tokenizer: dict, vocab_size: int, max_length: int,
                       inputs: int, num_classes: int, special: dict, splits: dict, classification: dict) -> dict:
    manifest = {
        "format": FORMAT, "version": VERSION, "source": f"lra-{task}", "tokenizer": tokenizer,
        "vocab_size": vocab_size, "dtype": TOKEN_DTYPE, "byte_order": "little", "seq_len": max_length,
        "sample_len": inputs * max_length, "packing": PACKING,
        "special": {"pad_id": -1, "eod_id": -1, "bos_id": -1, "unk_id": -1, "mask_id": -1, **special},
        "splits": splits,
        "classification": {"task": task, "num_classes": num_classes, "max_length": max_length, "inputs": inputs,
                           "label_dtype": LABEL_DTYPE, "label_ext": LABEL_EXT, **classification},
    }
    write_manifest(output, manifest)
    return manifest
