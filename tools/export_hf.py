#!/usr/bin/env python
"""Export to Hugging Face (`transnormer-export-hf` once installed): megatron_transnormer/commands/export_hf.py."""
if __name__ == "__main__":  # not on import: spawned worker processes re-import this file
    from megatron_transnormer.commands.export_hf import main
    raise SystemExit(main())
