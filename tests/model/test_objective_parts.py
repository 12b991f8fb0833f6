"""The parts the masked LM and classifiers add (float64, single process): padding that
changes nothing, the post-norm block, learned positions, RoBERTa's head, BERT init,
pooling, and the layer pattern as one setting."""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_transnormer.config import ConfigError, load_config, validate_config
from megatron_transnormer.model import (DiagAttention, NormAttention, SoftmaxAttention, build_model, count_parameters,
                                        flops_per_token)

from .conftest import small_config

pytestmark = pytest.mark.usefixtures("single_process")

BLM = dict(head="masked_lm", causal=False, norm_position="post", positions="learned", max_positions=64,
           embedding_scale=False, embedding_norm=True, init="bert", pad_id=1)


def _model(**cfg):
    model = build_model(small_config(**cfg), seed=3).double()
    model.eval()  # no dropout
    return model


@pytest.mark.parametrize("case", [
    dict(BLM, variant="t1"), dict(BLM, variant="t2"),  # bidirectional NormAttention + DiagAttention
    dict(variant="t2", pad_id=1),  # causal
    dict(arch="vanilla", head="masked_lm", causal=False, pad_id=1),  # softmax with a padding mask
    dict(arch="linear_1elu", pad_id=1),
    dict(BLM, layers=["norm", "diag", "softmax", "linear"]),
], ids=["blm_t1", "blm_t2", "alm_t2", "vanilla_bidirectional", "linear_1elu", "mixed"])
def test_appended_padding_changes_no_real_token(case):
    """37 real tokens padded to 40 and to 56 (pad ids replaced by random tokens in the second,
    so only the mask can hide them): every real position's logits and every gradient of a
    loss over real positions agree to rounding."""
    model = _model(**case)
    real = torch.randint(2, 96, (2, 37), generator=torch.Generator().manual_seed(0))

    def run(n, junk):
        ids = torch.full((2, n), 1)
        ids[:, :37] = real
        if junk:
            ids[:, 37:] = torch.randint(2, 96, (2, n - 37), generator=torch.Generator().manual_seed(n))
        valid = torch.arange(n) < 37
        valid = valid.expand(2, n)
        model.zero_grad()
        logits = model(ids, None, valid)[:, :37]
        (logits ** 2).mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (short, g_short), (long, g_long) = run(40, junk=False), run(56, junk=True)
    torch.testing.assert_close(long, short, rtol=1e-11, atol=1e-11)
    assert len(g_short) == len(g_long) > 0
    for a, b in zip(g_short, g_long):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_post_norm_block_learned_positions_and_masked_lm_head():
    """spec §8 by hand: LayerNorm(E[x] + P[t]) -> post-norm blocks -> dense, GELU, LayerNorm, Eᵀ + b."""
    model = _model(**dict(BLM, variant="t2", dropout=0.0))
    ids = torch.randint(2, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(16).unsqueeze(0)
    emb = model.embedding
    assert model.final_norm is None and emb.scale is None
    x = F.layer_norm(emb.word.weight[ids] + emb.position_table.weight[:16], (32,), emb.norm.weight, emb.norm.bias,
                     1e-5)

    def srms(t):
        return t / (t.norm(dim=-1, keepdim=True) * 32 ** -0.5 + 1e-8)

    for block in model.layers:
        x = srms(x + block.mixer(x, pos))
        x = srms(x + block.mlp(x))
    head = model.head
    h = F.layer_norm(F.gelu(x @ head.dense.weight.T + head.dense.bias), (32,), head.norm.weight, head.norm.bias, 1e-5)
    expected = h @ emb.word.weight.T + head.bias
    torch.testing.assert_close(model(ids), expected, rtol=1e-10, atol=1e-10)
    # Only the selected positions are projected, in row-major order.
    select = torch.rand(2, 16, generator=torch.Generator().manual_seed(2)) < 0.3
    torch.testing.assert_close(model(ids, None, None, select), expected[select], rtol=1e-10, atol=1e-10)


def test_bert_init():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    model = build_model(small_config(**dict(BLM, hidden_size=64, vocab_size=4096)), seed=3)
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, ColumnParallelLinear, RowParallelLinear))]
    assert len(linears) > 10
    for m in linears:
        assert abs(m.weight.std().item() - 0.02) < 0.004, m
        assert m.bias is None or not m.bias.any()
    word = model.embedding.word.weight
    assert abs(word.std().item() - 0.02) < 0.002 and not word[1].any()  # the padding row
    assert abs(model.embedding.position_table.weight.std().item() - 0.02) < 0.003
    assert not model.head.bias.any() and (model.head.norm.weight == 1).all()
    lrpe = model.layers[0].mixer.lrpe  # LRPE keeps its own (θ is not a Linear weight)
    torch.testing.assert_close(lrpe.theta, 10000.0 ** (-2 * torch.arange(8, dtype=torch.float32) / 16))


def test_classification_head_pools_real_tokens_only():
    model = _model(head="classification", causal=False, num_classes=3, pad_id=1)
    ids = torch.randint(2, 96, (2, 24), generator=torch.Generator().manual_seed(4))
    valid = torch.ones(2, 24, dtype=torch.bool)
    valid[1, 10:] = False
    captured = {}
    model.head.dense.register_forward_hook(lambda m, args, out: captured.setdefault("pooled", args[0]))
    out = model(ids, None, valid)
    assert out.shape == (2, 3)
    hidden = model.final_norm(_hidden(model, ids, valid))
    expected = torch.stack([hidden[0].mean(0), hidden[1, :10].mean(0)])
    torch.testing.assert_close(captured["pooled"], expected, rtol=1e-12, atol=1e-12)


def _hidden(model, ids, valid):
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    x = model.embedding(ids, pos)
    for block in model.layers:
        x = block(x, pos, valid)
    return x


def test_layer_pattern_is_one_setting():
    cfg = load_config("alm/tiny_cpu", ["model.layers=norm*2,diag*2", "data.seq_len=128"])
    validate_config(cfg)
    assert cfg.model.layers == ["norm", "norm", "diag", "diag"]
    cfg.model.vocab_size = 96
    model = build_model(cfg.model, seed=1)
    assert [type(b.mixer) for b in model.layers] == [NormAttention, NormAttention, DiagAttention, DiagAttention]
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg.model)
    # The default is the paper's: first half Diag, second half Norm; all-Norm costs more FLOPs at
    # long lengths than all-Diag at block 64 only through its state updates, and both are linear.
    default = validate_config(load_config("alm/tiny_cpu")).model
    assert default.layers == ["diag", "diag", "norm", "norm"]
    soft = validate_config(load_config("alm/tiny_cpu", ["model.layers=[softmax,softmax,norm,norm]"])).model
    soft.vocab_size = 96
    assert isinstance(build_model(soft, seed=1).layers[0].mixer, SoftmaxAttention)
    assert flops_per_token(soft, 4096) > flops_per_token(default, 4096) + 4 * 128 * 4096
    for overrides, message in ((["model.layers=norm*3"], "3 layers listed"),
                               (["model.layers=norm*2,gated*2"], "'gated' is not one of"),
                               (["model.layers=norm*x"], "NAME or NAME\\*COUNT"),
                               (["model.num_layers=3"], "must be even")):
        with pytest.raises(ConfigError, match=f"model\\.(layers|num_layers): .*{message}"):
            validate_config(load_config("alm/tiny_cpu", overrides))


def test_head_and_attention_direction_must_agree():
    with pytest.raises(ConfigError, match="model.causal: false with model.head=lm"):
        validate_config(load_config("alm/tiny_cpu", ["model.causal=false"]))
    with pytest.raises(ConfigError, match="model.causal: true with model.head=masked_lm"):
        validate_config(load_config("alm/tiny_cpu", ["model.head=masked_lm"]))
    with pytest.raises(ConfigError, match="model.num_classes"):
        validate_config(load_config("alm/tiny_cpu", ["model.head=classification", "model.causal=false"]))
    with pytest.raises(ConfigError, match="model.max_positions: 64 learned positions cannot cover"):
        validate_config(load_config("alm/tiny_cpu", ["model.positions=learned", "model.max_positions=64",
                                                     "data.seq_len=128"]))
    # A masked LM projects only its predicted positions: the head and the tied decoder's FLOPs
    # scale with that share.
    blm = small_config(**BLM)
    d, v = blm.hidden_size, blm.vocab_size
    head = d * d + d + 2 * d + v + v * d
    assert flops_per_token(blm, 512) - flops_per_token(blm, 512, predicted=0.15) == pytest.approx(6 * 0.85 * head)
    assert math.isfinite(flops_per_token(blm, 512))


@pytest.mark.parametrize("causal", [True, False])
def test_positions_are_inputs_and_only_differences_matter(causal):
    """The attention layers see positions only through LRPE (relative), so a slice that
    starts at a block-aligned offset, as a context-parallel rank's or a decoding step's,
    mixes exactly as at offset 0; the absolute position embeddings do see the offset."""
    cfg = small_config(hidden_size=16, num_heads=2, block_size=8, causal=causal)
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    at = lambda offset: (torch.arange(21) + offset).unsqueeze(0)  # noqa: E731
    for layer in (DiagAttention(cfg, 0), NormAttention(cfg, 3)):
        from megatron_transnormer.parallel.tensor_parallel import initialize_parameters
        initialize_parameters(layer, 0)
        layer.double()
        torch.testing.assert_close(layer(x, at(64)), layer(x, at(0)), rtol=1e-9, atol=1e-9)
    model = _model(**dict(BLM, max_positions=128))
    ids = torch.randint(2, 96, (1, 21))
    assert not torch.allclose(model(ids, at(64)), model(ids, at(0)))
