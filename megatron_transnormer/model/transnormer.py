"""The single-stage model: embedding -> blocks -> final norm (pre-norm models) -> head.

    model = build_model(cfg, seed)
    out = model(input_ids, positions, valid, output_mask)

Built from the parts `spec.model_parts` describes (the pipeline builds its stages from
the same list). The output is the head's: vocabulary-parallel logits [B, N, vocab/tp]
for the LM heads ([M, vocab/tp] for the M positions of `output_mask`), class logits
[B, classes] for the classifier. No loss here: objectives (training/objectives.py) turn
outputs and labels into one. Needs megatron's model-parallel groups
(`megatron_transnormer.parallel.init_distributed`) before building.
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import Block
from .spec import model_parts


class TransNormerModel(nn.Module):
    """forward(input_ids [B, N], positions [B or 1, N] = 0..N-1, valid [B, N] bool = all real,
    output_mask [B, N] bool = every position) -> the head's output (module docstring)."""

    def __init__(self, cfg, seed: int):
        super().__init__()
        self.cfg = cfg
        parts = {role: [p.build() for p in model_parts(cfg, seed) if p.role == role]
                 for role in ("embedding", "block", "final_norm", "head")}
        self.embedding = parts["embedding"][0]
        self.layers = nn.ModuleList(parts["block"])
        self.final_norm = parts["final_norm"][0] if parts["final_norm"] else None
        self.head = parts["head"][0]

    @property
    def activation_checkpointing(self) -> bool:
        return all(block.activation_checkpointing for block in self.layers)

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        for block in self.layers:
            block.activation_checkpointing = bool(value)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, output_mask: torch.Tensor | None = None):
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.embedding(input_ids, positions)
        for block in self.layers:
            x = block(x, positions, valid)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.head(x, valid, output_mask, self.embedding.weight if self.head.tied else None)


def build_model(cfg, seed: int) -> TransNormerModel:
    return TransNormerModel(cfg, seed)


def build_block(cfg, layer_index: int, seed: int) -> Block:
    """Layer `layer_index` alone, initialised exactly as inside the full model."""
    if not 0 <= layer_index < cfg.num_layers:
        raise ValueError(f"layer_index {layer_index} outside model.num_layers={cfg.num_layers}")
    return [p for p in model_parts(cfg, seed) if p.role == "block"][layer_index].build()
