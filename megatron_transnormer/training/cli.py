"""The pretrain.py command line: `--config NAME|PATH` plus `key=value` overrides.

`prepare_run` does everything that can fail because of a setting, before any process
group exists: parse, load the config, read the dataset manifest (vocab_size and
seq_len come from it when the config leaves them at 0), validate against the
world size the launcher announced, and compare the checkpoint to be resumed (its
meta.json) with this run's layout. A failure here is a `UsageError` naming the key or
file; pretrain.py turns it into one line and exit code 2, so no rank waits for a peer
that already gave up.
"""
from __future__ import annotations

import argparse
import sys
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


def _value(cfg: Config, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _help_epilog(cfg: Config) -> str:
    """cfg: the config `--config` and the overrides make; its values are listed per key."""
    lines = ["bundled configs (--config NAME):"]
    lines += [f"  {name}{'  (default)' if name == DEFAULT_CONFIG else ''}" for name in available_configs()]
    lines += ["", f"override keys (key=value, values parsed as YAML), each with its value in {cfg.name} "
                  f"after the overrides given, and the schema default where that differs:"]
    keys = override_keys()
    width = max(len(k) for k, _, _ in keys)
    for k, tp, default in keys:
        value = _value(cfg, k)
        differs = "" if value == default else f"  (default {default!r})"
        lines.append(f"  {k:<{width}}  {tp:<18} {value!r}{differs}")
    lines += ["", "examples:",
              "  python pretrain.py                                  # alm/tiny_cpu on data/shakespeare",
              "  python pretrain.py --config alm/wikitext103_t2 train.run_dir=runs/t2",
              "  python pretrain.py --config blm/tiny_cpu            # the masked LM on data/shakespeare-mlm",
              "  deepspeed pretrain.py --config blm/wikitext103_t2 model.layers=norm*12",
              "  torchrun --nproc_per_node 8 pretrain.py --config scale/1b parallel.tensor=2"]
    return "\n".join(lines)


def build_parser(cfg: Config | None = None) -> argparse.ArgumentParser:
    """cfg: the config whose values --help lists (see `_help_epilog`); None: no epilog."""
    p = argparse.ArgumentParser(
        prog="pretrain.py",
        description="Pretrain a TransNormer language model. The same arguments work under python, "
                    "torchrun, deepspeed and srun.",
        epilog=None if cfg is None else _help_epilog(cfg),
        formatter_class=argparse.RawDescriptionHelpFormatter)
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
    """Fill vocab_size / seq_len left at 0 from the dataset (and the padding id of padded
    data when the config leaves it at -1); refuse a mismatch, and a dataset packed for
    another objective."""
    from .objectives import check_dataset
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = info.vocab_size
    if cfg.data.seq_len == 0:
        cfg.data.seq_len = info.seq_len
    if cfg.model.pad_id == -1 and info.packing == "mlm":
        cfg.model.pad_id = info.pad_id
    try:
        info.check_model(vocab_size=cfg.model.vocab_size, seq_len=cfg.data.seq_len)
        check_dataset(cfg, info)
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse argv. --help exits after listing every key with its value in the config that
    --config and the overrides make (the default config without --config)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if "-h" in argv or "--help" in argv:
        args = parser.parse_intermixed_args([a for a in argv if a not in ("-h", "--help")])
        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            raise UsageError(str(e)) from None
        try:  # show derived values (the layer pattern, the FFN width) where the config is valid
            validate_config(cfg)
        except ConfigError:
            pass
        parser = build_parser(cfg)
    return parser.parse_intermixed_args(argv)


def check_resume_layout(cfg: Config, world_size: int) -> None:
    """Refuse to resume a checkpoint saved with another parallel layout, ZeRO stage,
    precision or model shape: here, before any process group exists, rather than in the
    runtime's load (which checks again) after every rank has started."""
    from . import checkpoint
    path = checkpoint.resume_target(cfg.train.resume, Path(cfg.train.run_dir) / checkpoint.RUN_SUBDIR)
    if path is None:
        return
    try:
        saved = checkpoint.read_meta(path)
    except ValueError as e:
        raise UsageError(f"train.resume: {e}") from None
    if saved is None:  # written before checkpoints carried meta.json: the runtime's check remains
        return
    diffs = checkpoint.layout_differences(saved, checkpoint.layout_record(cfg, world_size))
    if diffs:
        what = "; ".join(f"{name}: {old} in the checkpoint, {new} in this run" for name, old, new in diffs)
        raise UsageError(f"train.resume: checkpoint {path} was saved with another layout ({what}); "
                         f"resume it with the settings it was saved with, or start a new run with "
                         f"train.resume=none and another train.run_dir")


def prepare_run(argv: list[str] | None = None) -> PreparedRun:
    args = parse_args(argv)
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
        check_resume_layout(cfg, world_size)
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
