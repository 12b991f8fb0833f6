"""Causal NormAttention saves O(n·d) for backward: bytes grow linearly in n, no n×n tensor."""
import pytest
import torch

import transnormer_kernels as kernels


def _saved(n, backend, decay, device):
    torch.manual_seed(n)
    q, k = (torch.randn(1, 2, n, 32, device=device, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, n, 32, device=device, requires_grad=True)
    lam = torch.tensor([0.9, 0.99], device=device) if decay else None
    shapes, nbytes = [], []

    def pack(t):
        shapes.append(tuple(t.shape))
        nbytes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = kernels.norm_attention(q, k, v, causal=True, decay=lam, backend=backend)
    out.sum().backward()  # the graph must still run backward with what was saved
    return sum(nbytes), shapes


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_saved_bytes_linear_in_n(backend, decay, device):
    n = 320  # > block and head dims, not a multiple of 64
    small, small_shapes = _saved(n, backend, decay, device)
    large, large_shapes = _saved(2 * n, backend, decay, device)
    assert small > 0
    assert 1.8 <= large / small <= 2.2, (small, large)
    for size, shapes in ((n, small_shapes), (2 * n, large_shapes)):
        for shape in shapes:
            assert sum(dim >= size for dim in shape) <= 1, f"{shape} is quadratic in n={size}"
