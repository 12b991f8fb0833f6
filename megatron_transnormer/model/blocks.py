"""One layer: pre-norm token mixer and channel mixer with residual dropout.

    x = x + drop(mixer(norm1(x)));  x = x + drop(mlp(norm2(x)))

TransNormer: SRMSNorm, DiagAttention in the first L/2 layers and NormAttention in the
rest, SiLU GLU. Baselines (fairseq transformer_lm, pre-norm): LayerNorm, softmax or
1+elu attention, ReLU FFN.

Dropout draws from torch's default generator. The hidden states are replicated over the
TP group, so every rank of a TP group must be seeded alike to drop the same units.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..parallel.tensor_parallel import initialize_parameters
from .attention import DiagAttention, LinearEluAttention, NormAttention, SoftmaxAttention
from .mlp import FFN, GLU
from .norms import SimpleRMSNorm, layer_norm


class Block(nn.Module):
    def __init__(self, cfg, layer_index: int):
        super().__init__()
        d = cfg.hidden_size
        self.layer_index = layer_index
        self.dropout = cfg.dropout
        self.activation_checkpointing = False
        if cfg.arch == "transnormer":
            mixer = DiagAttention if layer_index < cfg.num_layers // 2 else NormAttention
            self.norm1, self.norm2 = SimpleRMSNorm(backend=cfg.kernels), SimpleRMSNorm(backend=cfg.kernels)
            self.mixer = mixer(cfg, layer_index)
            self.mlp = GLU(d, cfg.ffn_hidden_size)
        else:
            mixer = SoftmaxAttention if cfg.arch == "vanilla" else LinearEluAttention
            self.norm1, self.norm2 = layer_norm(d), layer_norm(d)
            self.mixer = mixer(cfg, layer_index)
            self.mlp = FFN(d, cfg.ffn_hidden_size)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + F.dropout(self.mixer(self.norm1(x)), self.dropout, self.training)
        return x + F.dropout(self.mlp(self.norm2(x)), self.dropout, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            # Recompute in backward; the RNG state is replayed, so dropout masks match.
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


def build_block(cfg, layer_index: int, seed: int) -> Block:
    """Layer `layer_index`, initialised exactly as inside the full model (canonical name layers.<i>.)."""
    if not 0 <= layer_index < cfg.num_layers:
        raise ValueError(f"layer_index {layer_index} outside model.num_layers={cfg.num_layers}")
    block = Block(cfg, layer_index)
    initialize_parameters(block, seed, prefix=f"layers.{layer_index}.")
    return block
