"""Layout equivalence: the same model, seed and data give the same 5 steps on every layout.

Real DeepSpeed engines in real gloo process groups. One spawn per world size runs
several layouts one after another (the process groups are rebuilt for each shape);
each layout is compared with a single-process run, with gradient clipping off and at
0.05 (about 3% of the gradient norm, so it changes every update).

The masked LM's samples are padded to random lengths, so its micro-batches hold
different numbers of masked tokens: the losses agree only because an update divides the
summed loss by the count of labelled tokens over all micro-batches and ranks.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import pytest

from tests.multiproc import run_ranks
from tests.training.runtime_helpers import (global_batch, objective_for, quiet_deepspeed, rank_rows, step_batches,
                                            tiny_config)

STEPS = 5
CLIPS = (0.0, 0.05)
RTOL = 1e-5

BF16_RTOL = 1e-2  # bf16 rounding; enough to catch a miscounted norm (DeepSpeed's is 30% off at TP 2)


class Case(NamedTuple):
    tensor: int = 1
    pipeline: int = 1
    zero: int = 0
    checkpointing: bool = False
    precision: str = "fp32"
    clips: tuple = CLIPS
    head: str = "lm"


MLM = dict(head="masked_lm", clips=(0.05,))
SINGLE = {"single": Case(), "single_checkpointing": Case(checkpointing=True),
          "single_bf16": Case(precision="bf16", clips=(0.05,)),
          "mlm_single": Case(**MLM),
          "mlm_single_mb4": Case(**MLM)}  # one micro-batch of 4 instead of two of 2
TWO_RANKS = {
    "tp2": Case(tensor=2),
    "pp2": Case(pipeline=2),
    "pp2_zero1": Case(pipeline=2, zero=1),
    "pp2_checkpointing": Case(pipeline=2, checkpointing=True, clips=(0.05,)),
    "dp2": Case(),  # our norm sees the gradients after DeepSpeed's data-parallel reduction
    "dp2_zero1": Case(zero=1),
    "dp2_zero2": Case(zero=2),
    "dp2_zero3": Case(zero=3),
    "tp2_bf16": Case(tensor=2, precision="bf16", clips=(0.05,)),  # bf16 at ZeRO 0: our norm
    "mlm_tp2": Case(tensor=2, **MLM),
    "mlm_pp2": Case(pipeline=2, **MLM),
    "mlm_dp2_zero1": Case(zero=1, **MLM),
    "mlm_dp2_zero2": Case(zero=2, **MLM),
    "mlm_dp2_zero3": Case(zero=3, **MLM),
}
FOUR_RANKS = {
    "tp2_pp2": Case(tensor=2, pipeline=2),  # our own norm and clipping (ZeRO 0)
    "tp2_pp2_zero1": Case(tensor=2, pipeline=2, zero=1, clips=(0.05,)),  # DeepSpeed's ZeRO norm
    "mlm_tp2_pp2": Case(tensor=2, pipeline=2, **MLM),
}


def _cases(layouts):
    return [(name, clip) for name, case in layouts.items() for clip in case.clips]


def _eval_rows(layout, cfg):
    """A fixed evaluation batch of 4 rows (not the training micro-batch shape), split over DP."""
    return rank_rows(global_batch(999, cfg, rows=4), layout)


def _train(rank, world_size, layouts: dict) -> dict:
    """Run STEPS updates for each (layout, clip), evaluating after update 3; returns the records."""
    from megatron_transnormer.model import count_parameters
    from megatron_transnormer.parallel import destroy_distributed, init_distributed
    from megatron_transnormer.training.runtime import build_runtime

    quiet_deepspeed()
    out = {}
    try:
        for name, case in layouts.items():
            for clip in case.clips:
                micro = 4 if name.endswith("_mb4") else 2
                cfg = tiny_config(tensor=case.tensor, pipeline=case.pipeline, zero=case.zero, clip=clip,
                                  precision=case.precision, head=case.head, micro_batch=micro)
                cfg.train.activation_checkpointing = case.checkpointing
                layout = init_distributed(case.tensor, case.pipeline)
                objective = objective_for(cfg)
                rt = build_runtime(cfg, layout, objective)
                micro_counts = [[int(rt._prepare(b)[1].ge(0).sum()) for b in step_batches(s, layout, cfg)]
                                for s in range(STEPS)]
                results = [rt.train_step(step_batches(s, layout, cfg)) for s in range(3)]
                evaluation = rt.eval_batch(_eval_rows(layout, cfg))  # training must go on unaffected
                results += [rt.train_step(step_batches(s, layout, cfg)) for s in range(3, STEPS)]
                from megatron_transnormer.model import Block
                blocks = [m for m in rt.engine.module.modules() if isinstance(m, Block)]
                out[name, clip] = {"eval": evaluation,
                                   "checkpointing": [b.activation_checkpointing for b in blocks],
                    "loss": [r.loss for r in results], "grad_norm": [r.grad_norm for r in results],
                    "lr": [r.lr for r in results], "tokens": [r.tokens for r in results],
                    "labels": [r.labels for r in results], "micro_counts": micro_counts,
                    "skipped": [r.skipped for r in results],
                    "num_parameters": rt.num_parameters, "expected_parameters": count_parameters(cfg.model),
                }
    finally:
        destroy_distributed()
    return out


@pytest.fixture(scope="module")
def reference():
    return run_ranks(_train, 1, SINGLE)[0]


@pytest.fixture(scope="module")
def two_ranks():
    results = run_ranks(_train, 2, TWO_RANKS, timeout=600)
    # Every rank reports the same loss and norm (the interface promises it).
    for other in results[1:]:
        for key, rec in other.items():
            assert rec["loss"] == results[0][key]["loss"], f"{key}: loss differs between ranks"
            assert rec["grad_norm"] == pytest.approx(results[0][key]["grad_norm"], rel=1e-6), key
    return results[0]


@pytest.fixture(scope="module")
def four_ranks():
    results = run_ranks(_train, 4, FOUR_RANKS, timeout=600)
    for other in results[1:]:
        for key, rec in other.items():
            assert rec["loss"] == results[0][key]["loss"], f"{key}: loss differs between ranks"
    return results[0]


def _assert_matches(rec: dict, ref: dict, what: str, rtol: float = RTOL) -> None:
    for field in ("loss", "grad_norm"):
        for step, (got, want) in enumerate(zip(rec[field], ref[field])):
            assert math.isfinite(got), f"{what}: {field} at step {step} is {got}"
            assert got == pytest.approx(want, rel=rtol), \
                f"{what}: {field} at step {step}: {got} vs single process {want}"
    assert rec["lr"] == pytest.approx(ref["lr"], rel=1e-12), what
    assert rec["tokens"] == ref["tokens"] == [4 * 64] * STEPS, what
    assert rec["labels"] == ref["labels"], what  # the same masks in every layout
    assert not any(rec["skipped"]), what
    assert rec["num_parameters"] == rec["expected_parameters"], what
    (nll, tokens), (ref_nll, ref_tokens) = rec["eval"], ref["eval"]
    assert tokens == ref_tokens, what
    assert nll == pytest.approx(ref_nll, rel=rtol), f"{what}: evaluation NLL {nll} vs {ref_nll}"


@pytest.mark.parametrize("clip", CLIPS)
def test_activation_checkpointing_changes_nothing(reference, clip):
    assert reference["single_checkpointing", clip]["checkpointing"] == [True] * 4
    assert reference["single", clip]["checkpointing"] == [False] * 4
    _assert_matches(reference["single_checkpointing", clip], reference["single", clip], "checkpointing")


def test_reference_clipping_bites(reference):
    off, on = reference["single", 0.0], reference["single", 0.05]
    assert off["loss"][0] == on["loss"][0]  # the first loss is before any update
    assert all(n > 0.5 for n in off["grad_norm"]), "clip 0.05 should be far below the norm"
    # Clipping changes the trajectory by much more than the comparison tolerance.
    assert abs(on["loss"][-1] - off["loss"][-1]) > 100 * RTOL * abs(off["loss"][-1])
    # Warm-up from warmup_init_lr over 2 updates, then inverse square root.
    assert off["lr"] == pytest.approx([1e-7, (1e-7 + 2e-3) / 2, 2e-3, 2e-3 * math.sqrt(2 / 3), 2e-3 * math.sqrt(2 / 4)])
    assert off["loss"][-1] < off["loss"][0]


def _reference_for(reference, case: Case, clip):
    if case.head == "masked_lm":
        return reference["mlm_single", clip]
    return reference["single_bf16" if case.precision == "bf16" else "single", clip]


def test_masked_lm_counts_labels_over_the_whole_update(reference):
    """Uneven micro-batches (different numbers of masked tokens) give the same update as one
    micro-batch holding them all; an average of per-micro-batch means would not."""
    two, one = reference["mlm_single", 0.05], reference["mlm_single_mb4", 0.05]
    assert sum(len(set(counts)) > 1 for counts in two["micro_counts"]) >= 3, two["micro_counts"]
    assert [sum(c) for c in two["micro_counts"]] == [c[0] for c in one["micro_counts"]] == two["labels"]
    assert all(0.05 * 4 * 64 < n < 0.15 * 4 * 64 for n in two["labels"])  # 15% of the real tokens
    _assert_matches(one, two, "masked LM, one micro-batch of 4")
    assert two["loss"][-1] < two["loss"][0]


@pytest.mark.parametrize("name, clip", _cases(TWO_RANKS))
def test_two_rank_layouts_match_single_process(two_ranks, reference, name, clip):
    case = TWO_RANKS[name]
    assert all(two_ranks[name, clip]["checkpointing"]) == case.checkpointing
    rtol = BF16_RTOL if case.precision == "bf16" else RTOL
    _assert_matches(two_ranks[name, clip], _reference_for(reference, case, clip), f"{name}, clip {clip}", rtol)


@pytest.mark.parametrize("name, clip", _cases(FOUR_RANKS))
def test_tp2_pp2_matches_single_process(four_ranks, reference, name, clip):
    _assert_matches(four_ranks[name, clip], _reference_for(reference, FOUR_RANKS[name], clip), f"{name}, clip {clip}")
