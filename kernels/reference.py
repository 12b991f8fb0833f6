"""PyTorch references for TransNormer's attention math: the CPU path and the ground truth.

Shapes: q, k are [B, H, N, D]; v is [B, H, N, E]; outputs are [B, H, N, E].
Feature maps, LRPE and the DiagAttention scale are applied by the caller; these
functions hold only the mixing math of the spec (§3, §4, §2, §11).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64


def norm_attention_quadratic(q, k, v, causal: bool = True, decay=None):
    """The direct formula: O = (Q Kᵀ ⊙ M) V, M lower-triangular (or λ^(s-t) with decay).

    Quadratic in N; for tests and short sequences only.
    """
    n = q.shape[-2]
    scores = q @ k.transpose(-1, -2)
    if causal:
        idx = torch.arange(n, device=q.device)
        diff = (idx[:, None] - idx[None, :]).to(q.dtype)
        mask = diff >= 0
        if decay is not None:
            lam = decay.to(q.dtype).view(-1, 1, 1)
            weight = torch.where(mask, lam ** diff.clamp(min=0), torch.zeros((), dtype=q.dtype, device=q.device))
            scores = scores * weight
        else:
            scores = scores.masked_fill(~mask, 0.0)
    return scores @ v


def _causal_chunked(q, k, v, decay, chunk: int):
    b, h, n, d = q.shape
    e = v.shape[-1]
    pad = (-n) % chunk
    if pad:
        # Zero keys/values add nothing to any state; padded queries are dropped.
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    c = (n + pad) // chunk
    qc, kc, vc = (t.reshape(b, h, c, chunk, t.shape[-1]) for t in (q, k, v))
    idx = torch.arange(chunk, device=q.device)
    diff = (idx[:, None] - idx[None, :]).to(torch.float64)
    if decay is None:
        intra_mask = (diff >= 0).to(q.dtype)
        q_decay = k_decay = None
        block_decay = None
    else:
        lam = decay.to(torch.float64).view(h, 1, 1)
        intra_mask = torch.where(diff >= 0, lam ** diff.clamp(min=0), torch.zeros(()))  # [H, c, c]
        intra_mask = intra_mask.to(q.dtype).view(1, h, 1, chunk, chunk)
        acc = torch.promote_types(q.dtype, torch.float32)
        pos = idx.to(torch.float64)
        lam = decay.to(torch.float64).view(h, 1)
        q_decay = (lam ** (pos + 1)).view(1, h, chunk, 1).to(acc)
        k_decay = (lam ** (chunk - 1 - pos)).view(1, h, chunk, 1).to(acc)
        block_decay = (lam ** chunk).view(1, h, 1, 1).to(acc)
    # Inside a chunk: the masked quadratic form.
    out = ((qc @ kc.transpose(-1, -2)) * intra_mask) @ vc
    # Across chunks: a running Kᵀ V state, at least fp32.
    acc = torch.promote_types(q.dtype, torch.float32)
    state = q.new_zeros(b, h, d, e, dtype=acc)
    inter = []
    # unbind, not qc[:, :, i]: the backward of indexing materialises a zero tensor of the
    # whole input per chunk (quadratic in the length); unbind's backward is one stack.
    for qi, ki, vi in zip(qc.to(acc).unbind(2), kc.to(acc).unbind(2), vc.to(acc).unbind(2)):
        if decay is None:
            inter.append(qi @ state)
            state = state + ki.transpose(-1, -2) @ vi
        else:
            inter.append((qi * q_decay) @ state)
            state = block_decay * state + (ki * k_decay).transpose(-1, -2) @ vi
    out = out + torch.stack(inter, dim=2).to(out.dtype)
    return out.reshape(b, h, c * chunk, e)[:, :, :n]


def norm_attention(q, k, v, causal: bool = True, decay=None, chunk_size: int = CHUNK):
    """NormAttention's mixing before the norm, in linear time and memory.

    causal: O = (Q Kᵀ ⊙ M) V computed chunk by chunk (quadratic inside a chunk of
    `chunk_size` tokens, a running Kᵀ V state across chunks); equals
    `norm_attention_quadratic` to rounding. Bidirectional: O = Q (Kᵀ V).
    decay: optional per-head λ_h in (0, 1], shape [H] (TransNormerLLM's decay):
    o_t = Σ_{s≤t} λ^(t-s) (q_t·k_s) v_s.
    """
    if not causal:
        if decay is not None:
            raise ValueError("decay is defined for causal NormAttention only")
        return q @ (k.transpose(-1, -2) @ v)
    return _causal_chunked(q, k, v, decay, chunk_size)


def diag_attention(q, k, v, block_size: int = 64, causal: bool = True, kind: str = "softmax",
                   dropout_p: float = 0.0, training: bool = False, key_mask=None):
    """Block-diagonal local attention (spec §4): attention only inside blocks of block_size.

    q must already carry the head_dim^-1/2 scale. kind='softmax' (T2): excluded logits
    are -inf; kind='relu' (T1): excluded logits are 0 before the ReLU. The sequence is
    padded to a multiple of the block; padded keys are excluded so they never receive
    weight (this matters only for bidirectional attention).

    key_mask: optional bool [B, N], True for a real token, shared by all heads. Query t
    attends key s only if key_mask[b, s] or s == t: real queries never see a padding key,
    and every row keeps one key, so padding queries (whose outputs nobody uses) get a
    finite softmax and finite gradients instead of NaN.
    """
    if kind not in ("softmax", "relu"):
        raise ValueError(f"kind must be 'softmax' or 'relu', got {kind!r}")
    b, h, n, d = q.shape
    e = v.shape[-1]
    if key_mask is not None and tuple(key_mask.shape) != (b, n):
        raise ValueError(f"key_mask must be [B, N] = {[b, n]}, got {list(key_mask.shape)}")
    pad = (-n) % block_size
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    nb = (n + pad) // block_size
    qb, kb, vb = (t.reshape(b, h, nb, block_size, t.shape[-1]) for t in (q, k, v))
    logits = qb @ kb.transpose(-1, -2)
    idx = torch.arange(block_size, device=q.device)
    keep = torch.ones(block_size, block_size, dtype=torch.bool, device=q.device)
    if causal:
        keep = idx[:, None] >= idx[None, :]
    keep = keep.expand(nb, block_size, block_size)
    if key_mask is not None:
        # Padded positions are invalid keys, like masked ones; the diagonal term also
        # gives each padded query its own (zero) key, so no row is empty.
        valid = F.pad(key_mask.to(device=q.device, dtype=torch.bool), (0, pad), value=False)
        valid = valid.view(b, 1, nb, 1, block_size) | (idx[:, None] == idx[None, :])
        keep = keep & valid  # [B, 1, nb, block, block]: broadcast over heads
    elif pad:
        key_pos = torch.arange(nb * block_size, device=q.device).view(nb, 1, block_size)
        keep = keep & (key_pos < n)
    if kind == "softmax":
        probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
    else:
        probs = torch.relu(logits.masked_fill(~keep, 0.0))
    if dropout_p > 0 and training:
        probs = F.dropout(probs, p=dropout_p)
    out = probs @ vb
    return out.reshape(b, h, nb * block_size, e)[:, :, :n]


def simple_rms_norm(x, eps: float = 1e-8):
    """SimpleRMSNorm (spec §2): x / (‖x‖₂ · d^(-1/2) + eps) over the last dimension.

    Computed in fp32 at least (as the Triton kernel does) and returned in x's dtype.
    """
    d = x.shape[-1]
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf / (xf.norm(dim=-1, keepdim=True) * d ** -0.5 + eps)).to(x.dtype)
