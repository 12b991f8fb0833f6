"""Convert a checkpoint of any parallel layout into a layout-free one, which any layout resumes.

    python tools/convert_checkpoint.py CHECKPOINT OUT [--model-only]
    torchrun --nproc_per_node N tools/convert_checkpoint.py CHECKPOINT OUT   (N = its world size)

CHECKPOINT is a checkpoint directory (RUN_DIR/checkpoints/step_NNNNNNNN) or a run directory
(its latest intact checkpoint). The checkpoint is loaded by the layout that saved it (the
world size, tensor, pipeline, context and data-parallel sizes and ZeRO stage in its
meta.json): started with plain python, this tool runs that many processes on this
machine's CPUs (gloo), which together need about the memory training needed; under a
launcher it runs as one of them. OUT receives, complete or not at all:

    model.safetensors      every parameter, whole, fp32, under the single-process model's names
    optimizer.safetensors  Adam's moments, whole (not with --model-only)
    state.json             Adam's step, the LR schedule, the step and data position (not with --model-only)
    config.yaml            the run's resolved config
    meta.json, checksums.json

Then `pretrain.py train.resume=OUT` continues the run on any layout and number of
processes (same model settings), `tools/generate.py --checkpoint OUT` samples from it and
`tools/evaluate.py --checkpoint OUT` evaluates it on one process. Nothing is pickled in OUT.

A damaged or incomplete checkpoint exits with code 2 and one line naming the file, before
any process starts; a failure during the conversion prints one line per failing rank.
TRANSNORMER_TRACEBACK=1 adds the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

PROG = "convert_checkpoint.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory, or a run directory (its latest)")
    p.add_argument("out", metavar="OUT", help="the layout-free checkpoint to write (replaced if it exists)")
    p.add_argument("--model-only", action="store_true",
                   help="write the weights and config only (for generation and evaluation; cannot be resumed)")
    # Launchers that append --local_rank=N; LOCAL_RANK says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _find(given: str) -> Path:
    from megatron_transnormer.training.checkpoint import META_FILE, RUN_SUBDIR, latest_checkpoint
    from megatron_transnormer.training.cli import UsageError
    path = Path(given)
    if not path.is_dir():
        raise UsageError(f"{given}: no such checkpoint directory")
    if (path / META_FILE).is_file():
        return path
    root = path / RUN_SUBDIR if (path / RUN_SUBDIR).is_dir() else path
    found = latest_checkpoint(root)
    if found is None:
        raise UsageError(f"{given}: not a checkpoint (no {META_FILE}) and no complete checkpoint under {root}")
    return Path(found)


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    args = build_parser().parse_args(argv)
    from megatron_transnormer.training.cli import UsageError, report_error
    from megatron_transnormer.training.deepspeed_loading import CheckpointError
    from megatron_transnormer.training.universal_convert import convert, convert_here, prepare_conversion
    try:
        path = _find(args.checkpoint)
        out = Path(args.out)
        if out.resolve() == path.resolve() or out.resolve().is_relative_to(path.resolve()):
            raise UsageError(f"{args.out}: must not be the checkpoint or inside it")
        if not out.parent.is_dir():
            raise UsageError(f"{args.out}: its folder {out.parent} does not exist")
        conv = prepare_conversion(path)
    except (UsageError, CheckpointError) as e:
        return report_error(PROG, 2, str(e), e)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    try:
        if launched:
            from megatron_transnormer.parallel import destroy_distributed
            try:
                convert(conv, out, args.model_only)
            finally:
                destroy_distributed()
            if int(os.environ["RANK"]) != 0:
                return 0
        else:
            convert_here(conv, out, args.model_only)
    except CheckpointError as e:
        return report_error(PROG, 2, str(e), e)
    except Exception as e:  # the ranks started here printed their own line
        return report_error(PROG, 1, f"{type(e).__name__}: {e}", e)
    meta = conv.meta
    print(f"converted {path} (step {meta.get('step')}, {meta.get('world_size')} ranks: tensor {meta.get('tensor')}, "
          f"pipeline {meta.get('pipeline')}, context {meta.get('context', 1)}, data {meta.get('data_parallel')}, "
          f"ZeRO {meta.get('zero_stage')}) to {out}" + (" (model only)" if args.model_only else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
