"""Fused SimpleRMSNorm in Triton: y = x / (‖x‖₂ · d^(-1/2) + eps), one row per program.

Backward, with r = ‖x‖₂ and den = r·d^(-1/2) + eps:
    dx = dy / den − x · (dy·x) · d^(-1/2) / (r · den²)
(the second term is taken as 0 for a zero row, where the norm is not differentiable).
The forward saves only x; r is recomputed from the row in registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_util import as_kernel_inputs, autotune, pow2


def _configs():
    return [triton.Config({}, num_warps=w) for w in (4, 8, 16, 2)]


@triton.jit
def _row_stats(x, inv_sqrt_d, eps):
    r = tl.sqrt(tl.sum(x * x, axis=0))
    den = r * inv_sqrt_d + eps
    return r, den


@autotune(_configs(), key=["D"])
@triton.jit
def _rms_fwd(X, Y, D, inv_sqrt_d, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    x = tl.load(X + row * D + cols, mask=ok, other=0.0).to(tl.float32)
    _, den = _row_stats(x, inv_sqrt_d, eps)
    tl.store(Y + row * D + cols, (x / den).to(Y.dtype.element_ty), mask=ok)


@autotune(_configs(), key=["D"])
@triton.jit
def _rms_bwd(X, DY, DX, D, inv_sqrt_d, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    x = tl.load(X + row * D + cols, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * D + cols, mask=ok, other=0.0).to(tl.float32)
    r, den = _row_stats(x, inv_sqrt_d, eps)
    # A zero row has dy·x = 0; dividing by 1 instead of r keeps its coefficient exactly 0.
    coef = tl.sum(dy * x, axis=0) * inv_sqrt_d / (tl.where(r > 0, r, 1.0) * den * den)
    tl.store(DX + row * D + cols, (dy / den - x * coef).to(DX.dtype.element_ty), mask=ok)


class SimpleRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps):
        (x,) = as_kernel_inputs(x, dense_rows=True)
        d = x.shape[-1]
        y = torch.empty_like(x)
        rows = x.numel() // d if d else 0
        if rows:
            _rms_fwd[(rows,)](x, y, d, d ** -0.5, eps, BLOCK_D=pow2(d, floor=1))
        ctx.save_for_backward(x)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        (dy,) = as_kernel_inputs(dy.to(x.dtype), dense_rows=True)
        d = x.shape[-1]
        dx = torch.empty_like(x)
        rows = x.numel() // d if d else 0
        if rows:
            _rms_bwd[(rows,)](x, dy, dx, d, d ** -0.5, ctx.eps, BLOCK_D=pow2(d, floor=1))
        return dx, None


def simple_rms_norm(x, eps: float = 1e-8):
    return SimpleRMSNorm.apply(x, eps)
