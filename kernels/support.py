"""What the Triton kernels can run, answerable without importing Triton."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off")


def dtypes_supported(*tensors) -> bool:
    return all(t.dtype in KERNEL_DTYPES for t in tensors)


def diag_block_supported(block_size: int) -> bool:
    """DiagAttention holds a BLOCK × BLOCK tile in one program: a power of two from 16
    (tl.dot's minimum) to 128 (beyond that the tile no longer fits in registers)."""
    return 16 <= block_size <= 128 and block_size & (block_size - 1) == 0
