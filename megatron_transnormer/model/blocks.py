"""One layer: a token mixer and a channel mixer, each in a residual branch with dropout.

    pre-norm (the ALM):         x = x + drop(mixer(norm1(x)));  x = x + drop(mlp(norm2(x)))
    post-norm (the masked LM):  x = norm1(x + drop(mixer(x)));  x = norm2(x + drop(mlp(x)))

What a layer holds comes from its `BlockSpec` (made by spec.block_specs): the mixer named in
`model.layers`, the channel mixer of `model.mlp`, SRMSNorm (TransNormer) or LayerNorm
(baselines).

Dropout draws from torch's default generator. The hidden states are replicated over the
TP group, so every rank of a TP group must be seeded alike to drop the same units.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import MIXERS
from .mlp import build_mlp
from .norms import build_norm


@dataclass(frozen=True)
class BlockSpec:
    """One layer: its token mixer (model.layers), channel mixer, norm and where the norm sits."""

    index: int
    mixer: str  # diag | norm | softmax | linear
    mlp: str  # glu | relu | gelu
    norm: str  # srms | layernorm
    post_norm: bool


class Block(nn.Module):
    def __init__(self, cfg, spec: BlockSpec):
        super().__init__()
        self.layer_index = spec.index
        self.post_norm = spec.post_norm
        self.dropout = cfg.dropout
        self.activation_checkpointing = False
        self.norm1 = build_norm(spec.norm, cfg.hidden_size, cfg.kernels)
        self.norm2 = build_norm(spec.norm, cfg.hidden_size, cfg.kernels)
        self.mixer = MIXERS[spec.mixer](cfg, spec.index)
        self.mlp = build_mlp(spec.mlp, cfg.hidden_size, cfg.ffn_hidden_size)

    def _layer(self, x: torch.Tensor, mix):
        """The layer around a token mixer `mix(h) -> (output, extra)`; returns (x, extra): the
        extra is the mixer's recurrent state when decoding starts (prefill), else None."""
        drop = lambda t: F.dropout(t, self.dropout, self.training)  # noqa: E731
        if self.post_norm:
            out, extra = mix(x)
            x = self.norm1(x + drop(out))
            return self.norm2(x + drop(self.mlp(x))), extra
        out, extra = mix(self.norm1(x))
        x = x + drop(out)
        return x + drop(self.mlp(self.norm2(x))), extra

    def _forward(self, x: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        return self._layer(x, lambda h: (self.mixer(h, positions, valid), None))[0]

    def prefill(self, x: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None):
        """forward over a (left-padded) prompt -> (output, the mixer's state after it; decoding.py)."""
        return self._layer(x, lambda h: self.mixer.prefill(h, positions, valid))

    def step(self, x: torch.Tensor, positions: torch.Tensor, state) -> torch.Tensor:
        """One token per row ([B, 1, d]); the mixer's state is updated in place."""
        return self._layer(x, lambda h: (self.mixer.step(h, positions, state), None))[0]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            # Recompute in backward; the RNG state is replayed, so dropout masks match.
            return checkpoint(self._forward, x, positions, valid, use_reentrant=False)
        return self._forward(x, positions, valid)

