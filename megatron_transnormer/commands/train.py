"""Pretrain a TransNormer language model.

    python pretrain.py [--config NAME|PATH] [key=value ...]
    torchrun --nproc_per_node N pretrain.py ...      deepspeed pretrain.py ...      srun python pretrain.py ...

With no --config it trains the default `alm/tiny_cpu` on data/shakespeare
(`make train` prepares the data first). `--help` lists the bundled configs and
every override key. Settings, data path and world size are checked before any
process group starts; a bad one exits with code 2 and a one-line message. Errors
during training are one line too: exit code 2 for bad data, 1 otherwise (after
saving a checkpoint where the state allows it); TRANSNORMER_TRACEBACK=1 adds the
traceback.
"""
from __future__ import annotations

import os
import sys
import warnings


def _report(code: int, line: str, exc: BaseException | None) -> int:
    from megatron_transnormer.training.cli import report_error
    return report_error("pretrain.py", code, line, exc)


EXAMPLES = """examples:
  python pretrain.py                                  # alm/tiny_cpu on data/shakespeare
  python pretrain.py --config alm/wikitext103_t2 train.run_dir=runs/t2
  python pretrain.py --config blm/tiny_cpu            # the masked LM on data/shakespeare-mlm
  torchrun --nproc_per_node 8 pretrain.py --config scale/1b parallel.tensor=2"""


def _help(argv: list[str]) -> int:
    """--help: the bundled configs, then every key with its value in the config that --config
    and the overrides make, its meaning and allowed values (from the schema itself)."""
    from megatron_transnormer.config import (ConfigError, available_configs, describe_keys, load_config,
                                             validate_config)
    from megatron_transnormer.config.loader import DEFAULT_CONFIG
    from megatron_transnormer.training.cli import build_parser
    parser = build_parser()
    args = parser.parse_intermixed_args([a for a in argv if a not in ("-h", "--help")])
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return _report(2, str(e), e)
    try:  # show derived values (the layer pattern, the FFN width) where the config is valid
        validate_config(cfg)
    except ConfigError:
        pass
    lines = ["bundled configs (--config NAME):"]
    lines += [f"  {n}{'  (default)' if n == DEFAULT_CONFIG else ''}" for n in available_configs()]
    lines += ["", f"settings (key=value words, values parsed as YAML), each with its value in {cfg.name} after the "
                  f"overrides given, the schema default where that differs, and what it means:",
              describe_keys(cfg), "", EXAMPLES]
    parser.epilog = "\n".join(lines)
    parser.print_help()
    return 0


def main(argv: list[str] | None = None) -> int:
    # First of all: record SIGUSR1/SIGTERM (SLURM's pre-emption warning) instead of dying,
    # even while the heavy imports and the process-group start are still running.
    from megatron_transnormer.training.signals import StopRequest
    stop = StopRequest()
    try:
        # megatron-core warns at import that optional CUDA extensions are missing; the
        # fallbacks are what we use, so the warning is noise on every rank.
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        args = sys.argv[1:] if argv is None else list(argv)
        from megatron_transnormer.config import config_warnings, option_habit
        habit = option_habit(args)  # --train.steps=20, --steps 20: say which key=value to write
        if habit:
            return _report(2, habit, None)
        if "-h" in args or "--help" in args:
            return _help(args)
        from megatron_transnormer.training.cli import UsageError, prepare_run
        try:
            run = prepare_run(args)
        except UsageError as e:
            return _report(2, str(e), e)
        if os.environ.get("RANK", "0") == "0":  # once per job, not once per rank
            for line in config_warnings(run.cfg):
                print(f"pretrain.py: warning: {line}", file=sys.stderr, flush=True)
        stop.grace_s = run.cfg.train.stop_grace_s
        from megatron_transnormer.training.loop import RunFailed, run_training
        try:
            return run_training(run.cfg, run.info, stop)
        except RunFailed as e:
            from megatron_transnormer.training.signals import terminate_children
            terminate_children()  # e.g. a shard command stuck in its pipe would outlive us
            return _report(e.code, e.line, e.__cause__ or e)
    finally:
        stop.restore()


if __name__ == "__main__":
    sys.exit(main())
