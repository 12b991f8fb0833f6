"""Every layer against the spec's direct formulas, in float64, single process (TP=1)."""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_transnormer.model import (LRPE, Block, DiagAttention, LinearEluAttention, NormAttention,
                                        SimpleRMSNorm, SoftmaxAttention, build_block, build_model,
                                        count_parameters, flops_per_token)
from megatron_transnormer.training.objectives import vocab_nll_sum
from megatron_transnormer.model.mlp import GLU
from megatron_transnormer.parallel.tensor_parallel import initialize_parameters

from .conftest import small_config

pytestmark = pytest.mark.usefixtures("single_process")


def built(module, seed=0):
    initialize_parameters(module, seed)
    return module.double()


def lin(layer, x):
    return x @ layer.weight.T + layer.bias


def srms(x):
    return x / (torch.sqrt((x ** 2).mean(-1, keepdim=True)) + 1e-8)


def lrpe_direct(lrpe, x, positions):
    """R(θ, t) H x_t with explicit matrices. x: [B, H, N, D]."""
    d = x.shape[-1]
    u = lrpe.u.detach() / lrpe.u.detach().norm()  # a unit vector (stored in fp32 before .double())
    householder = torch.eye(d, dtype=x.dtype) - 2 * torch.outer(u, u)
    out = torch.empty_like(x)
    for i, t in enumerate(positions.tolist()):
        rot = torch.zeros(d, d, dtype=x.dtype)
        for j, th in enumerate(lrpe.theta.detach().tolist()):
            c, s = math.cos(th * t), math.sin(th * t)
            rot[2 * j:2 * j + 2, 2 * j:2 * j + 2] = torch.tensor([[c, -s], [s, c]], dtype=x.dtype)
        out[:, :, i] = x[:, :, i] @ (rot @ householder).T
    return out


def split_heads(x, h):
    b, n, d = x.shape
    return x.view(b, n, h, d // h).transpose(1, 2)


def merge_heads(x):
    b, h, n, e = x.shape
    return x.transpose(1, 2).reshape(b, n, h * e)


def positions(n):
    return torch.arange(n).unsqueeze(0)


def token_losses(model, ids, labels):
    """Per-token next-token NLL [B, N] (0 where labels < 0), fp32, from the model's logits (TP=1)."""
    logits = model(ids).float()
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten().clamp(min=0), reduction="none")
    return torch.where(labels >= 0, nll.view(labels.shape), 0.0)


@pytest.mark.parametrize("variant,causal,decay", [("t1", True, False), ("t2", True, False), ("t2", False, False),
                                                  ("t2", True, True)])
def test_norm_attention_matches_direct_formula(variant, causal, decay):
    cfg = small_config(variant=variant, causal=causal, hidden_size=16, num_heads=2, decay=decay)
    attn = built(NormAttention(cfg, layer_index=3))
    n = 70  # not a multiple of the 64-token chunk
    x = torch.randn(2, n, 16, dtype=torch.float64)
    phi = F.elu if variant == "t1" else (lambda t: 1 + F.elu(t))
    pos = torch.arange(n)
    q = lrpe_direct(attn.lrpe, phi(split_heads(lin(attn.q_proj, x), 2)), pos)
    k = lrpe_direct(attn.lrpe, phi(split_heads(lin(attn.k_proj, x), 2)), pos)
    v = split_heads(lin(attn.v_proj, x), 2)
    scores = q @ k.transpose(-1, -2)
    if causal:
        scores = scores * torch.tril(torch.ones(n, n, dtype=torch.float64))
    if decay:  # o_t = Σ_{s≤t} λ_h^(t−s) (q_t·k_s) v_s
        lam = torch.tensor(attn.decay, dtype=torch.float64).view(2, 1, 1)
        scores = scores * lam ** (pos[:, None] - pos[None, :]).clamp(min=0)
    expected = lin(attn.out_proj, srms(merge_heads(scores @ v)))  # norm over all heads together
    torch.testing.assert_close(attn(x, positions(n)), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", ["t1", "t2"])
def test_diag_attention_matches_direct_formula(variant):
    cfg = small_config(variant=variant, hidden_size=16, num_heads=2, block_size=8)
    attn = built(DiagAttention(cfg, layer_index=0))
    n, blk = 21, 8  # padded to 24
    x = torch.randn(2, n, 16, dtype=torch.float64)
    local = torch.arange(n) % blk  # positions restart per block
    q = lrpe_direct(attn.lrpe, split_heads(lin(attn.q_proj, x), 2) / math.sqrt(8), local)
    k = lrpe_direct(attn.lrpe, split_heads(lin(attn.k_proj, x), 2), local)
    v = split_heads(lin(attn.v_proj, x), 2)
    idx = torch.arange(n)
    allowed = (idx[:, None] // blk == idx[None, :] // blk) & (idx[:, None] >= idx[None, :])
    logits = q @ k.transpose(-1, -2)
    if variant == "t1":
        o = srms(merge_heads(torch.relu(logits.masked_fill(~allowed, 0.0)) @ v))
    else:
        o = merge_heads(torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ v)
    torch.testing.assert_close(attn(x, positions(n)), lin(attn.out_proj, o), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", ["t1", "t2"])
def test_diag_attention_never_sees_other_blocks_or_the_future(variant):
    cfg = small_config(variant=variant, hidden_size=16, num_heads=2, block_size=8)
    attn = built(DiagAttention(cfg, layer_index=0))
    x = torch.randn(1, 24, 16, dtype=torch.float64)
    base = attn(x, positions(24))
    for t in (3, 8, 13, 20):
        y = x.clone()
        y[:, t] += 5.0
        changed = (attn(y, positions(24)) - base).abs().amax(-1)[0] > 1e-12
        block = t // 8
        assert not changed[:t].any(), f"perturbing token {t} changed an earlier position"
        assert not changed[(block + 1) * 8:].any(), f"perturbing token {t} leaked past its block"
        # (T1's ReLU may zero a single row, so ask for a change anywhere from t to the block's end.)
        assert changed[t:(block + 1) * 8].any(), f"perturbing token {t} changed nothing"


def test_lrpe_score_depends_only_on_relative_position():
    lrpe = built(LRPE(16))
    a, b = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)

    def score(s, t):
        qs = lrpe(a.view(1, 1, 1, 16), torch.tensor([[s]]))
        kt = lrpe(b.view(1, 1, 1, 16), torch.tensor([[t]]))
        return (qs * kt).sum().item()

    for diff in (0, 3, -5):
        ref = score(10 + diff, 10)
        for t in (0, 1, 37, 200):
            assert score(t + diff, t) == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert score(3, 0) != pytest.approx(score(0, 3))  # not trivially position-free
    torch.testing.assert_close(lrpe(a.view(1, 1, 1, 16), torch.tensor([[0]])).view(16),
                               a - 2 * (a @ lrpe.u) * lrpe.u / lrpe.u.norm() ** 2)  # t = 0: the reflection alone
    assert lrpe.theta.requires_grad and not lrpe.u.requires_grad
    assert lrpe.u.norm().item() == pytest.approx(1.0)
    torch.testing.assert_close(lrpe.theta, 10000.0 ** (-2 * torch.arange(8, dtype=torch.float64) / 16))


def test_decay_rates_follow_the_alibi_slopes():
    from megatron_transnormer.model.attention import decay_rates
    rates = decay_rates(num_heads=8, layer_index=2, num_layers=6).double()
    h = torch.arange(8, dtype=torch.float64)
    expected = torch.exp(-(2.0 ** (-8 * (h + 1) / 8)) * (1 - 2 / 5 + 1e-5))
    torch.testing.assert_close(rates, expected, rtol=1e-6, atol=0)
    assert (decay_rates(8, 5, 6) > rates).all()  # the last layer decays least


def test_simple_rms_norm_and_glu():
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(SimpleRMSNorm()(x), x / (x.norm(dim=-1, keepdim=True) * 12 ** -0.5 + 1e-8))
    glu = built(GLU(12, 20))
    expected = lin(glu.w3, F.silu(lin(glu.w1, x)) * lin(glu.w2, x))
    torch.testing.assert_close(glu(x), expected)


@pytest.mark.parametrize("causal", [True, False])
def test_baseline_attentions_match_direct_formulas(causal):
    cfg = small_config(arch="linear_1elu", causal=causal, hidden_size=16, num_heads=2)
    x = torch.randn(2, 70, 16, dtype=torch.float64)
    mask = torch.tril(torch.ones(70, 70, dtype=torch.bool)) if causal else torch.ones(70, 70, dtype=torch.bool)

    lin_attn = built(LinearEluAttention(cfg, 0))
    q, k, v = (1 + F.elu(split_heads(lin(p, x), 2)) for p in (lin_attn.q_proj, lin_attn.k_proj)), None, None
    q, k = list(q)
    v = split_heads(lin(lin_attn.v_proj, x), 2)
    a = (q @ k.transpose(-1, -2)) * mask
    expected = lin(lin_attn.out_proj, merge_heads((a @ v) / (a.sum(-1, keepdim=True) + 1e-6)))
    torch.testing.assert_close(lin_attn(x, positions(70)), expected, rtol=1e-10, atol=1e-10)

    soft = built(SoftmaxAttention(cfg, 0))
    q = split_heads(lin(soft.q_proj, x), 2) / math.sqrt(8)
    k, v = split_heads(lin(soft.k_proj, x), 2), split_heads(lin(soft.v_proj, x), 2)
    p = torch.softmax((q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(soft(x, positions(70)), lin(soft.out_proj, merge_heads(p @ v)), rtol=1e-10,
                               atol=1e-10)


def test_paper_parameter_counts():
    alm = small_config(vocab_size=267_744, hidden_size=512, num_heads=8, num_layers=6, block_size=64)
    assert alm.ffn_hidden_size == 1365
    assert count_parameters(alm) == 155_988_540
    model = build_model(alm, seed=1)
    assert sum(p.numel() for p in model.parameters()) == 155_988_540
    # LRPE: 3 Diag + 3 Norm modules x (32 θ + 64 u) = 576, all in the count above.
    assert sum(p.numel() for n, p in model.named_parameters() if ".lrpe." in n) == 576
    del model
    vanilla = small_config(arch="vanilla", vocab_size=267_744, hidden_size=512, num_heads=8, num_layers=6,
                           ffn_hidden_size=2048)
    assert count_parameters(vanilla) == 156_000_256
    assert flops_per_token(alm, 512) > 6 * 155_988_540


@pytest.mark.parametrize("arch", ["transnormer", "vanilla", "linear_1elu"])
def test_model_counts_layout_independent_init_and_checkpointing(arch):
    cfg = small_config(arch=arch, variant="t1", dropout=0.1)
    model = build_model(cfg, seed=7)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)
    # Layer 2 built alone (as on a pipeline stage) equals layer 2 of the full model.
    alone = build_block(cfg, 2, seed=7)
    for (name, p), (_, q) in zip(model.layers[2].named_parameters(), alone.named_parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(model.layers[2].mlp.fc1.weight if arch != "transnormer" else model.layers[2].mlp.w1.weight,
                           (model.layers[3].mlp.fc1.weight if arch != "transnormer" else model.layers[3].mlp.w1.weight))
    assert isinstance(model.layers[0], Block)
    if arch == "transnormer":
        assert isinstance(model.layers[1].mixer, DiagAttention) and isinstance(model.layers[2].mixer, NormAttention)

    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    results = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        model.zero_grad()
        torch.manual_seed(3)  # same dropout masks: recomputation must replay them
        loss = token_losses(model, ids, ids.roll(-1, 1))
        assert loss.shape == (2, 24) and loss.dtype == torch.float32
        loss.mean().backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for g0, g1 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g0, g1, rtol=1e-6, atol=1e-7)

    model.eval()
    logits = model(ids)
    assert logits.shape == (2, 24, cfg.vocab_size)
    # bf16 parameters (the runtime's cast) still give a close, finite loss.
    labels = ids.roll(-1, 1)
    with torch.no_grad():
        ref = token_losses(model, ids, labels)
        loss16 = token_losses(model.to(torch.bfloat16), ids, labels)
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16).all()
    assert (loss16.mean() - ref.mean()).abs() < 0.05 * ref.mean()
    # Labels of -1 are not scored.
    masked = labels.clone()
    masked[:, :5] = -1
    with torch.no_grad():
        out = token_losses(model.float(), ids, masked)
    assert (out[:, :5] == 0).all() and (out[:, 5:] > 0).all()


@pytest.mark.parametrize("variant,decay", [("t1", False), ("t2", True)])
def test_model_with_triton_kernels_matches_the_reference(variant, decay, single_process):
    """The model's own tensor layouts (head views of the projections, LRPE outputs, a length
    that is no multiple of the 64-token chunk) through the Triton kernels, forward and
    backward with activation checkpointing: in the interpreter on CPU, on the GPU when the
    process groups run on one (as `model.kernels=triton` trains)."""
    pytest.importorskip("triton")
    device = single_process.device
    results = []
    for backend in ("torch", "triton"):
        cfg = small_config(variant=variant, hidden_size=64, num_heads=4, block_size=16, decay=decay,
                           kernels=backend)
        model = build_model(cfg, seed=5).to(device)
        model.activation_checkpointing = True
        ids = torch.randint(0, cfg.vocab_size, (2, 70), generator=torch.Generator().manual_seed(0)).to(device)
        loss = vocab_nll_sum(model(ids), ids.roll(-1, 1))
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    (loss_ref, grads_ref), (loss_triton, grads_triton) = results
    torch.testing.assert_close(loss_triton, loss_ref, rtol=1e-5, atol=1e-5)
    for ours, ref in zip(grads_triton, grads_ref, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
