"""PyTorch references for TransNormer's attention math: the CPU path and the ground truth.

Shapes: q, k are [B, H, N, D]; v is [B, H, N, E]; outputs are [B, H, N, E].
Feature maps, LRPE and the DiagAttention scale are applied by the caller; these
functions hold only the mixing math of the spec (§3, §4, §2, §11).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64


def _powers(decay, exponent: torch.Tensor, dtype) -> torch.Tensor:
    """λ_h^exponent for every head: [H, *exponent.shape] (exponent >= 0)."""
    return decay.to(dtype).view(-1, *([1] * exponent.dim())) ** exponent.to(dtype)


def norm_attention_quadratic(q, k, v, causal: bool = True, decay=None, initial_state=None,
                             output_final_state: bool = False):
    """The direct formula: O = (Q Kᵀ ⊙ M) V, M lower-triangular (or λ^(t-s) with decay), plus
    the carried state's part: row t gets λ^(t+1) q_t S₀ (bidirectional: O = Q (S₀ + Kᵀ V)).
    The final state is S_N = λ^N S₀ + Σ_s λ^(N-1-s) k_s v_sᵀ (bidirectional: S₀ + Kᵀ V).

    Quadratic in N; for tests and short sequences only. Returns (O, S_N or None).
    """
    n = q.shape[-2]
    if not causal:
        kv = k.transpose(-1, -2) @ v
        if initial_state is not None:
            kv = kv + initial_state.to(kv.dtype)
        return q @ kv, (kv if output_final_state else None)
    scores = q @ k.transpose(-1, -2)
    idx = torch.arange(n, device=q.device)
    diff = idx[:, None] - idx[None, :]
    mask = diff >= 0
    if decay is not None:
        weight = torch.where(mask, _powers(decay, diff.clamp(min=0), q.dtype), torch.zeros((), dtype=q.dtype))
        scores = scores * weight
    else:
        scores = scores.masked_fill(~mask, 0.0)
    out = scores @ v
    lam = (lambda e: _powers(decay, e, q.dtype).unsqueeze(-1)) if decay is not None else (lambda e: 1.0)  # noqa: E731
    if initial_state is not None:
        out = out + (lam(idx + 1) * q) @ initial_state.to(q.dtype)
    final = None
    if output_final_state:
        final = (lam(n - 1 - idx) * k).transpose(-1, -2) @ v
        if initial_state is not None:
            carried = _powers(decay, torch.tensor(n), q.dtype).view(-1, 1, 1) if decay is not None else 1.0
            final = final + carried * initial_state.to(q.dtype)
    return out, final


def _causal_chunked(q, k, v, decay, chunk: int, initial_state, output_final_state: bool):
    b, h, n, d = q.shape
    e = v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)
    if n == 0:  # an empty slice passes the state on unchanged
        state = q.new_zeros(b, h, d, e, dtype=acc) if initial_state is None else initial_state.to(acc)
        return v.new_zeros(b, h, 0, e), (state if output_final_state else None)
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
    else:
        lam = decay.to(torch.float64).view(h, 1, 1)
        intra_mask = torch.where(diff >= 0, lam ** diff.clamp(min=0), torch.zeros(()))  # [H, c, c]
        intra_mask = intra_mask.to(q.dtype).view(1, h, 1, chunk, chunk)
        pos = idx.to(torch.float64)
        lam = decay.to(torch.float64).view(h, 1)
        q_decay = (lam ** (pos + 1)).view(1, h, chunk, 1).to(acc)

        def k_decay(length):  # a key's weight entering the state at the end of a chunk of `length`
            return (lam ** (length - 1 - pos).clamp(min=0)).view(1, h, chunk, 1).to(acc)

        def chunk_decay(length):
            return (lam ** length).view(1, h, 1, 1).to(acc)
    # Inside a chunk: the masked quadratic form.
    out = ((qc @ kc.transpose(-1, -2)) * intra_mask) @ vc
    # Across chunks: a running Kᵀ V state, at least fp32, starting from the carried one.
    state = q.new_zeros(b, h, d, e, dtype=acc) if initial_state is None else initial_state.to(acc)
    inter = []
    # unbind, not qc[:, :, i]: the backward of indexing materialises a zero tensor of the
    # whole input per chunk (quadratic in the length); unbind's backward is one stack.
    for i, (qi, ki, vi) in enumerate(zip(qc.to(acc).unbind(2), kc.to(acc).unbind(2), vc.to(acc).unbind(2))):
        if decay is None:
            inter.append(qi @ state)
            state = state + ki.transpose(-1, -2) @ vi
        else:
            # The last chunk may be partial: its state is taken at the last real token, so
            # that the final state is Σ λ^(N-1-s) k_s v_sᵀ (padding rows are zero anyway).
            length = chunk - pad if i == c - 1 else chunk
            inter.append((qi * q_decay) @ state)
            state = chunk_decay(length) * state + (ki * k_decay(length)).transpose(-1, -2) @ vi
    out = out + torch.stack(inter, dim=2).to(out.dtype)
    return out.reshape(b, h, c * chunk, e)[:, :, :n], (state if output_final_state else None)


def norm_attention(q, k, v, causal: bool = True, decay=None, initial_state=None, output_final_state: bool = False,
                   chunk_size: int = CHUNK):
    """NormAttention's mixing before the norm, in linear time and memory -> (O, final state).

    causal: O = (Q Kᵀ ⊙ M) V computed chunk by chunk (quadratic inside a chunk of
    `chunk_size` tokens, a running Kᵀ V state across chunks); equals
    `norm_attention_quadratic` to rounding. Bidirectional: O = Q (Kᵀ V).
    decay: optional per-head λ_h in (0, 1], shape [H] (TransNormerLLM's decay):
    o_t = Σ_{s≤t} λ^(t-s) (q_t·k_s) v_s.
    initial_state: [B, H, D, E], the state Σ_{s<0} λ^(-1-s) k_s v_sᵀ of the tokens before
    this slice (a previous chunk, an earlier context-parallel rank, the decoding cache);
    row t then also gets λ^(t+1) q_t S₀. output_final_state: also return the state after
    the last token, S_N = λ^N S₀ + Σ_s λ^(N-1-s) k_s v_sᵀ, in fp32 (at least); else None.
    Gradients flow to initial_state as to q, k, v.
    """
    if not causal:
        if decay is not None:
            raise ValueError("decay is defined for causal NormAttention only")
        if initial_state is None and not output_final_state:
            return q @ (k.transpose(-1, -2) @ v), None
        acc = torch.promote_types(q.dtype, torch.float32)
        kv = (k.transpose(-1, -2) @ v).to(acc)
        if initial_state is not None:
            kv = kv + initial_state.to(acc)
        return q @ kv.to(q.dtype), (kv if output_final_state else None)
    return _causal_chunked(q, k, v, decay, chunk_size, initial_state, output_final_state)


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
