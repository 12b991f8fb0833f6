"""Recomputing the attention cores in the backward (model.recompute_attention) changes no
value: the same loss and bit-identical gradients for every mixer, with less kept for the
backward. The GLU's gate keeps W1x and W2x only and has the composed ops' gradients."""
import pytest
import torch
import torch.nn.functional as F

from megatron_transnormer.model import build_model
from megatron_transnormer.model.mlp import _SiluGate
from tests.model.conftest import small_config

pytestmark = pytest.mark.usefixtures("single_process")


def _step(model, ids):
    """The loss and every gradient of one forward/backward, and the bytes autograd kept."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, \
        sum(v for k, v in kept.items() if k not in params)


@pytest.mark.parametrize("model", [dict(variant="t1"), dict(variant="t2", decay=True, attention_dropout=0.1),
                                   dict(arch="linear_1elu"), dict(arch="vanilla")])
def test_recomputed_cores_give_identical_gradients(model):
    ids = torch.randint(0, 96, (2, 65))
    results = {}
    for recompute in (False, True):
        cfg = small_config(recompute_attention=recompute, **model)
        m = build_model(cfg, seed=3).train()
        torch.manual_seed(0)  # the same attention-dropout draws in both runs
        results[recompute] = _step(m, ids)
    (loss0, grads0, kept0), (loss1, grads1, kept1) = results[False], results[True]
    assert loss0 == loss1
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name
    if model.get("arch") != "vanilla":  # softmax attention keeps only q, k, v, o already
        assert kept1 < 0.8 * kept0, (kept1, kept0)


def test_silu_gate_matches_the_composed_ops():
    a, b = (torch.randn(4, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(_SiluGate.apply, (a, b))
    w = torch.randn(4, 6, dtype=torch.float64)
    got = torch.autograd.grad((_SiluGate.apply(a, b) * w).sum(), (a, b))
    want = torch.autograd.grad((F.silu(a) * b * w).sum(), (a, b))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-14, atol=1e-14)
