"""The token mixers, all in one place: NormAttention and DiagAttention (TransNormer, spec §3–§4),
softmax attention (the vanilla baseline) and 1+elu linear attention (the linear baseline).

Every mixer maps (x [B, N, d], positions [B or 1, N], valid [B, N] bool or None) to
[B, N, d]. Positions are inputs (a context-parallel slice or a decoding step passes its
own offset); `valid` marks real tokens, and padding contributes nothing to any real
token: its keys are zeroed in the linear attentions (a zero key adds nothing to
Σ k vᵀ, causal or not) and excluded in the softmax/ReLU ones. `MIXERS` maps the names
of `model.layers` to the classes. Heads are split over the tensor-parallel group:
q, k, v are column-parallel (each rank computes its H/tp heads), the output projection
is row-parallel (its all-reduce restores the full width). The mixing math itself lives
in `kernels` (Triton on CUDA, PyTorch references elsewhere).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from ..parallel import context
from ..parallel.tensor_parallel import tp_rank, tp_size
from .init import constant, linear_default, xavier_uniform
from .linear import column_linear, row_linear
from .lrpe import LRPE
from .norms import SimpleRMSNorm


def decay_rates(num_heads: int, layer_index: int, num_layers: int) -> torch.Tensor:
    """TransNormerLLM's per-head decay λ_h = exp(−slope_h) (spec §11), for all heads.

    slope_h = 2^(−8(h+1)/H) · (1 − l/(L−1) + 1e-5): strong decay in early layers, almost
    none in the last.
    """
    h = torch.arange(num_heads, dtype=torch.float64)
    depth = 1.0 - layer_index / max(num_layers - 1, 1) + 1e-5
    return torch.exp(-(2.0 ** (-8.0 * (h + 1) / num_heads)) * depth).float()


class _Mixer(nn.Module):
    """q, k, v projections (column-parallel), output projection (row-parallel), head reshapes."""

    def __init__(self, cfg, qkv_weight_init, out_weight_init):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads // tp_size()  # heads on this rank
        self.head_dim = d // cfg.num_heads
        self.backend = cfg.kernels
        self.causal = cfg.causal
        # Biases of q/k/v keep torch.nn.Linear's default (the original leaves them so);
        # the output bias starts at zero as in fairseq's attention.
        self.q_proj = column_linear(d, d, qkv_weight_init, linear_default(d))
        self.k_proj = column_linear(d, d, qkv_weight_init, linear_default(d))
        self.v_proj = column_linear(d, d, qkv_weight_init, linear_default(d))
        self.out_proj = row_linear(d, d, out_weight_init, constant(0.0))

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, h·D] -> [B, h, N, D]"""
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    @staticmethod
    def merge(x: torch.Tensor) -> torch.Tensor:
        """[B, h, N, D] -> [B, N, h·D]"""
        b, h, n, e = x.shape
        return x.transpose(1, 2).reshape(b, n, h * e)

    def project_qkv(self, x):
        return self.q_proj(x)[0], self.k_proj(x)[0], self.v_proj(x)[0]

    def project_out(self, o):
        return self.out_proj(o)[0]


def _drop_padding_keys(k: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """k [B, h, N, D] with the keys of padding positions set to zero."""
    return k if valid is None else k * valid[:, None, :, None].to(k.dtype)


class NormAttention(_Mixer):
    """Linear attention with a normalised output (spec §3):

        q = LRPE(φ(x W_q + b_q)),  k = LRPE(φ(x W_k + b_k)),  v = x W_v + b_v
        O = (Q Kᵀ ⊙ M) V   (causal; computed in linear time)   or   Q (Kᵀ V)
        out = SRMSNorm_d(concat heads(O)) W_o + b_o

    φ = elu (T1) or 1 + elu (T2). No 1/√d scale, no denominator. Optional per-head decay
    (cfg.decay, spec §11).
    """

    def __init__(self, cfg, layer_index: int):
        super().__init__(cfg, xavier_uniform(2 ** -0.5), xavier_uniform(1.0))
        self.variant = cfg.variant
        self.lrpe = LRPE(self.head_dim)
        self.norm = SimpleRMSNorm(sharded=True, backend=cfg.kernels)  # over all heads, across TP
        self.decay = None
        if cfg.decay:  # this rank's heads; kept out of the buffers so a bf16 cast cannot round it
            lo = tp_rank() * self.num_heads
            self.decay = decay_rates(cfg.num_heads, layer_index, cfg.num_layers)[lo:lo + self.num_heads].tolist()

    def feature_map(self, x):
        return F.elu(x) if self.variant == "t1" else 1.0 + F.elu(x)

    def decay_on(self, device: torch.device) -> torch.Tensor | None:
        """The decay rates as an fp32 tensor on `device`, made once per device rather than
        copied from the host in every forward."""
        if self.decay is None:
            return None
        cached = getattr(self, "_decay_tensor", None)
        if cached is None or cached.device != device:
            cached = self._decay_tensor = torch.tensor(self.decay, dtype=torch.float32, device=device)
        return cached

    def forward(self, x: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (self.heads(t) for t in self.project_qkv(x))
        q = self.lrpe(self.feature_map(q), positions)
        k = _drop_padding_keys(self.lrpe(self.feature_map(k), positions), valid)
        # The kernel, or its context-parallel form when the sequence is split over ranks.
        o = context.norm_attention(q, k, v, self.causal, decay=self.decay_on(x.device), backend=self.backend)
        return self.project_out(self.norm(self.merge(o)))


class DiagAttention(_Mixer):
    """Block-diagonal local attention (spec §4), blocks of cfg.block_size tokens:

        q = (x W_q + b_q) · D^(-1/2),  k = x W_k + b_k,  v = x W_v + b_v,  LRPE on q and k
        T1: P = relu(q kᵀ, future -> 0), O = SRMSNorm_d(P V)      T2: P = softmax(q kᵀ), O = P V
        out = O W_o + b_o
    """

    def __init__(self, cfg, layer_index: int):
        super().__init__(cfg, xavier_uniform(1.0), xavier_uniform(1.0))
        self.block_size = cfg.block_size
        self.kind = "relu" if cfg.variant == "t1" else "softmax"
        self.dropout = cfg.attention_dropout
        self.lrpe = LRPE(self.head_dim)
        self.norm = SimpleRMSNorm(sharded=True, backend=cfg.kernels) if self.kind == "relu" else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (self.heads(t) for t in self.project_qkv(x))
        q = q * self.head_dim ** -0.5
        # Positions restart in every block, as in the original (the encoding is relative, so
        # only rounding differs); blocks are aligned to global positions that are multiples
        # of the block size, so a slice starting at such an offset sees the same blocks.
        positions = positions % self.block_size
        q, k = self.lrpe(q, positions), self.lrpe(k, positions)
        o = kernels.diag_attention(q, k, v, block_size=self.block_size, causal=self.causal, kind=self.kind,
                                   dropout_p=self.dropout, training=self.training, key_mask=valid,
                                   backend=self.backend)
        o = self.merge(o)
        if self.norm is not None:
            o = self.norm(o)
        return self.project_out(o)


class SoftmaxAttention(_Mixer):
    """fairseq's multi-head attention (vanilla baseline): softmax((x W_q + b_q) kᵀ / √D) V."""

    def __init__(self, cfg, layer_index: int):
        super().__init__(cfg, xavier_uniform(2 ** -0.5), xavier_uniform(1.0))
        self.dropout = cfg.attention_dropout

    def forward(self, x: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        # No positions here: the baseline takes them from the embedding's absolute positions.
        q, k, v = (self.heads(t) for t in self.project_qkv(x))
        mask = None
        if valid is not None:
            # Real keys, plus each query's own position so that a padding query's row is not
            # empty (an all -inf row would make NaNs that reach the gradients).
            n = x.shape[1]
            eye = torch.eye(n, dtype=torch.bool, device=x.device)
            mask = valid[:, None, None, :] | eye
            if self.causal:
                mask = mask & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           scale=1.0 / math.sqrt(self.head_dim))
        return self.project_out(self.merge(o))


class LinearEluAttention(_Mixer):
    """Linear attention with φ = 1 + elu and the usual denominator (Katharopoulos et al.):

        o_t = Σ_{s≤t} (φ(q_t)·φ(k_s)) v_s / (Σ_{s≤t} φ(q_t)·φ(k_s) + eps)

    Linear time: the numerator is the NormAttention kernel's causal pass, the denominator a
    running sum of the keys (fp32 at least).
    """

    EPS = 1e-6

    def __init__(self, cfg, layer_index: int):
        super().__init__(cfg, xavier_uniform(2 ** -0.5), xavier_uniform(1.0))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (self.heads(t) for t in self.project_qkv(x))
        q, k = 1.0 + F.elu(q), _drop_padding_keys(1.0 + F.elu(k), valid)
        num = context.norm_attention(q, k, v, self.causal, backend=self.backend)
        acc = torch.promote_types(q.dtype, torch.float32)
        den = (q.to(acc) * context.key_sums(k, self.causal)).sum(dim=-1, keepdim=True)
        o = (num.to(acc) / (den + self.EPS)).to(v.dtype)
        return self.project_out(self.merge(o))


# The names `model.layers` uses for each token mixer.
MIXERS = {"diag": DiagAttention, "norm": NormAttention, "softmax": SoftmaxAttention, "linear": LinearEluAttention}
