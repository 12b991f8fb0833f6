"""Token embedding (vocab-parallel) plus absolute positions, as the ALM and the masked LM use them.

    ALM (spec §7):        x = dropout(√d · E[token] + sinusoid(position))
    masked LM (spec §8):  x = dropout(LayerNorm(E[token] + P[position]))   P learned

E's rows (the vocabulary) are split over TP; the same E is the output projection of the
LM heads (heads.py). Positions are an input, so a slice of a longer sequence or one
decoding step embeds its own offsets.

Pixel inputs (`model.input=pixels`, the LRA image tasks, spec §9): the ids are intensities
0-255, each embedded as one real feature through a linear encoder (replicated over TP):

    x = dropout(W ((id / 255 - pixel_mean) / pixel_std) + b  [+ positions])
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import VocabParallelEmbedding
from torch import nn

from ..parallel import sequence
from ..parallel.tensor_parallel import declare_init, tp_group, tp_size
from .heads import replicated_linear
from .init import normal
from .megatron_config import megatron_config, unused_init
from .norms import layer_norm


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """fairseq's sinusoidal embedding of integer positions [..., N] -> [..., N, dim] (fp32):
    sin in the first half, cos in the second, frequencies 10000^(-i/(dim/2 - 1)); an odd
    dim gets a zero last column."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=positions.device)
                     * -(math.log(10000.0) / (half - 1)))
    angle = positions.to(torch.float32).unsqueeze(-1) * freq
    table = torch.cat([angle.sin(), angle.cos()], dim=-1)
    return F.pad(table, (0, 1)) if dim % 2 else table


def _word_table(cfg) -> VocabParallelEmbedding:
    """The vocabulary table E, rows split over TP: N(0, d^-1/2), padding row zero (BERT init: N(0, 0.02))."""
    if cfg.vocab_size % tp_size():
        raise ValueError(f"model.vocab_size={cfg.vocab_size} is not divisible by the tensor-parallel "
                         f"size {tp_size()}; pad the vocabulary to a multiple of it")
    word = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, init_method=unused_init,
                                  config=megatron_config(), tp_group=tp_group())
    pad = cfg.pad_id if cfg.pad_id >= 0 else None
    declare_init(word.weight, normal(cfg.hidden_size ** -0.5, zero_row=pad), partition_dim=0)
    return word


class WordTable(nn.Module):
    """E alone, for a pipeline stage that needs the tied output projection but not the
    embedding; its parameter has the embedding's canonical name (embedding.word.weight)."""

    def __init__(self, cfg):
        super().__init__()
        self.word = _word_table(cfg)

    @property
    def weight(self) -> torch.Tensor:
        return self.word.weight


class Embedding(nn.Module):
    """forward(input_ids [B, N], positions [B or 1, N]) -> [B, N, d]; see the module docstring."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.pixels = cfg.input == "pixels"
        if self.pixels:
            self.encoder = replicated_linear(1, d)
            self.pixel_mean, self.pixel_std = cfg.pixel_mean, cfg.pixel_std
        else:
            self.word = _word_table(cfg)
        self.scale = math.sqrt(d) if cfg.embedding_scale else None
        self.kind = cfg.positions
        self.position_table = None
        if cfg.positions == "learned":  # replicated over TP, like the hidden states it adds to
            self.position_table = nn.Embedding(cfg.max_positions, d)
            declare_init(self.position_table.weight, normal(d ** -0.5))
        self.norm = layer_norm(d) if cfg.embedding_norm else None
        self.dropout = cfg.dropout

    @property
    def weight(self) -> torch.Tensor | None:
        """This rank's shard of E, [vocab/tp, d]; what the LM heads tie to (None for pixels)."""
        return None if self.pixels else self.word.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.pixels:
            feature = (input_ids.unsqueeze(-1).to(self.encoder.weight.dtype) / 255.0 - self.pixel_mean) / self.pixel_std
            x = self.encoder(feature)
        else:
            x = self.word(input_ids)
        if self.scale is not None:
            x = x * self.scale
        if self.kind == "sinusoidal":
            x = x + sinusoidal(positions, x.shape[-1]).to(x.dtype)
        elif self.kind == "learned":
            x = x + self.position_table(positions).to(x.dtype)
        if self.norm is not None:
            x = self.norm(x)
        # Under sequence parallelism the blocks take this rank's slice of the tokens.
        return sequence.dropout(sequence.scatter(x), self.dropout, self.training)
