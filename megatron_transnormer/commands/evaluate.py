"""Evaluate a checkpoint on a split of its dataset, or gather evaluations into the paper's tables.

    python tools/evaluate.py --checkpoint RUN_DIR|CHECKPOINT [--split test] [--batches N] [--output FILE.json]
                             [key=value ...]
    torchrun --nproc_per_node 2 tools/evaluate.py --checkpoint ...   (a checkpoint saved by 2 ranks)
    python tools/evaluate.py --table RUN_DIR [RUN_DIR ...]

--checkpoint takes a checkpoint directory (RUN_DIR/checkpoints/step_NNNNNNNN) or a run
directory (its latest intact checkpoint). The settings are the run's resolved config
(RUN_DIR/config.yaml, written by pretrain.py) with the key=value overrides on top. The
evaluation runs under the launchers pretrain.py runs under, on the layout the checkpoint
was saved with (its meta.json): another world size, parallel layout, ZeRO stage,
precision or model shape is refused before any process group starts, naming each
difference. A layout-free checkpoint (tools/convert_checkpoint.py, --model-only too)
carries its config and loads into any layout: one process by default, or the parallel.*
overrides given under a launcher; its results go beside it (not inside: its files are
all checksummed). The split is scored as the run's validation scores it (the same
batches, the masked LM's masks drawn from (seed, epoch 0, sample index)): per-token and
per-word perplexity for causal LMs, masked-token perplexity for the masked LM, accuracy
(and cross entropy per sample) for classifiers, read through the LRA reader. Rank 0
shows a progress bar on a terminal (plain lines otherwise), prints one summary line and
writes the result as JSON, by default to RUN_DIR/eval_<split>_step<N>.json.

--table reads those files from each run directory given (each run's latest evaluated
step) and prints the paper's tables, the published numbers beside the runs' own.

Bad arguments exit with code 2 and one line naming the argument or file; a failure
during the evaluation prints one line and exits 1 (2 for bad data).
TRANSNORMER_TRACEBACK=1 adds the traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from megatron_transnormer.training.cli import UsageError, report_error

PROG = "evaluate.py"
_STEP_DIR = re.compile(r"^step_(\d{8})$")  # checkpoint.step_dirname's names

# The layout a layout-free checkpoint is evaluated with unless overrides say otherwise.
_ONE_PROCESS = {"tensor": 1, "pipeline": 1, "context": 1, "zero_stage": 0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", metavar="PATH",
                      help="a checkpoint directory (RUN_DIR/checkpoints/step_NNNNNNNN), a layout-free checkpoint, or "
                           "a run directory: its latest intact checkpoint")
    what.add_argument("--table", nargs="+", metavar="RUN_DIR",
                      help="print the paper's tables from the evaluations (eval_<split>_step<N>.json) of these runs")
    p.add_argument("--split", default=None,
                   help="the dataset split to evaluate (default: the run's validation split, data.valid_split)")
    p.add_argument("--batches", type=int, default=0, metavar="N",
                   help="evaluate the first N global batches of the split (default 0: all of it)")
    p.add_argument("--output", default=None, metavar="FILE.json",
                   help="where the result goes (default: RUN_DIR/eval_<split>_step<N>.json)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the run's config, e.g. data.path=/elsewhere/wikitext-103 "
                        "train.micro_batch_size=32")
    # Launchers that append --local_rank=N (deepspeed, torch.distributed.launch); LOCAL_RANK says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


@dataclass
class Prepared:
    cfg: object  # the run's Config with the overrides, resolved against the dataset
    info: object  # the dataset manifest (DatasetInfo)
    checkpoint: Path
    step: int  # from its meta.json (or its name)
    layout_free: bool  # a layout-free checkpoint (tools/convert_checkpoint.py): weights only are loaded
    split: str
    max_batches: int  # 0: the whole split
    output: Path


def _find_checkpoint(given: str) -> Path:
    """The checkpoint directory --checkpoint names, directly or as a run directory's latest."""
    path = Path(given)
    if not path.is_dir():
        raise UsageError(f"--checkpoint {given}: no such directory (give a checkpoint, "
                         f"RUN_DIR/checkpoints/step_NNNNNNNN, or a run directory)")
    from megatron_transnormer.training.universal import is_layout_free
    if _STEP_DIR.match(path.name) or is_layout_free(path):
        return path
    from megatron_transnormer.training.checkpoint import RUN_SUBDIR, CheckpointError, latest_checkpoint
    root = path / RUN_SUBDIR if (path / RUN_SUBDIR).is_dir() else path
    try:
        latest = latest_checkpoint(root)
    except CheckpointError as e:
        raise UsageError(f"--checkpoint {given}: {e}") from None
    if latest is None:
        raise UsageError(f"--checkpoint {given}: not a checkpoint (step_NNNNNNNN), and no complete checkpoint "
                         f"under {root}")
    return Path(latest)


def prepare(args: argparse.Namespace) -> Prepared:
    """Everything that can fail because of an argument, a setting or a file, checked before
    any process group exists (as pretrain.py does), so no rank waits for one that gave up.
    The checks that need no heavy import (DeepSpeed, megatron-core) come first."""
    from megatron_transnormer.config import ConfigError, check_sequence_length, load_config, validate_config
    from megatron_transnormer.evaluation.tables import eval_filename
    from megatron_transnormer.training import cli

    if args.batches < 0:
        raise UsageError(f"--batches {args.batches}: must be >= 0 (0: the whole split)")
    from megatron_transnormer.training.universal import CONFIG_FILE, is_layout_free
    checkpoint = _find_checkpoint(args.checkpoint)
    layout_free = is_layout_free(checkpoint)
    overrides = list(args.overrides)
    if layout_free:
        # It carries its run's config and no layout: any layout loads it, one process unless
        # the overrides (and the launcher) say otherwise. Results go beside it, not inside:
        # all its files are checksummed.
        run_dir, config_file = checkpoint.parent, checkpoint / CONFIG_FILE
        overrides = [f"parallel.{k}={v}" for k, v in _ONE_PROCESS.items()] + overrides
    else:
        run_dir = checkpoint.parent.parent
        config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: no {config_file} (pretrain.py writes the run's resolved "
                         f"config there); evaluate a checkpoint inside its run directory")
    try:
        cfg = load_config(str(config_file), overrides)
        if cfg.data.blend:  # a blend's run: its datasets are evaluated one at a time
            if not cfg.data.path:
                raise UsageError(f"--checkpoint {args.checkpoint}: the run blends {len(cfg.data.blend)} datasets "
                                 f"(data.blend: {', '.join(cfg.data.blend)}); name the one to evaluate with "
                                 f"data.path=PATH")
            cfg.data.blend = []
        cfg = validate_config(cfg)
        info = cli.load_data_info(cfg.data.path)
        split = args.split or cfg.data.valid_split
        if split not in info.manifest["splits"]:
            raise UsageError(f"--split {split}: dataset {info.path} has no split {split!r} (it has "
                             f"{', '.join(info.splits)})")
        cli.check_kernels(cfg)
        cli.apply_manifest(cfg, info)
        check_sequence_length(cfg, cfg.data.seq_len)
        from megatron_transnormer.training.checkpoint import read_meta
        from megatron_transnormer.training.objectives import ObjectiveError, build_objective
        try:
            build_objective(cfg, info)
        except ObjectiveError as e:
            raise UsageError(str(e)) from None
        try:
            meta = read_meta(checkpoint)
        except ValueError as e:
            raise UsageError(f"--checkpoint: {e}") from None
        world_size = cli.launcher_world_size()
        if meta is not None:  # a checkpoint without meta.json: the runtime's load checks the layout
            what = cli.layout_mismatch(meta, cfg, world_size)  # layout-free: model settings only
            if what and layout_free:
                raise UsageError(f"--checkpoint: {checkpoint} holds another model ({what})")
            if what:
                ranks = meta.get("world_size", "its")
                raise UsageError(f"--checkpoint: {checkpoint} was saved with another layout ({what}); evaluate it "
                                 f"with the layout it was saved with, on {ranks} processes (torchrun "
                                 f"--nproc_per_node {ranks} tools/evaluate.py ...)")
        validate_config(cfg, world_size=world_size)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    dp_size = world_size // (cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.context)
    per_batch = cfg.train.micro_batch_size * dp_size
    if info.split(split)["samples"] < per_batch:
        raise UsageError(f"--split {split}: {info.path} holds {info.split(split)['samples']} samples there, less "
                         f"than one global batch of {per_batch} (train.micro_batch_size x data-parallel size)")
    step = int(meta["step"]) if meta else int(_STEP_DIR.match(checkpoint.name).group(1))
    output = Path(args.output) if args.output else run_dir / eval_filename(split, step)
    if output.is_dir() or not output.parent.is_dir():
        raise UsageError(f"--output {output}: " + ("is a directory" if output.is_dir()
                                                    else f"its folder {output.parent} does not exist"))
    return Prepared(cfg=cfg, info=info, checkpoint=checkpoint, step=step, layout_free=layout_free, split=split,
                    max_batches=args.batches, output=output)


class Progress:
    """Rank 0's progress: a tqdm bar on a terminal, else a plain line every tenth of the batches."""

    def __init__(self, enabled: bool, total: int, split: str):
        self.enabled, self.total, self.bar = enabled, total, None
        self.every = max(1, total // 10)
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="batch", desc=f"evaluating {split}", dynamic_ncols=True)

    def __call__(self, totals) -> None:
        if not self.enabled:
            return
        loss = totals.nll_sum / max(totals.tokens, 1)
        if self.bar is not None:
            self.bar.update(totals.batches - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif totals.batches % self.every == 0 or totals.batches == self.total:
            print(f"evaluated {totals.batches}/{self.total} batches: loss {loss:.4f}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def evaluate(prep: Prepared) -> dict | None:
    """Collective: start the process groups, build the runtime for the checkpoint's layout,
    load it and evaluate the split. Returns the result on rank 0 (None on the others);
    raises RunFailed (loop.py) with one line."""
    from megatron_transnormer.data import split_stream
    from megatron_transnormer.evaluation.evaluate import evaluate_split, split_record
    from megatron_transnormer.parallel import destroy_distributed, init_distributed
    from megatron_transnormer.training.checkpoint import layout_record
    from megatron_transnormer.training.cli import resolved_config
    from megatron_transnormer.training.loop import RunFailed, describe_failure, raise_failure, world_max
    from megatron_transnormer.training.objectives import build_objective
    from megatron_transnormer.training.runtime import build_runtime

    cfg, split = prep.cfg, prep.split
    phase, rank = "starting the process group", ""
    try:
        layout = init_distributed(cfg.parallel.tensor, cfg.parallel.pipeline,
                                  timeout_s=cfg.train.collective_timeout_s, context=cfg.parallel.context,
                                  sequence=cfg.parallel.sequence)
        rank = f"rank {layout.rank}: " if layout.world_size > 1 else ""
        phase = "building the model and the DeepSpeed engine"
        objective = build_objective(cfg, prep.info)
        rt = build_runtime(cfg, layout, objective)
        phase = f"loading {prep.checkpoint}"
        if prep.layout_free:  # the weights are all an evaluation needs (a --model-only export will do)
            from megatron_transnormer.training import universal
            client_state, _ = universal.load(rt, prep.checkpoint, weights_only=True)
        else:
            client_state, _ = rt.load_checkpoint(prep.checkpoint)
        phase = f"evaluating split {split!r} of {prep.info.path}"
        stream = split_stream(cfg.data, prep.info, split=split, dp_rank=layout.dp_rank, dp_size=layout.dp_size,
                              micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed, shuffle=False,
                              infinite=False)
        in_split = stream.num_batches()
        total = min(in_split, prep.max_batches) if prep.max_batches else in_split
        batches, failure = iter(stream), None

        def next_batch():
            nonlocal failure
            try:
                return next(batches, None)
            except Exception as e:  # e.g. a corrupt shard: reported after the ranks agree, below
                failure = e
                return None

        def agree(exhausted: bool) -> bool:
            # One all-reduce before each batch: a rank whose reading failed (or ended early)
            # stops every rank here, instead of leaving them waiting in eval_batch's reduction.
            done, failed = world_max([int(exhausted), describe_failure(failure, phase, cfg).code if failure else 0],
                                      layout.device)
            if failure is not None:
                raise failure
            if failed:
                raise RunFailed(failed, "")  # the rank that failed says why
            return not done

        progress = Progress(layout.rank == 0, total, split)
        t0 = time.perf_counter()
        try:
            totals = evaluate_split(next_batch, rt.eval_batch, agree, max_batches=prep.max_batches,
                                    progress=progress)
        finally:
            progress.close()
        wall = time.perf_counter() - t0
        if totals.tokens == 0:
            raise RunFailed(2, f"split {split!r} of {prep.info.path}: the evaluated batches hold no labelled token")
        if layout.rank != 0:
            return None
        samples = totals.batches * cfg.train.micro_batch_size * layout.dp_size
        tokenizer = prep.info.manifest.get("tokenizer", {})
        return {"checkpoint": str(prep.checkpoint.resolve()), "step": int(client_state.get("step", prep.step)),
                "split": split, "objective": objective.name,
                **split_record(totals, prep.info, split, objective.word_perplexity),
                "batches": totals.batches, "samples": samples,
                "coverage": samples / prep.info.split(split)["samples"], "whole_split": totals.batches == in_split,
                "wall_s": wall, "layout": layout_record(cfg, layout.world_size),
                "dataset": {"path": prep.info.path, "source": prep.info.manifest.get("source"),
                            "tokenizer": tokenizer.get("type")},
                "config": resolved_config(cfg)}
    except Exception as e:
        raise_failure(e, phase, cfg, rank)
    finally:
        destroy_distributed()


def summary(result: dict, output: Path) -> str:
    loss = "masked-token loss" if result["objective"] == "masked_lm" else "loss"
    parts = [f"{result['split']} at step {result['step']}: {loss} {result['loss']:.4f}", f"ppl {result['ppl']:.2f}"]
    if "word_ppl" in result:
        parts.append(f"word ppl {result['word_ppl']:.2f}")
    if "accuracy" in result:
        parts.append(f"accuracy {result['accuracy']:.2f}%")
    scored = "samples" if result["objective"] == "classification" else "tokens"
    parts.append(f"{result['tokens']:,} {scored} scored, {result['batches']} batches "
                 f"({100 * result['coverage']:.1f}% of the split) in {result['wall_s']:.1f} s -> {output}")
    return " | ".join(parts)


def write_json(result: dict, output: Path) -> None:
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, output)  # a reader (--table) never sees half a file


def table(run_dirs: list[str]) -> str:
    from megatron_transnormer.evaluation.tables import TableError, paper_tables, read_run
    try:
        return paper_tables([read_run(d) for d in run_dirs])
    except TableError as e:
        raise UsageError(f"--table: {e}") from None


def main(argv: list[str] | None = None) -> int:
    # megatron-core warns at import that optional CUDA extensions are missing; the
    # fallbacks are what we use, so the warning is noise on every rank.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    args = build_parser().parse_intermixed_args(argv)
    try:
        if args.table:
            if args.overrides or args.split or args.batches or args.output:
                raise UsageError("--table takes only run directories")
            print(table(args.table), flush=True)
            return 0
        prep = prepare(args)
    except UsageError as e:
        return report_error(PROG, 2, str(e), e)
    from megatron_transnormer.training.loop import RunFailed
    try:
        result = evaluate(prep)
        if result is not None:
            try:
                write_json(result, prep.output)
            except OSError as e:
                raise RunFailed(1, f"{e.strerror or e} while writing {prep.output}") from e
            print(summary(result, prep.output), flush=True)
    except RunFailed as e:
        return report_error(PROG, e.code, e.line, e.__cause__ or e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
