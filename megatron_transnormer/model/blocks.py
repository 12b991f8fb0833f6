"""One layer: a token mixer and a channel mixer, each in a residual branch with dropout.

    pre-norm (the ALM):         x = x + drop(mixer(norm1(x)));  x = x + drop(mlp(norm2(x)))
    post-norm (the masked LM):  x = norm1(x + drop(mixer(x)));  x = norm2(x + drop(mlp(x)))

What a layer holds comes from its `BlockSpec` (made by spec.block_specs): the mixer named in
`model.layers`, the channel mixer of `model.mlp`, SRMSNorm (TransNormer), LayerNorm
(baselines) or batch norm (the LRA models, spec §9: also the attention-output norm, and
statistics over the real tokens only, so the block hands the norms the padding mask).

Dropout draws from torch's default generator. The hidden states are replicated over the
TP group, so every rank of a TP group must be seeded alike to drop the same units; under
sequence parallelism each TP rank holds other tokens and draws its own mask
(`parallel.sequence.dropout`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..parallel import sequence
from .attention import MIXERS
from .mlp import build_mlp
from .norms import MaskedBatchNorm, build_norm


@dataclass(frozen=True)
class BlockSpec:
    """One layer: its token mixer (model.layers), channel mixer, norm and where the norm sits."""

    index: int
    mixer: str  # diag | norm | softmax | linear
    mlp: str  # glu | relu | gelu
    norm: str  # srms | layernorm | batch
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
        mixer_cfg = cfg
        if spec.mixer == "diag" and cfg.local_heads and cfg.local_heads != cfg.num_heads:
            mixer_cfg = dataclasses.replace(cfg, num_heads=cfg.local_heads)  # model.local_heads
        self.mixer = MIXERS[spec.mixer](mixer_cfg, spec.index)
        self.mlp = build_mlp(spec.mlp, cfg.hidden_size, cfg.ffn_hidden_size)
        if spec.norm == "batch" and getattr(self.mixer, "norm", None) is not None:
            # The attention output is normalised by the block's kind of norm too (spec §9);
            # the mixer calls it without the padding mask, which _forward binds to it.
            self.mixer.norm = build_norm(spec.norm, cfg.hidden_size, cfg.kernels)
        self.masked_norms = [m for m in self.modules() if isinstance(m, MaskedBatchNorm)]

    def _norm(self, norm: nn.Module, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        return norm(x, valid) if isinstance(norm, MaskedBatchNorm) else norm(x)

    def _layer(self, x: torch.Tensor, mix, valid: torch.Tensor | None = None):
        """The layer around a token mixer `mix(h) -> (output, extra)`; returns (x, extra): the
        extra is the mixer's recurrent state when decoding starts (prefill), else None."""
        drop = lambda t: sequence.dropout(t, self.dropout, self.training)  # noqa: E731
        norm1 = lambda t: self._norm(self.norm1, t, valid)  # noqa: E731
        norm2 = lambda t: self._norm(self.norm2, t, valid)  # noqa: E731
        if self.post_norm:
            out, extra = mix(x)
            x = norm1(x + drop(out))
            return norm2(x + drop(self.mlp(x))), extra
        out, extra = mix(norm1(x))
        x = x + drop(out)
        return x + drop(self.mlp(norm2(x))), extra

    def _forward(self, x: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        for norm in self.masked_norms:
            norm.valid = valid
        return self._layer(x, lambda h: (self.mixer(h, positions, valid), None), valid)[0]

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

