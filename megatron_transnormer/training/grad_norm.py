"""The global gradient norm with every parameter counted once, and clipping by it.

Each rank holds gradients of its pipeline stage and tensor-parallel shard, already
averaged over data parallelism. A parameter is counted on this rank when
  * it is sharded over TP (each shard is a distinct part), or it is TP-replicated and
    this is TP rank 0 (megatron's `param_is_not_tensor_parallel_duplicate`), and
  * it is not the last stage's copy of the tied embedding (DeepSpeed's PipelineModule
    marks that copy `ds_pipe_replicated`; the first stage counts it).
The squares are then summed over the TP x PP group; DP replicas are not summed since
their gradients are identical.

Used wherever DeepSpeed hands the torch optimizer whole per-parameter gradients (ZeRO 0:
the model's own in fp32, fp32 master copies in bf16): DeepSpeed's norm there is wrong
(its pipeline engine drops the replicated parameters of later stages and counts the tied
embedding twice; its bf16 wrapper drops every gradient of TP ranks > 0). The ZeRO 1-3
optimizers compute the norm from their own partitions by the same rule (tensor rank,
`ds_pipe_replicated`), so under ZeRO DeepSpeed clips.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate


def counted_here(param: torch.Tensor) -> bool:
    """Whether this rank's copy of `param` is the one counted in sums over the whole model."""
    if getattr(param, "ds_pipe_replicated", False):
        return False
    return param_is_not_tensor_parallel_duplicate(param)


def global_grad_norm(params: list[torch.Tensor]) -> float:
    """L2 norm of all gradients of the model (see the module docstring for the counting)."""
    total = torch.zeros(1, dtype=torch.float64, device=params[0].device)
    for p in params:
        if p.grad is not None and counted_here(p):
            total += torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32).double() ** 2
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())  # TP x PP
    return float(total.sqrt())


def clip_coefficient(norm: float, max_norm: float) -> float:
    """DeepSpeed's rule (so that both clipping paths agree): scale by max/(norm+1e-6) when < 1."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))


class NormAndClip:
    """Step pre-hook for a torch optimizer that holds whole gradients: measure, clip or skip.

    Installed with `optimizer.register_step_pre_hook(hook)`; it runs after DeepSpeed's
    gradient reduction and before the update, on every rank. `last_norm` keeps the norm
    before clipping for reporting. A non-finite norm (the same on every rank) skips the
    update, as DeepSpeed's ZeRO optimizers do: AdamW leaves parameters without a gradient
    untouched, and DeepSpeed reads the optimizer's `overflow` to count the skip and hold
    the LR schedule.
    """

    def __init__(self, max_norm: float):
        self.max_norm = max_norm
        self.last_norm: float | None = None

    def __call__(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.last_norm = global_grad_norm(params)
        optimizer.overflow = not math.isfinite(self.last_norm)
        if optimizer.overflow:
            for p in params:
                p.grad = None
            return
        coef = clip_coefficient(self.last_norm, self.max_norm)
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
