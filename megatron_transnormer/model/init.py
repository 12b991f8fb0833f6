"""Initialisers for FULL (unsharded) tensors, each `fn(tensor, generator)`.

Used with `parallel.tensor_parallel.declare_init`: the full tensor is drawn from a
generator seeded by the parameter's canonical name, then sharded (layout-independent).
"""
from __future__ import annotations

import math

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn


def xavier_uniform(gain: float = 1.0):
    return lambda t, g: nn.init.xavier_uniform_(t, gain=gain, generator=g)


def linear_default(fan_in: int):
    """torch.nn.Linear's default for weights and biases: U(±1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda t, g: nn.init.uniform_(t, -bound, bound, generator=g)


def normal(std: float, zero_row: int | None = None):
    """N(0, std²); an embedding's padding row (zero_row) is set to zero."""
    def fn(t, g):
        nn.init.normal_(t, 0.0, std, generator=g)
        if zero_row is not None:
            t[zero_row].zero_()
    return fn


def constant(value: float):
    return lambda t, g: t.fill_(value)


def lrpe_theta(t, g):
    """θ_i = 10000^(-2i/head_dim), i < head_dim/2 (spec §5)."""
    head_dim = 2 * t.numel()
    t.copy_(10000.0 ** (-2.0 * torch.arange(t.numel(), dtype=torch.float64) / head_dim))


def random_unit_vector(t, g):
    """The Householder vector u: a uniformly random direction."""
    u = torch.randn(t.shape, generator=g, dtype=torch.float64)
    t.copy_(u / u.norm())


BERT_STD = 0.02


def apply_bert_init(module: nn.Module, pad_id: int | None = None) -> None:
    """Re-declare every Linear and Embedding weight of `module` as N(0, 0.02), and their biases
    as 0 (fairseq's init_bert_params, spec §8); the word embedding's padding row stays zero.
    Norms, LRPE and the masked-LM output bias keep their own. Call before drawing the weights;
    each parameter keeps its declared tensor-parallel split."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, ColumnParallelLinear, RowParallelLinear)):
            m.weight.init_fn = normal(BERT_STD)
            if m.bias is not None:
                m.bias.init_fn = constant(0.0)
        elif isinstance(m, VocabParallelEmbedding):
            m.weight.init_fn = normal(BERT_STD, zero_row=pad_id)
        elif isinstance(m, nn.Embedding):
            m.weight.init_fn = normal(BERT_STD)
