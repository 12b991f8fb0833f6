"""The model as a DeepSpeed PipelineModule: embedding | blocks | final norm + tied head.

    layer 0        TiedLayerSpec("embedding")  input_ids -> hidden           (first stage)
    layers 1..L    PipeBlock(i)                hidden -> hidden              (split evenly)
    layer L+1      PipeFinalNorm               hidden -> hidden              (last stage)
    layer L+2      TiedLayerSpec("embedding")  hidden -> (hidden, E shard)   (last stage)
    loss_fn        lm_head(hidden, E, labels) -> mean per-token loss

Every part is built by the model's own builders from the same seed, so layer i here has
the single-process model's layer i weights. The embedding table E is the output
projection; DeepSpeed keeps one copy on the first and one on the last stage, sums their
gradients and marks the last stage's copy `ds_pipe_replicated`.
"""
from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from megatron_transnormer.model import build_block, build_embedding, build_final_norm, lm_head


class PipeEmbedding(nn.Module):
    def __init__(self, model_cfg, seed: int):
        super().__init__()
        self.embedding = build_embedding(model_cfg, seed)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)


def _head_inputs(tied: PipeEmbedding, hidden: torch.Tensor):
    # The last stage's use of the tied module: hand the table to the loss, which needs labels.
    return hidden, tied.embedding.weight


class PipeBlock(nn.Module):
    def __init__(self, model_cfg, layer_index: int, seed: int, activation_checkpointing: bool):
        super().__init__()
        self.block = build_block(model_cfg, layer_index, seed)
        self.block.activation_checkpointing = activation_checkpointing

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.block(hidden)


class PipeFinalNorm(nn.Module):
    def __init__(self, model_cfg, seed: int):
        super().__init__()
        self.norm = build_final_norm(model_cfg, seed)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)


def token_loss(per_token: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum or mean over the labelled positions (labels < 0 are masked; the model gives them 0)."""
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / (labels >= 0).sum().clamp(min=1)


class HeadLoss:
    """PipelineModule's loss_fn: the tied head and the cross-entropy, on the last stage.

    `reduction` is "mean" for training (one value per micro-batch, as DeepSpeed averages
    them) and switched to "sum" by evaluation.
    """

    def __init__(self):
        self.reduction = "mean"

    def __call__(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        hidden, weight = outputs
        return token_loss(lm_head(hidden, weight, labels), labels, self.reduction)


def build_pipeline_module(model_cfg, layout, seed: int, activation_checkpointing: bool) -> PipelineModule:
    layers = [TiedLayerSpec("embedding", PipeEmbedding, model_cfg, seed, tied_weight_attr=["embedding.weight"])]
    layers += [LayerSpec(PipeBlock, model_cfg, i, seed, activation_checkpointing)
               for i in range(model_cfg.num_layers)]
    layers += [LayerSpec(PipeFinalNorm, model_cfg, seed),
               TiedLayerSpec("embedding", PipeEmbedding, model_cfg, seed, forward_fn=_head_inputs,
                             tied_weight_attr=["embedding.weight"])]
    topology = PipeModelDataParallelTopology(num_pp=layout.pp_size, num_mp=layout.tp_size, num_dp=layout.dp_size)
    # Balance the blocks only; the embedding then lands on the first stage, norm and head on the last.
    # no_grad: PipelineModule broadcasts the tied table in place at construction; recorded by
    # autograd, that broadcast would become part of the embedding's backward graph.
    with torch.no_grad():
        return PipelineModule(layers=layers, topology=topology, loss_fn=HeadLoss(),
                              partition_method=f"type:^{PipeBlock.__name__}$")
