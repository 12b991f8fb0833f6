"""A tiny model config and deterministic token batches for the runtime tests.

Every layout trains on the same global batch per step: the batch of step s is drawn from
seed s, and data-parallel rank r takes its share of rows; TP and PP ranks of one
replica take the same rows.
"""
from __future__ import annotations

import os

import torch

from megatron_transnormer.config import Config, validate_config

SEQ, VOCAB = 64, 128


def tiny_config(tensor=1, pipeline=1, zero=0, clip=0.0, precision="fp32", dropout=0.0,
                micro_batch=2, global_batch=4, steps=10) -> Config:
    c = Config()
    m = c.model
    m.vocab_size, m.hidden_size, m.num_layers, m.num_heads = VOCAB, 64, 4, 4
    m.dropout, m.kernels = dropout, "torch"
    c.data.seq_len = SEQ
    c.parallel.tensor, c.parallel.pipeline, c.parallel.zero_stage = tensor, pipeline, zero
    c.train.micro_batch_size, c.train.global_batch_size, c.train.steps = micro_batch, global_batch, steps
    c.train.precision = precision
    c.optim.lr, c.optim.warmup_steps, c.optim.clip_grad = 2e-3, 2, clip
    # A large eps makes Adam's update scale with the gradient (it is scale-invariant
    # otherwise), so that the clipping coefficient, and any error in the norm behind it,
    # shows in the losses.
    c.optim.eps = 1e-3
    return validate_config(c, world_size=int(os.environ.get("WORLD_SIZE", 1)))


def step_batches(step: int, layout, cfg: Config):
    """This rank's micro-batches of update `step` (LongTensor [micro_batch, SEQ + 1] each)."""
    t = cfg.train
    full = torch.randint(0, VOCAB, (t.global_batch_size, SEQ + 1), generator=torch.Generator().manual_seed(step))
    per_rank = t.global_batch_size // layout.dp_size
    mine = full[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank]
    return iter(mine.split(t.micro_batch_size))


def quiet_deepspeed() -> None:
    import logging

    from deepspeed.utils import logger
    logger.setLevel(logging.WARNING)
