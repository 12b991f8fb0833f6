"""What recurrent decoding carries from one token to the next (model.prefill / model.step).

One state class per token mixer (attention.py fills and advances them), the cache of a
whole model, and the positions of left-padded prompts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NormState:
    """NormAttention's state after token t: S_t = Σ_{s≤t} λ^(t-s) k_s v_sᵀ, [B, H, D, E], fp32 at
    least; the kernel's final state, and the next slice's `initial_state`."""
    kv: torch.Tensor


@dataclass
class LinearState:
    """The 1+elu baseline's state: the numerator's Σ k_s v_sᵀ [B, H, D, E] and the
    denominator's running key sum Σ k_s [B, H, D], both fp32 at least."""
    kv: torch.Tensor
    key_sum: torch.Tensor


@dataclass
class DiagState:
    """DiagAttention's current block: slot j of keys [B, H, block, D] and values [B, H, block, E]
    holds the row's token at the position ≡ j (mod block) of its current block, keys already
    LRPE-rotated (with position % block, as the layer does). A step reads only the slots up
    to its own token's, so a block starts empty whenever a position is a multiple of the
    block; the slots past it hold older tokens until they are written."""
    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class KVCache:
    """Softmax attention's keys and values so far, [B, H, length, ·] views of buffers that double
    when full (one copy per doubling, not per token); valid [B, length] marks the real tokens
    (None: no row was padded)."""
    key_buffer: torch.Tensor
    value_buffer: torch.Tensor
    valid_buffer: torch.Tensor | None
    length: int

    @classmethod
    def start(cls, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None) -> "KVCache":
        n = k.shape[2]
        cache = cls(k.new_empty(*k.shape[:2], 2 * n, k.shape[3]), v.new_empty(*v.shape[:2], 2 * n, v.shape[3]),
                    None if valid is None else valid.new_ones(valid.shape[0], 2 * n), 0)
        cache.append(k, v, valid)
        return cache

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        n, end = k.shape[2], self.length + k.shape[2]
        if end > self.key_buffer.shape[2]:
            grow = max(end, 2 * self.key_buffer.shape[2])
            self.key_buffer = torch.cat([self.keys, k.new_empty(*k.shape[:2], grow - self.length, k.shape[3])], 2)
            self.value_buffer = torch.cat([self.values,
                                           v.new_empty(*v.shape[:2], grow - self.length, v.shape[3])], 2)
            if self.valid_buffer is not None:
                self.valid_buffer = torch.cat([self.valid, self.valid_buffer.new_ones(k.shape[0],
                                                                                      grow - self.length)], 1)
        self.key_buffer[:, :, self.length:end] = k
        self.value_buffer[:, :, self.length:end] = v
        if self.valid_buffer is not None:
            self.valid_buffer[:, self.length:end] = True if valid is None else valid
        self.length = end

    @property
    def keys(self) -> torch.Tensor:
        return self.key_buffer[:, :, :self.length]

    @property
    def values(self) -> torch.Tensor:
        return self.value_buffer[:, :, :self.length]

    @property
    def valid(self) -> torch.Tensor | None:
        return None if self.valid_buffer is None else self.valid_buffer[:, :self.length]


@dataclass
class DecodeCache:
    """What decoding carries from token to token: `layers[i]` is layer i's mixer state
    (NormState, LinearState, DiagState or KVCache), `positions` [B] each row's next position."""
    layers: list
    positions: torch.Tensor


def prompt_positions(valid: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded prompts: each row's real tokens 0..len-1, its padding 0.
    valid [B, N] bool, False (padding) before True (real tokens) in every row; a ValueError
    names `valid` when it is not so."""
    if valid.dtype != torch.bool or valid.dim() != 2:
        raise ValueError(f"valid must be a bool tensor [B, N], got {valid.dtype} of shape {list(valid.shape)}")
    if not valid[:, -1].all() or (valid[:, 1:].int() < valid[:, :-1].int()).any():
        raise ValueError("valid must mark left-padded prompts: in every row its padding (False) first, "
                         "then at least one real token (True) up to the last column")
    return (valid.long().cumsum(dim=1) - 1).clamp(min=0)
