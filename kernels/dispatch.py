"""Chooses between the Triton kernels and the PyTorch references (run through
`segmented`, which keeps their backward's memory to q, k, v and the segment states).

Rule: backend="torch" always takes the reference. backend="auto" takes Triton for CUDA
tensors when Triton is importable, else the reference. backend="triton" requires Triton
and, for CPU tensors, Triton's interpreter (TRITON_INTERPRET=1, set before the first
Triton call): that is how the CPU tests run the kernels through this API.

The Triton modules are imported on first use, so importing `transnormer_kernels` never imports
Triton, and the interpreter flag matters only to whoever sets it before that first use.
Cases the kernels do not cover go to the reference under "auto" and raise under "triton":
bidirectional NormAttention (the reference is two matmuls, already on tensor cores), a
decay that requires grad, fused dropout, DiagAttention blocks that are not a power of two
in [16, 128], and dtypes other than fp16/bf16/fp32.
"""
from __future__ import annotations

import importlib

import torch

from . import reference, segmented
from .support import diag_block_supported, dtypes_supported, interpreting, triton_available

BACKENDS = ("auto", "torch", "triton")


def _use_triton(backend: str, x, unsupported: str | None = None) -> bool:
    """Whether to run Triton; `unsupported` names a case the kernels lack (None: covered)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return x.is_cuda and triton_available() and unsupported is None
    if not triton_available():
        raise RuntimeError("backend='triton' but Triton is not installed")
    if not x.is_cuda and not interpreting():
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
    if unsupported is not None:
        raise NotImplementedError(f"no Triton kernel for {unsupported}; use backend='auto' or 'torch'")
    return True


def _kernels(name: str):
    return importlib.import_module(f".triton_{name}", __package__)


def _autocast(*tensors):
    """Under autocast the reference's matmuls run in the autocast dtype, so fp32 inputs go
    to the kernels in that dtype too (rather than down their slow exact-fp32 path)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.dtype == torch.float32 else t for t in tensors)


def norm_attention(q, k, v, causal: bool = True, decay=None, initial_state=None, output_final_state: bool = False,
                   backend: str = "auto"):
    """-> (output [B, H, N, E], final state [B, H, D, E] fp32 or None); see reference.norm_attention."""
    unsupported = None if dtypes_supported(q, k, v) else "dtypes other than fp16/bf16/fp32"
    if not causal:
        unsupported = "bidirectional NormAttention (plain PyTorch is the fast path)"
    elif decay is not None and decay.requires_grad:
        unsupported = "a trainable decay (its gradient)"
    if _use_triton(backend, q, unsupported):
        return _kernels("norm_attention").causal_norm_attention(*_autocast(q, k, v), decay=decay,
                                                                initial_state=initial_state,
                                                                output_final_state=output_final_state)
    if not causal:
        return reference.norm_attention(q, k, v, causal=False, decay=decay, initial_state=initial_state,
                                        output_final_state=output_final_state)
    return segmented.norm_attention(q, k, v, decay=decay, initial_state=initial_state,
                                    output_final_state=output_final_state)


def diag_attention(q, k, v, block_size: int = 64, causal: bool = True, kind: str = "softmax",
                   dropout_p: float = 0.0, training: bool = False, key_mask=None, backend: str = "auto"):
    # The kernels read key_mask themselves: a mask alone never sends a call to the reference.
    unsupported = None if dtypes_supported(q, k, v) else "dtypes other than fp16/bf16/fp32"
    if dropout_p > 0 and training:
        unsupported = "attention dropout"
    elif not diag_block_supported(block_size):
        unsupported = f"block_size={block_size} (needs a power of two in [16, 128])"
    if _use_triton(backend, q, unsupported):
        return _kernels("diag_attention").diag_attention(*_autocast(q, k, v), block_size=block_size, causal=causal,
                                                         kind=kind, key_mask=key_mask)
    return segmented.diag_attention(q, k, v, block_size=block_size, causal=causal, kind=kind,
                                    dropout_p=dropout_p, training=training, key_mask=key_mask)


def simple_rms_norm(x, eps: float = 1e-8, backend: str = "auto"):
    if _use_triton(backend, x, None if dtypes_supported(x) else "dtypes other than fp16/bf16/fp32"):
        return _kernels("rms_norm").simple_rms_norm(x, eps=eps)
    return reference.simple_rms_norm(x, eps=eps)
