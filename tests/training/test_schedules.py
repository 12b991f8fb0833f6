"""LR schedules and AdamW parameter groups (single process, no engine)."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_transnormer.config import OptimConfig
from megatron_transnormer.training.optimizer import build_optimizer, param_groups
from megatron_transnormer.training.schedules import build_scheduler, lr_at


def _optim(schedule, warmup=4, **kw):
    return OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=warmup, warmup_init_lr=1e-7, schedule=schedule, **kw)


@pytest.mark.parametrize("schedule", ["inverse_sqrt", "polynomial", "cosine", "linear", "constant"])
def test_warmup_is_linear_from_warmup_init_lr(schedule):
    o = _optim(schedule)
    assert [lr_at(s, o, 20) for s in range(5)] == pytest.approx([1e-7 + (1e-3 - 1e-7) * s / 4 for s in range(5)])


def test_decays():
    inv, cos, lin, const = (_optim(s) for s in ("inverse_sqrt", "cosine", "linear", "constant"))
    assert lr_at(16, inv, 20) == pytest.approx(1e-3 * math.sqrt(4 / 16))  # the paper's lr·sqrt(warmup/step)
    assert lr_at(12, cos, 20) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(12, lin, 20) == pytest.approx(1e-3 - 0.9e-3 * 0.5)
    for o in (cos, lin):  # min_lr at the last step and after
        assert lr_at(20, o, 20) == pytest.approx(1e-4) and lr_at(30, o, 20) == pytest.approx(1e-4)
    assert lr_at(19, const, 20) == 1e-3
    assert lr_at(0, _optim("inverse_sqrt", warmup=0), 20) == 1e-3  # no warm-up: start at the peak
    # fairseq's polynomial_decay: (lr - end) * (1 - progress)^power + end; power 1 is linear.
    poly = _optim("polynomial", decay_power=2.0)
    assert lr_at(12, poly, 20) == pytest.approx(1e-4 + 0.9e-3 * 0.25)
    assert lr_at(20, poly, 20) == pytest.approx(1e-4)
    assert [lr_at(s, _optim("polynomial"), 20) for s in range(4, 21)] == \
        pytest.approx([lr_at(s, lin, 20) for s in range(4, 21)])


def test_scheduler_drives_every_group_and_round_trips():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    o = _optim("inverse_sqrt")
    opt = build_optimizer(model, o)
    sched = build_scheduler(opt, o, 20)
    for _ in range(6):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr_at(6, o, 20)] * 2)
    again = build_scheduler(build_optimizer(model, o), o, 20)
    again.load_state_dict(sched.state_dict())
    assert again.last_epoch == 6


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_no_weight_decay_on_norms_biases_and_optionally_embeddings(decay_embeddings):
    emb, lin, norm = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)
    groups = param_groups(torch.nn.ModuleList([emb, lin, norm]), OptimConfig(weight_decay=0.1,
                                                                             decay_embeddings=decay_embeddings))
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}
    decayed = {id(lin.weight)} | ({id(emb.weight)} if decay_embeddings else set())
    assert by_decay[0.1] == decayed
    assert by_decay[0.0] == {id(p) for p in (lin.bias, norm.weight, norm.bias)} | (
        set() if decay_embeddings else {id(emb.weight)})
