#!/usr/bin/env python
"""The perplexity a model must beat to have learned more than token frequencies.

A unigram model from the training split's label counts (add-one smoothed) scored on the
validation split, at exactly the positions the training loop's validation scores: the
config's objective makes the labels (every next token of a causal LM; for a masked LM
the masked tokens, with the masks validation draws), over the batches validation reads
on one process (micro-batches of train.micro_batch_size, the last partial one dropped).

    python bench/unigram_baseline.py [--config alm/tiny_cpu] [key=value ...]
    python bench/unigram_baseline.py --config blm/tiny_cpu

Writes bench/out/unigram_<config>.json (alm_tiny_cpu, ...).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def label_counts(cfg, objective, split: str, vocab_size: int, batches: int = 0):
    """Counts of the labels the objective makes for `split` ([vocab_size] fp64); batches: 0 = all."""
    import torch

    from megatron_transnormer.data import TokenStream
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    stream = TokenStream(cfg.data, split=split, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
                         shuffle=False, infinite=False)
    for n, batch in enumerate(stream):
        if batches and n == batches:
            break
        _, labels = objective.prepare(batch)
        labels = labels[labels >= 0]
        counts += torch.bincount(labels.reshape(-1), minlength=vocab_size).double()
    return counts


def unigram(config: str | None, overrides: list[str] = ()) -> dict:
    """The unigram model's validation loss and perplexities for a config (see the module docstring)."""
    from megatron_transnormer.config import load_config, validate_config
    from megatron_transnormer.data import load_dataset_info
    from megatron_transnormer.evaluation.perplexity import report
    from megatron_transnormer.training.cli import apply_manifest
    from megatron_transnormer.training.objectives import build_objective

    cfg = validate_config(load_config(config, list(overrides)))
    info = load_dataset_info(cfg.data.path)
    apply_manifest(cfg, info)
    objective = build_objective(cfg, info)
    train = label_counts(cfg, objective, cfg.data.train_split, info.vocab_size)
    valid = label_counts(cfg, objective, cfg.data.valid_split, info.vocab_size, cfg.train.eval_batches)
    logp = ((train + 1) / (train.sum() + info.vocab_size)).log()
    nll, tokens = -(valid * logp).sum().item(), int(valid.sum().item())
    ppl = report(nll, tokens, info, cfg.data.valid_split)
    result = {"config": cfg.name, "data": cfg.data.path, "objective": objective.name,
              "vocab_size": info.vocab_size, "valid_labels": tokens,
              "unigram_val_loss": ppl.mean_nll, "unigram_val_ppl": ppl.token_ppl}
    if objective.word_perplexity:
        result["unigram_val_word_ppl"] = ppl.word_ppl
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="bundled config name or YAML path (default: alm/tiny_cpu)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args()
    result = unigram(a.config, a.overrides)
    out = REPO / "bench" / "out" / f"unigram_{result['config'].replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    words = f", word ppl {result['unigram_val_word_ppl']:.2f}" if "unigram_val_word_ppl" in result else ""
    print(f"unigram on {result['data']} (valid, {result['valid_labels']} {result['objective']} labels): "
          f"loss {result['unigram_val_loss']:.4f}, ppl {result['unigram_val_ppl']:.2f}{words}")


if __name__ == "__main__":
    main()
