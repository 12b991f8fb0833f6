#!/usr/bin/env python
"""Generate text (`transnormer-generate` once installed): megatron_transnormer/commands/generate.py."""
if __name__ == "__main__":  # not on import: spawned worker processes re-import this file
    from megatron_transnormer.commands.generate import main
    raise SystemExit(main())
