#!/usr/bin/env python
"""Pretrain a TransNormer language model.

    python pretrain.py [--config NAME|PATH] [key=value ...]
    torchrun --nproc_per_node N pretrain.py ...      deepspeed pretrain.py ...      srun python pretrain.py ...

With no --config it trains the default `alm/tiny_cpu` on data/shakespeare
(`make train` prepares the data first). `--help` lists the bundled configs and
every override key. Settings, data path and world size are checked before any
process group starts; a bad one exits with code 2 and a one-line message.
"""
from __future__ import annotations

import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    # First of all: record SIGUSR1/SIGTERM (SLURM's pre-emption warning) instead of dying,
    # even while the heavy imports and the process-group start are still running.
    from megatron_transnormer.training.signals import StopRequest
    stop = StopRequest()
    # megatron-core warns at import that optional CUDA extensions are missing; the fallbacks
    # are what we use, so the warning is noise on every rank.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron_transnormer.training.cli import UsageError, prepare_run
    try:
        run = prepare_run(argv)
    except UsageError as e:
        print(f"pretrain.py: error: {e}", file=sys.stderr)
        return 2
    from megatron_transnormer.training.loop import run_training
    return run_training(run.cfg, run.info, stop)


if __name__ == "__main__":
    sys.exit(main())
