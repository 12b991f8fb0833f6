"""Kernel tests run the Triton kernels on the GPU when there is one, else in Triton's
CPU interpreter. The flag is set per test (monkeypatch), so it never leaks into other
test packages; `kernels` imports its Triton modules on first use, inside a test here."""
import math

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty_like during the test returns NaNs, so an output element the
    kernel never writes shows up as NaN instead of as leftover memory."""
    real = torch.empty_like

    def nan_empty_like(t, *args, **kwargs):
        out = real(t, *args, **kwargs)
        if out.is_floating_point():
            out.fill_(math.nan)
        return out

    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
