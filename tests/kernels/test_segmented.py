"""The references' memory-lean backward (kernels/segmented.py): the same values and gradients
as the direct formulas (float64), and what autograd keeps is q, k, v plus one state per
segment, whatever the length."""
import pytest
import torch

from transnormer_kernels import reference, segmented


def _inputs(n, initial_state=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    q, k, v = make(2, 2, n, 8), make(2, 2, n, 8), make(2, 2, n, 4)
    return q, k, v, (make(2, 2, 8, 4) if initial_state else None)


@pytest.mark.parametrize("decay", [None, (0.97, 0.8)])
def test_norm_attention_matches_the_direct_formula(decay):
    n = 3 * 128 + 37  # several segments, the last one and its last chunk partial
    q, k, v, s0 = _inputs(n, initial_state=True)
    lam = None if decay is None else torch.tensor(decay, dtype=torch.float64)
    o, final = segmented.norm_attention(q, k, v, lam, s0, output_final_state=True, segment=128)
    o_ref, final_ref = reference.norm_attention_quadratic(q, k, v, True, lam, s0, output_final_state=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, final_ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(o)
    grads = torch.autograd.grad((o * w).sum() + final.sum(), (q, k, v, s0))
    grads_ref = torch.autograd.grad((o_ref * w).sum() + final_ref.sum(), (q, k, v, s0))
    for name, got, want in zip("q k v initial_state".split(), grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11, msg=f"d{name}")


def test_diag_attention_matches_the_reference_with_padding_and_dropout():
    n = 3 * 128 + 40
    q, k, v, _ = _inputs(n, seed=1)
    mask = torch.rand(2, n, generator=torch.Generator().manual_seed(2)) > 0.2
    for kind in ("softmax", "relu"):
        out = segmented.diag_attention(q, k, v, 32, True, kind, key_mask=mask, segment=128)
        want = reference.diag_attention(q, k, v, 32, True, kind, key_mask=mask)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        w = torch.randn_like(out)
        for got, ref in zip(torch.autograd.grad((out * w).sum(), (q, k, v)),
                            torch.autograd.grad((want * w).sum(), (q, k, v))):
            torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-11)
    # With dropout, the backward's recomputation replays each segment's mask: the gradient
    # is that of the forward that ran (checked by finite differences on a linear form).
    torch.manual_seed(3)
    out = segmented.diag_attention(q, k, v, 32, True, "relu", dropout_p=0.5, training=True, segment=128)
    grad_v = torch.autograd.grad(out.sum(), v)[0]
    torch.manual_seed(3)
    bumped = v.detach().clone()
    bumped[0, 0, 5, 0] += 1.0  # out is linear in v: the change is exactly the gradient entry
    out2 = segmented.diag_attention(q, k, bumped.requires_grad_(), 32, True, "relu", dropout_p=0.5, training=True,
                                    segment=128)
    assert (out2.sum() - out.detach().sum()).item() == pytest.approx(grad_v[0, 0, 5, 0].item(), rel=1e-9)


def _saved_bytes(fn, *inputs) -> int:
    """Bytes of the distinct storages autograd keeps for fn's backward, inputs included."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    return sum(storages.values()), out


def test_backward_keeps_q_k_v_and_segment_states_only():
    n, seg = 4096, 512
    q, k, v = (torch.randn(1, 2, n, 32, requires_grad=True) for _ in range(3))
    qkv = 3 * q.numel() * 4
    state = 2 * 32 * 32 * 4
    lean, out = _saved_bytes(lambda *t: segmented.norm_attention(*t, segment=seg)[0], q, k, v)
    out.sum().backward()  # what was kept is enough for the backward
    assert lean <= qkv + (n // seg) * state + 4096, (lean, qkv)
    plain, _ = _saved_bytes(lambda *t: reference.norm_attention(*t)[0], q, k, v)
    assert plain > 1.5 * qkv  # what the plain chunked form keeps: the reason for segments
    lean_diag, out = _saved_bytes(lambda *t: segmented.diag_attention(*t, 64, segment=seg), q, k, v)
    out.sum().backward()
    assert lean_diag <= qkv + 4096, (lean_diag, qkv)
