"""Context parallelism in the training step: the same 4 updates as one process, for the
causal LM (T1, T2 with decay, 1+elu) and the masked LM, with CP alone and combined with
tensor, data (ZeRO 1 and 3) and pipeline parallelism; clipping on (0.05, so the global
norm matters every update). Real DeepSpeed engines in real gloo groups, fp32, dropout 0."""
from __future__ import annotations

import pytest

from tests.multiproc import run_ranks
from tests.training.runtime_helpers import train_layouts

STEPS, RTOL = 4, 1e-5
# name -> (model settings, layouts on this world size: (tensor, pipeline, context, zero))
MODELS = {
    "t1": dict(variant="t1"),
    "t2_decay": dict(variant="t2", decay=True),
    "linear_1elu": dict(arch="linear_1elu"),
    "masked_lm": dict(head="masked_lm"),
}
TWO = [("t1", (1, 1, 2, 0)), ("t2_decay", (1, 1, 2, 0)), ("linear_1elu", (1, 1, 2, 0)), ("masked_lm", (1, 1, 2, 1))]
FOUR = [("t2_decay", (1, 1, 4, 0)), ("t1", (2, 1, 2, 0)), ("masked_lm", (1, 1, 2, 1)), ("t2_decay", (1, 1, 2, 3)),
        ("linear_1elu", (1, 2, 2, 0)), ("masked_lm", (1, 2, 2, 1))]


def _train(rank, world_size, cases):
    return train_layouts(cases, MODELS, STEPS)


@pytest.fixture(scope="module")
def reference():
    return run_ranks(_train, 1, [(m, (1, 1, 1, 0)) for m in MODELS])[0]


@pytest.mark.parametrize("world_size, cases", [(2, TWO), (4, FOUR)], ids=["2_ranks", "4_ranks"])
def test_context_parallel_layouts_match_one_process(reference, world_size, cases):
    results = run_ranks(_train, world_size, cases, timeout=600)
    for rank_result in results[1:]:
        for key, rec in rank_result.items():
            assert rec["loss"] == results[0][key]["loss"], f"{key}: loss differs between ranks"
    for (model, layout), rec in results[0].items():
        ref = reference[model, (1, 1, 1, 0)]
        what = f"{model}, (tp, pp, cp, zero) = {layout}"
        assert rec["labels"] == ref["labels"] and rec["tokens"] == ref["tokens"], what
        for field in ("loss", "grad_norm"):
            assert rec[field] == pytest.approx(ref[field], rel=RTOL), f"{what}: {field} {rec[field]} vs {ref[field]}"
