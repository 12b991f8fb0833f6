"""Causal NormAttention kernel (forward, dq, dk, dv) against the float64 quadratic formula,
with and without a carried state (initial_state in, final state out)."""
import pytest
import torch

import transnormer_kernels as kernels
from transnormer_kernels import reference
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
            return kernels.norm_attention(q, k, v, causal=True, decay=lam, backend="triton")[0]
    else:
        # Imported here, after the fixture has chosen the interpreter or the GPU.
        from transnormer_kernels.triton_norm_attention import causal_norm_attention

        def fn(q, k, v):
            return causal_norm_attention(q, k, v, decay=lam, segments=segments)[0]
    check_against_float64(fn, lambda q, k, v: reference.norm_attention_quadratic(q, k, v, causal=True,
                                                                                 decay=ref_lam)[0],
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
        ours, _ = kernels.norm_attention(q, k, v, decay=decay, backend="triton")
        ref, _ = kernels.norm_attention(q, k, v, decay=decay, backend="torch")
        assert rel_err(ours, ref) < 1e-5


def test_strong_decay_stays_finite(device):
    # λ^64 underflows fp32 for small λ; the kernel must give zeros there, not NaN.
    torch.manual_seed(1)
    (q, k, v), _ = _inputs(1, 2, 200, 32, 32, torch.float32, device, False)
    lam = torch.tensor([1e-3, 0.5], device=device)
    ours, _ = kernels.norm_attention(q, k, v, decay=lam, backend="triton")
    ref, _ = reference.norm_attention_quadratic(q.double(), k.double(), v.double(), decay=lam.double())
    assert rel_err(ours, ref) < 1e-5


def test_unsupported_cases_fall_back_or_raise(device):
    q = torch.randn(1, 2, 70, 32, device=device)
    with pytest.raises(NotImplementedError):
        kernels.norm_attention(q, q, q, causal=False, backend="triton")
    lam = torch.full((2,), 0.9, device=device, requires_grad=True)
    with pytest.raises(NotImplementedError):
        kernels.norm_attention(q, q, q, decay=lam, backend="triton")
    # "auto" takes the reference for both, gradient of the decay included.
    out, _ = kernels.norm_attention(q, q, q, decay=lam, backend="auto")
    out.sum().backward()
    assert lam.grad is not None and torch.isfinite(lam.grad).all()
    assert torch.allclose(kernels.norm_attention(q, q, q, causal=False)[0], q @ (q.transpose(-1, -2) @ q))


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
    out, _ = kernels.norm_attention(q, k, v, decay=lam, backend="triton")
    assert out.transpose(1, 2).is_contiguous()
    grad_out = torch.randn(b, n, h, d, device=device).transpose(1, 2)
    out.backward(grad_out)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference.norm_attention_quadratic(*ref, decay=None if lam is None else lam.double())
    ref_out.backward(grad_out.double())
    assert rel_err(out, ref_out) < 1e-5
    for t, r in zip((q, k, v), ref):
        assert t.grad.transpose(1, 2).is_contiguous()
        assert rel_err(t.grad, r.grad) < 1e-5


def _state_case(b, h, n, d, e, decay, device, seed):
    """Inputs, a random carried state and random upstream gradients for the output and the final state."""
    torch.manual_seed(seed)
    (q, k, v), lam = _inputs(b, h, n, d, e, torch.float32, device, decay)
    s0 = torch.randn(b, h, d, e, device=device) / d ** 0.5
    grads = (torch.randn(b, h, n, e, device=device), torch.randn(b, h, d, e, device=device))
    return [q, k, v, s0], lam, grads


def _run_states(fn, tensors, grads, dtype=None):
    leaves = [t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in tensors]
    out, final = fn(*leaves)
    torch.autograd.backward([out, final], [g.to(out.dtype) for g in grads[:1]] + [grads[1].to(final.dtype)])
    return [out.detach(), final.detach()] + [t.grad for t in leaves]


# Lengths: one block, partial last blocks (also shorter than a block), five blocks cut into
# segments; the state tests cover forward, the final state and all four gradients.
STATE_CASES = [(2, 2, 64, 32, 32, None), (1, 2, 100, 48, 32, None), (2, 1, 37, 32, 48, None),
               (2, 2, 300, 32, 48, 2), (1, 2, 300, 32, 32, 3)]


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("case", STATE_CASES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_carried_state_against_float64(backend, case, decay, device, poisoned):
    """o = (QKᵀ⊙M)V + λ^(t+1) Q S₀ and S_N = λ^N S₀ + Σ λ^(N-1-s) k_s v_sᵀ, with gradients for
    q, k, v and S₀ when both the output and the final state feed the loss."""
    *shape, segments = case
    tensors, lam, grads = _state_case(*shape, decay, device, seed=sum(shape) + decay)
    if backend == "triton" and segments:
        from transnormer_kernels.triton_norm_attention import causal_norm_attention
        fn = lambda q, k, v, s0: causal_norm_attention(q, k, v, decay=lam, segments=segments,  # noqa: E731
                                                         initial_state=s0, output_final_state=True)
    else:
        fn = lambda q, k, v, s0: kernels.norm_attention(q, k, v, decay=lam, initial_state=s0,  # noqa: E731
                                                          output_final_state=True, backend=backend)
    got = _run_states(fn, tensors, grads)
    ref_lam = None if lam is None else lam.double()
    want = _run_states(lambda q, k, v, s0: reference.norm_attention_quadratic(
        q, k, v, decay=ref_lam, initial_state=s0, output_final_state=True), tensors, grads, torch.float64)
    names = ("out", "final", "dq", "dk", "dv", "ds0")
    errors = {name: rel_err(g, w) for name, g, w in zip(names, got, want)}
    assert got[1].dtype == torch.float32
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_slices_chained_by_their_states_equal_the_whole(backend, decay, device):
    """Three slices (of 100, 64 and 37 tokens), each starting from the previous one's final
    state, give the whole sequence's output, final state and input gradients: what a
    context-parallel rank or a decoding step relies on."""
    tensors, lam, _ = _state_case(2, 2, 201, 32, 32, decay, device, seed=11)
    q, k, v, _ = (t.detach().clone().requires_grad_() for t in tensors)
    whole, whole_final = kernels.norm_attention(q, k, v, decay=lam, output_final_state=True, backend=backend)
    grad = torch.randn_like(whole)
    whole.backward(grad)
    whole_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    state, outs = None, []
    for lo, hi in ((0, 100), (100, 164), (164, 201)):
        out, state = kernels.norm_attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], decay=lam,
                                            initial_state=state, output_final_state=True, backend=backend)
        outs.append(out)
    torch.cat(outs, dim=2).backward(grad)
    assert rel_err(torch.cat(outs, dim=2), whole) < 1e-5 and rel_err(state, whole_final) < 1e-5
    for t, g in zip((q, k, v), whole_grads):
        assert rel_err(t.grad, g) < 1e-5


def test_bidirectional_state(device):
    """Q (S₀ + Kᵀ V) and the final state S₀ + Kᵀ V, on the reference path (plain PyTorch)."""
    tensors, _, grads = _state_case(2, 2, 50, 16, 24, False, device, seed=3)
    got = _run_states(lambda q, k, v, s0: kernels.norm_attention(q, k, v, causal=False, initial_state=s0,
                                                                 output_final_state=True), tensors, grads)
    want = _run_states(lambda q, k, v, s0: reference.norm_attention_quadratic(
        q, k, v, causal=False, initial_state=s0, output_final_state=True), tensors, grads, torch.float64)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5
    out, final = kernels.norm_attention(*tensors[:3], causal=False)
    assert final is None and torch.equal(out, tensors[0] @ (tensors[1].transpose(-1, -2) @ tensors[2]))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("decay", [False, True])
def test_gpu_carried_state(decay, poisoned):
    tensors, lam, grads = _state_case(2, 4, 1000, 64, 64, decay, "cuda", seed=7)
    got = _run_states(lambda q, k, v, s0: kernels.norm_attention(q, k, v, decay=lam, initial_state=s0,
                                                                 output_final_state=True, backend="triton"),
                      tensors, grads, torch.bfloat16)
    ref_lam = None if lam is None else lam.double()
    want = _run_states(lambda q, k, v, s0: reference.norm_attention_quadratic(
        q, k, v, decay=ref_lam, initial_state=s0, output_final_state=True), tensors, grads, torch.float64)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-2
