#!/usr/bin/env python
"""Pretrain a TransNormer LM (`transnormer-train` once installed): megatron_transnormer/commands/train.py."""
if __name__ == "__main__":  # not on import: spawned worker processes re-import this file
    from megatron_transnormer.commands.train import main
    raise SystemExit(main())
