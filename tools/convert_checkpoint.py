#!/usr/bin/env python
"""Make a checkpoint layout-free (`transnormer-convert` once installed): megatron_transnormer/commands/convert.py."""
if __name__ == "__main__":  # not on import: spawned worker processes re-import this file
    from megatron_transnormer.commands.convert import main
    raise SystemExit(main())
