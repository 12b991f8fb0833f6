"""The model as data: which parts, in which order, each built and initialised on its own.

    embedding  ->  layers.0 ... layers.L-1  ->  final_norm (pre-norm models)  ->  head

`model_parts(cfg, seed)` is the one description of a model. The single-stage model
(`TransNormerModel`) and the pipeline (training/pipeline.py, one DeepSpeed layer per
part) are both built from it, so a part, a head or a layer kind is added here once.
Every part draws its weights from (seed, its canonical name), so the same layer has
the same weights whether it is built inside the whole model, alone on a pipeline
stage, or sharded over any tensor-parallel size.

`block_specs(cfg)` is the layer pattern (`model.layers`) turned into per-layer specs;
the blocks, the FLOP accounting and the pipeline read it, nothing else re-derives it.
`model_inputs(cfg)` names what the model's forward takes besides the tokens, in order:
objectives produce exactly these, and the pipeline carries them from stage to stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from megatron.core import parallel_state
from torch import nn

from ..parallel.tensor_parallel import initialize_parameters
from .blocks import Block, BlockSpec
from .embedding import Embedding, WordTable
from .heads import HEADS, build_head
from .init import apply_bert_init
from .norms import build_norm, head_holds_final_norm, norm_kind


def block_specs(cfg) -> list[BlockSpec]:
    if len(cfg.layers) != cfg.num_layers:
        raise ValueError(f"model.layers has {len(cfg.layers)} entries for model.num_layers={cfg.num_layers}: "
                         f"run config validation (validate_config) first")
    return [BlockSpec(i, mixer, cfg.mlp, norm_kind(cfg), cfg.norm_position == "post")
            for i, mixer in enumerate(cfg.layers)]


def model_inputs(cfg) -> tuple[str, ...]:
    """The forward's inputs in order. The causal LM trains on packed text (no padding);
    the masked LM and classifiers see padded samples, and the masked LM projects to the
    vocabulary only where a token is to be predicted (`output_mask`)."""
    if cfg.head == "lm":
        return ("input_ids", "positions")
    if cfg.head == "masked_lm":
        return ("input_ids", "positions", "valid", "output_mask")
    return ("input_ids", "positions", "valid")


@dataclass(frozen=True)
class Part:
    name: str  # canonical parameter prefix: embedding, layers.<i>, final_norm, head
    role: str  # embedding | block | final_norm | head | table
    build: Callable[[], nn.Module]  # builds the part and draws its weights
    tied: bool = False  # a head that projects through the embedding table E


def _built(make: Callable[[], nn.Module], cfg, seed: int, name: str) -> nn.Module:
    module = make()
    if cfg.init == "bert":
        apply_bert_init(module, pad_id=cfg.pad_id if cfg.pad_id >= 0 else None)
    initialize_parameters(module, seed, prefix=f"{name}.")
    return module


def check_buildable(cfg) -> None:
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("model-parallel groups are not initialised: call "
                           "megatron_transnormer.parallel.init_distributed(tensor=..., pipeline=...) first")
    if cfg.vocab_size <= 0:
        raise ValueError(f"model.vocab_size={cfg.vocab_size}: set it (or take it from the dataset) before building")
    if cfg.ffn_hidden_size <= 0 or not cfg.layers:
        raise ValueError("model settings are not validated: run config validation (validate_config) first")
    if cfg.positions == "learned" and cfg.max_positions <= 0:
        raise ValueError("model.positions=learned needs model.max_positions (or data.seq_len) > 0")


def model_parts(cfg, seed: int) -> list[Part]:
    """The parts of the model `cfg` describes, in forward order (see the module docstring)."""
    check_buildable(cfg)
    part = lambda name, role, make, **kw: Part(name, role, partial(_built, make, cfg, seed, name), **kw)  # noqa: E731
    parts = [part("embedding", "embedding", partial(Embedding, cfg))]
    parts += [part(f"layers.{s.index}", "block", partial(Block, cfg, s)) for s in block_specs(cfg)]
    if cfg.norm_position == "pre" and not head_holds_final_norm(cfg):
        parts.append(part("final_norm", "final_norm", partial(build_norm, norm_kind(cfg), cfg.hidden_size,
                                                              cfg.kernels)))
    parts.append(part("head", "head", partial(build_head, cfg), tied=HEADS[cfg.head].tied))
    return parts


def table_part(cfg, seed: int) -> Part:
    """E alone under the embedding's canonical name: what a pipeline stage that holds a tied
    head but not the embedding builds (the single-stage model uses the embedding's E)."""
    return Part("embedding", "table", partial(_built, partial(WordTable, cfg), cfg, seed, "embedding"))
