#!/usr/bin/env python
"""Step time and peak memory against sequence length: TransNormer vs the softmax baseline.

Both models have the same width, depth and heads; one training step (forward + backward
of the LM loss) is timed at each length. TransNormer's NormAttention is linear in the
length and its DiagAttention works in 64-token blocks, so its cost should grow linearly;
softmax attention grows quadratically in time (PyTorch's fused attention keeps its
memory linear).

    python bench/seq_scaling.py [--hidden 128 --layers 2 --heads 2 --batch 1]
                                [--lengths 512 1024 2048 4096 8192 16384]

On a GPU the default is a larger width and CUDA memory statistics; on CPU peak memory is
the growth of the process's peak resident set over the step, so every (architecture,
length) pair runs in a fresh process. Writes bench/out/seq_scaling.{json,md}.
Pass: TransNormer time(16384) / time(1024) <= 20.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "out"
ARCHS = ("transnormer", "vanilla")
# glibc serves every allocation above 32 MiB with a fresh mmap and returns it on free, so
# on CPU each step of the long sequences pays page faults and zeroing that shorter ones
# (reusing heap memory) do not; that jump would be measured as attention cost. Heap-only
# allocation in the workers keeps memory reuse alike at every length, as a GPU's caching
# allocator does.
CPU_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(arch: str, a) -> list[dict]:
    import torch

    from megatron_transnormer.config import load_config, validate_config
    from megatron_transnormer.model import build_model
    from megatron_transnormer.parallel import init_distributed
    from megatron_transnormer.training.objectives import vocab_nll_sum

    layout = init_distributed(1, 1)
    dev = layout.device
    cfg = load_config(None, [f"model.arch={arch}", f"model.hidden_size={a.hidden}", f"model.num_layers={a.layers}",
                             f"model.num_heads={a.heads}", f"model.vocab_size={a.vocab}", "model.dropout=0.0",
                             f"model.ffn_hidden_size={a.ffn}"])
    validate_config(cfg, world_size=1)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = build_model(cfg.model, seed=1).to(dev, dtype)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in a.lengths:
        tokens = torch.randint(0, a.vocab, (a.batch, n + 1), generator=gen).to(dev)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]

        def step():
            loss = vocab_nll_sum(model(inputs), labels) / labels.numel()
            loss.backward()
            model.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_mib()
        step()  # warm-up (and kernel compilation on GPU)
        times = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        if dev.type == "cuda":
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak = _rss_mib() - base  # growth of the process's peak RSS during the steps
        rows.append({"arch": arch, "seq_len": n, "step_s": min(times), "peak_mib": peak,
                     "tokens_per_s": a.batch * n / min(times)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=0, help="width (default 128 on CPU, 1024 on GPU)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=0, help="default: hidden / 64")
    p.add_argument("--ffn", type=int, default=0, help="feed-forward width (default 4 x hidden for both)")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=3, help="timed steps per length; the fastest counts")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--worker", choices=ARCHS, help=argparse.SUPPRESS)
    a = p.parse_args()
    import torch
    gpu = torch.cuda.is_available()
    a.hidden = a.hidden or (1024 if gpu else 128)
    a.heads = a.heads or max(1, a.hidden // 64)
    a.ffn = a.ffn or 4 * a.hidden  # equal FFN width, so only the token mixers differ

    if a.worker:
        worker(a.worker, a)
        return

    rows = []
    for n in a.lengths:
        for arch in ARCHS:
            args = [sys.executable, __file__, "--worker", arch, "--hidden", str(a.hidden), "--layers",
                    str(a.layers), "--heads", str(a.heads), "--ffn", str(a.ffn), "--vocab", str(a.vocab),
                    "--batch", str(a.batch), "--reps", str(a.reps), "--lengths", str(n)]
            out = subprocess.run(args, cwd=REPO, check=True, capture_output=True, text=True,
                                 env={**os.environ, **CPU_MALLOC_ENV}).stdout
            rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    by = {(r["arch"], r["seq_len"]): r for r in rows}
    lo, hi = 1024, max(a.lengths)
    growth = {arch: by[(arch, hi)]["step_s"] / by[(arch, lo)]["step_s"]
              for arch in ARCHS if (arch, lo) in by and (arch, hi) in by}
    result = {"device": torch.cuda.get_device_name() if gpu else "cpu",
              "threads": torch.get_num_threads(),
              "model": {"hidden": a.hidden, "layers": a.layers, "heads": a.heads, "ffn": a.ffn,
                        "vocab": a.vocab, "batch": a.batch, "dtype": "bf16" if gpu else "fp32"},
              "rows": rows, f"time_ratio_{hi}_over_{lo}": growth,
              "transnormer_linear": growth.get("transnormer", float("inf")) <= 20}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "seq_scaling.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| seq len | TransNormer step (s) | vanilla step (s) | TransNormer peak (MiB) | vanilla peak (MiB) |",
             "|---|---|---|---|---|"]
    for n in a.lengths:
        t, v = by.get(("transnormer", n)), by.get(("vanilla", n))
        lines.append(f"| {n} | {t['step_s']:.3f} | {v['step_s']:.3f} | {t['peak_mib']:.0f} | {v['peak_mib']:.0f} |")
    lines.append("")
    lines.append(f"time({hi}) / time({lo}): " + ", ".join(f"{k} {v:.1f}" for k, v in growth.items())
                 + f" (TransNormer must be <= 20; linear would be {hi // lo})")
    table = "\n".join(lines) + "\n"
    (OUT / "seq_scaling.md").write_text(f"device: {result['device']}, model: {result['model']}\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
