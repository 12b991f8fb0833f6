"""DiagAttention kernel (softmax T2 / ReLU T1, causal and bidirectional) vs float64."""
import pytest
import torch

import kernels
from kernels import reference
from tests.kernels.helpers import TOL, check_against_float64, rel_err, requires_cuda


def _check(b, h, n, d, e, block, causal, kind, dtype, device):
    torch.manual_seed(n + d + 3 * e + causal + len(kind))
    inputs = [torch.randn(b, h, n, d, device=device) / d ** 0.5, torch.randn(b, h, n, d, device=device),
              torch.randn(b, h, n, e, device=device)]
    check_against_float64(
        lambda q, k, v: kernels.diag_attention(q, k, v, block, causal, kind, backend="triton"),
        lambda q, k, v: reference.diag_attention(q, k, v, block, causal, kind),
        [t.to(dtype) for t in inputs], TOL[dtype])


# Lengths that are not a multiple of the block (so the last block has padded keys),
# head dims 64 and padded ones, D ≠ E, every block size the kernel takes (16 to 128).
CPU_SHAPES = [(2, 2, 100, 64, 64, 64), (1, 3, 130, 48, 32, 64), (2, 1, 70, 32, 48, 32), (1, 2, 150, 32, 32, 128),
              (1, 1, 40, 16, 16, 16)]


@pytest.mark.parametrize("kind", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_fp32(shape, causal, kind, device, poisoned):
    _check(*shape, causal, kind, torch.float32, device)


def test_matches_reference_backend(device):
    q, k, v = (torch.randn(1, 2, 90, 32, device=device) for _ in range(3))
    for kind in ("softmax", "relu"):
        ours = kernels.diag_attention(q, k, v, kind=kind, backend="triton")
        assert rel_err(ours, kernels.diag_attention(q, k, v, kind=kind, backend="torch")) < 1e-5


def test_unsupported_cases_fall_back_or_raise(device):
    q = torch.randn(1, 2, 70, 32, device=device)
    with pytest.raises(NotImplementedError):
        kernels.diag_attention(q, q, q, dropout_p=0.1, training=True, backend="triton")
    with pytest.raises(NotImplementedError):
        kernels.diag_attention(q, q, q, block_size=48, backend="triton")
    # Dropout inactive outside training: the kernel runs.
    assert kernels.diag_attention(q, q, q, dropout_p=0.1, training=False, backend="triton").shape == q.shape
    assert kernels.diag_attention(q, q, q, block_size=48, backend="auto").shape == q.shape


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 4, 1000, 64, 64, 64), (1, 3, 2048 + 17, 128, 128, 64), (2, 2, 300, 96, 80, 128)])
def test_gpu(shape, causal, kind, dtype, poisoned):
    _check(*shape, causal, kind, dtype, "cuda")


@pytest.mark.parametrize("kind", ["softmax", "relu"])
def test_heads_interleaved_layout(kind, device, poisoned):
    # [B, N, H, D] viewed as [B, H, N, D], as the model passes it: read and written in place.
    torch.manual_seed(6)
    b, n, h, d = 2, 100, 3, 32
    q, k, v = (torch.randn(b, n, h, d, device=device).transpose(1, 2).requires_grad_() for _ in range(3))
    out = kernels.diag_attention(q, k, v, kind=kind, backend="triton")
    assert out.transpose(1, 2).is_contiguous()
    grad_out = torch.randn(b, n, h, d, device=device).transpose(1, 2)
    out.backward(grad_out)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out = reference.diag_attention(*ref, kind=kind)
    ref_out.backward(grad_out.double())
    assert rel_err(out, ref_out) < 1e-5
    for t, r in zip((q, k, v), ref):
        assert t.grad.transpose(1, 2).is_contiguous()
        assert rel_err(t.grad, r.grad) < 1e-5
