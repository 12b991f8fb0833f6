"""What the last layer's hidden states feed: one head per objective family.

Every head has one signature, `head(hidden, valid, output_mask, embedding_weight)`:
  * `LMHead` (causal LM, spec §7): logits through the tied embedding;
  * `MaskedLMHead` (RoBERTa, spec §8): dense -> GELU -> LayerNorm -> tied decoder + bias;
  * `ClassificationHead`: pooling over the real tokens -> dense -> GELU -> classes, or one
    linear layer (`model.classifier=linear`, the LRA models), or the two-tower classifier of
    LRA Retrieval (`two_tower`: the batch holds each sample's two documents, first all the
    first ones then all the second ones; features [u, v, u·v, u−v] -> dense -> GELU -> classes).
`tied` says whether the head needs the embedding table (the pipeline fetches it from the
first stage's tied copy). Vocabulary logits stay split over TP (`vocab_logits`); the loss
is `vocab_parallel_cross_entropy`, never a gather. With `output_mask` [B, N] the token
heads project only the selected positions and return [M, vocab/tp] rows in row-major
order: a masked LM predicts 15% of its tokens and need not pay for the other 85%.
Under sequence parallelism the hidden states arrive as this rank's slice of the sequence;
every head gathers them first (parallel/sequence.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from torch import nn

from ..parallel import sequence
from ..parallel.tensor_parallel import declare_init, tp_group, tp_size
from .init import constant, linear_default
from .norms import build_norm, head_holds_final_norm, layer_norm


def vocab_logits(hidden: torch.Tensor, embedding_weight: torch.Tensor, bias: torch.Tensor | None = None):
    """hidden [..., d] @ Eᵀ (+ b) -> this rank's vocabulary slice of the logits [..., vocab/tp]."""
    if tp_size() > 1:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group())  # backward: sum dgrad
    return F.linear(hidden, embedding_weight, bias)


def replicated_linear(d_in: int, d_out: int) -> nn.Linear:
    """A replicated Linear with torch's default initialisation, declared for layout-independent init."""
    layer = nn.Linear(d_in, d_out)
    declare_init(layer.weight, linear_default(d_in))
    declare_init(layer.bias, linear_default(d_in))
    return layer


def _selected(hidden: torch.Tensor, output_mask: torch.Tensor | None) -> torch.Tensor:
    return hidden if output_mask is None else hidden[output_mask]


class LMHead(nn.Module):
    tied = True

    def __init__(self, cfg):
        super().__init__()

    def forward(self, hidden, valid, output_mask, embedding_weight):
        if sequence.enabled():
            # The gather's backward reduce-scatters, summing the vocabulary shards' partial
            # gradients as vocab_logits' all-reduce would (megatron's SP output layer).
            hidden = _selected(sequence.gather(hidden, partial_grads=True), output_mask)
            return F.linear(hidden, embedding_weight)
        return vocab_logits(_selected(hidden, output_mask), embedding_weight)


class MaskedLMHead(nn.Module):
    """RoBERTa's LM head; the dense layer and its norm are replicated over TP, the output
    bias is split like the vocabulary."""

    tied = True

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.dense = replicated_linear(d, d)
        self.norm = layer_norm(d)
        self.bias = nn.Parameter(torch.empty(cfg.vocab_size // tp_size()))
        declare_init(self.bias, constant(0.0), partition_dim=0)

    def forward(self, hidden, valid, output_mask, embedding_weight):
        hidden = sequence.gather(hidden, partial_grads=False)  # dense and norm are replicated
        h = self.norm(F.gelu(self.dense(_selected(hidden, output_mask))))
        return vocab_logits(h, embedding_weight, self.bias)


def two_tower_features(pooled: torch.Tensor) -> torch.Tensor:
    """pooled [2B, d], the B first documents then the B second ones -> [u, v, u·v, u−v] [B, 4d]."""
    u, v = pooled.chunk(2, dim=0)
    return torch.cat([u, v, u * v, u - v], dim=-1)


class ClassificationHead(nn.Module):
    """Mean of the real tokens' states (or token 0's), then the classifier of
    `model.classifier` -> [B, classes] (module docstring). A pre-norm model with batch norm
    applies its final norm here, where the padding mask is known (norms.head_holds_final_norm)."""

    tied = False

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.pooling = cfg.pooling
        self.classifier = cfg.classifier
        self.norm = build_norm("batch", d) if head_holds_final_norm(cfg) else None
        if cfg.classifier == "linear":
            self.out = replicated_linear(d, cfg.num_classes)
        else:
            self.dense = replicated_linear(4 * d if cfg.classifier == "two_tower" else d, d)
            self.out = replicated_linear(d, cfg.num_classes)

    def forward(self, hidden, valid, output_mask, embedding_weight):
        hidden = sequence.gather(hidden, partial_grads=False)  # the classifier is replicated
        if self.norm is not None:
            hidden = self.norm(hidden, valid)
        if self.pooling == "first":
            pooled = hidden[:, 0]
        elif valid is None:
            pooled = hidden.mean(dim=1)
        else:
            weight = valid.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)
        if self.classifier == "linear":
            return self.out(pooled)
        if self.classifier == "two_tower":
            pooled = two_tower_features(pooled)
        return self.out(F.gelu(self.dense(pooled)))


HEADS = {"lm": LMHead, "masked_lm": MaskedLMHead, "classification": ClassificationHead}


def build_head(cfg) -> nn.Module:
    return HEADS[cfg.head](cfg)
