#!/usr/bin/env python
"""What the framework costs: tokens/s of `pretrain.py` against a bare PyTorch loop.

Both train the same model (`build_model` from the same config and seed) on the same
batches (`TokenStream`, same seed) with AdamW, the same parameter groups and the same
gradient clipping, each in a fresh process. `pretrain.py` adds DeepSpeed's engine, the
LR schedule, the counted-once gradient norm, logging (metrics.jsonl, TensorBoard) and
the per-step stop-signal check.

Two measures, both over steady-state steps only:
  * cpu: CPU seconds per step, from a short and a long run of each loop (the
    difference cancels start-up, model build and the final checkpoint). Run with one
    thread, this counts work done and is not inflated by other processes sharing the
    cores, which wall-clock time on a shared machine is.
  * wall: wall clock between step ends after warm-up, in the long runs.

    python bench/framework_overhead.py [--config alm/tiny_cpu] [--steps 10 40] [--threads 1]

Writes bench/out/framework_overhead.{json,md}. Target: ratio >= 0.9.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "out"


def steady_tokens_per_s(times: list[float], tokens_per_step: int, warmup: int) -> float:
    """Tokens/s over the steps after warm-up, from the wall-clock end time of every step."""
    t = times[warmup:]
    return tokens_per_step * (len(t) - 1) / (t[-1] - t[0])


def _clean_env(threads: int) -> dict:
    """This environment without a launcher's rank variables (one fresh process), N threads."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def _timed(cmd: list[str], threads: int) -> tuple[subprocess.CompletedProcess, float]:
    """Run a child; also return the CPU seconds (user + system) it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True, env=_clean_env(threads))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return p, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_bare_process(config: str, steps: int, warmup: int, overrides: list[str], threads: int) -> dict:
    """The bare loop in its own process, started the same way as pretrain.py."""
    cmd = [sys.executable, __file__, "--bare", "--config", config, "--steps", str(steps), str(steps),
           "--warmup", str(warmup),
           *overrides]
    p, cpu = _timed(cmd, threads)
    return {**json.loads(p.stdout.strip().splitlines()[-1]), "cpu_s": cpu}


def run_pretrain(config: str, steps: int, warmup: int, overrides: list[str], threads: int) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "pretrain.py", "--config", config, f"train.steps={steps}",
               f"train.run_dir={run_dir}", "train.resume=none", "train.save_interval=0",
               "train.eval_interval=0", "train.eval_batches=1", "train.log_interval=1000000",
               "train.plot=false", *overrides]
        _, cpu = _timed(cmd, threads)
        recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    return {"tokens_per_s": steady_tokens_per_s([r["time"] for r in train], train[0]["tokens"], warmup),
            "losses": [r["loss"] for r in train], "cpu_s": cpu}


def run_bare(cfg, steps: int, warmup: int) -> dict:
    """The same training with nothing but PyTorch: forward, backward, clip, AdamW step."""
    import torch

    from megatron_transnormer.data import TokenStream
    from megatron_transnormer.model import build_model
    from megatron_transnormer.parallel import init_distributed
    from megatron_transnormer.training import rng
    from megatron_transnormer.training.objectives import CausalLM
    from megatron_transnormer.training.optimizer import build_optimizer

    device = init_distributed(1, 1).device  # megatron-core's layers need their (size-1) groups
    rng.seed_all(cfg.train.seed, 0, 0, 0)  # pretrain.py's dropout stream
    model = build_model(cfg.model, cfg.train.seed).to(device)
    model.train()
    opt = build_optimizer(model, cfg.optim)
    batches = iter(TokenStream(cfg.data, split=cfg.data.train_split, micro_batch_size=cfg.train.micro_batch_size,
                               seed=cfg.train.seed, shuffle=True, infinite=True))
    accum = cfg.train.global_batch_size // cfg.train.micro_batch_size
    objective = CausalLM(cfg.model)
    times, losses = [], []
    for _ in range(steps):
        micro = []
        for _ in range(accum):
            inputs, labels = objective.prepare(next(batches))
            labels = labels.to(device)
            loss = objective.loss_sum(model(*(t.to(device) for t in inputs)), labels) / labels.numel()
            (loss / accum).backward()
            micro.append(loss.detach())
        total = torch.stack(micro).mean().item()  # one host sync per update, like the runtime
        if cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        times.append(time.time())
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    return {"tokens_per_s": steady_tokens_per_s(times, tokens, warmup), "losses": losses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="alm/tiny_cpu")
    p.add_argument("--steps", type=int, nargs=2, default=[10, 40], metavar=("SHORT", "LONG"))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="OMP threads of both loops (default: %(default)s)")
    p.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)  # the bare loop's process
    p.add_argument("overrides", nargs="*", help="config overrides for both runs")
    a = p.parse_args()

    from megatron_transnormer.training.cli import prepare_run
    # Same resolution as pretrain.py (manifest fills vocab and sequence length).
    cfg = prepare_run(["--config", a.config, *a.overrides]).cfg
    if a.bare:
        print(json.dumps(run_bare(cfg, a.steps[1], a.warmup)))
        return

    short, long_ = a.steps
    # Interleaved, so that drifting machine load hits both loops alike.
    runs = {}
    for steps in (short, long_):
        runs["bare", steps] = run_bare_process(a.config, steps, a.warmup, a.overrides, a.threads)
        runs["pretrain", steps] = run_pretrain(a.config, steps, a.warmup, a.overrides, a.threads)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    cpu_tps = {k: tokens * (long_ - short) / (runs[k, long_]["cpu_s"] - runs[k, short]["cpu_s"])
               for k in ("bare", "pretrain")}
    wall_tps = {k: runs[k, long_]["tokens_per_s"] for k in ("bare", "pretrain")}
    ratio = cpu_tps["pretrain"] / cpu_tps["bare"]
    result = {
        "config": a.config, "overrides": a.overrides, "steps": a.steps, "warmup_steps": a.warmup,
        "tokens_per_step": tokens, "threads": a.threads,
        "load_average_after": os.getloadavg(),  # other processes on the machine skew wall-clock numbers
        "cpu_tokens_per_s": cpu_tps, "wall_tokens_per_s": wall_tps,
        "ratio": ratio, "wall_ratio": wall_tps["pretrain"] / wall_tps["bare"],
        "target": 0.9, "meets_target": ratio >= 0.9,
        # Same init, data, dropout and optimizer: the first loss agrees exactly; later ones
        # differ by the LR schedule (warm-up vs the bare loop's constant LR).
        "first_loss": {"bare": runs["bare", long_]["losses"][0], "pretrain": runs["pretrain", long_]["losses"][0]},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "framework_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    table = ("| loop | tokens/s per CPU-second | tokens/s wall clock |\n|---|---|---|\n"
             f"| bare PyTorch | {cpu_tps['bare']:,.0f} | {wall_tps['bare']:,.0f} |\n"
             f"| pretrain.py | {cpu_tps['pretrain']:,.0f} | {wall_tps['pretrain']:,.0f} |\n\n"
             f"ratio pretrain.py / bare = **{ratio:.3f}** by CPU time (target >= 0.9), "
             f"{result['wall_ratio']:.3f} by wall clock; {a.config}, steps {short} vs {long_}, "
             f"{a.threads} thread(s), load average {result['load_average_after'][0]:.1f}\n")
    (OUT / "framework_overhead.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
