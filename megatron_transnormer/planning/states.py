"""Parameters, gradients and optimizer state per rank, as DeepSpeed lays them out here.

Parameters on a rank: the tensor-parallel shards (q, k, v, the MLP's first layers and
their biases, the output projections' weights, the vocabulary table) are divided by TP;
the rest (norm gains, the output projections' biases, LRPE, learned positions) is
replicated. Pipeline stage s holds its layers, the embedding on the first stage and the
tied table again on the last.

The optimizer is a torch AdamW (two fp32 moments per parameter) under DeepSpeed, whose
data-parallel group is data x context parallel (parallel/deepspeed_mpu.py): ZeRO
partitions over n = DP x CP ranks. Bytes per parameter P on the rank:

    precision, stage    parameters  gradients      fp32 master   Adam moments
    fp32, 0             4           4              -             8
    fp32, 1             4           4              4/n           8/n
    fp32, 2             4           4/n            4/n           8/n
    fp32, 3             4/n (+live) 4/n            4/n           8/n
    bf16, 0             2           2              4             8     (FP16_UnfusedOptimizer)
    bf16, 1             2           2              4/n           8/n
    bf16, 2             2           2/n            4/n           8/n
    bf16, 3             2/n (+live) 2/n            4/n           8/n

ZeRO 1-3 keep an fp32 copy of their partition even in fp32 (the flat partition the
optimizer steps). In the optimizer step the fp32 gradient of the partition (4/n; at bf16
ZeRO 0 of every parameter, 4) exists too, after the activations are gone. ZeRO 1 and 2
stage the gradients in a reduce bucket of `reduce_bucket_size` elements, DeepSpeed's
default 5e8 as deepspeed_config sets none, allocated whole whatever the model's size:
ZeRO 1 in fp32 (its accumulator; 1.9 GiB), ZeRO 2 in the gradients' dtype. ZeRO 3 gathers
the parameters of the layer it runs and prefetches the next one.
"""
from __future__ import annotations

from dataclasses import dataclass

from .activations import F32

REDUCE_BUCKET_SIZE = 500_000_000  # DeepSpeed's default (deepspeed_config sets none)


@dataclass(frozen=True)
class StageParameters:
    """Parameter counts of one pipeline stage on one TP rank."""

    total: int  # everything the rank holds (trainable or not)
    largest_layer: int  # the biggest block on it (what ZeRO 3 gathers at a time)


def _layer(cfg, mixer: str, tp: int) -> int:
    d, f, head_dim = cfg.hidden_size, cfg.ffn_hidden_size, cfg.hidden_size // cfg.num_heads
    attention = 3 * (d * d + d) // tp + d * d // tp + d  # q, k, v column-parallel; out row-parallel
    lrpe = head_dim // 2 + head_dim if mixer in ("diag", "norm") else 0
    norms = 4 * d if cfg.arch != "transnormer" else 0  # two LayerNorms; SRMSNorm has none
    if cfg.mlp == "glu":
        mlp = 2 * (d * f + f) // tp + f * d // tp + d
    else:
        mlp = (d * f + f) // tp + f * d // tp + d
    return attention + lrpe + norms + mlp


def _embedding(cfg, tp: int) -> int:
    d = cfg.hidden_size
    positions = cfg.max_positions * d if cfg.positions == "learned" else 0
    return cfg.vocab_size * d // tp + positions + (2 * d if cfg.embedding_norm else 0)


def _head(cfg, tp: int) -> int:
    d = cfg.hidden_size
    final_norm = 2 * d if cfg.norm_position == "pre" and cfg.arch != "transnormer" else 0
    if cfg.head == "masked_lm":
        return final_norm + d * d + d + 2 * d + cfg.vocab_size // tp
    if cfg.head == "classification":
        return final_norm + d * d + d + d * cfg.num_classes + cfg.num_classes
    return final_norm


def stage_layers(num_layers: int, pipeline: int, stage: int) -> range:
    """The layers of a stage: contiguous, as even as they go, the first stages taking the remainder."""
    base, extra = divmod(num_layers, pipeline)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def stage_parameters(cfg, tp: int, pipeline: int, stage: int) -> StageParameters:
    """cfg: a validated ModelConfig."""
    layers = [_layer(cfg, cfg.layers[i], tp) for i in stage_layers(cfg.num_layers, pipeline, stage)]
    total = sum(layers)
    if stage == 0:
        total += _embedding(cfg, tp)
    if stage == pipeline - 1:
        total += _head(cfg, tp)
        if stage > 0 and cfg.head in ("lm", "masked_lm"):
            total += cfg.vocab_size * cfg.hidden_size // tp  # the tied table, again
    return StageParameters(total=total, largest_layer=max(layers, default=0))


@dataclass(frozen=True)
class StateBytes:
    parameters: float
    gradients: float
    master: float  # fp32 master weights
    moments: float  # Adam's two fp32 moments
    bucket: float  # ZeRO 1/2's gradient reduce bucket
    step_transient: float  # fp32 gradients of what this rank steps, during the optimizer step


def state_bytes(params: StageParameters, precision: str, zero_stage: int, replicas: int) -> StateBytes:
    """replicas: n, the ranks ZeRO partitions over (data x context parallel)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision={precision!r}: expected fp32 or bf16")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"parallel.zero_stage={zero_stage}: expected 0, 1, 2 or 3")
    p, n = params.total, replicas
    low = F32 if precision == "fp32" else 2
    if zero_stage == 0:
        master = 0.0 if precision == "fp32" else F32 * p
        return StateBytes(low * p, low * p, master, 2 * F32 * p, 0.0, 0.0 if precision == "fp32" else F32 * p)
    parameters = low * p if zero_stage < 3 else low * p / n + 2 * low * params.largest_layer
    gradients = low * p if zero_stage == 1 else low * p / n
    bucket = {1: F32, 2: low}.get(zero_stage, 0) * REDUCE_BUCKET_SIZE
    return StateBytes(parameters, gradients, F32 * p / n, 2 * F32 * p / n, bucket, F32 * p / n)
