"""The LRA models' parts (spec §9) against direct float64 formulas, in one process: batch
norm over real tokens only, the pixel encoder, the two-tower features, the attention-output
norm and local heads; padding that changes no logit; the layouts refused."""
import copy

import pytest
import torch
import torch.nn.functional as F

from megatron_transnormer.config import ConfigError, load_config, validate_config
from megatron_transnormer.data.lra.reader import IGNORE_LABEL, LRABatch
from megatron_transnormer.model import build_model
from megatron_transnormer.model.norms import MaskedBatchNorm
from megatron_transnormer.training.objectives import IGNORE, Classification

from .conftest import small_config

pytestmark = pytest.mark.usefixtures("single_process")

LRA = dict(head="classification", causal=False, num_classes=3, pad_id=0, norm="batch", mlp="gelu",
           classifier="linear", positions="none", embedding_scale=False, recompute_attention=False)


def _model(**cfg):
    return build_model(small_config(**{**LRA, **cfg}), seed=5).double()


def test_batch_norm_counts_real_tokens_only():
    """Training: (x - μ)/sqrt(σ² + eps)·γ + β with μ, σ² (biased) over the real tokens; the
    padding's values change nothing; running statistics move by 0.1 towards (μ, unbiased σ²).
    Evaluation: the running statistics."""
    d = 6
    norm = MaskedBatchNorm(d).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, dtype=torch.float64))
        norm.bias.copy_(torch.randn(d, dtype=torch.float64))
    x = torch.randn(3, 10, d, dtype=torch.float64) * 3 + 1
    valid = torch.arange(10) < torch.tensor([10, 4, 7])[:, None]
    real = x[valid]  # [21, d]
    mean, var = real.mean(0), real.var(0, unbiased=False)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias

    y = norm(x, valid)
    torch.testing.assert_close(y[valid], expected[valid], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.running_mean, 0.1 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.running_var, 0.9 + 0.1 * real.var(0, unbiased=True), rtol=1e-12, atol=1e-12)

    junk = torch.where(valid[..., None], x, torch.full_like(x, 1e6))
    fresh = MaskedBatchNorm(d).double()
    fresh.load_state_dict({**norm.state_dict(), "running_mean": torch.zeros(d), "running_var": torch.ones(d)})
    torch.testing.assert_close(fresh(junk, valid)[valid], expected[valid], rtol=1e-12, atol=1e-12)

    norm.eval()
    rm, rv = norm.running_mean.clone(), norm.running_var.clone()
    torch.testing.assert_close(norm(junk, valid), (junk - rm) / torch.sqrt(rv + 1e-5) * norm.weight + norm.bias,
                               rtol=1e-12, atol=1e-12)
    assert torch.equal(norm.running_mean, rm)  # evaluation leaves them alone


def test_pixel_encoder_is_one_linear_feature():
    model = _model(input="pixels", pixel_mean=0.4, pixel_std=0.25, vocab_size=256, pad_id=-1)
    ids = torch.randint(0, 256, (2, 16))
    enc = model.embedding.encoder
    expected = (ids.double() / 255 - 0.4) / 0.25
    expected = expected[..., None] * enc.weight[:, 0] + enc.bias
    torch.testing.assert_close(model.embedding(ids, torch.arange(16)[None]), expected, rtol=1e-12, atol=1e-12)
    assert not hasattr(model.embedding, "word") and model.embedding.weight is None


def _pooled(model, ids, valid):
    """The head's pooled states, from the model's own parts, run in evaluation mode."""
    pos = torch.arange(ids.shape[1])[None]
    x = model.embedding(ids, pos)
    for block in model.layers:
        x = block(x, pos, valid)
    x = model.head.norm(x, valid)
    w = valid.double()[..., None]
    return (x * w).sum(1) / w.sum(1)


def test_two_tower_classifies_u_v_product_and_difference():
    model = _model(classifier="two_tower", layers=["diag", "norm"], num_layers=2).eval()
    ids = torch.randint(1, 96, (6, 24))
    valid = torch.arange(24) < torch.tensor([24, 9, 17, 24, 5, 12])[:, None]
    ids[~valid] = 0
    u, v = _pooled(model, ids[:3], valid[:3]), _pooled(model, ids[3:], valid[3:])
    head = model.head
    expected = head.out(F.gelu(head.dense(torch.cat([u, v, u * v, u - v], dim=-1))))
    torch.testing.assert_close(model(ids, None, valid), expected, rtol=1e-10, atol=1e-12)
    assert head.dense.in_features == 4 * 32


@pytest.mark.parametrize("variant", ["t1", "t2"])
@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
def test_appended_padding_changes_no_logit(variant, training):
    """37 real tokens padded to 40 and to 56 with random junk ids: the same logits and the
    same gradients, with batch statistics (training) and running ones (evaluation)."""
    model = _model(variant=variant, local_heads=2)
    model.train(training)
    real = torch.randint(1, 96, (2, 37), generator=torch.Generator().manual_seed(0))
    state = copy.deepcopy(model.state_dict())

    def run(n):
        model.load_state_dict(state)  # the same running statistics for both
        ids = torch.zeros(2, n, dtype=torch.long)
        ids[:, :37] = real
        ids[:, 37:] = torch.randint(1, 96, (2, n - 37), generator=torch.Generator().manual_seed(n))
        valid = (torch.arange(n) < 37).expand(2, n)
        model.zero_grad()
        logits = model(ids, None, valid)
        (logits ** 2).sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (short, g_short), (long, g_long) = run(40), run(56)
    torch.testing.assert_close(long, short, rtol=1e-10, atol=1e-12)
    assert len(g_short) == len(g_long) > 0
    for a, b in zip(g_short, g_long):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-11)


def test_batch_norm_everywhere_and_local_heads():
    """Block norms, the attention-output norm of NormAttention (and T1's DiagAttention) and the
    final norm (in the head, which has the padding mask) are batch norms; Diag layers have
    model.local_heads heads, Norm layers model.num_heads."""
    for variant in ("t1", "t2"):
        model = _model(variant=variant, local_heads=2)
        diag, norm = model.layers[0], model.layers[-1]
        assert all(isinstance(b.norm1, MaskedBatchNorm) and isinstance(b.norm2, MaskedBatchNorm)
                   for b in model.layers)
        assert isinstance(norm.mixer.norm, MaskedBatchNorm) and isinstance(model.head.norm, MaskedBatchNorm)
        assert model.final_norm is None
        assert (diag.mixer.norm is None) == (variant == "t2")  # T2's softmax DiagAttention has no output norm
        assert (diag.mixer.num_heads, norm.mixer.num_heads) == (2, 4)


def test_classification_objective_pads_pairs_and_ignores_filler_rows():
    cfg = small_config(**{**LRA, "classifier": "two_tower"})
    objective = Classification(cfg, seq_len=16, pad_id=0)
    tokens, tokens2 = torch.randint(1, 9, (2, 12)), torch.randint(1, 9, (2, 12))
    batch = LRABatch(tokens, torch.tensor([12, 5]), torch.tensor([2, IGNORE_LABEL]), torch.tensor([7, -1]),
                     tokens2, torch.tensor([3, 12]))
    (ids, pos, valid), labels = objective.prepare(batch)
    assert ids.shape == valid.shape == (4, 16) and pos.shape == (1, 16)
    assert torch.equal(ids[:2, :12], tokens) and torch.equal(ids[2:, :12], tokens2) and not ids[:, 12:].any()
    assert valid.sum(1).tolist() == [12, 5, 3, 12]
    assert labels.tolist() == [2, IGNORE]
    logits = torch.tensor([[0.1, 0.2, 3.0], [5.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(objective.loss_sum(logits, labels), F.cross_entropy(logits[:1], labels[:1]).float())
    assert int(objective.correct(logits, labels)) == 1  # the filler row's answer never counts


@pytest.mark.parametrize("override, key", [
    ("parallel.tensor=2", "parallel.tensor"), ("parallel.pipeline=2", "parallel.pipeline"),
    ("parallel.context=2", "parallel.context"), ("model.recompute_attention=true", "model.recompute_attention"),
    ("train.activation_checkpointing=true", "train.activation_checkpointing"),
])
def test_lra_models_refuse_model_parallel_layouts(override, key):
    with pytest.raises(ConfigError) as e:
        validate_config(load_config("lra/listops_t2", [override]), world_size=8)
    assert str(e.value).startswith(f"{key}: ") and ("model.norm=batch" in str(e.value)), str(e.value)
    validate_config(load_config("lra/listops_t2", ["parallel.zero_stage=1"]), world_size=8)  # DP + ZeRO is fine
