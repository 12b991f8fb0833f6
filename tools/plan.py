#!/usr/bin/env python
"""Plan per-GPU memory (`transnormer-plan` once installed): megatron_transnormer/commands/plan.py."""
if __name__ == "__main__":  # not on import: spawned worker processes re-import this file
    from megatron_transnormer.commands.plan import main
    raise SystemExit(main())
