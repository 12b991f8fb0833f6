"""Tensor-parallel helpers on top of megatron-core: layout-independent init and two autograd ops.

Layout-independent initialisation: every parameter declares how its FULL (unsharded)
tensor is drawn and along which dimension it is split across the TP group
(`declare_init`). `initialize_parameters` then draws each full tensor from a generator
seeded by (seed, canonical parameter name) on every rank and copies this rank's shard
in. The weights of layer i are therefore the same whether it is built alone on a
pipeline stage, inside the full model, or sharded over any TP size.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import (
    set_defaults_if_not_set_tensor_model_parallel_attributes,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

# init_fn(full_tensor, generator) fills the full tensor in place.
InitFn = Callable[[torch.Tensor, torch.Generator], None]


def tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def declare_init(param: torch.nn.Parameter, init_fn: InitFn, partition_dim: Optional[int] = None) -> None:
    """Record how `param` is initialised; partition_dim None means replicated over TP."""
    param.init_fn = init_fn
    param.init_partition_dim = partition_dim


def name_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, canonical name); stable across runs and Python versions."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def initialize_parameters(module: torch.nn.Module, seed: int, prefix: str = "") -> None:
    """Draw every declared parameter of `module` (names prefixed by `prefix`) layout-independently.

    Also marks the megatron TP attributes (tensor_model_parallel, partition_dim,
    partition_stride), which DeepSpeed's gradient norm uses to count each weight once.
    """
    size, rank = tp_size(), tp_rank()
    for name, param in module.named_parameters():
        full_name = prefix + name
        init_fn = getattr(param, "init_fn", None)
        if init_fn is None:
            raise RuntimeError(f"parameter {full_name!r} declares no initialisation (declare_init)")
        dim = param.init_partition_dim
        shape = list(param.shape)
        if dim is not None:
            shape[dim] *= size
        full = torch.empty(shape, dtype=torch.float32)
        init_fn(full, torch.Generator().manual_seed(name_seed(seed, full_name)))
        shard = full if dim is None else full.chunk(size, dim=dim)[rank]
        param.copy_(shard)
        if not hasattr(param, "tensor_model_parallel"):
            if dim is None:
                set_defaults_if_not_set_tensor_model_parallel_attributes(param)
            else:
                set_tensor_model_parallel_attributes(param, True, dim, 1)


class _AllReduceSumBothWays(torch.autograd.Function):
    """Sum over a group in forward AND backward.

    Right for a value computed from each rank's part and then consumed by every rank (a
    norm statistic over TP shards): each rank's incoming gradient covers only its own
    consumers, so the gradient of every partial sum is the sum of them all.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of `x` over `group` (default: the TP group), autograd-correct for a value every
    rank then consumes (a norm statistic over TP shards, a state over context-parallel slices)."""
    group = tp_group() if group is None else group
    if dist.get_world_size(group) == 1:
        return x
    return _AllReduceSumBothWays.apply(x, group)


def replicated_param(param: torch.Tensor) -> torch.Tensor:
    """Use a TP-replicated parameter inside head-sharded math (LRPE's θ).

    Identity forward; backward sums the per-rank partial gradients over TP so every rank
    holds the full, identical gradient (megatron's copy-to-region operator).
    """
    if tp_size() == 1:
        return param
    return copy_to_tensor_model_parallel_region(param, group=tp_group())


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """Per-row Σ x² over the last dimension across all TP shards, in fp32 at least."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return all_reduce_sum(x.to(acc).pow(2).sum(dim=-1, keepdim=True))
