"""Chooses between the Triton kernels and the PyTorch references."""
from __future__ import annotations

from . import reference

BACKENDS = ("auto", "torch", "triton")


def _use_triton(backend: str, x) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        raise NotImplementedError("Triton kernels are not available in this build")
    return False


def norm_attention(q, k, v, causal: bool = True, decay=None, backend: str = "auto"):
    _use_triton(backend, q)
    return reference.norm_attention(q, k, v, causal=causal, decay=decay)


def diag_attention(q, k, v, block_size: int = 64, causal: bool = True, kind: str = "softmax",
                   dropout_p: float = 0.0, training: bool = False, backend: str = "auto"):
    _use_triton(backend, q)
    return reference.diag_attention(q, k, v, block_size=block_size, causal=causal, kind=kind,
                                    dropout_p=dropout_p, training=training)


def simple_rms_norm(x, eps: float = 1e-8, backend: str = "auto"):
    _use_triton(backend, x)
    return reference.simple_rms_norm(x, eps=eps)
