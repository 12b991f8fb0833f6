#!/usr/bin/env python
"""End-to-end training throughput on one GPU: the project's runtime, kernels on and off.

    python bench/train_throughput.py [--config scale/385m] [--steps 200] [--max-seconds 40]
    python bench/train_throughput.py --dry-run          # tiny model on CPU, a few steps

Each run builds the model, AdamW, the LR schedule and the DeepSpeed engine through
`build_runtime` (as pretrain.py does, ZeRO stage and precision from the config) and
times `Runtime.train_step` on synthetic token batches made up front, so data loading
is not in the figures. Runs, each in a fresh process so that memory and compiled
kernels of one never count for the next:

  * kernels on / off: `model.kernels=triton` and `model.kernels=torch` at the config's
    sequence length and micro-batch (one micro-batch per update, one GPU): tokens/s,
    TFLOP/s per GPU and MFU (the loop's own FLOP count, `model.flops_per_token`, over
    the device's dense bf16 peak from `training.metrics.peak_tflops`), peak memory;
  * long context: the kernels on at each of --long-lengths, with --long-tokens tokens
    per update at every length (micro-batch = tokens / length): step time should not
    grow with the length.

Timing: `torch.cuda.synchronize()` around each update, the first --warmup updates
(autotuning, compilation, the allocator's growth) not counted; a run stops counting at
--steps updates or --max-seconds, whichever comes first, and says how many it counted.
Writes one JSON (--out, default bench/out/train_throughput.json) after every run, so a
run cut short keeps what finished.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "out" / "train_throughput.json"
VOCAB = 50304  # the scale configs' BPE vocabulary (their names assume it); synthetic tokens below it


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default="scale/385m")
    p.add_argument("--seq-len", type=int, default=0, help="default: the config's data.seq_len (2048 if unset)")
    p.add_argument("--micro-batch", type=int, default=0, help="default: the config's train.micro_batch_size")
    p.add_argument("--steps", type=int, default=200, help="timed updates per run (at most)")
    p.add_argument("--warmup", type=int, default=10, help="updates before timing starts")
    p.add_argument("--max-seconds", type=float, default=40.0, help="stop counting after this long (per run)")
    p.add_argument("--kernels", default="triton,torch", help="model.kernels values to compare; the first is 'on'")
    p.add_argument("--long-lengths", default="2048,8192,32768")
    p.add_argument("--long-tokens", type=int, default=32768, help="tokens per update in the long-context runs")
    p.add_argument("--long-steps", type=int, default=20)
    p.add_argument("--long-max-seconds", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--dry-run", action="store_true", help="tiny model on CPU (Triton's interpreter for 'on')")
    p.add_argument("--run-timeout", type=float, default=0, help="seconds a single run may take (0: no limit)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one run's spec, JSON
    p.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- one run (its own process)

def worker(spec: dict) -> dict:
    import torch

    from megatron_transnormer.config import load_config, validate_config
    from megatron_transnormer.data.stream import TokenBatch
    from megatron_transnormer.model import flops_per_token
    from megatron_transnormer.parallel import init_distributed
    from megatron_transnormer.training.cli import check_kernels, check_sequence_length
    from megatron_transnormer.training.metrics import peak_tflops, throughput
    from megatron_transnormer.training.runtime import build_runtime

    n, mb = spec["seq_len"], spec["micro_batch"]
    total = spec["warmup"] + spec["steps"]
    overrides = [*spec["overrides"], f"model.kernels={spec['kernels']}", f"data.seq_len={n}",
                 f"train.micro_batch_size={mb}", f"train.global_batch_size={mb}", f"train.steps={total}",
                 "train.activation_checkpointing=false"]
    if not any(o.startswith("model.vocab_size=") for o in overrides):
        overrides.append(f"model.vocab_size={spec['vocab']}")
    cfg = validate_config(load_config(spec["config"], overrides), world_size=1)
    check_kernels(cfg)
    check_sequence_length(cfg, n)
    layout = init_distributed(1, 1)
    device = layout.device
    rt = build_runtime(cfg, layout)
    gen = torch.Generator().manual_seed(0)
    # A few distinct batches, cycled: different tokens each update, none made inside the timing.
    batches = [TokenBatch(torch.randint(0, cfg.model.vocab_size, (mb, n + 1), generator=gen),
                          torch.zeros(mb, 2, dtype=torch.int64)) for _ in range(4)]
    fpt = flops_per_token(cfg.model, n, rt.objective.predicted_fraction)
    peak = peak_tflops(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times, losses, started = [], [], None
    for i in range(total):
        if i == spec["warmup"]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
        sync()
        t0 = time.perf_counter()
        result = rt.train_step(iter([batches[i % len(batches)]]))
        sync()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
        losses.append(result.loss)
        if started is not None and time.perf_counter() - started > spec["max_seconds"]:
            break
    tokens = mb * n
    row = {k: spec[k] for k in ("name", "kernels", "seq_len", "micro_batch")}
    row.update(tokens_per_step=tokens, parameters=rt.num_parameters, precision=cfg.train.precision,
               zero_stage=cfg.parallel.zero_stage, device=torch.cuda.get_device_name(device)
               if device.type == "cuda" else "cpu", warmup_steps=spec["warmup"], timed_steps=len(times),
               first_loss=losses[0], last_loss=losses[-1], flops_per_token=fpt, peak_tflops=peak)
    if times:
        row.update(step_s_median=statistics.median(times), step_s_mean=statistics.fmean(times),
                   step_s_min=min(times), step_s_max=max(times))
        # TFLOP/s and MFU on accelerators only, as the training loop reports them.
        row.update(throughput(tokens * len(times), sum(times), fpt if device.type == "cuda" else None, 1, peak))
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


# ---------------------------------------------------------------- the runs

def plan(a) -> list[dict]:
    from megatron_transnormer.config import load_config

    base = dict(config=a.config, overrides=a.overrides, vocab=VOCAB, warmup=a.warmup)
    cfg = load_config(a.config, a.overrides)
    n = a.seq_len or cfg.data.seq_len or 2048
    mb = a.micro_batch or cfg.train.micro_batch_size
    kernels = [k for k in a.kernels.split(",") if k]
    runs = [dict(base, name=f"kernels={k}", kernels=k, seq_len=n, micro_batch=mb, steps=a.steps,
                 max_seconds=a.max_seconds) for k in kernels]
    for length in (int(x) for x in a.long_lengths.split(",") if x):
        runs.append(dict(base, name=f"long_context n={length}", kernels=kernels[0], seq_len=length,
                         micro_batch=max(1, a.long_tokens // length), steps=a.long_steps,
                         max_seconds=a.long_max_seconds, long_context=True))
    return runs


def run_one(spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # one fresh single-rank process group per run
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout or None)
    except subprocess.TimeoutExpired as e:
        return {**_ident(spec), "error": f"timed out after {timeout:.0f} s", "log_tail": _tail(e.stderr)}
    rows = [json.loads(line[len("RESULT "):]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode or not rows:
        return {**_ident(spec), "error": f"exit code {p.returncode}", "log_tail": _tail(p.stderr)}
    return {**rows[-1], "wall_s": time.perf_counter() - t0, "long_context": bool(spec.get("long_context"))}


def _ident(spec):
    return {k: spec[k] for k in ("name", "kernels", "seq_len", "micro_batch")} | {
        "long_context": bool(spec.get("long_context"))}


def _tail(text, n=1500):
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-n:]


def summarize(rows: list[dict], kernels_on: str, kernels_off: str | None) -> dict:
    ok = [r for r in rows if "error" not in r and r.get("timed_steps")]
    main = {r["kernels"]: r for r in ok if not r["long_context"]}
    s = {"kernels_on": kernels_on, "kernels_off": kernels_off}
    on, off = main.get(kernels_on), main.get(kernels_off)
    if on:
        s.update(seq_len=on["seq_len"], tokens_per_s=on["tokens_per_s"], mfu=on.get("mfu"),
                 tflops_per_device=on.get("tflops_per_device"), peak_memory_gib=on.get("peak_memory_gib"))
    if on and off:
        s["kernels_speedup"] = on["tokens_per_s"] / off["tokens_per_s"]
    long = sorted((r for r in ok if r["long_context"]), key=lambda r: r["seq_len"])
    s["long_context_step_s"] = {r["seq_len"]: r["step_s_median"] for r in long}
    if len(long) >= 2:
        steps = [r["step_s_median"] for r in long]
        s["long_context_flatness"] = min(steps) / max(steps)  # 1 = the same step time at every length
    return s


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        row = worker(json.loads(a.worker))
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    if a.dry_run:
        # Two cores, no GPU: a 4-layer width-64 model, a few updates; 'on' runs the Triton
        # kernels in the interpreter (set before any kernel module is imported, in the workers).
        os.environ["TRITON_INTERPRET"] = "1"
        a.config = "alm/tiny_cpu"
        a.overrides = ["model.hidden_size=64", "model.num_heads=2", "model.num_layers=2", "model.ffn_hidden_size=128",
                       "model.dropout=0.0", "model.vocab_size=256", *a.overrides]
        tiny = dict(seq_len=128, micro_batch=2, steps=2, warmup=1, max_seconds=30, long_lengths="64,256",
                    long_tokens=256, long_steps=2, long_max_seconds=30)
        defaults = parse_args([])
        for key, value in tiny.items():  # what the command line left at its GPU default
            if getattr(a, key) == getattr(defaults, key):
                setattr(a, key, value)
    import torch
    runs = plan(a)
    kernels = [k for k in a.kernels.split(",") if k]
    report = {"config": a.config, "overrides": a.overrides, "dry_run": a.dry_run,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "args": {k: str(v) for k, v in vars(a).items() if k != "worker"},
              "runs": [], "complete": False}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for spec in runs:
        row = run_one(spec, a.run_timeout)
        report["runs"].append(row)
        report["summary"] = summarize(report["runs"], kernels[0], kernels[1] if len(kernels) > 1 else None)
        a.out.write_text(json.dumps(report, indent=1))
        if "error" in row:
            print(f"{row['name']:28s} {row['error']}\n{row.get('log_tail', '')}", flush=True)
        else:
            print(f"{row['name']:28s} mb {row['micro_batch']:3d} x {row['seq_len']:6d}: "
                  f"{row['step_s_median'] * 1e3:9.1f} ms/step {row['tokens_per_s']:12,.0f} tok/s"
                  + (f" {row['tflops_per_device']:7.1f} TFLOP/s" if "tflops_per_device" in row else "")
                  + (f" MFU {100 * row['mfu']:5.1f}%" if "mfu" in row else "")
                  + (f" peak {row['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in row else "")
                  + f" ({row['timed_steps']} timed steps)", flush=True)
    report["complete"] = True
    a.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"]))
    print(f"wrote {a.out}")
    return 0 if all("error" not in r for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
