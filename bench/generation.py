#!/usr/bin/env python
"""Per-token decoding latency against the context length: TransNormer vs the softmax baseline.

Both models have the same width, depth, heads and FFN width. At each context length a
random prompt of that many tokens is prefilled (timed once), then new tokens are decoded
one at a time through the recurrent path (`TransNormerModel.step`, greedy) and each step
is timed. TransNormer's step reads a fixed-size state (NormAttention's Kᵀ V, DiagAttention's
current block), so its time per token should not depend on the context; the softmax
baseline attends to its whole KV cache, so its time per token grows with it.

    python bench/generation.py [--hidden 128 --layers 2 --heads 2 --vocab 512]
                               [--contexts 1024 8192 32768 --tokens 64 --threads 1]

Prints a table and writes bench/out/generation.json, including each model's time per token
at the longest context over the shortest. fp32 on CPU, bf16 on a GPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # before bench/, whose kernels.py would shadow the kernels package
OUT = REPO / "bench" / "out"
ARCHS = ("transnormer", "vanilla")


def measure(arch: str, a, dev, dtype) -> list[dict]:
    import torch

    from megatron_transnormer.config import load_config, validate_config
    from megatron_transnormer.model import build_model

    cfg = load_config(None, [f"model.arch={arch}", f"model.hidden_size={a.hidden}", f"model.num_layers={a.layers}",
                             f"model.num_heads={a.heads}", f"model.vocab_size={a.vocab}", "model.dropout=0.0",
                             f"model.ffn_hidden_size={a.ffn}"])
    validate_config(cfg, world_size=1)
    model = build_model(cfg.model, seed=1).to(dev, dtype).eval()
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for n in a.contexts:
        ids = torch.randint(0, a.vocab, (a.batch, n), generator=gen).to(dev)
        last = torch.zeros_like(ids, dtype=torch.bool)
        last[:, -1] = True
        with torch.inference_mode():
            t0 = time.perf_counter()
            logits, cache = model.prefill(ids, output_mask=last)
            sync()
            prefill_s = time.perf_counter() - t0
            times = []
            for i in range(a.warmup + a.tokens):
                t0 = time.perf_counter()
                logits = model.step(logits.argmax(dim=-1).view(-1, 1), cache)[:, 0]
                sync()
                if i >= a.warmup:
                    times.append(time.perf_counter() - t0)
        rows.append({"arch": arch, "layers": list(cfg.model.layers), "context": n, "prefill_s": prefill_s,
                     "ms_per_token": 1e3 * statistics.median(times), "ms_per_token_min": 1e3 * min(times)})
        print(json.dumps(rows[-1]), flush=True)
        del cache
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2, help="TransNormer: the first half diag, the rest norm")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=0, help="feed-forward width (default 4 x hidden for both)")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--tokens", type=int, default=64, help="timed tokens per context; the median counts")
    p.add_argument("--warmup", type=int, default=4, help="untimed tokens after the prefill")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: a one-token step is too small for intra-op threads to pay, and "
                        "on a shared machine their spin-waits would be measured instead of the step)")
    a = p.parse_args()
    a.ffn = a.ffn or 4 * a.hidden  # equal FFN width, so only the token mixers differ

    import torch

    from megatron_transnormer.parallel import init_distributed
    torch.set_num_threads(a.threads)
    init_distributed(1, 1)
    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    rows = [r for arch in ARCHS for r in measure(arch, a, dev, dtype)]

    by = {(r["arch"], r["context"]): r for r in rows}
    lo, hi = min(a.contexts), max(a.contexts)
    ratio = {arch: by[(arch, hi)]["ms_per_token"] / by[(arch, lo)]["ms_per_token"] for arch in ARCHS}
    result = {"device": torch.cuda.get_device_name() if gpu else "cpu", "threads": torch.get_num_threads(),
              "model": {"hidden": a.hidden, "layers": a.layers, "heads": a.heads, "ffn": a.ffn, "vocab": a.vocab,
                        "batch": a.batch, "dtype": str(dtype).removeprefix("torch.")},
              "tokens": a.tokens, "rows": rows, f"time_per_token_ratio_{hi}_over_{lo}": ratio}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "generation.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| context | TransNormer ms/token | vanilla ms/token | TransNormer prefill (s) | vanilla prefill (s) |",
             "|---|---|---|---|---|"]
    for n in a.contexts:
        t, v = by[("transnormer", n)], by[("vanilla", n)]
        lines.append(f"| {n} | {t['ms_per_token']:.3f} | {v['ms_per_token']:.3f} | {t['prefill_s']:.2f} "
                     f"| {v['prefill_s']:.2f} |")
    lines.append("")
    lines.append(f"time per token at {hi} / at {lo}: " + ", ".join(f"{k} {x:.2f}" for k, x in ratio.items()))
    print(f"device: {result['device']}, model: {result['model']}\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
