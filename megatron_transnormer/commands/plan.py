"""Predict per-GPU memory (GiB) of a config and parallel layout, and the longest context that fits.

    python tools/plan.py --config scale/1b parallel.tensor=2 parallel.context=4 data.seq_len=32768 --gpus 8
    python tools/plan.py --config scale/1b_1m_context --gpus 8 --gpu-memory 141

The config and the key=value overrides are resolved as pretrain.py resolves them and
validated for --gpus ranks. The table lists parameters, gradients, fp32 master weights and
Adam moments as DeepSpeed lays them out for the ZeRO stage (partitioned over data x
context parallel ranks), the activations of one micro-batch with and without block
checkpointing and those kept in flight, the backward's recomputation working set, the
logits' transient, the optimizer step's transient and the peak; then whether the peak fits
the --gpu-memory GPU with the headroom left, and the longest sequence (micro-batch 1)
fitting an 80 GB and a 141 GB GPU. Formulas: megatron_transnormer/planning/. Errors are one
line naming the key (exit code 2).
"""
from __future__ import annotations

import argparse
import sys
import warnings

PROG = "plan.py"
# The bundled scale configs take the vocabulary from the dataset; they are sized for 50,304.
DEFAULT_VOCAB = 50304


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="bundled config name or YAML path (default: alm/tiny_cpu)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for pretrain.py")
    p.add_argument("--gpus", type=int, default=None,
                   help="world size (default: tensor x pipeline x context, one data-parallel replica)")
    p.add_argument("--gpu-memory", type=float, default=80,
                   help="GPU size to check the peak against: 80 (H100), 141 (H200) or any GiB (default 80)")
    p.add_argument("--headroom", type=float, default=None,
                   help="share of the GPU left free for what the plan does not model (default 0.10)")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB,
                   help=f"vocabulary when the config takes it from the dataset (model.vocab_size=0; "
                        f"default {DEFAULT_VOCAB})")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    args = parse_args(argv)
    from megatron_transnormer.config import ConfigError, check_sequence_length, load_config, validate_config
    from megatron_transnormer.planning import HEADROOM, plan_memory
    from megatron_transnormer.planning.report import markdown
    from megatron_transnormer.training.cli import report_error
    headroom = HEADROOM if args.headroom is None else args.headroom
    if not 0 <= headroom < 1:
        return report_error(PROG, 2, f"--headroom {headroom}: must be in [0, 1)")
    if args.gpus is not None and args.gpus < 1:
        return report_error(PROG, 2, f"--gpus {args.gpus}: must be >= 1")
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = args.vocab_size
        validate_config(cfg)
        p = cfg.parallel
        world = args.gpus or p.tensor * p.pipeline * p.context
        validate_config(cfg, world_size=world)
        if cfg.data.seq_len == 0:
            raise ConfigError("data.seq_len: 0 (taken from the dataset at training time); set data.seq_len=N")
        check_sequence_length(cfg, cfg.data.seq_len)
        plan = plan_memory(cfg, world)
        table = markdown(plan, args.gpu_memory, headroom)
    except (ConfigError, ValueError) as e:
        return report_error(PROG, 2, str(e), e)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
