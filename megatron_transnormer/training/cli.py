"""The pretrain.py command line: `--config NAME|PATH` plus `key=value` overrides.

`prepare_run` does everything that can fail because of a setting, before any process
group exists: parse, load the config, read the dataset manifest (vocab_size and
seq_len come from it when the config leaves them at 0), and validate against the
world size the launcher announced. A failure here is a `UsageError` naming the key or
file; pretrain.py turns it into one line and exit code 2, so no rank waits for a peer
that already gave up.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from megatron_transnormer.config import (Config, ConfigError, available_configs,
                                         check_sequence_length, config_to_dict, load_config,
                                         override_keys, validate_config)
from megatron_transnormer.config.loader import DEFAULT_CONFIG


class UsageError(Exception):
    """A bad argument, config value or data path; the message says which."""


@dataclass
class PreparedRun:
    cfg: Config
    info: object  # the dataset manifest (megatron_transnormer.data.load_dataset_info)
    world_size: int


def _help_epilog() -> str:
    lines = ["bundled configs (--config NAME):"]
    lines += [f"  {name}{'  (default)' if name == DEFAULT_CONFIG else ''}" for name in available_configs()]
    lines += ["", "override keys (key=value, values parsed as YAML; defaults before any config file):"]
    keys = override_keys()
    width = max(len(k) for k, _, _ in keys)
    lines += [f"  {k:<{width}}  {tp:<18} {default!r}" for k, tp, default in keys]
    lines += ["", "examples:",
              "  python pretrain.py                                  # alm/tiny_cpu on data/shakespeare",
              "  python pretrain.py --config alm/wikitext103_t2 train.run_dir=runs/t2",
              "  torchrun --nproc_per_node 8 pretrain.py --config scale/1b parallel.tensor=2"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain.py",
        description="Pretrain a TransNormer language model. The same arguments work under python, "
                    "torchrun, deepspeed and srun.",
        epilog=_help_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help=f"bundled config name or YAML path (default: {DEFAULT_CONFIG})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=20")
    # DeepSpeed's launcher (and torch.distributed.launch) append --local_rank=N; LOCAL_RANK
    # in the environment carries the same information, so the flag is accepted and ignored.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def launcher_world_size() -> int:
    from megatron_transnormer.parallel.process_groups import read_launch_env
    try:
        return read_launch_env().world_size
    except ValueError as e:
        raise UsageError(f"launcher environment: {e}") from None


def apply_manifest(cfg: Config, info) -> None:
    """Fill vocab_size / seq_len left at 0 from the dataset; refuse a mismatch."""
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = info.vocab_size
    if cfg.data.seq_len == 0:
        cfg.data.seq_len = info.seq_len
    try:
        info.check_model(vocab_size=cfg.model.vocab_size, seq_len=cfg.data.seq_len)
    except ValueError as e:  # the message names the key and the dataset
        raise UsageError(str(e)) from None


def load_data_info(path: str):
    from megatron_transnormer.data import load_dataset_info
    try:
        return load_dataset_info(path)
    except ValueError as e:  # DataError: names data.path or the manifest file
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"data.path={path!r}: {e}") from None


def prepare_run(argv: list[str] | None = None) -> PreparedRun:
    args = build_parser().parse_intermixed_args(argv)
    try:
        cfg = validate_config(load_config(args.config, args.overrides))  # values first, then the data
        info = load_data_info(cfg.data.path)
        apply_manifest(cfg, info)
        check_sequence_length(cfg, cfg.data.seq_len)
        resume = cfg.train.resume
        if resume not in ("auto", "none") and not Path(resume).is_dir():
            raise UsageError(f"train.resume={resume!r}: no checkpoint directory there (auto, none, or a "
                             f"path such as {cfg.train.run_dir}/checkpoints/step_00000100)")
        world_size = launcher_world_size()
        validate_config(cfg, world_size=world_size)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    return PreparedRun(cfg=cfg, info=info, world_size=world_size)


def resolved_config(cfg: Config) -> dict:
    """Plain dict (tuples as lists) for YAML and checkpoints."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(config_to_dict(cfg))
