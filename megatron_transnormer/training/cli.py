"""The pretrain.py command line: `--config NAME|PATH` plus `key=value` overrides.

`prepare_run` does everything that can fail because of a setting, before any process
group exists: parse, load the config, read the dataset manifest (vocab_size and
seq_len come from it when the config leaves them at 0; it must hold the training and
validation splits, with sample counts that add up), check the kernels can run here,
validate against the world size the launcher announced, refuse to start a second run
in a run directory that holds one, and compare the checkpoint to be resumed (its
meta.json) with this run's layout. A failure here is a `UsageError` naming the key or
file; pretrain.py turns it into one line and exit code 2, so no rank waits for a peer
that already gave up. Failures during training get one line too (loop.RunFailed); the
traceback only with TRANSNORMER_TRACEBACK=1.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_transnormer.config import (Config, ConfigError, available_configs,
                                         check_sequence_length, config_to_dict, load_config,
                                         override_keys, validate_config)
from megatron_transnormer.config.loader import DEFAULT_CONFIG

from .wandb_logging import check_wandb


TRACEBACK_ENV = "TRANSNORMER_TRACEBACK"  # 1: print the traceback of an error, not only its line


def report_error(prog: str, code: int, line: str, exc: BaseException | None = None) -> int:
    """The command-line tools' way to fail: `<prog>: error: <line>` on stderr (nothing when the
    line is empty: another rank reports it), the traceback too when TRACEBACK_ENV is set.
    Returns `code`, the exit code."""
    if exc is not None and os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        import traceback
        traceback.print_exception(exc)
    if line:
        print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
    return code


def run_tool(prog: str, run, usage_errors: tuple = ()) -> int:
    """A tool's body `run()` -> its exit code; a UsageError, ValueError or FileNotFoundError
    (or one of `usage_errors`) exits 2 with its message, anything else 1, one line each."""
    try:
        return run()
    except (UsageError, ValueError, FileNotFoundError, *usage_errors) as e:
        return report_error(prog, 2, str(e), e)
    except Exception as e:  # one line, whatever it is
        return report_error(prog, 1, f"{type(e).__name__}: {e}", e)

# What a run leaves in its run directory (besides logs/ of the SLURM launchers), deleted by
# train.overwrite=true; the first two are what makes a directory "hold a run".
RUN_FILES = ("metrics.jsonl", "checkpoints", "tensorboard", "loss.png", "config.yaml",
             "wandb",  # train.wandb's offline runs and run id (wandb_logging.py)
             "best", "test_result.json")  # the last two: classifiers' (loop.BEST_SUBDIR, loop.TEST_RESULT)


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
        # A classifier pads its samples up to data.seq_len (objectives.Classification), which may
        # exceed the dataset's length; check_dataset checks it against that.
        padded = "classification" in info.manifest
        info.check_model(vocab_size=cfg.model.vocab_size, seq_len=None if padded else cfg.data.seq_len)
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


def load_run_data(cfg: Config):
    """The dataset the run reads (data.path), or the first of its blend (data.blend), whose
    datasets are checked to share one tokenizer and sample shape; each holds the splits
    training reads."""
    if not cfg.data.blend:
        info = load_data_info(cfg.data.path)
        check_splits(cfg, info)
        return info
    from megatron_transnormer.data.blend import blend_datasets
    try:
        datasets = blend_datasets(cfg.data)
    except ValueError as e:  # DataError: names the data.blend entry
        raise UsageError(str(e)) from None
    for d in datasets:
        check_splits(cfg, d.info)
    return datasets[0].info


def data_path(cfg: Config) -> str:
    """The dataset whose tokenizer and vocabulary a run uses: data.path, or the first
    dataset of data.blend (all of a blend share them)."""
    from megatron_transnormer.config.schema import blend_entries
    return cfg.data.path or (blend_entries(cfg.data.blend)[0][1] if cfg.data.blend else "")


def check_splits(cfg: Config, info) -> None:
    """The splits training reads exist, and each split's sample count is its shards' sum
    (the loader sizes everything by the shards' counts; a split total that disagrees means
    the manifest was edited or mixed from two preparations)."""
    for key in ("train_split", "valid_split"):
        name = getattr(cfg.data, key)
        if name not in info.manifest["splits"]:
            need = "training" if key == "train_split" else "validation (at train.eval_interval and at the end)"
            raise UsageError(f"data.{key}={name!r}: dataset {info.path} has no split {name!r} (it has "
                             f"{', '.join(info.splits) or 'none'}); {need} reads it: prepare the dataset with "
                             f"it (tools/prepare_data.py) or set data.{key}")
    for name, split in info.manifest["splits"].items():
        total = sum(int(s["samples"]) for s in split["shards"])
        if total != split["samples"]:
            raise UsageError(f"{info.path}: splits.{name}.samples is {split['samples']}, but its "
                             f"{len(split['shards'])} shards hold {total} samples (the sum of their 'samples'); "
                             f"the manifest is inconsistent: prepare the dataset again")


def check_kernels(cfg: Config) -> None:
    """model.kernels=triton needs Triton, and a GPU or Triton's CPU interpreter."""
    if cfg.model.kernels != "triton":
        return
    import torch
    from transnormer_kernels.support import interpreting, triton_available
    if not triton_available():
        raise UsageError("model.kernels=triton: Triton is not installed; use model.kernels=auto or torch")
    if not torch.cuda.is_available() and not interpreting():
        raise UsageError("model.kernels=triton: no GPU here, and TRITON_INTERPRET=1 (Triton's CPU interpreter) "
                         "is not set; use model.kernels=auto (Triton on GPUs, the PyTorch reference elsewhere) "
                         "or model.kernels=torch")


def previous_run(run_dir: str | os.PathLike) -> list[str]:
    """What of an earlier run `run_dir` holds: a non-empty metrics.jsonl, a non-empty checkpoints/."""
    run_dir = Path(run_dir)
    found = []
    metrics, checkpoints = run_dir / RUN_FILES[0], run_dir / RUN_FILES[1]
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(str(metrics))
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append(f"{checkpoints}/")
    return found


def clear_previous_run(run_dir: str | os.PathLike) -> None:
    """Delete what a run leaves in run_dir (RUN_FILES), for train.overwrite=true."""
    for name in RUN_FILES:
        path = Path(run_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def continues_run(cfg: Config) -> bool:
    """Whether train.resume continues the run in train.run_dir (auto, or one of its checkpoints)."""
    from .checkpoint import RUN_SUBDIR
    resume = cfg.train.resume
    if resume == "auto":
        return True
    if resume == "none":
        return False
    return Path(resume).resolve().is_relative_to((Path(cfg.train.run_dir) / RUN_SUBDIR).resolve())


def check_run_dir(cfg: Config) -> None:
    """train.run_dir is a directory (or absent), and holds no other run unless this run
    continues it or train.overwrite allows starting over (metrics of two runs must never
    end up in one metrics.jsonl)."""
    run_dir = Path(cfg.train.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"train.run_dir={cfg.train.run_dir!r}: exists and is not a directory")
    found = previous_run(run_dir)
    if found and not continues_run(cfg) and not cfg.train.overwrite:
        raise UsageError(f"train.run_dir={cfg.train.run_dir!r} already holds a run ({', '.join(found)}); "
                         f"train.resume={cfg.train.resume} would start another one there. Continue it with "
                         f"train.resume=auto, choose another train.run_dir, or add train.overwrite=true to "
                         f"delete it and start clean")


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


def layout_mismatch(saved: dict, cfg: Config, world_size: int) -> str:
    """What differs between a checkpoint's meta.json (`saved`) and the layout cfg has on
    world_size ranks, as "setting: A in the checkpoint, B in this run; ...", or ""."""
    from . import checkpoint
    diffs = checkpoint.layout_differences(saved, checkpoint.layout_record(cfg, world_size))
    return "; ".join(f"{name}: {old} in the checkpoint, {new} in this run" for name, old, new in diffs)


def check_resume_layout(cfg: Config, world_size: int) -> None:
    """Refuse to resume a checkpoint saved with another parallel layout, ZeRO stage,
    precision or model shape (a layout-free checkpoint: another model shape): here, before
    any process group exists, rather than in the runtime's load (which checks again) after
    every rank has started."""
    from . import checkpoint
    try:  # auto: the newest intact checkpoint; none intact is a one-line error, as here
        path = checkpoint.resume_target(cfg.train.resume, Path(cfg.train.run_dir) / checkpoint.RUN_SUBDIR)
    except checkpoint.CheckpointError as e:
        raise UsageError(f"train.resume: {e}") from None
    if path is None:
        return
    try:
        saved = checkpoint.read_meta(path)
    except ValueError as e:
        raise UsageError(f"train.resume: {e}") from None
    if saved is None:  # written before checkpoints carried meta.json: the runtime's check remains
        return
    blend = saved.get("data_blend")
    if blend is not None and blend != checkpoint.blend_weights(cfg):
        mix = lambda w: f"a blend of {len(w)} datasets with weights {w}" if w else "one dataset (data.path)"
        raise UsageError(f"train.resume: {path} was saved by a run reading {mix(blend)}, this run reads "
                         f"{mix(checkpoint.blend_weights(cfg))}; its data position continues only the same mix: "
                         f"resume it with the data settings it was saved with")
    what = layout_mismatch(saved, cfg, world_size)
    if saved.get("format") == checkpoint.LAYOUT_FREE:
        # It records no layout, so `what` names model settings only: any layout may resume it.
        if saved.get("model_only"):
            raise UsageError(f"train.resume: {path} is a model-only export (no optimizer state); resuming needs "
                             f"a full layout-free checkpoint (tools/convert_checkpoint.py without --model-only)")
        if what:
            raise UsageError(f"train.resume: layout-free checkpoint {path} holds another model ({what}); resume "
                             f"it with the model settings it was saved with")
        return
    if what:
        raise UsageError(f"train.resume: checkpoint {path} was saved with another layout ({what}); "
                         f"resume it with the settings it was saved with, or start a new run with "
                         f"train.resume=none and another train.run_dir")


def prepare_run(argv: list[str] | None = None) -> PreparedRun:
    args = parse_args(argv)
    try:
        cfg = validate_config(load_config(args.config, args.overrides))  # values first, then the data
        check_kernels(cfg)
        check_wandb(cfg)
        info = load_run_data(cfg)
        apply_manifest(cfg, info)
        check_sequence_length(cfg, cfg.data.seq_len)
        resume = cfg.train.resume
        if resume not in ("auto", "none") and not Path(resume).is_dir():
            raise UsageError(f"train.resume={resume!r}: no checkpoint directory there (auto, none, or a "
                             f"path such as {cfg.train.run_dir}/checkpoints/step_00000100)")
        check_run_dir(cfg)
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
