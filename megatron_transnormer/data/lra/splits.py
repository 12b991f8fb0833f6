"""Seeded splits, drawn as the S4-derived LRA code draws them, so that a validation or
test split holds the same samples as in the reference runs.

That code splits with `torch.utils.data.random_split(dataset, lengths,
generator=torch.Generator().manual_seed(42))`: one `torch.randperm` of the samples, cut
into consecutive pieces. `random_split` below calls exactly that; the manifest keeps a
digest of each piece's indices (`indices_digest`), so a split drawn by another torch
build can be compared with this one.
"""
from __future__ import annotations

import hashlib

import numpy as np

LRA_SPLIT_SEED = 42


def random_split(n: int, lengths: list[int], seed: int) -> list[np.ndarray]:
    """Indices of each piece, in the order the permutation gives them."""
    import torch  # only to draw the permutation torch's random_split draws
    from torch.utils.data import random_split as torch_random_split
    if sum(lengths) != n:
        raise ValueError(f"split lengths {lengths} do not add up to {n} samples")
    pieces = torch_random_split(range(n), lengths, generator=torch.Generator().manual_seed(seed))
    return [np.asarray(p.indices, dtype=np.int64) for p in pieces]


def holdout_lengths(n: int, fractions: tuple[float, ...]) -> list[int]:
    """[train, held-out...] lengths as the reference code computes them: each held-out
    piece int(fraction * n), train the rest."""
    held = [int(f * n) for f in fractions]
    return [n - sum(held)] + held


def indices_digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def seeded_order(n: int, seed: int) -> np.ndarray:
    """A permutation for writing a split in a mixed order (numpy PCG64: the same on every build)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, n]))).permutation(n)
