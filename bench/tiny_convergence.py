#!/usr/bin/env python
"""Small-scale check: a tiny config trains from scratch on this machine, and its final
validation perplexity is compared with a unigram model's at the same positions.

For each config: `pretrain.py --config NAME` in a fresh run directory (wall-clock timed,
the run's own output kept in bench/out/runs/), then `unigram_baseline.unigram` on the
positions the run's validation scored (every next token of a causal LM, the masked tokens
of a masked LM). The bundled corpus the config reads is prepared first if missing.

    python bench/tiny_convergence.py                          # alm/tiny_cpu and blm/tiny_cpu
    python bench/tiny_convergence.py --config blm/tiny_cpu [key=value ...]

Prints a table and writes bench/out/tiny_convergence.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "out"

from bench.unigram_baseline import unigram  # noqa: E402


def run(config: str, overrides: list[str]) -> dict:
    from megatron_transnormer.config import load_config
    from megatron_transnormer.data.prepare import BUNDLED

    cfg = load_config(config, overrides)
    name = os.path.basename(os.path.normpath(cfg.data.path))
    if name in BUNDLED:
        subprocess.run([sys.executable, "tools/prepare_data.py", "--bundled", name, "--output", cfg.data.path,
                        "--quiet"], cwd=REPO, check=True)
    run_dir = OUT / "runs" / config.replace("/", "_")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    t0 = time.time()
    with open(run_dir.with_suffix(".log"), "w") as log:
        subprocess.run([sys.executable, "pretrain.py", "--config", config, *overrides, f"train.run_dir={run_dir}",
                        "train.resume=none"], cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "val_loss" in r][-1]
    base = unigram(config, overrides)
    return {"config": config, "overrides": overrides, "steps": last["step"], "wall_s": seconds,
            "cpus": os.cpu_count(), "load_average": os.getloadavg()[0], "val_loss": last["val_loss"],
            "val_ppl": last["val_ppl"], "val_labels": last["val_tokens"], **base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", help="bundled config name or YAML path (repeatable; default: "
                                                     "alm/tiny_cpu and blm/tiny_cpu)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args()
    rows = [run(c, a.overrides) for c in a.config or ["alm/tiny_cpu", "blm/tiny_cpu"]]
    print("| config | objective | steps | wall time | val ppl | unigram ppl (same positions) | labels scored |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        assert r["valid_labels"] == r["val_labels"], "the unigram model scored other positions than the run"
        print(f"| {r['config']} | {r['objective']} | {r['steps']} | {r['wall_s'] / 60:.1f} min | {r['val_ppl']:.2f} "
              f"| {r['unigram_val_ppl']:.1f} | {r['val_labels']:,} |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "tiny_convergence.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"({rows[0]['cpus']} CPUs, load average {rows[-1]['load_average']:.1f} at the end)")


if __name__ == "__main__":
    main()
