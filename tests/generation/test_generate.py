"""Sampling and generation: the filters on exact probabilities (float64), seeded and greedy
determinism, streaming, stop ids, and batches of different lengths against each prompt alone."""
import math

import pytest
import torch

from megatron_transnormer.generation import Sampling, filter_logits, generate, generate_tokens, left_pad, next_tokens
from megatron_transnormer.model import build_model
from tests.model.conftest import single_process, small_config  # noqa: F401  (the fixture, used below)

PROBS = torch.tensor([[0.05, 0.5, 0.15, 0.3]], dtype=torch.float64)


def _model(**cfg):
    """A random model whose token mixers outweigh the residual stream (their output projections
    scaled by 16): otherwise its tied embedding makes it repeat its last token, whatever the
    states hold, and greedy tokens would say little about them."""
    model = build_model(small_config(**cfg), seed=5).double().eval()
    with torch.no_grad():
        for block in model.layers:
            block.mixer.out_proj.weight.mul_(16)
    return model


def test_top_k_keeps_the_k_most_likely():
    kept = filter_logits(PROBS.log(), top_k=2).softmax(dim=-1)
    assert torch.equal(kept == 0, torch.tensor([[True, False, True, False]]))
    assert kept[0, 1].item() == pytest.approx(0.5 / 0.8, abs=1e-15)
    assert torch.equal(filter_logits(PROBS.log(), top_k=4), PROBS.log())


@pytest.mark.parametrize("top_p, kept", [(0.3, [1]), (0.5, [1]), (0.79, [1, 3]), (0.81, [1, 3, 2]),
                                         (0.96, [1, 3, 2, 0])])
def test_top_p_keeps_the_smallest_nucleus_reaching_p(top_p, kept):
    probs = filter_logits(PROBS.log(), top_p=top_p).softmax(dim=-1)[0]
    assert sorted(torch.nonzero(probs).flatten().tolist()) == sorted(kept)
    total = PROBS[0, kept].sum().item()
    for i in kept:
        assert probs[i].item() == pytest.approx(PROBS[0, i].item() / total, abs=1e-15)


def test_greedy_and_degenerate_draws_take_the_argmax():
    logits = torch.randn(6, 96, dtype=torch.float64)
    best = logits.argmax(dim=-1)
    assert torch.equal(next_tokens(logits, Sampling(temperature=0)), best)
    for seed in range(3):
        one = Sampling(temperature=1.5, top_k=1, seed=seed)
        assert torch.equal(next_tokens(logits, one, one.generator(logits.device)), best)
        tiny = Sampling(temperature=0.7, top_p=1e-9, seed=seed)
        assert torch.equal(next_tokens(logits, tiny, tiny.generator(logits.device)), best)


def test_draws_are_seeded():
    logits = torch.zeros(4, 96, dtype=torch.float64)  # uniform: every draw is up to the generator

    def draw(sampling):
        generator = sampling.generator(logits.device)
        return torch.stack([next_tokens(logits, sampling, generator) for _ in range(5)])

    assert torch.equal(draw(Sampling(seed=7)), draw(Sampling(seed=7)))
    assert not torch.equal(draw(Sampling(seed=7)), draw(Sampling(seed=8)))


@pytest.mark.parametrize("kwargs, name", [(dict(temperature=-1.0), "temperature"),
                                          (dict(temperature=math.inf), "temperature"),
                                          (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"),
                                          (dict(top_p=1.5), "top_p")])
def test_bad_sampling_settings_name_the_setting(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must"):
        Sampling(**kwargs)


def test_left_pad():
    ids, valid = left_pad([[4, 5, 6], [7]], pad_id=1)
    assert ids.tolist() == [[4, 5, 6], [1, 1, 7]]
    assert valid.tolist() == [[True, True, True], [False, False, True]]
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        left_pad([[4], []])
    with pytest.raises(ValueError, match="prompts is empty"):
        left_pad([])


@pytest.mark.usefixtures("single_process")
@pytest.mark.parametrize("cfg", [dict(variant="t2", decay=True), dict(variant="t1"), dict(arch="vanilla"),
                                 dict(arch="linear_1elu"), dict(layers=["diag", "norm", "softmax", "linear"])],
                         ids=["t2_decay", "t1", "vanilla", "linear_1elu", "mixed"])
def test_a_batch_generates_what_each_prompt_generates_alone(cfg):
    """Greedy, prompts of 3, 11 and 17 tokens (blocks of 8): the same 12 new tokens in a batch
    as alone, and the same again on a second run."""
    model = _model(**cfg)
    prompts = [torch.randint(0, 96, (n,)).tolist() for n in (3, 11, 17)]
    greedy = Sampling(temperature=0)
    batch = generate_tokens(model, prompts, 12, greedy)
    alone = [generate_tokens(model, [p], 12, greedy)[0] for p in prompts]
    assert batch == alone
    assert all(len(tokens) == 12 for tokens in batch)
    assert generate_tokens(model, prompts, 12, greedy) == batch


@pytest.mark.usefixtures("single_process")
def test_sampled_generation_repeats_with_its_seed():
    model = _model(variant="t2", decay=True)
    prompts = [[5, 6, 7], [8]]
    sampling = Sampling(temperature=1.0, top_k=40, top_p=0.95, seed=11)
    first = generate_tokens(model, prompts, 10, sampling)
    assert generate_tokens(model, prompts, 10, sampling) == first
    assert generate_tokens(model, prompts, 10, Sampling(temperature=1.0, top_k=40, top_p=0.95, seed=12)) != first


@pytest.mark.usefixtures("single_process")
def test_streaming_and_stop_ids():
    """generate yields one [B] tensor per token; a stop id ends its row's tokens, and the
    stream ends once every row has stopped."""
    model = _model(variant="t2")
    prompts = [[5, 6, 7], [8, 9]]
    greedy = Sampling(temperature=0)
    stream = list(generate(model, prompts, 9, greedy))
    assert len(stream) == 9 and all(t.shape == (2,) for t in stream)
    tokens = torch.stack(stream, dim=1).tolist()
    stop = tokens[0][4]
    cut = [row[:row.index(stop)] if stop in row else row for row in tokens]
    assert generate_tokens(model, prompts, 9, greedy, stop_ids=[stop]) == cut
    stops = {tokens[0][0], tokens[1][0]}  # both rows stop at their first token
    assert len(list(generate(model, prompts, 9, greedy, stop_ids=stops))) == 1
    assert list(generate(model, prompts, 0, greedy)) == []


@pytest.mark.usefixtures("single_process")
def test_generation_refuses_a_training_model_and_negative_lengths():
    model = _model(variant="t2")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        next(generate(model, [[1, 2]], -1))
    model.train()
    with pytest.raises(ValueError, match=r"training mode .* call model.eval\(\)"):
        next(generate(model, [[1, 2]], 3))
