"""Evaluating a split: the loss of its batches summed over every rank, and the record it makes.

    totals = evaluate_split(next_batch, runtime.eval_batch, agree, max_batches=N)
    record = split_record(totals, info, split, word_level=objective.word_perplexity)

The training loop's validation (`training/loop.py`, `Trainer.validate`) and
`tools/evaluate.py` both evaluate through these two functions, so that a checkpoint
evaluated after training scores exactly what the run's own validation scored on the
same batches. What differs between the two callers (how a failure reading a batch is
handled, which stop signals end the pass, what a rank does meanwhile) comes in as the
functions `next_batch` and `agree`; this module needs nothing but them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megatron_transnormer.evaluation.perplexity import report, token_perplexity


@dataclass
class SplitTotals:
    nll_sum: float = 0.0  # nats, summed over the labelled tokens of every rank's batches
    tokens: int = 0  # labelled (scored) tokens over all ranks
    batches: int = 0  # global batches evaluated
    correct: int | None = None  # classifiers: samples answered right over all ranks (else None)


def evaluate_split(next_batch: Callable[[], object], eval_batch: Callable[[object], tuple[float, int]],
                   agree: Callable[[bool], bool] | None = None, *, max_batches: int = 0,
                   progress: Callable[[SplitTotals], None] | None = None) -> SplitTotals:
    """Evaluate global batches until the split ends or `max_batches` of them (0: no limit).

    next_batch(): this rank's next batch, or None at the end of its part of the split.
    agree(exhausted): called on every rank before each batch is evaluated, with whether
        this rank has none left; returns whether to evaluate it. It must return the same
        on every rank (False wherever any rank is exhausted): eval_batch is collective.
        None: one process, evaluate while there are batches.
    eval_batch(batch): (loss sum, labelled tokens), each summed over the data-parallel
        group (`Runtime.eval_batch`); a classifier's adds a third, the samples answered right.
    progress(totals): after each batch.
    """
    totals = SplitTotals()
    while not max_batches or totals.batches < max_batches:
        batch = next_batch()
        if not (agree(batch is None) if agree is not None else batch is not None):
            break
        loss_sum, tokens, *correct = eval_batch(batch)
        totals.nll_sum += float(loss_sum)
        totals.tokens += int(tokens)
        if correct:
            totals.correct = (totals.correct or 0) + int(correct[0])
        totals.batches += 1
        if progress is not None:
            progress(totals)
    return totals


def split_record(totals: SplitTotals, info, split: str, word_level: bool) -> dict:
    """{loss, ppl, tokens} per labelled token, and word_ppl (the paper's per-word
    perplexity, `perplexity.report`) when word_level (causal LMs), accuracy (in %) for
    classifiers. info: the DatasetInfo the split's word and token counts come from. totals
    must hold at least one token (a classifier's: one sample)."""
    record = {"loss": totals.nll_sum / totals.tokens, "ppl": token_perplexity(totals.nll_sum, totals.tokens),
              "tokens": totals.tokens}
    if totals.correct is not None:
        record["accuracy"] = 100.0 * totals.correct / totals.tokens
    if word_level:
        record["word_ppl"] = report(totals.nll_sum, totals.tokens, info, split).word_ppl
    return record
