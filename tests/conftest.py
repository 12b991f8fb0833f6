"""Session-wide test setup.

Without a GPU, Triton kernels can only run in Triton's interpreter, and the interpreter
flag is read when a `@triton.jit` function is decorated, so it must be set before any
module defining one is imported, whichever test package gets collected first. On CPU
tensors the dispatcher uses the PyTorch references unless a test asks for Triton, so
the flag changes nothing else.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
