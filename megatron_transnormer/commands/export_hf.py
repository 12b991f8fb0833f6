"""Export a checkpoint as a Hugging Face model directory.

    python tools/export_hf.py runs/tiny_cpu hf/tiny_cpu
    python tools/export_hf.py runs/blm/checkpoints/step_00000300 hf/blm --data data/shakespeare-mlm

CHECKPOINT is a checkpoint directory (step_NNNNNNNN), or a run directory or its checkpoints/
folder, whose newest intact checkpoint is used; it is read as tools/generate.py reads it
(its `load_checkpoint`). The tokenizer comes from the checkpoint's dataset (data.path in its
config, or --data). OUT_DIR receives config.json, model.safetensors, generation_config.json,
tokenizer.json with tokenizer_config.json and special_tokens_map.json, and the model code
(configuration_transnormer.py, modeling_transnormer.py), so that

    AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)   # model.head=lm
    AutoModelForMaskedLM.from_pretrained(OUT_DIR, trust_remote_code=True)   # model.head=masked_lm

loads it where transformers is installed, without this package. Errors are one line (exit code 2
for a bad argument, file or setting, else 1); TRANSNORMER_TRACEBACK=1 adds the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings

from .generate import checkpoint_dir, load_checkpoint  # how every command reads a checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="export_hf.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint, run directory or checkpoints folder")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the directory to write (created if missing)")
    p.add_argument("--data", metavar="PATH", default=None,
                   help="the dataset whose tokenizer to export (default: data.path of the checkpoint's config)")
    return p.parse_args(argv)


def run(args) -> int:
    import dataclasses

    from megatron_transnormer.config import config_from_dict, validate_config
    from megatron_transnormer.data.tokenizers import dataset_tokenizer
    from megatron_transnormer.hf import export
    from megatron_transnormer.training.cli import data_path, load_data_info

    path = checkpoint_dir(args.checkpoint)
    config, weights = load_checkpoint(path)
    cfg = validate_config(config_from_dict(config))
    info = load_data_info(args.data or data_path(cfg))
    info.check_model(vocab_size=cfg.model.vocab_size)
    files = export(dataclasses.asdict(cfg), weights, dataset_tokenizer(info), args.out_dir)
    auto = "AutoModelForCausalLM" if cfg.model.head == "lm" else "AutoModelForMaskedLM"
    print(f"exported {path} ({cfg.model.head}, {len(cfg.model.layers)} layers, vocabulary {cfg.model.vocab_size}) "
          f"to {args.out_dir}: {', '.join(files)}")
    print(f"load it with transformers.{auto}.from_pretrained({str(args.out_dir)!r}, trust_remote_code=True)")
    return 0


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    args = parse_args(argv)
    # DeepSpeed's logger writes to the stdout it finds at import; stdout carries the summary.
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401
        from megatron_transnormer.training.cli import run_tool
    return run_tool("export_hf.py", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
