"""Every bundled config loads and validates at a world size it is meant for; the paper and
scale-up configs have the parameter counts their names promise."""
from __future__ import annotations

import pytest

from megatron_transnormer.config import available_configs, load_config, validate_config
from megatron_transnormer.model import count_parameters

# A world size each config is meant for (GPUs of 8-GPU nodes; 1 process on CPU).
WORLD = {"alm/tiny_cpu": 1, "blm/tiny_cpu": 1, "scale/7b": 64}
WIKITEXT103_VOCAB = 267_744  # fairseq's word vocabulary (spec §7)
BPE_VOCAB = 50_304  # GPT-2's 50,257 padded to a multiple of 128


@pytest.mark.parametrize("name", available_configs())
def test_bundled_config_validates(name):
    cfg = validate_config(load_config(name), world_size=WORLD.get(name, 8))
    assert cfg.data.path, name
    if name.startswith("scale/"):
        assert cfg.train.precision == "bf16" and cfg.optim.clip_grad == 1.0 and cfg.optim.schedule == "cosine"


def test_bundled_configs_are_the_expected_set():
    assert {"alm/tiny_cpu", "alm/wikitext103_t1", "alm/wikitext103_t2", "alm/wikitext103_vanilla",
            "alm/wikitext103_1elu", "blm/tiny_cpu", "blm/wikitext103_t1", "blm/wikitext103_t2",
            "scale/385m", "scale/1b", "scale/7b"} <= set(available_configs())


@pytest.mark.parametrize("variant", ["t1", "t2"])
def test_blm_configs_match_the_paper(variant):
    """spec §8: d 768, 12 heads, 12 layers (6 Diag + 6 Norm), GLU 2048, post-norm SRMSNorm,
    LayerNorm on the embeddings, learned positions, no embedding scale, BERT init, dropout and
    attention dropout 0.1; 512 x 512 per update, 50k updates, warm-up 3000, lr 5e-4 with
    polynomial decay, Adam(0.9, 0.98, eps 1e-6), weight decay 0.01, no clipping."""
    cfg = validate_config(load_config(f"blm/wikitext103_{variant}", ["model.vocab_size=50264"]), world_size=8)
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (m.variant, m.head, m.causal, m.hidden_size, m.num_heads, m.num_layers, m.ffn_hidden_size) == \
        (variant, "masked_lm", False, 768, 12, 12, 2048)
    assert m.layers == ["diag"] * 6 + ["norm"] * 6 and m.mlp == "glu" and m.block_size == 64
    assert (m.norm_position, m.positions, m.max_positions, m.embedding_scale, m.embedding_norm, m.init) == \
        ("post", "learned", 512, False, True, "bert")
    assert (m.dropout, m.attention_dropout, cfg.data.seq_len) == (0.1, 0.1, 512)
    assert (t.global_batch_size, t.steps) == (512, 50_000)
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.clip_grad) == (5e-4, (0.9, 0.98), 1e-6, 0.01, 0.0)
    assert (o.schedule, o.decay_power, o.min_lr, o.warmup_steps) == ("polynomial", 1.0, 0.0, 3000)
    o_ = cfg.objective
    assert (o_.mask_prob, o_.leave_unmasked_prob, o_.random_token_prob) == (0.15, 0.1, 0.1)
    # RoBERTa-base size with the GLU: ~125M parameters.
    assert 110e6 < count_parameters(m) < 140e6


@pytest.mark.parametrize("name, params", [
    ("alm/wikitext103_t1", 155_988_540), ("alm/wikitext103_t2", 155_988_540),
    ("alm/wikitext103_vanilla", 156_000_256),  # the paper's counts (spec §7)
])
def test_paper_configs_match_the_paper(name, params):
    cfg = validate_config(load_config(name, [f"model.vocab_size={WIKITEXT103_VOCAB}"]))
    assert count_parameters(cfg.model) == params
    o, t = cfg.optim, cfg.train
    assert (cfg.model.hidden_size, cfg.model.num_heads, cfg.model.num_layers, cfg.data.seq_len) == (512, 8, 6, 512)
    assert (t.global_batch_size, t.steps, t.precision) == (128, 100_000, "fp32")
    assert (o.lr, o.betas, o.weight_decay, o.clip_grad) == (5e-4, (0.9, 0.98), 0.01, 0.0)
    assert (o.schedule, o.warmup_steps, o.warmup_init_lr) == ("inverse_sqrt", 8000, 1e-7)


@pytest.mark.parametrize("name, low, high", [
    ("scale/385m", 330e6, 420e6), ("scale/1b", 0.9e9, 1.2e9), ("scale/7b", 6.3e9, 7.3e9),
])
def test_scale_config_sizes(name, low, high):
    cfg = validate_config(load_config(name, [f"model.vocab_size={BPE_VOCAB}"]), world_size=WORLD.get(name, 8))
    assert low <= count_parameters(cfg.model) <= high
