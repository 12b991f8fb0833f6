#!/usr/bin/env python
"""Small-scale check of the LRA family on CPU: a tiny T2 on generated ListOps against the
majority class, and a tiny Image run end to end on synthetic data in CIFAR-10's binary
format. Everything runs through the project's own commands (tools/prepare_lra.py,
pretrain.py --config lra/tiny_cpu, tools/lra_table.py); nothing is downloaded.

    python bench/lra_small.py [--steps 300] [--image-steps 20]

ListOps: the generator's short expressions (depth <= 3, <= 5 arguments, 10-120 symbols, in
sequences of 128 ids), `lra/tiny_cpu` for --steps updates of 32 samples; the run scores its
best-validation checkpoint on the test split itself (test_result.json). Image: 600 random
32x32 RGB records per training file and 300 in the test file, grayscale 1024-pixel
sequences, the same tiny model with the pixel encoder. Writes bench/out/lra_small.json and
prints a table. Pass: ListOps test accuracy above the test split's majority class (a noise
image has no signal: its run only has to finish and score its test split).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"


def run(*cmd: str) -> str:
    p = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd[:2])} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def write_cifar(directory: Path, per_file: int, seed: int) -> None:
    """CIFAR-10's binary release layout: records of 1 label byte + 3072 pixel bytes (R, G, B planes)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name, n in [(f"data_batch_{i}.bin", per_file) for i in range(1, 6)] + [("test_batch.bin", per_file // 2)]:
        records = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], axis=1)
        (directory / name).write_bytes(records.astype(np.uint8).tobytes())


def majority(manifest: Path, split: str) -> float:
    counts = json.loads(manifest.read_text())["splits"][split]["class_counts"]
    return 100.0 * max(counts) / sum(counts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="ListOps updates of 32 samples")
    p.add_argument("--image-steps", type=int, default=20)
    p.add_argument("--work", default=str(OUT / "lra_small"), help="datasets and runs go here")
    a = p.parse_args()
    work = Path(a.work)
    listops, image = work / "lra-listops-tiny", work / "lra-image-synthetic"
    rows = {}

    t0 = time.perf_counter()
    run("tools/prepare_lra.py", "--task", "listops", "--generate", "4800", "--seed", "1", "--gen-max-depth", "3",
        "--gen-max-args", "5", "--gen-min-length", "10", "--gen-max-length", "120", "--max-length", "128",
        "--output", str(listops), "--quiet")
    run_dir = work / "runs" / "listops"
    run("pretrain.py", "--config", "lra/tiny_cpu", f"data.path={listops}", f"train.run_dir={run_dir}",
        "train.overwrite=true", "train.micro_batch_size=32", f"train.steps={a.steps}",
        f"train.eval_interval={max(a.steps // 10, 1)}", f"train.save_interval={a.steps}", "train.plot=false")
    result = json.loads((run_dir / "test_result.json").read_text())
    rows["listops"] = {"updates": a.steps, "wall_s": time.perf_counter() - t0, "best_step": result["step"],
                       "val_accuracy": result["val_accuracy"], "test_accuracy": result["test_accuracy"],
                       "majority_test": majority(listops / "manifest.json", "test")}
    table = run("tools/lra_table.py", str(run_dir))

    t0 = time.perf_counter()
    write_cifar(work / "cifar-10-batches-bin", per_file=600, seed=0)
    run("tools/prepare_lra.py", "--task", "image", "--input", str(work / "cifar-10-batches-bin"),
        "--output", str(image), "--quiet")
    image_run = work / "runs" / "image"
    run("pretrain.py", "--config", "lra/tiny_cpu", f"data.path={image}", f"train.run_dir={image_run}",
        "train.overwrite=true", "model.input=pixels", "model.pixel_mean=0.5", "model.pixel_std=0.5",
        "data.seq_len=1024", "train.micro_batch_size=32", f"train.steps={a.image_steps}",
        f"train.eval_interval={a.image_steps}", f"train.save_interval={a.image_steps}", "train.plot=false",
        "optim.warmup_steps=2")
    result = json.loads((image_run / "test_result.json").read_text())
    rows["image_synthetic"] = {"updates": a.image_steps, "wall_s": time.perf_counter() - t0,
                               "best_step": result["step"], "val_accuracy": result["val_accuracy"],
                               "test_accuracy": result["test_accuracy"],
                               "majority_test": majority(image / "manifest.json", "test")}

    rows["listops"]["pass"] = rows["listops"]["test_accuracy"] > rows["listops"]["majority_test"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "lra_small.json").write_text(json.dumps({"rows": rows, "table": table}, indent=1) + "\n")
    lines = ["| run | updates | wall (s) | best step | val acc (%) | test acc (%) | test majority class (%) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['updates']} | {r['wall_s']:.0f} | {r['best_step']} | {r['val_accuracy']:.2f} | "
                     f"{r['test_accuracy']:.2f} | {r['majority_test']:.2f} |")
    print("\n".join(lines))
    print(f"\nListOps above the majority class: {rows['listops']['pass']}")


if __name__ == "__main__":
    main()
