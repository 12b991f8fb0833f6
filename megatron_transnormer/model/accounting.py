"""Analytic parameter count and training FLOPs per token (for MFU), from the layer pattern."""
from __future__ import annotations

from .spec import block_specs

CHUNK = 64  # the causal linear-attention kernels' chunk


def _mlp_parameters(kind: str, d: int, f: int) -> int:
    if kind == "glu":
        return 2 * (d * f + f) + (f * d + d)
    return (d * f + f) + (f * d + d)


def _layer_parameters(cfg, spec) -> int:
    d, head_dim = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
    attention = 4 * (d * d + d)  # q, k, v, out with biases
    lrpe = head_dim // 2 + head_dim if spec.mixer in ("diag", "norm") else 0  # θ and the Householder u
    norms = 2 * 2 * d if spec.norm == "layernorm" else 0  # SRMSNorm has no parameters
    return attention + lrpe + _mlp_parameters(spec.mlp, d, cfg.ffn_hidden_size) + norms


def _embedding_parameters(cfg) -> int:
    d = cfg.hidden_size
    positions = cfg.max_positions * d if cfg.positions == "learned" else 0  # sinusoids are fixed
    return cfg.vocab_size * d + positions + (2 * d if cfg.embedding_norm else 0)


def _head_parameters(cfg) -> int:
    d = cfg.hidden_size
    if cfg.head == "masked_lm":
        return d * d + d + 2 * d + cfg.vocab_size  # dense, LayerNorm, output bias (decoder tied)
    if cfg.head == "classification":
        return d * d + d + d * cfg.num_classes + cfg.num_classes
    return 0  # tied to the embedding


def count_parameters(cfg) -> int:
    """Parameters of the full model (tied embedding counted once, fixed positions not at all)."""
    if cfg.ffn_hidden_size <= 0:
        raise ValueError("model.ffn_hidden_size=0: run config validation first")
    specs = block_specs(cfg)
    final_norm = 2 * cfg.hidden_size if cfg.norm_position == "pre" and specs[0].norm == "layernorm" else 0
    return (_embedding_parameters(cfg) + sum(_layer_parameters(cfg, s) for s in specs) + final_norm
            + _head_parameters(cfg))


def _mixing_forward_flops(cfg, mixer: str, seq_len: int) -> float:
    """Forward FLOPs per token of the token mixing (beyond the projections), all heads."""
    d, head_dim = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
    if mixer == "softmax":
        return 4.0 * d * seq_len  # QKᵀ and PV over the full length (the usual, mask-agnostic count)
    if mixer in ("norm", "linear"):
        # Inside a chunk: QKᵀ and PV (2·chunk·d MACs); across chunks: q·S and the Kᵀ V update.
        return 2.0 * (2 * min(CHUNK, seq_len) * d + 2 * head_dim * d)
    return 2.0 * 2 * min(cfg.block_size, seq_len) * d  # DiagAttention: QKᵀ and PV in a block


def flops_per_token(cfg, seq_len: int, predicted: float = 1.0) -> float:
    """Training FLOPs per token: 6·N (forward + backward through every weight, the tied output
    projection included) plus 3 × the attention-mixing forward FLOPs of every layer.

    predicted: the share of positions the head runs on (a masked LM projects only its
    masked tokens onto the vocabulary), which scales the head's weights and the tied
    projection's."""
    mixing = sum(_mixing_forward_flops(cfg, s.mixer, seq_len) for s in block_specs(cfg))
    head = _head_parameters(cfg) + (cfg.vocab_size * cfg.hidden_size if cfg.head != "classification" else 0)
    return 6.0 * (count_parameters(cfg) - (1.0 - predicted) * head) + 3.0 * mixing
