"""DiagAttention in Triton: attention inside non-overlapping blocks of BLOCK tokens.

One program per (batch·head, block) holds the whole BLOCK × BLOCK score tile, so the
forward needs no online softmax and the backward recomputes the probabilities from
q, k, v: nothing but the inputs is saved. kind 0 = softmax (T2: masked logits -inf),
kind 1 = ReLU (T1: masked logits 0 before the ReLU). Keys past the sequence end are
always masked, so padding never receives weight; an optional key mask [B, N] (shared by
all heads) masks padding tokens too, except each query's own key. Dropout is not fused:
the dispatcher sends dropout to the PyTorch reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .support import diag_block_supported
from .triton_util import as_kernel_inputs, autotune, dot_precision, pow2

SOFTMAX, RELU = 0, 1


def _configs():
    # 8 warps first: at d=128 the backward spills with 4 (bench/kernels.py --sass).
    return [triton.Config({}, num_warps=w, num_stages=1) for w in (8, 4)]


@triton.jit
def _offsets(bh, H, s_b, s_h, s_n, rows, cols):
    """Element offsets of a [rows, cols] tile of head bh in a [B, H, N, ·] tensor, last dim dense."""
    return (bh // H) * s_b + (bh % H) * s_h + rows[:, None] * s_n + cols[None, :]


@triton.jit
def _probs(q, k, keep, KIND: tl.constexpr, PREC: tl.constexpr):
    """Attention weights of one block (fp32) and the raw logits."""
    logits = tl.dot(q, tl.trans(k), input_precision=PREC)
    if KIND == 0:
        masked = tl.where(keep, logits, float("-inf"))
        e = tl.exp(masked - tl.max(masked, axis=1)[:, None])
        p = e / tl.sum(e, axis=1)[:, None]
    else:
        p = tl.maximum(tl.where(keep, logits, 0.0), 0.0)
    return p, logits


@triton.jit
def _load_block(Q, K, V, M, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, N, H, DQK, DV,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's block: its q, k, v tiles, their masks and the attention mask `keep`
    (keys past the sequence end, keys the key mask M marks as padding, and the future when
    causal, are masked). M, when given, is a dense [B, N] of bytes, nonzero = a real token."""
    bh = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BLOCK)
    rows = tl.program_id(1) * BLOCK + r
    row_ok = rows < N
    kd = tl.arange(0, BLOCK_D)
    ke = tl.arange(0, BLOCK_E)
    qk_mask = row_ok[:, None] & (kd < DQK)[None, :]
    v_mask = row_ok[:, None] & (ke < DV)[None, :]
    q = tl.load(Q + _offsets(bh, H, sq_b, sq_h, sq_n, rows, kd), mask=qk_mask, other=0.0)
    k = tl.load(K + _offsets(bh, H, sk_b, sk_h, sk_n, rows, kd), mask=qk_mask, other=0.0)
    v = tl.load(V + _offsets(bh, H, sv_b, sv_h, sv_n, rows, ke), mask=v_mask, other=0.0)
    keep = row_ok[None, :]
    if HAS_MASK:
        # One load of the block's key validity (keys past N read as invalid). The diagonal
        # stays allowed so no row is empty: padding queries, rows past N included, get a
        # finite softmax, and no NaN reaches dK / dV through their (unused) rows.
        valid = tl.load(M + (bh // H) * N + rows, mask=row_ok, other=0) != 0
        keep = valid[None, :] | (r[:, None] == r[None, :])
    if CAUSAL:
        keep = keep & (r[:, None] >= r[None, :])
    return bh, rows, kd, ke, qk_mask, v_mask, q, k, v, keep


@autotune(_configs(), key=["DQK", "DV", "KIND", "CAUSAL", "HAS_MASK"])
@triton.jit
def _diag_fwd(Q, K, V, OUT, M, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
              N, H, DQK, DV,
              KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
              BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    bh, rows, kd, ke, qk_mask, v_mask, q, k, v, keep = _load_block(
        Q, K, V, M, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, N, H, DQK, DV,
        CAUSAL, HAS_MASK, BLOCK, BLOCK_D, BLOCK_E)
    p, _ = _probs(q, k, keep, KIND, PREC)
    out = tl.dot(p.to(v.dtype), v, input_precision=PREC)
    tl.store(OUT + _offsets(bh, H, so_b, so_h, so_n, rows, ke), out.to(v.dtype), mask=v_mask)


@autotune(_configs(), key=["DQK", "DV", "KIND", "CAUSAL", "HAS_MASK"])
@triton.jit
def _diag_bwd(Q, K, V, DO, DQ, DK, DVAL, M, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
              sdo_b, sdo_h, sdo_n, sdq_b, sdq_h, sdq_n, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n,
              N, H, DQK, DV,
              KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
              BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    bh, rows, kd, ke, qk_mask, v_mask, q, k, v, keep = _load_block(
        Q, K, V, M, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, N, H, DQK, DV,
        CAUSAL, HAS_MASK, BLOCK, BLOCK_D, BLOCK_E)
    do = tl.load(DO + _offsets(bh, H, sdo_b, sdo_h, sdo_n, rows, ke), mask=v_mask, other=0.0)
    p, logits = _probs(q, k, keep, KIND, PREC)
    dt = v.dtype
    dv = tl.dot(tl.trans(p.to(dt)), do, input_precision=PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    if KIND == 0:
        # Softmax: dS = P ⊙ (dP − rowsum(P ⊙ dP)); rowsum(P ⊙ dP) = dO·O, so O need not be saved.
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    else:
        ds = tl.where(keep & (logits > 0), dp, 0.0)
    ds = ds.to(dt)
    dq = tl.dot(ds, k, input_precision=PREC)
    dk = tl.dot(tl.trans(ds), q, input_precision=PREC)
    tl.store(DQ + _offsets(bh, H, sdq_b, sdq_h, sdq_n, rows, kd), dq.to(dt), mask=qk_mask)
    tl.store(DK + _offsets(bh, H, sdk_b, sdk_h, sdk_n, rows, kd), dk.to(dt), mask=qk_mask)
    tl.store(DVAL + _offsets(bh, H, sdv_b, sdv_h, sdv_n, rows, ke), dv.to(dt), mask=v_mask)


def _launch(kernel, tensors, mask, q, v, block_size, kind, causal):
    """Runs `kernel` over (batch·head, block); tensors: its [B, H, N, ·] pointer arguments,
    in order; mask: the key mask from `_key_mask_operand`, or None (Triton takes None as a
    constexpr: the unmasked kernels compile as they would without a mask argument)."""
    bsz, h, n, d = q.shape
    if n == 0:
        return
    strides = [s for t in tensors for s in t.stride()[:3]]
    kernel[(bsz * h, triton.cdiv(n, block_size))](
        *tensors, mask, *strides, n, h, d, v.shape[-1],
        KIND=SOFTMAX if kind == "softmax" else RELU, CAUSAL=causal, HAS_MASK=mask is not None,
        PREC=dot_precision(q.dtype), BLOCK=block_size, BLOCK_D=pow2(d), BLOCK_E=pow2(v.shape[-1]))


def _key_mask_operand(key_mask, q):
    """The key mask as the kernels read it: one byte per token, a contiguous [B, N] (so
    its row stride is N and needs no kernel argument). A contiguous bool or (u)int8 mask
    is reinterpreted in place, not copied."""
    if key_mask is None:
        return None
    bsz, _, n, _ = q.shape
    if tuple(key_mask.shape) != (bsz, n):
        raise ValueError(f"key_mask must be [B, N] = {[bsz, n]}, got {list(key_mask.shape)}")
    if key_mask.device != q.device:
        raise ValueError("key_mask must be on the device of q, k, v")
    if key_mask.dtype == torch.bool:
        key_mask = key_mask.view(torch.uint8)  # same bytes: False = 0, True = 1
    elif key_mask.dtype not in (torch.uint8, torch.int8):
        raise TypeError(f"key_mask must be bool, uint8 or int8, got {key_mask.dtype}")
    return key_mask.contiguous()


class DiagAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_size, causal, kind, mask):
        q, k, v = as_kernel_inputs(q, k, v)
        out = torch.empty_like(v)  # keeps v's strides: a [B, N, H, E] layout stays one
        _launch(_diag_fwd, (q, k, v, out), mask, q, v, block_size, kind, causal)
        ctx.save_for_backward(q, k, v, mask)
        ctx.args = (block_size, kind, causal)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, mask = ctx.saved_tensors
        (do,) = as_kernel_inputs(do.to(q.dtype))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _launch(_diag_bwd, (q, k, v, do, dq, dk, dv), mask, q, v, *ctx.args)
        return dq, dk, dv, None, None, None, None


def diag_attention(q, k, v, block_size: int = 64, causal: bool = True, kind: str = "softmax", key_mask=None):
    """key_mask: optional [B, N] (bool, uint8 or int8; nonzero = a real token): query t
    attends key s only if key_mask[b, s] or s == t (see `reference.diag_attention`)."""
    if kind not in ("softmax", "relu"):
        raise ValueError(f"kind must be 'softmax' or 'relu', got {kind!r}")
    if not diag_block_supported(block_size):
        raise ValueError(f"the Triton DiagAttention needs a power-of-two block in [16, 128], got {block_size}")
    return DiagAttention.apply(q, k, v, block_size, causal, kind, _key_mask_operand(key_mask, q))
