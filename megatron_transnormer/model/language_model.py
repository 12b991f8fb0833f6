"""The language model: embedding -> L blocks -> final norm -> tied head (spec §7).

Built from parts a pipeline stage can also build alone (`build_embedding`, `build_block`,
`build_final_norm`, `lm_head`); each part draws its weights from (seed, canonical name),
so any TP/PP layout starts from the same model. Needs megatron's model-parallel groups
(`megatron_transnormer.parallel.init_distributed`) before building.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from torch import nn

from ..parallel.tensor_parallel import initialize_parameters
from .blocks import Block, build_block
from .embedding import Embedding, lm_head
from .norms import SimpleRMSNorm, layer_norm


def _check_ready(cfg) -> None:
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("model-parallel groups are not initialised: call "
                           "megatron_transnormer.parallel.init_distributed(tensor=..., pipeline=...) first")
    if cfg.vocab_size <= 0:
        raise ValueError(f"model.vocab_size={cfg.vocab_size}: set it (or take it from the dataset) before building")
    if cfg.ffn_hidden_size <= 0:
        raise ValueError("model.ffn_hidden_size=0: run config validation (validate_config) before building")


def build_embedding(cfg, seed: int) -> Embedding:
    _check_ready(cfg)
    emb = Embedding(cfg)
    initialize_parameters(emb, seed, prefix="embedding.")
    return emb


def build_final_norm(cfg, seed: int = 0) -> nn.Module:
    """SRMSNorm for TransNormer (no parameters), LayerNorm for the baselines."""
    if cfg.arch == "transnormer":
        return SimpleRMSNorm(backend=cfg.kernels)
    norm = layer_norm(cfg.hidden_size)
    initialize_parameters(norm, seed, prefix="final_norm.")
    return norm


class TransNormerLM(nn.Module):
    """forward(input_ids [B, N], labels [B, N] | None) -> per-token loss [B, N] (fp32) if labels
    are given, else vocab-parallel logits [B, N, vocab/tp]. Any `cfg.arch`."""

    def __init__(self, cfg, seed: int):
        super().__init__()
        self.cfg = cfg
        self.embedding = build_embedding(cfg, seed)
        self.layers = nn.ModuleList(build_block(cfg, i, seed) for i in range(cfg.num_layers))
        self.final_norm = build_final_norm(cfg, seed)

    @property
    def activation_checkpointing(self) -> bool:
        return all(block.activation_checkpointing for block in self.layers)

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        for block in self.layers:
            block.activation_checkpointing = bool(value)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embedding(input_ids)
        for block in self.layers:
            x = block(x)
        return lm_head(self.final_norm(x), self.embedding.weight, labels)


def build_model(cfg, seed: int) -> TransNormerLM:
    _check_ready(cfg)
    return TransNormerLM(cfg, seed)
