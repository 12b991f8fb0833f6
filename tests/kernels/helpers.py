"""Comparison helpers for the kernel tests."""
import pytest
import torch

# Use together with @pytest.mark.gpu (the marker `make test` deselects).
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Relative error bounds vs a float64 reference (‖x − ref‖ / ‖ref‖).
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(x, ref):
    assert torch.isfinite(x).all(), "non-finite values (an unwritten output?)"
    ref = ref.double().cpu()
    return ((x.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def run_with_grads(fn, inputs, grad_out=None):
    """fn(*inputs) and the gradients of <fn(...), grad_out> w.r.t. each input."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in leaves], grad_out


def check_against_float64(fn, ref_fn, inputs, tol):
    """fn on `inputs` vs ref_fn on their float64 copies: output and every input gradient."""
    out, grads, grad_out = run_with_grads(fn, inputs)
    ref_out, ref_grads, _ = run_with_grads(ref_fn, [t.double() for t in inputs], grad_out.double())
    errors = {"out": rel_err(out, ref_out)}
    errors.update({f"grad{i}": rel_err(g, r) for i, (g, r) in enumerate(zip(grads, ref_grads))})
    assert max(errors.values()) <= tol, errors
    return errors
