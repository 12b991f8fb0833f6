"""Sequence parallelism under TP=2: the same 4 updates as one process, for TransNormer (T1,
and T2 with decay: DiagAttention and NormAttention, SRMSNorm), the vanilla baseline
(softmax attention, LayerNorm in the sequence-parallel region, whose gradients are summed
over the TP group) and the masked LM (post-norm, its head gathering the sequence), alone
and with context, data (ZeRO 1) and pipeline parallelism. Also: the activation the blocks
see is this rank's slice of the sequence. Real DeepSpeed engines, gloo, fp32, dropout 0,
clipping on (every update's global norm matters)."""
from __future__ import annotations

import pytest

from tests.multiproc import run_ranks
from tests.training.runtime_helpers import train_layouts

STEPS, RTOL = 4, 1e-5
MODELS = {
    "t1": dict(variant="t1"),
    "t2_decay": dict(variant="t2", decay=True),
    "vanilla": dict(arch="vanilla"),
    "masked_lm": dict(head="masked_lm"),
}
# (model, (tensor, pipeline, context, zero)) with parallel.sequence on
FOUR = [("t1", (2, 1, 1, 0)), ("vanilla", (2, 1, 1, 1)), ("masked_lm", (2, 1, 1, 0)),
        ("t2_decay", (2, 1, 2, 0)), ("t2_decay", (2, 2, 1, 0))]


def _train(rank, world_size, cases, sequence):
    return train_layouts(cases, MODELS, STEPS, sequence=sequence)


@pytest.fixture(scope="module")
def reference():
    return run_ranks(_train, 1, [(m, (1, 1, 1, 0)) for m in MODELS], False)[0]


def test_sequence_parallel_layouts_match_one_process(reference):
    results = run_ranks(_train, 4, FOUR, True, timeout=600)
    for (model, layout), rec in results[0].items():
        ref = reference[model, (1, 1, 1, 0)]
        what = f"{model}, (tp, pp, cp, zero) = {layout}, sequence parallel"
        tp, _, cp, _ = layout
        if rec["block_tokens"]:
            assert rec["block_tokens"] == [rec["seq_len"] // (tp * cp)], what
        for field in ("loss", "grad_norm"):
            assert rec[field] == pytest.approx(ref[field], rel=RTOL), f"{what}: {field} {rec[field]} vs {ref[field]}"
