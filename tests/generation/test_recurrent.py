"""The recurrent path against the parallel forward (float64, one process): a prompt's
prefill and then one step per token give, at every position, the logits the parallel
forward gives for the whole sequence; left padding of a batch reaches no state."""
import pytest
import torch

from megatron_transnormer.model import build_model
from tests.model.conftest import single_process, small_config  # noqa: F401  (the fixture, used below)

pytestmark = pytest.mark.usefixtures("single_process")

CASES = {
    "t1": dict(variant="t1"),
    "t2": dict(variant="t2"),
    "t2_decay": dict(variant="t2", decay=True),
    "t1_decay_post_norm": dict(variant="t1", decay=True, norm_position="post"),
    "linear_1elu": dict(arch="linear_1elu"),
    "vanilla": dict(arch="vanilla"),
    "mixed": dict(layers=["diag", "norm", "softmax", "linear"], decay=True),
    "mixed_block16": dict(layers=["norm", "diag", "linear", "diag"], block_size=16),
}
TOL = 1e-10


def _model(case):
    return build_model(small_config(**CASES[case]), seed=3).double().eval()


def _max_error(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("prompt", [1, 13, 16, 21])
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_then_steps_equal_the_parallel_forward(case, prompt):
    """Blocks of 8 (16 for mixed_block16): the prompt ends at the first token, mid-block, at a
    block's end, or past a block; 40 tokens in all, so every step crosses block starts and the
    softmax cache outgrows its first buffer."""
    model = _model(case)
    ids = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        full = model(ids)
        logits, cache = model.prefill(ids[:, :prompt])
        assert _max_error(logits, full[:, :prompt]) <= TOL
        assert cache.positions.tolist() == [prompt, prompt]
        for t in range(prompt, 40):
            step = model.step(ids[:, t:t + 1], cache)
            assert step.shape == (2, 1, 96)
            assert _max_error(step[:, 0], full[:, t]) <= TOL, f"position {t}"
        assert cache.positions.tolist() == [40, 40]


@pytest.mark.parametrize("case", list(CASES))
def test_left_padded_batch_gives_each_row_its_own_logits(case):
    """Prompts of 5, 13 and 20 tokens left-padded with random ids (only `valid` can hide them),
    prefilled together, then 12 steps: every row's logits at every real position equal the
    parallel forward of that row alone."""
    model = _model(case)
    lengths, steps = [5, 13, 20], 12
    rows = [torch.randint(0, 96, (n + steps,)) for n in lengths]
    width = max(lengths)
    ids = torch.randint(0, 96, (3, width))
    valid = torch.zeros(3, width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = rows[i][:n]
        valid[i, width - n:] = True
    with torch.no_grad():
        alone = [model(r[None])[0] for r in rows]
        logits, cache = model.prefill(ids, valid)
        for i, n in enumerate(lengths):
            assert _max_error(logits[i, width - n:], alone[i][:n]) <= TOL
        assert cache.positions.tolist() == lengths
        for s in range(steps):
            nxt = torch.stack([r[n + s] for r, n in zip(rows, lengths)])[:, None]
            step = model.step(nxt, cache)[:, 0]
            for i, n in enumerate(lengths):
                assert _max_error(step[i], alone[i][n + s]) <= TOL, f"row {i}, step {s}"


def test_bad_decoding_inputs_are_refused():
    model = _model("t2")
    ids = torch.randint(0, 96, (2, 6))
    right_padded = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    with pytest.raises(ValueError, match="valid must mark left-padded prompts"):
        model.prefill(ids, right_padded)
    with pytest.raises(ValueError, match="valid must mark left-padded prompts"):
        model.prefill(ids, torch.tensor([[True] * 6, [False] * 6]))  # a row without tokens
    _, cache = model.prefill(ids)
    with pytest.raises(ValueError, match=r"input_ids must be \[B, 1\]"):
        model.step(ids[:, :2], cache)


def test_only_the_causal_lm_decodes():
    masked = build_model(small_config(causal=False), seed=3).double().eval()
    with pytest.raises(ValueError, match="needs the causal LM"):
        masked.prefill(torch.randint(0, 96, (1, 5)))


def test_learned_positions_end_at_the_table():
    model = build_model(small_config(positions="learned", max_positions=8), seed=3).double().eval()
    _, cache = model.prefill(torch.randint(0, 96, (1, 8)))
    with pytest.raises(ValueError, match=r"position 8 is past the learned position table \(model.max_positions=8\)"):
        model.step(torch.randint(0, 96, (1, 1)), cache)
