"""Tiny model configs and deterministic batches for the runtime tests.

Every layout trains on the same global batch per step: the batch of step s is drawn from
seed s, and data-parallel rank r takes its share of rows; TP and PP ranks of one
replica take the same rows. Each row carries its key (epoch 0, its index in the run), so
a masked LM draws the same masks for it in every layout.

Masked-LM samples are padded to random lengths, so their micro-batches hold different
numbers of real, and so of masked, tokens.
"""
from __future__ import annotations

import os

import torch

from megatron_transnormer.config import Config, validate_config
from megatron_transnormer.data.stream import TokenBatch
from megatron_transnormer.training.objectives import MaskedLM

SEQ, VOCAB = 64, 128
PAD, MASK, BOS = 1, 2, 0  # the masked LM's special ids in the synthetic vocabulary


def tiny_config(tensor=1, pipeline=1, zero=0, clip=0.0, precision="fp32", dropout=0.0,
                micro_batch=2, global_batch=4, steps=10, head="lm", context=1, sequence=False, **model) -> Config:
    """model: further model settings (variant, arch, decay, layers, block_size, ...)."""
    c = Config()
    m = c.model
    m.vocab_size, m.hidden_size, m.num_layers, m.num_heads = VOCAB, 64, 4, 4
    m.dropout, m.kernels = dropout, "torch"
    if head == "masked_lm":  # the paper's BLM shape (spec §8), tiny
        m.head, m.causal, m.norm_position, m.positions = "masked_lm", False, "post", "learned"
        m.embedding_scale, m.embedding_norm, m.init, m.pad_id = False, True, "bert", PAD
        m.block_size = 16
    for key, value in model.items():
        setattr(m, key, value)
    c.data.seq_len = SEQ
    c.parallel.tensor, c.parallel.pipeline, c.parallel.zero_stage = tensor, pipeline, zero
    c.parallel.context, c.parallel.sequence = context, sequence
    c.train.micro_batch_size, c.train.global_batch_size, c.train.steps = micro_batch, global_batch, steps
    c.train.precision = precision
    c.optim.lr, c.optim.warmup_steps, c.optim.clip_grad = 2e-3, 2, clip
    # A large eps makes Adam's update scale with the gradient (it is scale-invariant
    # otherwise), so that the clipping coefficient, and any error in the norm behind it,
    # shows in the losses.
    c.optim.eps = 1e-3
    return validate_config(c, world_size=int(os.environ.get("WORLD_SIZE", 1)))


def objective_for(cfg: Config):
    """The objective for cfg's head over the synthetic vocabulary (None: the runtime's default)."""
    if cfg.model.head != "masked_lm":
        return None
    return MaskedLM(cfg.model, cfg.objective, cfg.train.seed, vocab_size=VOCAB, pad_id=PAD, mask_id=MASK,
                    special_ids=(BOS,))


def global_batch(step: int, cfg: Config, rows: int | None = None) -> TokenBatch:
    """The whole batch of update `step` (rows: its size, default the global batch size)."""
    rows = rows or cfg.train.global_batch_size
    g = torch.Generator().manual_seed(step)
    if cfg.model.head == "lm":
        tokens = torch.randint(0, VOCAB, (rows, SEQ + 1), generator=g)
    else:
        tokens = torch.randint(BOS + 3, VOCAB, (rows, SEQ), generator=g)
        lengths = torch.randint(8, SEQ + 1, (rows,), generator=g)
        tokens[torch.arange(SEQ) >= lengths[:, None]] = PAD
    keys = torch.stack([torch.zeros(rows, dtype=torch.long), step * 1000 + torch.arange(rows)], dim=1)
    return TokenBatch(tokens, keys)


def rank_rows(batch: TokenBatch, layout) -> TokenBatch:
    """This data-parallel rank's share of a batch."""
    return TokenBatch(*(t.chunk(layout.dp_size)[layout.dp_rank] for t in batch))


def step_batches(step: int, layout, cfg: Config):
    """This rank's micro-batches of update `step`."""
    mine = rank_rows(global_batch(step, cfg), layout)
    mb = cfg.train.micro_batch_size
    return iter([TokenBatch(mine.tokens[i:i + mb], mine.keys[i:i + mb]) for i in range(0, len(mine.tokens), mb)])


def quiet_deepspeed() -> None:
    import logging

    from deepspeed.utils import logger
    logger.setLevel(logging.WARNING)


def train_layouts(cases, models: dict, steps: int, sequence: bool = False) -> dict:
    """In a rank of run_ranks: for each (model name, (tensor, pipeline, context, zero)) of
    `cases`, `steps` updates of the tiny config with models[name]'s settings (clipping 0.05,
    so the global norm matters every update) -> {case: loss, grad_norm, labels, tokens per
    update, and the tokens a block receives per sequence (single-stage models)}."""
    from megatron_transnormer.parallel import destroy_distributed, init_distributed
    from megatron_transnormer.training.runtime import build_runtime

    quiet_deepspeed()
    out = {}
    try:
        for model, (tp, pp, cp, zero) in cases:
            settings = dict(models[model])
            head = settings.pop("head", "lm")
            cfg = tiny_config(tensor=tp, pipeline=pp, context=cp, zero=zero, clip=0.05, head=head, block_size=16,
                              sequence=sequence, **settings)
            layout = init_distributed(tp, pp, context=cp, sequence=sequence)
            rt = build_runtime(cfg, layout, objective_for(cfg))
            widths, hook = [], None
            if pp == 1:
                hook = rt.engine.module.layers[0].register_forward_pre_hook(
                    lambda m, args: widths.append(args[0].shape[1]))
            results = [rt.train_step(step_batches(s, layout, cfg)) for s in range(steps)]
            if hook is not None:
                hook.remove()
            out[model, (tp, pp, cp, zero)] = {"loss": [r.loss for r in results],
                                              "grad_norm": [r.grad_norm for r in results],
                                              "labels": [r.labels for r in results],
                                              "tokens": [r.tokens for r in results],
                                              "block_tokens": sorted(set(widths)), "seq_len": cfg.data.seq_len}
    finally:
        destroy_distributed()
    return out
