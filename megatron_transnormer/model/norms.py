"""SimpleRMSNorm (spec §2), the baselines' LayerNorm, and the LRA models' batch norm (spec §9)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from megatron.core import parallel_state
from torch import nn

import transnormer_kernels as kernels
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


def _dp_group():
    """The group whose ranks hold the other samples of the global batch, or None (one process)."""
    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        return None
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return group if dist.get_world_size(group) > 1 else None


def _global_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Σ over the data-parallel ranks, differentiable: the backward sums every rank's gradient
    of the statistics, which is what makes the gradient that of the global-batch loss (as
    torch.nn.SyncBatchNorm's backward does)."""
    return t if group is None else dist_fn.all_reduce(t, group=group)


class MaskedBatchNorm(nn.Module):
    """Batch norm over the hidden features of the real tokens of the global batch:

        y = (x - μ) / sqrt(σ² + eps) · γ + β,   μ, σ² (biased) over every real token of every
        data-parallel rank's samples; padding positions are normalised but never counted.

    torch.nn.SyncBatchNorm's semantics over the data-parallel group with a padding mask. In
    training the running statistics move by `momentum` towards (μ, unbiased σ²), the same
    on every rank; in evaluation they replace the batch's. Statistics in fp32 at least, two
    passes (the mean first) for accuracy.

    `valid` [..., N] (True at real tokens) is forward's argument; where a caller does not
    pass one (an attention layer's output norm), the block that owns it sets `self.valid`
    before the layer runs.
    """

    def __init__(self, d: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.empty(d))
        self.bias = nn.Parameter(torch.empty(d))
        declare_init(self.weight, constant(1.0))
        declare_init(self.bias, constant(0.0))
        self.register_buffer("running_mean", torch.zeros(d))
        self.register_buffer("running_var", torch.ones(d))
        self.valid: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        h = x.to(acc)
        if self.training:
            valid = self.valid if valid is None else valid
            weight = (torch.ones(h.shape[:-1], dtype=acc, device=h.device) if valid is None
                      else valid.to(acc).expand(h.shape[:-1])).unsqueeze(-1)  # [..., 1]
            group = _dp_group()
            count = _global_sum(weight.sum().reshape(1), group).clamp(min=1.0)
            mean = _global_sum((h * weight).reshape(-1, h.shape[-1]).sum(0), group) / count
            centred = h - mean
            var = _global_sum((centred.square() * weight).reshape(-1, h.shape[-1]).sum(0), group) / count
            with torch.no_grad():
                n = float(count)
                unbiased = var * (n / max(n - 1.0, 1.0))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        else:
            centred = h - self.running_mean.to(acc)
            var = self.running_var.to(acc)
        y = centred * torch.rsqrt(var + self.eps) * self.weight.to(acc) + self.bias.to(acc)
        return y.to(x.dtype)


def norm_kind(cfg) -> str:
    """model.norm, else the family's: TransNormer uses SimpleRMSNorm everywhere; the baselines
    LayerNorm (fairseq's)."""
    if cfg.norm:
        return cfg.norm
    return "srms" if cfg.arch == "transnormer" else "layernorm"


def head_holds_final_norm(cfg) -> bool:
    """A batch norm needs the padding mask, which the head receives and the final-norm part
    does not: a pre-norm model with batch norm has its final norm inside the head."""
    return cfg.norm_position == "pre" and norm_kind(cfg) == "batch"


def build_norm(kind: str, d: int, backend: str = "auto") -> nn.Module:
    """The norm of the blocks and the final norm. kind: srms (TransNormer) | layernorm (the
    baselines) | batch (the LRA models; takes the padding mask, see MaskedBatchNorm)."""
    if kind == "batch":
        return MaskedBatchNorm(d)
    return SimpleRMSNorm(backend=backend) if kind == "srms" else layer_norm(d, region=True)
