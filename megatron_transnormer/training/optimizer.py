"""AdamW with parameter groups: no weight decay on norms and biases (and embeddings if asked).

A plain torch optimizer on purpose: DeepSpeed's own Adam variants JIT-compile C++/CUDA
ops, and ZeRO wraps any torch optimizer (with `zero_allow_untested_optimizer`).
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding

from megatron_transnormer.config import OptimConfig

_EMBEDDINGS = (torch.nn.Embedding, VocabParallelEmbedding)


def param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """[decayed, not decayed] groups, empty ones dropped. Every parameter appears once.

    Vectors (norm gains, biases, LRPE angles) never decay; embedding tables decay unless
    `optim.decay_embeddings` is false. Parameters shared by two modules (a tied
    embedding) are listed once.
    """
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, _EMBEDDINGS) for p in m.parameters()}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or (id(p) in embedding_ids and not optim.decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, optim), lr=optim.lr, betas=tuple(optim.betas),
                             eps=optim.eps, weight_decay=optim.weight_decay)
