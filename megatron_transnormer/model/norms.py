"""SimpleRMSNorm (spec §2) and the baselines' LayerNorm."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from ..parallel import sequence
from ..parallel.tensor_parallel import declare_init, sum_of_squares, tp_size
from .init import constant

EPS = 1e-8


class SimpleRMSNorm(nn.Module):
    """srms(x) = x / (‖x‖₂ · d^(-1/2) + 1e-8) over the last dimension; no parameters.

    sharded=True: x holds this rank's slice of the width (heads split over TP); the norm
    is taken over the FULL width, so the per-token sum of squares is all-reduced
    (forward and backward) over the TP group. Computed in fp32 at least.
    """

    def __init__(self, sharded: bool = False, backend: str = "auto"):
        super().__init__()
        self.sharded = sharded
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        if self.sharded and tp_size() > 1:
            ss = sum_of_squares(x)
            d = x.shape[-1] * tp_size()
            # clamp: sqrt'(0) is infinite; an all-zero row (T1 ReLU attention can give one) maps to 0.
            norm = ss.clamp_min(torch.finfo(acc).tiny).sqrt()
            return (x.to(acc) / (norm * d ** -0.5 + EPS)).to(x.dtype)
        # Both backends accumulate in fp32 themselves: no fp32 copy of x here.
        return kernels.simple_rms_norm(x, eps=EPS, backend=self.backend)


class RegionLayerNorm(nn.LayerNorm):
    """A LayerNorm between the attention and MLP regions (blocks, final norm): under
    sequence parallelism it sees only this rank's tokens, so its gradients are summed
    over the TP group (parallel/sequence.py); otherwise nn.LayerNorm exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, sequence.shared_param(self.weight),
                            sequence.shared_param(self.bias), self.eps)


def layer_norm(d: int, region: bool = False) -> nn.LayerNorm:
    """fairseq's LayerNorm (eps 1e-5, weight 1, bias 0), replicated over TP. region: it
    normalises the hidden states between the TP regions (`RegionLayerNorm`)."""
    norm = (RegionLayerNorm if region else nn.LayerNorm)(d, eps=1e-5)
    declare_init(norm.weight, constant(1.0))
    declare_init(norm.bias, constant(0.0))
    return norm


def build_norm(kind: str, d: int, backend: str = "auto") -> nn.Module:
    """The norm of the blocks and the final norm. kind: srms (TransNormer) | layernorm (the baselines)."""
    return SimpleRMSNorm(backend=backend) if kind == "srms" else layer_norm(d, region=True)
