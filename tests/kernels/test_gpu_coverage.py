"""GPU cases the per-kernel files leave out: the carried state at d = 128 in every dtype,
the segmented scan (forced, and chosen by `segments_for` on a long sequence), the key
mask at the model's 64-token blocks in fp16/bf16, the model's [B, N, H, D] layout in
bf16, and SimpleRMSNorm's zero row in the low-precision dtypes. Forward and every input
gradient against float64, outputs poisoned with NaN. Each case is a function of the
device and sizes, so the same code runs (small, fp32) under Triton's interpreter too."""
import pytest
import torch

import transnormer_kernels as kernels
from transnormer_kernels import reference
from tests.kernels.helpers import TOL, check_against_float64, rel_err, requires_cuda
from tests.kernels.test_diag_attention import _direct

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _qkv(b, h, n, d, e, device, seed):
    torch.manual_seed(seed)
    # Scaled so that outputs stay O(1) whatever n: the sums run over up to n terms.
    return (torch.randn(b, h, n, d, device=device) / d ** 0.5, torch.randn(b, h, n, d, device=device) / n ** 0.5,
            torch.randn(b, h, n, e, device=device))


def _decay(h, device, decay):
    return (0.8 + 0.2 * torch.rand(h, device=device)) if decay else None


def carried_state_case(b, h, n, d, e, decay, dtype, device, segments=None, seed=0):
    """o and the final state (fp32) from an fp32 initial state, and the gradients of q, k, v and
    S₀ when both outputs feed the loss, against the float64 quadratic formula."""
    q, k, v = _qkv(b, h, n, d, e, device, seed)
    lam = _decay(h, device, decay)
    s0 = torch.randn(b, h, d, e, device=device) / d ** 0.5
    g_out, g_final = torch.randn(b, h, n, e, device=device), torch.randn(b, h, d, e, device=device)

    def run(fn, cast):
        leaves = [t.detach().clone().to(cast).requires_grad_() for t in (q, k, v)]
        state = s0.detach().clone().to(torch.float64 if cast == torch.float64 else torch.float32).requires_grad_()
        out, final = fn(*leaves, state)
        torch.autograd.backward([out, final], [g_out.to(out.dtype), g_final.to(final.dtype)])
        return [out.detach(), final.detach()] + [t.grad for t in (*leaves, state)], final.dtype

    if segments is None:
        fn = lambda q, k, v, s: kernels.norm_attention(q, k, v, decay=lam, initial_state=s,  # noqa: E731
                                                         output_final_state=True, backend="triton")
    else:
        from transnormer_kernels.triton_norm_attention import causal_norm_attention
        fn = lambda q, k, v, s: causal_norm_attention(q, k, v, decay=lam, segments=segments,  # noqa: E731
                                                        initial_state=s, output_final_state=True)
    got, final_dtype = run(fn, dtype)
    ref_lam = None if lam is None else lam.double()
    want, _ = run(lambda q, k, v, s: reference.norm_attention_quadratic(
        q, k, v, decay=ref_lam, initial_state=s, output_final_state=True), torch.float64)
    errors = {name: rel_err(g, w) for name, g, w in zip(("out", "final", "dq", "dk", "dv", "ds0"), got, want)}
    assert final_dtype == torch.float32
    assert max(errors.values()) <= TOL[dtype], errors


def long_sequence_case(b, h, n, d, decay, dtype, device):
    """A long sequence at small B·H, where `segments_for` cuts it into segments, against the
    chunked reference in float64 (the quadratic one would need n² memory per head)."""
    from transnormer_kernels.triton_norm_attention import segments_for
    q, k, v = _qkv(b, h, n, d, d, device, seed=n + decay)
    lam = _decay(h, device, decay)
    ref_lam = None if lam is None else lam.double()
    if device == "cuda":
        assert segments_for(b * h, d, n, q.device) > 1, "the case is meant to take the segmented path"
    check_against_float64(lambda q, k, v: kernels.norm_attention(q, k, v, decay=lam, backend="triton")[0],
                          lambda q, k, v: reference.norm_attention(q, k, v, decay=ref_lam)[0],
                          [t.to(dtype) for t in (q, k, v)], TOL[dtype])


def key_mask_case(b, h, n, d, block, causal, kind, dtype, device, seed=0):
    """DiagAttention with a padding mask: random padding, one fully masked block, and left
    padding whose first real query has no earlier real key."""
    torch.manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, device=device) / d ** 0.5, torch.randn(b, h, n, d, device=device),
               torch.randn(b, h, n, d, device=device))
    key_mask = torch.rand(b, n, device=device) < 0.7
    key_mask[0, block:2 * block] = False
    key_mask[-1, :5] = False
    key_mask[-1, 5] = True
    check_against_float64(
        lambda q, k, v: kernels.diag_attention(q, k, v, block, causal, kind, key_mask=key_mask, backend="triton"),
        lambda q, k, v: _direct(q, k, v, block, causal, kind, key_mask),
        [t.to(dtype) for t in (q, k, v)], TOL[dtype])


def model_layout_case(b, n, h, d, mixer, decay, dtype, device):
    """The model's projections, [B, N, H, D] seen as [B, H, N, D]: read in place, outputs and
    gradients back in the model's layout."""
    torch.manual_seed(n + h + decay)
    q, k, v = (torch.randn(b, n, h, d, device=device).to(dtype).transpose(1, 2).requires_grad_() for _ in range(3))
    if mixer == "norm":
        with torch.no_grad():
            k /= n ** 0.5
            q /= d ** 0.5
        lam = _decay(h, device, decay)
        ref_lam = None if lam is None else lam.double()
        fn = lambda q, k, v: kernels.norm_attention(q, k, v, decay=lam, backend="triton")[0]  # noqa: E731
        ref = lambda q, k, v: reference.norm_attention_quadratic(q, k, v, decay=ref_lam)[0]  # noqa: E731
    else:
        with torch.no_grad():
            q /= d ** 0.5
        fn = lambda q, k, v: kernels.diag_attention(q, k, v, 64, True, "softmax", backend="triton")  # noqa: E731
        ref = lambda q, k, v: reference.diag_attention(q, k, v, 64, True, "softmax")  # noqa: E731
    out = fn(q, k, v)
    assert out.transpose(1, 2).is_contiguous()
    grad_out = torch.randn(b, n, h, d, device=device).to(dtype).transpose(1, 2)
    out.backward(grad_out)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out = ref(*leaves)
    ref_out.backward(grad_out.double())
    errors = {"out": rel_err(out.detach(), ref_out.detach())}
    for name, t, r in zip(("dq", "dk", "dv"), (q, k, v), leaves):
        assert t.grad.transpose(1, 2).is_contiguous()
        errors[name] = rel_err(t.grad, r.grad)
    assert max(errors.values()) <= TOL[dtype], errors


def rms_zero_row_case(shape, dtype, device):
    torch.manual_seed(sum(shape))
    x = torch.randn(shape, device=device) * 3
    x.view(-1, shape[-1])[1] = 0  # the norm's kink: finite, equal to the reference
    check_against_float64(lambda t: kernels.simple_rms_norm(t, backend="triton"), reference.simple_rms_norm,
                          [x.to(dtype)], TOL[dtype])


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [False, True])
def test_gpu_carried_state_d128(decay, dtype, poisoned):
    carried_state_case(1, 3, 2048 + 17, 128, 128, decay, dtype, "cuda", seed=3)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("segments", [2, 5])
@pytest.mark.parametrize("decay", [False, True])
def test_gpu_segmented_scan_with_state(decay, segments, poisoned):
    # 1000 tokens = 16 blocks (the last partial): segments of unequal lengths.
    carried_state_case(2, 2, 1000, 128, 128, decay, torch.bfloat16, "cuda", segments=segments, seed=5)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("decay", [False, True])
def test_gpu_long_sequence_segments(decay, poisoned):
    long_sequence_case(1, 2, 16384 + 5, 128, decay, torch.bfloat16, "cuda")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_key_mask_model_blocks(causal, kind, dtype, poisoned):
    key_mask_case(2, 4, 2048 + 17, 128, 64, causal, kind, dtype, "cuda", seed=9)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mixer,decay", [("norm", False), ("norm", True), ("diag", False)])
def test_gpu_model_layout_bf16(mixer, decay, poisoned):
    model_layout_case(2, 1000, 8, 128, mixer, decay, torch.bfloat16, "cuda")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_rms_zero_row(dtype, poisoned):
    rms_zero_row_case((4, 512, 1024), dtype, "cuda")
