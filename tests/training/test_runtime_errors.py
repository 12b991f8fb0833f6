"""Layouts the runtime cannot run fail with a message naming the key, before any process group."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_transnormer.config import ConfigError, validate_config
from megatron_transnormer.parallel import Layout
from megatron_transnormer.training.runtime import build_runtime
from tests.training.runtime_helpers import tiny_config


def _unchecked(**kwargs):
    """A tiny config with fields changed after validation (as YAML or overrides could set them)."""
    cfg = tiny_config()
    for key, value in kwargs.items():
        section, field = key.split("__")
        setattr(getattr(cfg, section), field, value)
    return cfg


def _layout(world_size, tensor, pipeline):
    dp = max(world_size // (tensor * pipeline), 1)
    return Layout(rank=0, world_size=world_size, local_rank=0, tp_rank=0, tp_size=tensor, pp_rank=0,
                  pp_size=pipeline, dp_rank=0, dp_size=dp, device=torch.device("cpu"))


CASES = [
    # (overrides, world size, message)
    ({"parallel__pipeline": 2, "parallel__zero_stage": 2}, 2,
     r"parallel.zero_stage: ZeRO stage 2 cannot be combined with pipeline parallelism"),
    ({"parallel__pipeline": 2, "parallel__zero_stage": 3}, 2,
     r"parallel.zero_stage: ZeRO stage 3 cannot be combined with pipeline parallelism"),
    ({"parallel__pipeline": 2, "parallel__zero_stage": 0, "train__precision": "bf16"}, 2,
     r"parallel.zero_stage: bf16 with pipeline parallelism needs zero_stage 1"),
    ({"parallel__tensor": 3}, 3,
     r"parallel.tensor: model.num_heads=4 is not divisible by tensor-parallel size 3"),
    ({"parallel__tensor": 4, "model__num_heads": 8}, 4,  # GLU width int(8/3 * 64) = 170
     r"parallel.tensor: model.ffn_hidden_size=170 is not divisible by tensor-parallel size 4"),
    ({"parallel__tensor": 2, "parallel__pipeline": 2}, 6,
     r"parallel: world size 6 is not divisible by tensor \(2\) x pipeline \(2\) x context \(1\) = 4"),
    ({"parallel__tensor": 2, "train__global_batch_size": 2}, 4,
     r"train.global_batch_size: 2 is not a multiple of micro_batch_size \(2\) x data-parallel size \(2\)"),
]


@pytest.mark.parametrize("overrides, world_size, message", CASES)
def test_refused_before_any_process_group(overrides, world_size, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_unchecked(**overrides), world_size=world_size)
    # The runtime repeats the check first thing, before it touches a process group.
    tensor, pipeline = overrides.get("parallel__tensor", 1), overrides.get("parallel__pipeline", 1)
    with pytest.raises(ConfigError, match=message):
        build_runtime(_unchecked(**overrides), _layout(world_size, tensor, pipeline))
    assert not dist.is_initialized()


def test_runtime_refuses_groups_of_another_shape():
    cfg = _unchecked(parallel__tensor=2)
    with pytest.raises(ConfigError, match=r"process groups are tensor 1 x pipeline 2 x context 1, the config asks "
                                          r"for 2 x 1 x 1"):
        build_runtime(cfg, _layout(2, 1, 2))
    assert not dist.is_initialized()


def _poisoned_step(rank, world_size, zero):
    """A NaN weight makes every gradient NaN: the update must be skipped, not applied."""
    from megatron_transnormer.parallel import destroy_distributed, init_distributed
    from megatron_transnormer.training.runtime import build_runtime
    from tests.training.runtime_helpers import quiet_deepspeed, step_batches

    quiet_deepspeed()
    cfg = tiny_config(zero=zero, clip=0.05)
    layout = init_distributed(1, 1)
    try:
        rt = build_runtime(cfg, layout)
        first = rt.train_step(step_batches(0, layout, cfg))
        weight = next(p for p in rt.engine.module.parameters() if p.ndim == 2)
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.fill_(float("nan"))
        bad = rt.train_step(step_batches(1, layout, cfg))
        with torch.no_grad():
            weight.copy_(saved)
        after = rt.train_step(step_batches(1, layout, cfg))
        clean = build_runtime(cfg, layout)  # the same two updates without the poison
        clean_losses = [clean.train_step(step_batches(s, layout, cfg)).loss for s in (0, 1)]
        return first, bad, after, clean_losses
    finally:
        destroy_distributed()


@pytest.mark.parametrize("zero", [0, 1])  # our norm (ZeRO 0) and DeepSpeed's (ZeRO 1) agree
def test_non_finite_gradients_skip_the_update(zero):
    from tests.multiproc import run_ranks

    first, bad, after, clean_losses = run_ranks(_poisoned_step, 1, zero)[0]
    assert not first.skipped and bad.skipped and not after.skipped
    assert not torch.isfinite(torch.tensor(bad.grad_norm))
    # The skipped update moved neither the weights, the optimizer state nor the LR
    # schedule: the next update is exactly the one that would have come second.
    assert after.lr == bad.lr > first.lr
    assert [first.loss, after.loss] == clean_losses
