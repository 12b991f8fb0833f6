"""The backend switch: which implementation runs, and what it refuses."""
import os
import subprocess
import sys

import pytest
import torch

import transnormer_kernels as kernels
from transnormer_kernels import reference
from tests.kernels.helpers import rel_err


def test_import_needs_neither_triton_nor_interpreter():
    code = ("import sys, torch, transnormer_kernels as kernels; q = torch.randn(1, 1, 70, 16); "
            "kernels.norm_attention(q, q, q); kernels.diag_attention(q, q, q); kernels.simple_rms_norm(q); "
            "assert 'triton' not in sys.modules")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_auto_on_cpu_is_the_reference():
    q, k, v = (torch.randn(2, 2, 75, 16) for _ in range(3))
    lam = torch.tensor([0.9, 0.5])
    assert torch.equal(kernels.norm_attention(q, k, v, decay=lam)[0], reference.norm_attention(q, k, v, decay=lam)[0])
    assert torch.equal(kernels.diag_attention(q, k, v, kind="relu"), reference.diag_attention(q, k, v, kind="relu"))
    assert torch.equal(kernels.simple_rms_norm(q), reference.simple_rms_norm(q))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the interpreter flag is only consulted for CPU tensors")
    monkeypatch.delenv("TRITON_INTERPRET")
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.norm_attention(q, q, q, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.simple_rms_norm(q, backend="triton")


def test_unknown_backend():
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError):
        kernels.norm_attention(q, q, q, backend="cuda")


def test_dtypes(device):
    q = torch.randn(1, 2, 70, 32, device=device, dtype=torch.float64)
    with pytest.raises(NotImplementedError):
        kernels.norm_attention(q, q, q, backend="triton")
    assert kernels.diag_attention(q, q, q, backend="auto").dtype == torch.float64
    # Mixed fp16/fp32 inputs run in the common dtype; each gradient comes back in its input's dtype.
    q16 = torch.randn(1, 2, 70, 32, device=device, dtype=torch.float16, requires_grad=True)
    v32 = torch.randn(1, 2, 70, 32, device=device, requires_grad=True)
    out, _ = kernels.norm_attention(q16, q16, v32, backend="triton")
    assert out.dtype == torch.float32
    out.sum().backward()
    assert q16.grad.dtype == torch.float16 and v32.grad.dtype == torch.float32


def test_autocast_casts_fp32_inputs(device):
    # fp16: the interpreter's bf16 arithmetic is wrong, fp16 is exact enough.
    q, k, v = (torch.randn(1, 2, 100, 32, device=device) / 4 for _ in range(3))
    with torch.autocast(device, dtype=torch.float16):
        for name, out in (("norm_attention", lambda r: r[0]), ("diag_attention", lambda r: r)):
            ours = out(getattr(kernels, name)(q, k, v, backend="triton"))
            ref = out(getattr(kernels, name)(q, k, v, backend="torch"))
            assert ours.dtype == ref.dtype == torch.float16
            assert rel_err(ours, ref) < 1e-2
