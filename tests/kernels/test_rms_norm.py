"""Fused SimpleRMSNorm kernel (forward and dx) vs float64."""
import pytest
import torch

import transnormer_kernels as kernels
from transnormer_kernels import reference
from tests.kernels.helpers import TOL, check_against_float64, requires_cuda


def _check(shape, dtype, device, zero_row=False):
    torch.manual_seed(sum(shape))
    x = torch.randn(shape, device=device) * 3
    if zero_row:
        x.view(-1, shape[-1])[1] = 0  # the norm's kink: finite, equal to the reference
    check_against_float64(lambda t: kernels.simple_rms_norm(t, backend="triton"), reference.simple_rms_norm,
                          [x.to(dtype)], TOL[dtype])


@pytest.mark.parametrize("shape", [(3, 5, 64), (7, 96), (2, 3, 4, 1000), (4, 5)])
def test_fp32(shape, device, poisoned):
    _check(shape, torch.float32, device)


def test_zero_row(device, poisoned):
    _check((4, 64), torch.float32, device, zero_row=True)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(8, 2048, 1024), (4096, 768), (3, 100, 4000)])
def test_gpu(shape, dtype, poisoned):
    _check(shape, dtype, "cuda")
