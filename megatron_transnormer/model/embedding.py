"""Token embedding (vocab-parallel), fixed sinusoidal positions, and the tied LM head."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import VocabParallelEmbedding, vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from torch import nn

from ..parallel.tensor_parallel import declare_init, tp_group, tp_size
from .init import normal
from .megatron_config import megatron_config, unused_init


def sinusoidal_positions(num_positions: int, dim: int, device=None) -> torch.Tensor:
    """fairseq's sinusoidal table [num_positions, dim]: sin in the first half, cos in the second,
    frequencies 10000^(-i/(dim/2 - 1)); an odd dim gets a zero last column. Positions start at 0."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=device) * -(math.log(10000.0) / (half - 1)))
    angle = torch.arange(num_positions, dtype=torch.float32, device=device).unsqueeze(1) * freq.unsqueeze(0)
    table = torch.cat([angle.sin(), angle.cos()], dim=1)
    if dim % 2:
        table = F.pad(table, (0, 1))
    return table


class Embedding(nn.Module):
    """x = dropout(√d · E[token] + sinusoid[position]); E ~ N(0, d^-1/2), padding row zero.

    E's rows (the vocabulary) are split over TP; the same E is the output projection.
    """

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        if cfg.vocab_size % tp_size():
            raise ValueError(f"model.vocab_size={cfg.vocab_size} is not divisible by the tensor-parallel "
                             f"size {tp_size()}; pad the vocabulary to a multiple of it")
        self.word = VocabParallelEmbedding(cfg.vocab_size, d, init_method=unused_init,
                                           config=megatron_config(), tp_group=tp_group())
        pad = cfg.pad_id if cfg.pad_id >= 0 else None
        declare_init(self.word.weight, normal(d ** -0.5, zero_row=pad), partition_dim=0)
        self.scale = math.sqrt(d)
        self.dropout = cfg.dropout

    @property
    def weight(self) -> torch.Tensor:
        """This rank's shard of E, [vocab/tp, d]; what `lm_head` ties to."""
        return self.word.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.word(input_ids) * self.scale
        x = x + sinusoidal_positions(input_ids.shape[1], x.shape[-1], x.device).to(x.dtype)
        return F.dropout(x, self.dropout, self.training)


def lm_head(hidden: torch.Tensor, embedding_weight: torch.Tensor, labels: torch.Tensor | None = None):
    """Tied output projection: hidden [B, N, d] @ Eᵀ -> vocab-parallel logits [B, N, vocab/tp].

    With labels [B, N]: the per-token cross-entropy [B, N] in fp32 instead (labels < 0 give 0,
    so callers can mask positions). The logits are never gathered over TP.
    """
    if tp_size() > 1:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group())  # backward: sum dgrad
    logits = F.linear(hidden, embedding_weight)
    if labels is None:
        return logits
    valid = labels >= 0
    loss = vocab_parallel_cross_entropy(logits.float(), labels.clamp(min=0))
    return torch.where(valid, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
