#!/usr/bin/env python
"""Tabulate LRA runs (`transnormer-lra-table` once installed): megatron_transnormer/commands/lra_table.py."""
if __name__ == "__main__":  # not on import: spawned worker processes re-import this file
    from megatron_transnormer.commands.lra_table import main
    raise SystemExit(main())
