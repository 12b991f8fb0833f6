"""Small helpers shared by the Triton kernel modules (importing this needs Triton)."""
from __future__ import annotations

import functools

import torch
import triton

from .support import KERNEL_DTYPES, interpreting


def autotune(configs, key):
    """`triton.autotune`, reduced to the first config under the interpreter.

    The interpreter cannot time kernels, and with a single config the autotuner never
    benchmarks; on a GPU all configs are tried once per key.
    """
    return triton.autotune(configs=configs[:1] if interpreting() else configs, key=key)


def pow2(n: int, floor: int = 16) -> int:
    """Tile width for a dimension of size n: a power of two, at least `floor` (tl.dot needs 16)."""
    return max(floor, triton.next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 products (the caller asked for fp32); half types use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def as_kernel_inputs(*tensors, dense_rows: bool = False):
    """The tensors in one common dtype (autograd casts each gradient back to its input's),
    copied only where the kernels cannot index them: the last dim must be dense, and with
    `dense_rows` the whole tensor (kernels that see it as [rows, last dim])."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"Triton kernels take fp16, bf16 or fp32, got {dtype}")
    if len({t.device for t in tensors}) != 1:
        raise ValueError("all inputs must be on one device")
    return [t.to(dtype) if t.stride(-1) == 1 and not dense_rows else t.to(dtype).contiguous() for t in tensors]


__all__ = ["as_kernel_inputs", "autotune", "dot_precision", "pow2"]
