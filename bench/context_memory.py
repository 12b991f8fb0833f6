#!/usr/bin/env python
"""Activation memory per rank under context parallelism, and TransNormer against softmax attention.

    python bench/context_memory.py [--seq-len 65536 --hidden 32 --heads 2 --layers 2]
                                   [--cp 1 2 4] [--compare-len 16384]

1. Context parallelism: one long sequence trained with parallel.context = 1, 2, 4, each
   rank a gloo process started with bench/seq_scaling.py's heap-only malloc settings,
   through megatron's parallel_state (parallel.init_distributed) and the DeepSpeed
   runtime: per rank, the bytes one micro-batch's forward keeps for the backward, the
   peak of the tensors an update creates, and the growth of the peak RSS over it
   (megatron_transnormer/planning/measure.py), with the planner's prediction. Target:
   saved bytes per rank fall as 1/CP.
2. Bytes kept per token by TransNormer (half DiagAttention, half NormAttention) and by
   the softmax baseline at the same length (--compare-len; softmax attention's time is
   quadratic), with the same channel mixer (GLU) and with each family's default (GLU;
   ReLU FFN of 4d), in fp32, attention-core recomputation as configured by default.
   Target: TransNormer <= softmax.

Prints a markdown table; writes bench/out/context_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "out"
MIB = 2 ** 20


def _config(a, context: int = 1, seq_len: int | None = None, arch: str = "transnormer", mlp: str = ""):
    from megatron_transnormer.config import load_config, validate_config
    cfg = load_config(None, [f"model.arch={arch}", f"model.hidden_size={a.hidden}", f"model.num_heads={a.heads}",
                             f"model.num_layers={a.layers}", f"model.vocab_size={a.vocab}", "model.layers=[]",
                             f"model.mlp={mlp}", "model.ffn_hidden_size=0", "model.dropout=0.0",
                             "model.kernels=torch", f"data.seq_len={seq_len or a.seq_len}",
                             f"parallel.context={context}", "train.micro_batch_size=1",
                             "train.global_batch_size=1", "train.precision=fp32",
                             "train.activation_checkpointing=false"])
    return validate_config(cfg, world_size=context)


def worker(a) -> None:
    """One rank of the CP=a.worker run: prints its measurements as one JSON line."""
    import logging

    from deepspeed.utils import logger

    from megatron_transnormer.parallel import init_distributed
    from megatron_transnormer.planning import plan_memory
    from megatron_transnormer.planning.measure import training_peak
    logger.setLevel(logging.WARNING)
    cfg = _config(a, context=a.worker)
    layout = init_distributed(1, 1, context=a.worker)
    measured = training_peak(cfg, layout, steps=1)
    plan = plan_memory(cfg, a.worker).worst
    measured.update(cp=a.worker, tokens_per_rank=plan.tokens, planned_saved=plan.activations(),
                    planned_peak=plan.peak() - plan.states.parameters - plan.states.moments)
    print(json.dumps(measured), flush=True)


def run_context(a, cp: int) -> list[dict]:
    """Start cp ranks (gloo, a fresh process each) and collect their lines."""
    from bench.seq_scaling import CPU_MALLOC_ENV
    from tests.multiproc import free_port
    port = free_port()
    procs = []
    for rank in range(cp):
        env = {**os.environ, **CPU_MALLOC_ENV, "RANK": str(rank), "WORLD_SIZE": str(cp), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(cp), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        args = [sys.executable, __file__, "--worker", str(cp), "--seq-len", str(a.seq_len), "--hidden",
                str(a.hidden), "--heads", str(a.heads), "--layers", str(a.layers), "--vocab", str(a.vocab)]
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    rows = []
    for rank, p in enumerate(procs):
        out, err = p.communicate(timeout=1800)
        if p.returncode:
            raise RuntimeError(f"CP={cp} rank {rank} exited with {p.returncode}:\n{err[-3000:]}")
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows


def compare_families(a) -> list[dict]:
    """Saved bytes per token of TransNormer and softmax attention at one length, in this process."""
    from megatron_transnormer.parallel import destroy_distributed, init_distributed
    from megatron_transnormer.planning import plan_memory
    from megatron_transnormer.planning.measure import model_saved_bytes
    init_distributed(1, 1)
    rows = []
    for label, arch, mlp in (("same channel mixer (GLU)", "transnormer", "glu"),
                             ("same channel mixer (GLU)", "vanilla", "glu"),
                             ("family default", "transnormer", ""), ("family default", "vanilla", "")):
        cfg = _config(a, seq_len=a.compare_len, arch=arch, mlp=mlp)
        saved = model_saved_bytes(cfg)
        rows.append({"comparison": label, "arch": arch, "mlp": cfg.model.mlp, "ffn": cfg.model.ffn_hidden_size,
                     "layers": list(cfg.model.layers), "seq_len": a.compare_len,
                     "saved_bytes_per_token": saved / a.compare_len,
                     "planned_bytes_per_token": plan_memory(cfg, 1).worst.per_token.saved})
    destroy_distributed()
    return rows


def main() -> None:
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=65536)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--compare-len", type=int, default=16384)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return

    context = {cp: run_context(a, cp) for cp in a.cp}
    base = max(r["saved_bytes"] for r in context[a.cp[0]]) * a.cp[0]
    lines = [f"Context parallelism: {a.seq_len:,} tokens, d {a.hidden}, {a.heads} heads, {a.layers} layers "
             f"(diag, norm), vocab {a.vocab}, fp32, micro-batch 1; per rank (the largest of the ranks)", "",
             "| CP | tokens/rank | saved (MiB) | planned saved (MiB) | saved / CP=1 | 1/CP | tensors' peak (MiB) "
             "| planned peak (MiB) | peak RSS growth (MiB) |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    summary = []
    for cp, rows in context.items():
        worst = {k: max(r[k] for r in rows) for k in ("saved_bytes", "peak_tensor_bytes", "peak_rss_growth",
                                                      "planned_saved", "planned_peak")}
        ratio = worst["saved_bytes"] / base
        summary.append({"cp": cp, **worst, "saved_ratio_to_cp1": ratio})
        lines.append(f"| {cp} | {rows[0]['tokens_per_rank']:,} | {worst['saved_bytes'] / MIB:.1f} | "
                     f"{worst['planned_saved'] / MIB:.1f} | {ratio:.3f} | {1 / cp:.3f} | "
                     f"{worst['peak_tensor_bytes'] / MIB:.1f} | {worst['planned_peak'] / MIB:.1f} | "
                     f"{worst['peak_rss_growth'] / MIB:.1f} |")
    families = compare_families(a)
    lines += ["", f"Bytes kept per token at {a.compare_len:,} tokens (fp32, d {a.hidden}, {a.heads} heads, "
                  f"{a.layers} layers, vocab {a.vocab})", "",
              "| comparison | model | layers | MLP (width) | measured B/token | planned B/token |",
              "|---|---|---|---|---:|---:|"]
    for r in families:
        lines.append(f"| {r['comparison']} | {r['arch']} | {','.join(r['layers'])} | {r['mlp']} ({r['ffn']}) | "
                     f"{r['saved_bytes_per_token']:.1f} | {r['planned_bytes_per_token']:.1f} |")
    by = {(r["comparison"], r["arch"]): r["saved_bytes_per_token"] for r in families}
    verdicts = {label: by[(label, "transnormer")] <= by[(label, "vanilla")] for label, _ in by}
    result = {"model": {"seq_len": a.seq_len, "hidden": a.hidden, "heads": a.heads, "layers": a.layers,
                        "vocab": a.vocab, "dtype": "fp32"},
              "context": {str(cp): rows for cp, rows in context.items()}, "context_summary": summary,
              "saved_falls_as_1_over_cp": all(abs(s["saved_ratio_to_cp1"] * s["cp"] - 1) < 0.05 for s in summary),
              "families": families, "transnormer_le_softmax": verdicts}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "context_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    lines += ["", "saved bytes fall as 1/CP (within 5%): " + str(result["saved_falls_as_1_over_cp"]),
              "TransNormer <= softmax: " + ", ".join(f"{k}: {v}" for k, v in verdicts.items())]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
