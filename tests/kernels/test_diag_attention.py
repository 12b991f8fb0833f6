"""DiagAttention kernel (softmax T2 / ReLU T1, causal and bidirectional, optional key mask) vs float64."""
import pytest
import torch

import transnormer_kernels as kernels
from transnormer_kernels import reference
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


def _direct(q, k, v, block, causal, kind, key_mask):
    """The rule itself on the whole [N, N] score matrix: query t attends key s iff both
    lie in one block, s <= t when causal, and key_mask[b, s] or s == t."""
    t = torch.arange(q.shape[-2], device=q.device)
    allowed = t[:, None] // block == t[None, :] // block
    if causal:
        allowed = allowed & (t[None, :] <= t[:, None])
    allowed = allowed & (key_mask[:, None, None, :] | (t[:, None] == t[None, :]))  # [B, 1, N, N]
    logits = q @ k.transpose(-1, -2)
    if kind == "softmax":
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    else:
        probs = torch.relu(logits.masked_fill(~allowed, 0.0))
    return probs @ v


def _masked_case(device, seed):
    """Inputs [2, 2, 88, ·] (blocks of 32: the last one partial) and a key mask with a
    fully masked block (batch 0) and left padding (batch 1: queries 0..4 are padding,
    and real query 5 has no earlier real key, so causally its only key is itself)."""
    torch.manual_seed(seed)
    b, h, n, d, e = 2, 2, 88, 32, 24
    q, k, v = (torch.randn(b, h, n, d, device=device) / d ** 0.5, torch.randn(b, h, n, d, device=device),
               torch.randn(b, h, n, e, device=device))
    key_mask = torch.rand(b, n, device=device) < 0.7
    key_mask[0, 32:64] = False
    key_mask[1, :5] = False
    key_mask[1, 5] = True
    return q, k, v, key_mask


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [True, False])
def test_key_mask_vs_direct_formula(causal, kind, backend, device, poisoned):
    # Forward and the three input gradients against float64; the incoming gradient is
    # random on every row, padding queries' rows included, so a NaN anywhere would show.
    q, k, v, key_mask = _masked_case(device, seed=11 + causal + 2 * len(kind))
    check_against_float64(
        lambda q, k, v: kernels.diag_attention(q, k, v, 32, causal, kind, key_mask=key_mask, backend=backend),
        lambda q, k, v: _direct(q, k, v, 32, causal, kind, key_mask),
        [q, k, v], TOL[torch.float32])


def test_key_mask_hides_padding_tokens():
    # Whatever q, k, v hold at padding positions, real queries' outputs stay the same.
    q, k, v, key_mask = (t.double() if t.is_floating_point() else t for t in _masked_case("cpu", seed=5))
    pad = ~key_mask[:, None, :, None]
    q2, k2, v2 = (torch.where(pad, torch.randn_like(t), t) for t in (q, k, v))
    real = key_mask[:, None, :, None].expand(-1, q.shape[1], -1, v.shape[-1])
    for kind in ("softmax", "relu"):
        for causal in (True, False):
            out = reference.diag_attention(q, k, v, 32, causal, kind, key_mask=key_mask)
            out2 = reference.diag_attention(q2, k2, v2, 32, causal, kind, key_mask=key_mask)
            torch.testing.assert_close(out[real], out2[real], rtol=0, atol=1e-12)
            assert not torch.equal(out[~real], out2[~real])  # the replacement did reach the padding rows


def test_key_mask_operand(device):
    # bool and (u)int8 masks give the same result; dense ones reach the kernel uncopied.
    from transnormer_kernels.triton_diag_attention import _key_mask_operand

    q, k, v, key_mask = _masked_case(device, seed=3)
    outs = [kernels.diag_attention(q, k, v, 32, key_mask=m, backend="triton")
            for m in (key_mask, key_mask.to(torch.uint8), key_mask.to(torch.int8), key_mask.t().contiguous().t())]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    for m in (key_mask, key_mask.to(torch.uint8)):
        assert _key_mask_operand(m, q).data_ptr() == m.data_ptr()
    with pytest.raises(ValueError):
        kernels.diag_attention(q, k, v, key_mask=key_mask[:, :-1], backend="triton")
    with pytest.raises(ValueError):
        kernels.diag_attention(q, k, v, key_mask=key_mask[:, :-1], backend="torch")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_key_mask(causal, kind, dtype, poisoned):
    q, k, v, key_mask = _masked_case("cuda", seed=7)
    check_against_float64(
        lambda q, k, v: kernels.diag_attention(q, k, v, 32, causal, kind, key_mask=key_mask, backend="triton"),
        lambda q, k, v: _direct(q, k, v, 32, causal, kind, key_mask),
        [t.to(dtype) for t in (q, k, v)], TOL[dtype])
    # Under "auto" a mask on CUDA still runs the kernel.
    auto = kernels.diag_attention(q, k, v, 32, causal, kind, key_mask=key_mask)
    assert torch.equal(auto, kernels.diag_attention(q, k, v, 32, causal, kind, key_mask=key_mask, backend="triton"))


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
