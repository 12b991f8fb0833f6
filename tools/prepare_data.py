#!/usr/bin/env python
"""Prepare a dataset (`transnormer-prepare` once installed): megatron_transnormer/commands/prepare.py."""
if __name__ == "__main__":  # not on import: spawned worker processes re-import this file
    from megatron_transnormer.commands.prepare import main
    raise SystemExit(main())
