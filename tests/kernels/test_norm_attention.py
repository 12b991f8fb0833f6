"""Causal NormAttention kernel (forward, dq, dk, dv) against the float64 quadratic formula."""
import pytest
import torch

import kernels
from kernels import reference
from tests.kernels.helpers import TOL, check_against_float64, rel_err, requires_cuda


def _inputs(b, h, n, d, e, dtype, device, decay):
    # Scaled so that outputs stay O(1) whatever n: the sums run over up to n terms.
    q = torch.randn(b, h, n, d, device=device) / d ** 0.5
    k = torch.randn(b, h, n, d, device=device) / n ** 0.5
    v = torch.randn(b, h, n, e, device=device)
    lam = (0.8 + 0.2 * torch.rand(h, device=device)) if decay else None
    return [t.to(dtype) for t in (q, k, v)], lam


def _check(b, h, n, d, e, decay, dtype, device, segments=None):
    torch.manual_seed(n * 131 + d + 7 * e + decay)
    inputs, lam = _inputs(b, h, n, d, e, dtype, device, decay)
    ref_lam = None if lam is None else lam.double()
    if segments is None:
        def fn(q, k, v):
            return kernels.norm_attention(q, k, v, causal=True, decay=lam, backend="triton")
    else:
        # Imported here, after the fixture has chosen the interpreter or the GPU.
        from kernels.triton_norm_attention import causal_norm_attention

        def fn(q, k, v):
            return causal_norm_attention(q, k, v, decay=lam, segments=segments)
    check_against_float64(fn, lambda q, k, v: reference.norm_attention_quadratic(q, k, v, causal=True, decay=ref_lam),
                          inputs, TOL[dtype])


# Shapes: exactly one block, lengths that are not multiples of 64 (shorter than a block
# too, a single token), head dims 64, 128 and padded ones (48, 32), D ≠ E, several batches and heads.
CPU_SHAPES = [(1, 2, 64, 64, 64), (2, 3, 100, 64, 64), (1, 2, 130, 48, 48), (2, 1, 37, 32, 64), (1, 1, 150, 128, 128),
              (2, 1, 1, 32, 32)]


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_fp32(shape, decay, device, poisoned):
    _check(*shape, decay, torch.float32, device)


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("segments", [2, 3])
def test_sequence_segments(segments, decay, device, poisoned):
    # 300 tokens = 5 blocks: segments of 3+2 and 2+2+1 blocks; the last block is partial.
    _check(2, 2, 300, 32, 48, decay, torch.float32, device, segments=segments)


def test_fp16(device, poisoned):
    _check(1, 2, 80, 64, 32, True, torch.float16, device)


def test_matches_reference_backend(device):
    torch.manual_seed(0)
    (q, k, v), lam = _inputs(2, 2, 90, 32, 32, torch.float32, device, True)
    for decay in (None, lam):
        ours = kernels.norm_attention(q, k, v, decay=decay, backend="triton")
        ref = kernels.norm_attention(q, k, v, decay=decay, backend="torch")
        assert rel_err(ours, ref) < 1e-5


def test_strong_decay_stays_finite(device):
    # λ^64 underflows fp32 for small λ; the kernel must give zeros there, not NaN.
    torch.manual_seed(1)
    (q, k, v), _ = _inputs(1, 2, 200, 32, 32, torch.float32, device, False)
    lam = torch.tensor([1e-3, 0.5], device=device)
    ours = kernels.norm_attention(q, k, v, decay=lam, backend="triton")
    ref = reference.norm_attention_quadratic(q.double(), k.double(), v.double(), decay=lam.double())
    assert rel_err(ours, ref) < 1e-5


def test_unsupported_cases_fall_back_or_raise(device):
    q = torch.randn(1, 2, 70, 32, device=device)
    with pytest.raises(NotImplementedError):
        kernels.norm_attention(q, q, q, causal=False, backend="triton")
    lam = torch.full((2,), 0.9, device=device, requires_grad=True)
    with pytest.raises(NotImplementedError):
        kernels.norm_attention(q, q, q, decay=lam, backend="triton")
    # "auto" takes the reference for both, gradient of the decay included.
    out = kernels.norm_attention(q, q, q, decay=lam, backend="auto")
    out.sum().backward()
    assert lam.grad is not None and torch.isfinite(lam.grad).all()
    assert torch.allclose(kernels.norm_attention(q, q, q, causal=False), q @ (q.transpose(-1, -2) @ q))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 1000, 64, 64), (1, 3, 2048 + 17, 128, 128), (2, 2, 513, 96, 80)])
def test_gpu(shape, decay, dtype, poisoned):
    _check(*shape, decay, dtype, "cuda")


@pytest.mark.parametrize("decay", [False, True])
def test_heads_interleaved_layout(decay, device, poisoned):
    # The model's layout: [B, N, H, D] viewed as [B, H, N, D]. The kernel reads it in place and
    # writes the output and gradients in the same layout, so the model's transpose back is free.
    torch.manual_seed(5)
    b, n, h, d = 2, 150, 3, 32
    q, k, v = (torch.randn(b, n, h, d, device=device).transpose(1, 2).requires_grad_() for _ in range(3))
    lam = torch.tensor([0.9, 0.99, 1.0], device=device) if decay else None
    out = kernels.norm_attention(q, k, v, decay=lam, backend="triton")
    assert out.transpose(1, 2).is_contiguous()
    grad_out = torch.randn(b, n, h, d, device=device).transpose(1, 2)
    out.backward(grad_out)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out = reference.norm_attention_quadratic(*ref, decay=None if lam is None else lam.double())
    ref_out.backward(grad_out.double())
    assert rel_err(out, ref_out) < 1e-5
    for t, r in zip((q, k, v), ref):
        assert t.grad.transpose(1, 2).is_contiguous()
        assert rel_err(t.grad, r.grad) < 1e-5
