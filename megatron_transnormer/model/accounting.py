"""Analytic parameter count and training FLOPs per token (for MFU)."""
from __future__ import annotations


def _layer_parameters(cfg) -> int:
    d, f, head_dim = cfg.hidden_size, cfg.ffn_hidden_size, cfg.hidden_size // cfg.num_heads
    attention = 4 * (d * d + d)  # q, k, v, out with biases
    if cfg.arch == "transnormer":
        lrpe = head_dim // 2 + head_dim  # θ and the Householder vector u
        glu = 2 * (d * f + f) + (f * d + d)
        return attention + lrpe + glu  # SRMSNorm has no parameters
    ffn = (d * f + f) + (f * d + d)
    return attention + ffn + 2 * 2 * d  # two LayerNorms


def count_parameters(cfg) -> int:
    """Parameters of the full model (tied embedding counted once, fixed positions not at all)."""
    if cfg.ffn_hidden_size <= 0:
        raise ValueError("model.ffn_hidden_size=0: run config validation first")
    final_norm = 0 if cfg.arch == "transnormer" else 2 * cfg.hidden_size
    return cfg.vocab_size * cfg.hidden_size + cfg.num_layers * _layer_parameters(cfg) + final_norm


def _attention_forward_flops(cfg, layer_index: int, seq_len: int) -> float:
    """Forward FLOPs per token of the token mixing (beyond the projections), all heads."""
    d, head_dim = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
    chunk = 64  # the causal linear-attention kernels' chunk
    if cfg.arch == "vanilla":
        return 4.0 * d * seq_len  # QKᵀ and PV over the full length (the usual, mask-agnostic count)
    if cfg.arch == "linear_1elu" or layer_index >= cfg.num_layers // 2:
        # Inside a chunk: QKᵀ and PV (2·chunk·d MACs); across chunks: q·S and the Kᵀ V update.
        return 2.0 * (2 * min(chunk, seq_len) * d + 2 * head_dim * d)
    return 2.0 * 2 * min(cfg.block_size, seq_len) * d  # DiagAttention: QKᵀ and PV in a block


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6·N (forward + backward through every weight, the tied output
    projection included) plus 3 × the attention-mixing forward FLOPs of every layer."""
    mixing = sum(_attention_forward_flops(cfg, i, seq_len) for i in range(cfg.num_layers))
    return 6.0 * count_parameters(cfg) + 3.0 * mixing
