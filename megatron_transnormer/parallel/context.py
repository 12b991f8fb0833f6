"""Context parallelism: each rank of a context-parallel (CP) group holds one contiguous slice
of every sequence, and the token mixers exchange only what crosses the slices.

    rank r of CP holds positions [r·L, (r+1)·L) of a sequence of CP·L tokens

- Causal NormAttention (LASP-2): each rank forms the state of its own slice,
  S_r = Σ_{s in slice} λ^(L-1-s') k_s v_sᵀ (one GEMM), the states are all-gathered (one
  message of B·H·D·E values, whatever the length), and rank r starts its scan from the
  decayed prefix of the earlier ranks' states, P_r = Σ_{j<r} λ^(L·(r-1-j)) S_j, passed to
  the kernel as `initial_state`. The backward is autograd's: the kernel returns dP_r, the
  gather's backward sums every rank's gradient of each S_j back to rank j.
- Bidirectional NormAttention (the masked LM): O = Q (Σ_r K_rᵀ V_r), one all-reduce of the
  [D, E] state per head, summed again in the backward.
- The 1+elu baseline's denominator: the running key sum continues across ranks the same way.
- DiagAttention needs nothing when every slice is a whole number of blocks (checked by
  config validation); positions are global, so LRPE and the position embeddings see each
  token's true offset.

With CP size 1 every function here is the plain kernel call. The groups are megatron-core's
(`parallel_state`, rank order tp-cp-ep-dp-pp).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

import transnormer_kernels as kernels

from .tensor_parallel import all_reduce_sum


def cp_size() -> int:
    return parallel_state.get_context_parallel_world_size()


def cp_rank() -> int:
    return parallel_state.get_context_parallel_rank()


def cp_group():
    return parallel_state.get_context_parallel_group()


def local_slice(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous slice of a sequence tensor (a view). A length-1 dimension is a
    broadcast (positions shared by the batch), not a sequence, and is kept whole."""
    size = cp_size()
    if size == 1 or t.shape[dim] == 1:
        return t
    if t.shape[dim] % size:
        raise ValueError(f"a sequence of {t.shape[dim]} tokens cannot be split over {size} context-parallel ranks")
    length = t.shape[dim] // size
    return t.narrow(dim, cp_rank() * length, length)


class _AllGather(torch.autograd.Function):
    """Stacks every rank's tensor: [CP, *shape]. Backward: each rank's gradient of the stack,
    summed over the group, and this rank's part of it (a reduce-scatter; gloo has none)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def _decayed_prefix(local: torch.Tensor, block_decay: torch.Tensor | None) -> torch.Tensor:
    """Σ_{j<r} w^(r-1-j) X_j over the earlier ranks' `local` X_j ([B, H, ...]); w: [H] or None (1).

    A weighted sum over ALL ranks (zero weight for j >= r), so that every rank, rank 0
    included, takes part in the gather's backward collective."""
    gathered = _AllGather.apply(local, cp_group())  # [CP, B, H, ...]
    rank, size = cp_rank(), gathered.shape[0]
    exponent = torch.tensor([rank - 1 - j for j in range(size)], device=local.device, dtype=local.dtype)
    shape = (size, 1, -1, *([1] * (local.dim() - 2)))
    if block_decay is None:
        weight = (exponent >= 0).to(local.dtype).view(size, *([1] * local.dim()))
    else:
        powers = block_decay.to(local.dtype).view(1, -1) ** exponent.clamp(min=0).view(-1, 1)  # [CP, H]
        weight = torch.where(exponent.view(-1, 1) >= 0, powers, torch.zeros_like(powers)).view(shape)
    return (weight * gathered).sum(dim=0)


def norm_attention(q, k, v, causal: bool, decay=None, backend: str = "auto") -> torch.Tensor:
    """NormAttention's mixing over a sequence split across the CP group; q, k: [B, H, L, D],
    v: [B, H, L, E] this rank's slice. Returns this slice's output."""
    if cp_size() == 1:
        return kernels.norm_attention(q, k, v, causal=causal, decay=decay, backend=backend)[0]
    acc = torch.promote_types(q.dtype, torch.float32)
    if not causal:
        total = all_reduce_sum((k.to(acc).transpose(-1, -2) @ v.to(acc)), cp_group())
        return q @ total.to(q.dtype)
    length = q.shape[2]
    if decay is None:
        own, block_decay = k.to(acc).transpose(-1, -2) @ v.to(acc), None
    else:
        lam = decay.to(acc).view(1, -1, 1, 1)
        weight = lam ** torch.arange(length - 1, -1, -1, device=q.device, dtype=acc).view(1, 1, -1, 1)
        own, block_decay = (k.to(acc) * weight).transpose(-1, -2) @ v.to(acc), decay.to(acc) ** length
    start = _decayed_prefix(own, block_decay)
    return kernels.norm_attention(q, k, v, causal=True, decay=decay, initial_state=start, backend=backend)[0]


def key_sums(k: torch.Tensor, causal: bool) -> torch.Tensor:
    """Σ of the keys each position attends to, fp32 at least: the running sum over the whole
    sequence up to it (causal, [B, H, L, D]) or the total ([B, H, 1, D])."""
    acc = torch.promote_types(k.dtype, torch.float32)
    k = k.to(acc)
    if not causal:
        total = k.sum(dim=2, keepdim=True)
        return total if cp_size() == 1 else all_reduce_sum(total, cp_group())
    running = k.cumsum(dim=2)
    if cp_size() == 1:
        return running
    return running + _decayed_prefix(k.sum(dim=2, keepdim=True), None)
