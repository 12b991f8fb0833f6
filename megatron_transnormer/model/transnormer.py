"""The single-stage model: embedding -> blocks -> final norm (pre-norm models) -> head.

    model = build_model(cfg, seed)
    out = model(input_ids, positions, valid, output_mask)

Built from the parts `spec.model_parts` describes (the pipeline builds its stages from
the same list). The output is the head's: vocabulary-parallel logits [B, N, vocab/tp]
for the LM heads ([M, vocab/tp] for the M positions of `output_mask`), class logits
[B, classes] for the classifier. No loss here: objectives (training/objectives.py) turn
outputs and labels into one. Needs megatron's model-parallel groups
(`megatron_transnormer.parallel.init_distributed`) before building.

Recurrent decoding of the causal LM (one process: tensor and context parallel size 1):

    logits, cache = model.prefill(input_ids, valid)     # the prompt, in parallel, once
    logits = model.step(next_ids, cache)                # then one token per row: [B, 1, vocab]

`prefill` is `forward` over left-padded prompts that also returns a `DecodeCache`: every
layer's recurrent state (decoding.py) and each row's next position; `step` advances it
in place. The cost of a step does not depend on the length so far, except in softmax
layers, whose KV cache grows.
"""
from __future__ import annotations

import torch
from torch import nn

from ..parallel import context
from ..parallel.tensor_parallel import tp_size
from .blocks import Block
from .decoding import DecodeCache, prompt_positions
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

    def _check_decodable(self, positions: torch.Tensor) -> None:
        if self.cfg.head != "lm" or not self.cfg.causal:
            raise ValueError(f"recurrent decoding needs the causal LM (model.head=lm, model.causal=true), "
                             f"this model has model.head={self.cfg.head}, model.causal={self.cfg.causal}")
        if tp_size() > 1 or context.cp_size() > 1:
            raise ValueError(f"recurrent decoding runs in one process: tensor-parallel size {tp_size()} and "
                             f"context-parallel size {context.cp_size()} must be 1")
        if self.cfg.positions == "learned" and int(positions.max()) >= self.cfg.max_positions:
            raise ValueError(f"position {int(positions.max())} is past the learned position table "
                             f"(model.max_positions={self.cfg.max_positions})")

    def prefill(self, input_ids: torch.Tensor, valid: torch.Tensor | None = None,
                output_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, DecodeCache]:
        """forward over prompts, left-padded where `valid` [B, N] marks padding (False first,
        see `prompt_positions`), each row's real tokens at positions 0..len-1 -> (the head's
        logits, as forward returns them for output_mask, and the DecodeCache after each
        row's last token)."""
        n = input_ids.shape[1]
        if valid is None:
            positions = torch.arange(n, device=input_ids.device).unsqueeze(0)
            following = torch.full((input_ids.shape[0],), n, device=input_ids.device)
        else:
            if tuple(valid.shape) != tuple(input_ids.shape):
                raise ValueError(f"valid has shape {list(valid.shape)}, input_ids {list(input_ids.shape)}")
            positions, following = prompt_positions(valid), valid.sum(dim=1)
        self._check_decodable(positions)
        x = self.embedding(input_ids, positions)
        states = []
        for block in self.layers:
            x, state = block.prefill(x, positions, valid)
            states.append(state)
        if self.final_norm is not None:
            x = self.final_norm(x)
        logits = self.head(x, valid, output_mask, self.embedding.weight)
        return logits, DecodeCache(states, following)

    def step(self, input_ids: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """One token per row, input_ids [B, 1] at the cache's positions -> logits [B, 1, vocab];
        the cache advances in place."""
        if input_ids.dim() != 2 or input_ids.shape[1] != 1 or input_ids.shape[0] != cache.positions.shape[0]:
            raise ValueError(f"input_ids must be [B, 1] with B = {cache.positions.shape[0]} (the cache's rows), "
                             f"got {list(input_ids.shape)}")
        positions = cache.positions.unsqueeze(1)
        self._check_decodable(positions)
        x = self.embedding(input_ids, positions)
        for block, state in zip(self.layers, cache.layers):
            x = block.step(x, positions, state)
        if self.final_norm is not None:
            x = self.final_norm(x)
        cache.positions = cache.positions + 1
        return self.head(x, None, None, self.embedding.weight)


def build_model(cfg, seed: int) -> TransNormerModel:
    return TransNormerModel(cfg, seed)


def build_block(cfg, layer_index: int, seed: int) -> Block:
    """Layer `layer_index` alone, initialised exactly as inside the full model."""
    if not 0 <= layer_index < cfg.num_layers:
        raise ValueError(f"layer_index {layer_index} outside model.num_layers={cfg.num_layers}")
    return [p for p in model_parts(cfg, seed) if p.role == "block"][layer_index].build()
