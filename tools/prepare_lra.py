#!/usr/bin/env python
"""Prepare an LRA task (`transnormer-prepare-lra` once installed): megatron_transnormer/commands/prepare_lra.py."""
if __name__ == "__main__":  # not on import: spawned worker processes re-import this file
    from megatron_transnormer.commands.prepare_lra import main
    raise SystemExit(main())
