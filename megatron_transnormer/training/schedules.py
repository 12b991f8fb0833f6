"""Learning-rate schedules: linear warm-up, then inverse-sqrt (the paper's ALM), polynomial (its
masked LM), cosine, linear or constant.

`lr_at(step, ...)` is the rate used by the update that follows `step` completed updates
(the first update uses step 0), as in fairseq's `inverse_sqrt`, which the paper trained
with: warm-up from `warmup_init_lr` to `lr` over `warmup_steps` updates, then
`lr * sqrt(warmup_steps / step)`. Polynomial decay (fairseq's `polynomial_decay`) is
`min_lr + (lr - min_lr) * (1 - progress)^decay_power`; linear is its power 1. Cosine,
polynomial and linear decay reach `min_lr` at `total_steps`.
"""
from __future__ import annotations

import math

import torch

from megatron_transnormer.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    warmup = optim.warmup_steps
    if step < warmup:
        return optim.warmup_init_lr + (optim.lr - optim.warmup_init_lr) * step / warmup
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule == "inverse_sqrt":
        # Without warm-up the decay starts from the peak at step 1 (fairseq's factor would be 0).
        return optim.lr * math.sqrt(max(warmup, 1) / max(step, 1))
    progress = min(1.0, (step - warmup) / max(total_steps - warmup, 1))
    if optim.schedule == "cosine":
        return optim.min_lr + (optim.lr - optim.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if optim.schedule in ("polynomial", "linear"):
        power = optim.decay_power if optim.schedule == "polynomial" else 1.0
        return optim.min_lr + (optim.lr - optim.min_lr) * (1.0 - progress) ** power
    raise ValueError(f"optim.schedule: unknown schedule {optim.schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `optimizer` whose param groups all start at `optim.lr`.

    A LambdaLR (not a custom class) because DeepSpeed saves and restores its state_dict
    with the engine checkpoint; only the step count is stored, the schedule is rebuilt
    from the config.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, optim, total_steps) / optim.lr)
