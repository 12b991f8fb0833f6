#!/usr/bin/env python
"""The perplexity a model must beat to have learned more than token frequencies.

A unigram model from the training split's token counts (add-one smoothed) scored on the
validation split, over the same predicted positions the training loop evaluates
(targets of every packed sample).

    python bench/unigram_baseline.py [--data data/shakespeare]

Writes bench/out/unigram_<dataset>.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def target_counts(data_cfg, split: str, vocab_size: int):
    import torch

    from megatron_transnormer.data import TokenStream
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for batch in TokenStream(data_cfg, split=split, micro_batch_size=1, shuffle=False, infinite=False):
        counts += torch.bincount(batch.tokens[:, 1:].reshape(-1), minlength=vocab_size).double()
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/shakespeare")
    a = p.parse_args()
    from megatron_transnormer.config import load_config
    from megatron_transnormer.data import load_dataset_info
    from megatron_transnormer.evaluation.perplexity import report

    info = load_dataset_info(a.data)
    data_cfg = load_config(None, [f"data.path={a.data}"]).data
    train = target_counts(data_cfg, data_cfg.train_split, info.vocab_size)
    valid = target_counts(data_cfg, data_cfg.valid_split, info.vocab_size)
    logp = ((train + 1) / (train.sum() + info.vocab_size)).log()
    ppl = report(-(valid * logp).sum().item(), int(valid.sum().item()), info, data_cfg.valid_split)
    result = {"data": a.data, "vocab_size": info.vocab_size, "valid_tokens": ppl.tokens,
              "unigram_val_loss": ppl.mean_nll, "unigram_val_ppl": ppl.token_ppl,
              "unigram_val_word_ppl": ppl.word_ppl}
    out = REPO / "bench" / "out" / f"unigram_{Path(a.data).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"unigram on {a.data} ({data_cfg.valid_split}): loss {ppl.mean_nll:.4f}, ppl {ppl.token_ppl:.2f}, "
          f"word ppl {ppl.word_ppl:.2f}")


if __name__ == "__main__":
    main()
