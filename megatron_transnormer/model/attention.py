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

Decoding (causal mixers only): `prefill(x, positions, valid)` runs a prompt through the
same parallel computation as `forward` and also returns the mixer's recurrent state after
its last token; `step(x, positions, state)` takes one token per row ([B, 1, d], positions
[B, 1]) and updates that state in place. The states (one class per mixer, decoding.py) hold
what the next token needs: NormAttention's decayed Kᵀ V, the 1+elu baseline's Kᵀ V and
key sum, DiagAttention's current block of keys and values, softmax attention's growing
KV cache. A batch of prompts of different lengths is left-padded (`valid` False first,
then each row's real tokens at positions 0..len-1): a padding key is zero in the linear
attentions, so it adds nothing to any state, and is masked in the others.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import transnormer_kernels as kernels
from ..parallel import context
from ..parallel.tensor_parallel import tp_rank, tp_size
from .decoding import DiagState, KVCache, LinearState, NormState
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
        self.recompute = cfg.recompute_attention
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

    def forward(self, x: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """out_proj(core(q_proj x, k_proj x, v_proj x)). With recompute on, autograd keeps only
        the projections' outputs and the core's output for the core; the rest of the core is
        rerun in the backward (checkpoint replays the RNG, so dropout masks match)."""
        q, k, v = self.project_qkv(x)
        if self.recompute and torch.is_grad_enabled():
            o = checkpoint(self.core, q, k, v, positions, valid, use_reentrant=False)
        else:
            o = self.core(q, k, v, positions, valid)
        return self.project_out(o)

    def core(self, q, k, v, positions, valid):
        """[B, N, h·D] projections -> [B, N, h·E], the out projection's input."""
        raise NotImplementedError

    def _require_causal(self) -> None:
        if not self.causal:
            raise ValueError(f"{type(self).__name__}: recurrent decoding needs a causal model (model.causal=true)")


def _drop_padding_keys(k: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """k [B, h, N, D] with the keys of padding positions set to zero."""
    return k if valid is None else k * valid[:, None, :, None].to(k.dtype)


def _gather_tokens(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [B, h, N, X] at the token columns index [B, M] of each row -> [B, h, M, X]."""
    return t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))


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

    def _features(self, q, k, v, positions, valid=None):
        q, k, v = (self.heads(t) for t in (q, k, v))
        q = self.lrpe(self.feature_map(q), positions)
        k = _drop_padding_keys(self.lrpe(self.feature_map(k), positions), valid)
        return q, k, v

    def _qkv(self, x, positions, valid=None):
        return self._features(*self.project_qkv(x), positions, valid)

    def _out(self, o):
        return self.project_out(self.norm(self.merge(o)))

    def core(self, q, k, v, positions, valid):
        q, k, v = self._features(q, k, v, positions, valid)
        # The kernel, or its context-parallel form when the sequence is split over ranks.
        o = context.norm_attention(q, k, v, self.causal, decay=self.decay_on(q.device), backend=self.backend)
        return self.norm(self.merge(o))

    def prefill(self, x, positions, valid=None) -> tuple[torch.Tensor, NormState]:
        """forward's output, and the kernel's final state (padding keys are zero, so a
        left-padded row's state is that of its real tokens alone)."""
        self._require_causal()
        q, k, v = self._qkv(x, positions, valid)
        o, kv = kernels.norm_attention(q, k, v, causal=True, decay=self.decay_on(x.device), output_final_state=True,
                                       backend=self.backend)
        return self._out(o), NormState(kv)

    def step(self, x, positions, state: NormState) -> torch.Tensor:
        """One token: S_t = λ S_{t-1} + k_t v_tᵀ, o_t = q_t S_t, which is the kernel's
        λ q_t S_{t-1} + (q_t·k_t) v_t; the direct formula costs O(D·E) per head, where the
        chunked kernel would pad the one token to a whole chunk."""
        q, k, v = self._qkv(x, positions)
        acc = state.kv.dtype
        decay = self.decay_on(x.device)
        if decay is not None:
            state.kv.mul_(decay.to(acc).view(1, -1, 1, 1))
        state.kv.add_(k.to(acc).transpose(-1, -2) @ v.to(acc))
        return self._out((q.to(acc) @ state.kv).to(v.dtype))


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

    def _features(self, q, k, v, positions):
        q, k, v = (self.heads(t) for t in (q, k, v))
        q = q * self.head_dim ** -0.5
        # Positions restart in every block, as in the original (the encoding is relative, so
        # only rounding differs); blocks are aligned to global positions that are multiples
        # of the block size, so a slice starting at such an offset sees the same blocks.
        positions = positions % self.block_size
        return self.lrpe(q, positions), self.lrpe(k, positions), v

    def _qkv(self, x, positions):
        return self._features(*self.project_qkv(x), positions)

    def _merged(self, o):
        o = self.merge(o)
        return o if self.norm is None else self.norm(o)

    def _out(self, o):
        return self.project_out(self._merged(o))

    def core(self, q, k, v, positions, valid):
        q, k, v = self._features(q, k, v, positions)
        o = kernels.diag_attention(q, k, v, block_size=self.block_size, causal=self.causal, kind=self.kind,
                                   dropout_p=self.dropout, training=self.training, key_mask=valid,
                                   backend=self.backend)
        return self._merged(o)

    def prefill(self, x, positions, valid=None) -> tuple[torch.Tensor, DiagState]:
        """forward's output for left-padded prompts, and the tail of each row's last block.

        The kernel cuts blocks by column, so a row whose padding is not a whole number of
        blocks would see its blocks shifted: each row is rotated so that its real tokens
        start at column 0 (column = position), attended with the padding masked, and
        rotated back."""
        self._require_causal()
        q, k, v = self._qkv(x, positions)
        b, n, size = x.shape[0], x.shape[1], self.block_size
        lengths = torch.full((b,), n, device=x.device) if valid is None else valid.sum(dim=1)
        columns = torch.arange(n, device=x.device)
        key_mask = valid
        if valid is not None:
            rotate = (columns + (n - lengths)[:, None]) % n  # [B, N]: rotated column -> column
            q, k, v = (_gather_tokens(t, rotate) for t in (q, k, v))
            key_mask = valid.gather(1, rotate)
        o = kernels.diag_attention(q, k, v, block_size=size, causal=True, kind=self.kind, dropout_p=self.dropout,
                                   training=self.training, key_mask=key_mask, backend=self.backend)
        if valid is not None:
            o = _gather_tokens(o, (columns - (n - lengths)[:, None]) % n)
        # Slot j <- the token at position (start of the last block) + j; the slots from the
        # tail's length on are never read before they are written.
        slots = ((lengths - lengths % size)[:, None] + torch.arange(size, device=x.device)).clamp(max=n - 1)
        return self._out(o), DiagState(_gather_tokens(k, slots), _gather_tokens(v, slots))

    def step(self, x, positions, state: DiagState) -> torch.Tensor:
        """One token per row: written into its slot (position % block), then the direct formula
        over the slots up to it, softmax (T2) or ReLU (T1) as in the kernel."""
        q, k, v = self._qkv(x, positions)
        b, size = x.shape[0], self.block_size
        slot = positions.expand(b, 1)[:, 0] % size
        rows = torch.arange(b, device=x.device)
        state.keys[rows, :, slot] = k[:, :, 0]
        state.values[rows, :, slot] = v[:, :, 0]
        keep = (torch.arange(size, device=x.device) <= slot[:, None]).view(b, 1, 1, size)
        acc = torch.promote_types(q.dtype, torch.float32)
        logits = (q @ state.keys.transpose(-1, -2)).to(acc)
        if self.kind == "softmax":
            probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
        else:
            probs = torch.relu(logits.masked_fill(~keep, 0.0))
        probs = F.dropout(probs, self.dropout, self.training).to(v.dtype)
        return self._out(probs @ state.values)


class SoftmaxAttention(_Mixer):
    """fairseq's multi-head attention (vanilla baseline): softmax((x W_q + b_q) kᵀ / √D) V."""

    def __init__(self, cfg, layer_index: int):
        super().__init__(cfg, xavier_uniform(2 ** -0.5), xavier_uniform(1.0))
        self.dropout = cfg.attention_dropout
        # The fused attention keeps only q, k, v, its output and the row statistics already:
        # recomputing would save nothing.
        self.recompute = False

    def _attend(self, q, k, v, valid):
        """[B, h, N, D] heads -> [B, N, h·D], the out projection's input."""
        mask = None
        if valid is not None:
            # Real keys, plus each query's own position so that a padding query's row is not
            # empty (an all -inf row would make NaNs that reach the gradients).
            n = q.shape[2]
            eye = torch.eye(n, dtype=torch.bool, device=q.device)
            mask = valid[:, None, None, :] | eye
            if self.causal:
                mask = mask & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           scale=1.0 / math.sqrt(self.head_dim))
        return self.merge(o)

    def core(self, q, k, v, positions, valid):
        # No positions here: the baseline takes them from the embedding's absolute positions.
        return self._attend(*(self.heads(t) for t in (q, k, v)), valid)

    def prefill(self, x, positions, valid=None) -> tuple[torch.Tensor, KVCache]:
        self._require_causal()
        q, k, v = (self.heads(t) for t in self.project_qkv(x))
        return self.project_out(self._attend(q, k, v, valid)), KVCache.start(k, v, valid)

    def step(self, x, positions, state: KVCache) -> torch.Tensor:
        """One token per row against every cached key: O(length) per token."""
        q, k, v = (self.heads(t) for t in self.project_qkv(x))
        state.append(k, v)
        mask = None if state.valid is None else state.valid[:, None, None, :]
        o = F.scaled_dot_product_attention(q, state.keys, state.values, attn_mask=mask,
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

    def _features(self, q, k, v, valid=None):
        q, k, v = (self.heads(t) for t in (q, k, v))
        return 1.0 + F.elu(q), _drop_padding_keys(1.0 + F.elu(k), valid), v

    def _qkv(self, x, valid=None):
        return self._features(*self.project_qkv(x), valid)

    def _ratio(self, q, num, key_sums, v):
        """num / (q · Σk + eps), heads merged; key_sums: the sums each row sees."""
        acc = torch.promote_types(q.dtype, torch.float32)
        den = (q.to(acc) * key_sums).sum(dim=-1, keepdim=True)
        return self.merge((num.to(acc) / (den + self.EPS)).to(v.dtype))

    def _out(self, q, num, key_sums, v):
        return self.project_out(self._ratio(q, num, key_sums, v))

    def core(self, q, k, v, positions, valid):
        q, k, v = self._features(q, k, v, valid)
        num = context.norm_attention(q, k, v, self.causal, backend=self.backend)
        return self._ratio(q, num, context.key_sums(k, self.causal), v)

    def prefill(self, x, positions, valid=None) -> tuple[torch.Tensor, LinearState]:
        self._require_causal()
        q, k, v = self._qkv(x, valid)
        num, kv = kernels.norm_attention(q, k, v, causal=True, output_final_state=True, backend=self.backend)
        sums = context.key_sums(k, True)
        return self._out(q, num, sums, v), LinearState(kv, sums[:, :, -1].clone())

    def step(self, x, positions, state: LinearState) -> torch.Tensor:
        """One token: Σ k vᵀ and Σ k grow by this token's terms, o = q Σ k vᵀ / (q · Σ k + eps)."""
        q, k, v = self._qkv(x)
        acc = state.kv.dtype
        state.kv.add_(k.to(acc).transpose(-1, -2) @ v.to(acc))
        state.key_sum.add_(k[:, :, 0].to(acc))
        return self._out(q, q.to(acc) @ state.kv, state.key_sum[:, :, None], v)


# The names `model.layers` uses for each token mixer.
MIXERS = {"diag": DiagAttention, "norm": NormAttention, "softmax": SoftmaxAttention, "linear": LinearEluAttention}
