"""Sequence parallelism (megatron's, Korthikanti et al. 2022) on the model's [B, N, d] layout.

Under tensor parallelism alone, every TP rank holds the whole hidden state between the
attention and MLP regions: the norms, dropout and residual adds repeat the same work on the
same [B, N, d] tensor on every rank. With sequence parallelism each TP rank keeps only its
slice of the sequence there, [B, N/tp, d], and the collectives at the region boundaries
change from all-reduce to all-gather/reduce-scatter (the same bytes on the wire):

    embedding --scatter--> [B, N/tp, d]  norm, residual, dropout (sequence-parallel region)
        column linear: all-gather the sequence, then the local heads / FFN columns
        row linear: partial sums, reduce-scatter back to this rank's slice
    head <--gather-- [B, N/tp, d]

The column linear keeps only its local slice for the backward and gathers it again there
(megatron-core's memory contract). Parameters used inside the sequence-parallel region on
every rank (norm weights, the row linears' bias) see only this rank's tokens, so their
gradients are summed over the TP group (`shared_param`), as megatron's finalize_model_grads
does for parameters marked `sequence_parallel`.

megatron-core's own sequence-parallel path works on sequence-first [N, B, d] tensors and
allocates on CUDA unconditionally; these few collectives on dim 1 serve the batch-first
model on CPU (gloo) and GPU alike. Off (the default) or at TP size 1, every function here
is the identity and the linears are megatron's.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .tensor_parallel import replicated_param, tp_group, tp_rank, tp_size

_enabled = False


def set_sequence_parallel(on: bool) -> None:
    """Called by `init_distributed(sequence=...)`; the model reads it when it runs."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled and tp_size() > 1


def _gather(x: torch.Tensor) -> torch.Tensor:
    """[B, L, ...] slices of every TP rank -> [B, tp·L, ...], in rank order."""
    seq_first = x.transpose(0, 1).contiguous()
    out = seq_first.new_empty((seq_first.shape[0] * tp_size(), *seq_first.shape[1:]))
    dist.all_gather_into_tensor(out, seq_first, group=tp_group())
    return out.transpose(0, 1)


def _reduce_scatter(x: torch.Tensor) -> torch.Tensor:
    """[B, N, ...] partial sums on every TP rank -> this rank's slice of their sum, [B, N/tp, ...]."""
    seq_first = x.transpose(0, 1).contiguous()
    if seq_first.shape[0] % tp_size():
        raise ValueError(f"a sequence of {seq_first.shape[0]} tokens cannot be split over "
                         f"{tp_size()} tensor-parallel ranks (sequence parallelism)")
    out = seq_first.new_empty((seq_first.shape[0] // tp_size(), *seq_first.shape[1:]))
    dist.reduce_scatter_tensor(out, seq_first, group=tp_group())
    return out.transpose(0, 1)


def _slice(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[1]
    if n % tp_size():
        raise ValueError(f"a sequence of {n} tokens cannot be split over {tp_size()} tensor-parallel ranks "
                         f"(sequence parallelism)")
    length = n // tp_size()
    return x[:, tp_rank() * length:(tp_rank() + 1) * length].contiguous()


class _Scatter(torch.autograd.Function):
    """Forward: this rank's slice. Backward: all-gather (every slice's gradient is needed)."""

    @staticmethod
    def forward(ctx, x):
        return _slice(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad)


class _Gather(torch.autograd.Function):
    """Forward: all-gather. Backward: reduce-scatter when every rank's gradient is a partial
    sum (the vocabulary-parallel heads), else this rank's slice (replicated consumers)."""

    @staticmethod
    def forward(ctx, x, partial_grads: bool):
        ctx.partial_grads = partial_grads
        return _gather(x)

    @staticmethod
    def backward(ctx, grad):
        return (_reduce_scatter(grad) if ctx.partial_grads else _slice(grad)), None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad)


class _GatheredLinear(torch.autograd.Function):
    """F.linear(all-gather(x), W, b) keeping only the local x: the backward gathers it again
    for W's gradient and reduce-scatters x's (partial over the column shards)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(_gather(x), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        full = _gather(x)
        grad_x = _reduce_scatter(grad @ weight.to(grad.dtype))
        grad_w = grad.flatten(0, -2).t() @ full.flatten(0, -2).to(grad.dtype)
        grad_b = grad.flatten(0, -2).sum(dim=0) if ctx.has_bias else None
        return grad_x, grad_w.to(weight.dtype), (None if grad_b is None else grad_b.to(weight.dtype))


def scatter(x: torch.Tensor) -> torch.Tensor:
    """Enter the sequence-parallel region: [B, N, d] replicated -> [B, N/tp, d]."""
    return _Scatter.apply(x) if enabled() else x


def gather(x: torch.Tensor, partial_grads: bool) -> torch.Tensor:
    """Leave it: [B, N/tp, d] -> [B, N, d]. partial_grads: whether each rank's consumer
    produces only a part of the gradient (a vocabulary shard's logits) or all of it."""
    return _Gather.apply(x, partial_grads) if enabled() else x


def column_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A column-parallel linear fed from the sequence-parallel region: [B, N/tp, d] -> [B, N, out/tp]."""
    return _GatheredLinear.apply(x, weight, bias)


def row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A row-parallel linear returning into the region: [B, N, in/tp] -> [B, N/tp, out], the
    replicated bias added after the reduction."""
    out = _ReduceScatter.apply(F.linear(x, weight))
    return out if bias is None else out + shared_param(bias)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout of the hidden states between the TP regions. Under sequence parallelism each
    TP rank holds other tokens, so each draws its own mask, from a generator seeded by one
    number drawn from the default generator (the same draw on every TP rank, so their
    default streams stay in step, and activation checkpointing's RNG replay redraws it)
    plus the TP rank, as megatron forks a per-rank generator there. Otherwise F.dropout."""
    if not (enabled() and training and p > 0):
        return F.dropout(x, p, training)
    seed = int(torch.randint(0, 2**62, (1,), device=x.device).item())
    generator = torch.Generator(device=x.device).manual_seed(seed + tp_rank())
    keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator)
    return x * keep / (1.0 - p)


def shared_param(param: torch.Tensor) -> torch.Tensor:
    """A TP-replicated parameter used inside the sequence-parallel region: identity forward,
    gradient summed over the TP group (each rank saw only its tokens)."""
    return replicated_param(param) if enabled() else param
