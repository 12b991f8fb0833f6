#!/usr/bin/env python
"""Evaluate a checkpoint (`transnormer-evaluate` once installed): megatron_transnormer/commands/evaluate.py."""
if __name__ == "__main__":  # not on import: spawned worker processes re-import this file
    from megatron_transnormer.commands.evaluate import main
    raise SystemExit(main())
