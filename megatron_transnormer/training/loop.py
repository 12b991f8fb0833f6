"""The training loop: resume, steps, periodic validation, checkpoints, stop signals, failures, plot.

One iteration of `Trainer.run` is one optimizer update: the loop pulls the update's
micro-batches from the data stream, and `self.rt.train_step(...)` runs forward/backward
(and the pipeline schedule when PP > 1) and steps the optimizer. Everything else here is
bookkeeping around that call.

Resume is exact: a checkpoint holds the runtime's model/optimizer/scheduler, and per
rank the data stream position and the RNG states, so a run stopped at step k (by a
signal or SIGKILL) and resumed produces the same per-step losses as one that never
stopped.

Step boundaries. Before update k+1 every rank loads its micro-batches, then the ranks
agree (one all-reduce of the max) on two flags: a stop signal (signals.py) and a local
failure. Local failures are those of collective-free work, after which this rank's
state is still the consistent state of step k: loading batches (a corrupt shard),
writing metrics (a full disk), validation data, the config file. Raising at once would
leave the other ranks waiting in their next collective; instead every rank learns of
the failure at the boundary, they save a checkpoint of step k together (when at least
one update was made since the last one; the data position is the one from before the
batches of k+1 were loaded) and exit non-zero. Validation agrees on the same flags
between its batches. A failure inside a collective operation (the update, an
evaluation batch, a checkpoint) cannot be agreed on: the rank exits at once with a
message naming what it was doing, and its peers fail their next collective, or time
out after `train.collective_timeout_s`.

Classifiers (model.head=classification, the LRA tasks) read the LRA reader's batches
(data/lra/stream.py) instead of the token stream; each validation that beats the best
accuracy so far is also saved under <run_dir>/best/, and at the end that checkpoint is
scored on data.test_split: a `test_*` record in metrics.jsonl and test_result.json.

Every failure ends as a `RunFailed`: an exit code (2 for bad data or settings, as the
checks before start-up; 1 otherwise) and one line for pretrain.py to print.
"""
from __future__ import annotations

import errno
import json
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from megatron_transnormer.config import Config, ConfigError
from megatron_transnormer.data import DataError, split_stream
from megatron_transnormer.data.blend import blend_datasets, dataset_config
from megatron_transnormer.evaluation.evaluate import SplitTotals, evaluate_split, split_record
from megatron_transnormer.evaluation.perplexity import token_perplexity, word_perplexity

from . import rng
from .checkpoint import RUN_SUBDIR, CheckpointError, latest_checkpoint, resume_target, step_dirname
from .cli import TRACEBACK_ENV, clear_previous_run, continues_run, resolved_config
from .metrics import MetricsLogger, peak_tflops, throughput, truncate_metrics
from .objectives import build_objective
from .plotting import plot_losses
from .runtime import build_runtime
from .signals import StopRequest, signal_name


BEST_SUBDIR = "best"  # classifiers: the checkpoint of the best validation accuracy, under run_dir
TEST_RESULT = "test_result.json"  # classifiers: the test score of that checkpoint, under run_dir


class RunFailed(Exception):
    """The run stopped on an error. `code` is the exit code; `line` is what pretrain.py
    prints, one line, or empty on a rank that stopped because another rank failed (that
    rank prints it). The original exception is the `__cause__`."""

    def __init__(self, code: int, line: str):
        super().__init__(line)
        self.code, self.line = code, line


# How torch.distributed reports a peer that stopped answering (gloo: "Timed out waiting
# 600000ms for recv operation"; the store: "Timed out after 601 seconds waiting for
# clients"; NCCL's watchdog: "Watchdog caught collective operation timeout") and one that
# went away (gloo: "Connection closed by peer", "Connection reset by peer").
_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)
_PEER_LOST = re.compile(r"connection (closed|reset|refused)|broken pipe", re.IGNORECASE)


def _gloo_detail(text: str) -> str:
    """The reason in a torch.distributed message, without the source location and advice."""
    return re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        # Re-raised from a DataLoader worker: the worker's own message is the last line.
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0].strip() if text else type(exc).__name__


def describe_failure(exc: BaseException, phase: str, cfg: Config) -> RunFailed:
    """The RunFailed that reports `exc`, raised while the run was `phase` (e.g. "running
    training step 7"), in one line."""
    if isinstance(exc, RunFailed):
        return exc
    if isinstance(exc, (DataError, ConfigError, CheckpointError)):  # their messages name the file or key
        return RunFailed(2, _one_line(exc))
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename and str(exc.filename) not in phase else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return RunFailed(1, f"no space left on device while {phase}{where}")
        return RunFailed(1, f"{exc.strerror or _one_line(exc)} while {phase}{where}")
    text = _one_line(exc)
    if isinstance(exc, RuntimeError) and _TIMED_OUT.search(text):
        timeout = cfg.train.collective_timeout_s
        return RunFailed(1, f"a collective operation timed out after {timeout:g} s while {phase}: another rank "
                            f"stopped responding (frozen, stuck or dead; see train.collective_timeout_s) "
                            f"[{_gloo_detail(text)}]")
    if isinstance(exc, RuntimeError) and _PEER_LOST.search(text):
        return RunFailed(1, f"lost contact with another rank while {phase}: it exited or was killed (its own "
                            f"output says why) [{_gloo_detail(text)}]")
    return RunFailed(1, f"{type(exc).__name__} while {phase}: {text} (set {TRACEBACK_ENV}=1 for the traceback)")


def raise_failure(exc: Exception, phase: str, cfg: Config, rank: str = ""):
    """Raise `exc` as the RunFailed that reports it (`describe_failure`), its line prefixed
    with `rank` ("rank 3: ") on multi-rank runs."""
    failure = describe_failure(exc, phase, cfg)
    if failure.line and rank:
        failure.line = rank + failure.line
    if failure is exc:
        raise exc
    raise failure from exc


def world_max(values: list[int], device: torch.device) -> list[int]:
    """The max of each value over all ranks (one all-reduce): how the ranks agree."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on the device: CUDA runs asynchronously, so a clock read
    without it could miss part of a step (or count part of the previous one)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _from_rank0(obj):
    """Rank 0's value on every rank (so that all ranks resume from the same checkpoint)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# Below this much free space a failed checkpoint write is reported as a full disk: torch's
# serializer reports ENOSPC as an opaque "unexpected pos" RuntimeError.
_NEARLY_FULL = 1 << 20


class Trainer:
    def __init__(self, cfg: Config, info, layout):
        self.cfg, self.info, self.layout = cfg, info, layout
        self.is_rank0 = layout.rank == 0
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_root = self.run_dir / RUN_SUBDIR
        self.run_dir.mkdir(parents=True, exist_ok=True)
        rng.seed_all(cfg.train.seed, layout.tp_rank, layout.pp_rank, layout.dp_rank, layout.cp_rank)
        self.objective = build_objective(cfg, info)
        self.rt = build_runtime(cfg, layout, self.objective)
        self.train_stream = self._stream(cfg.data.train_split, shuffle=True, infinite=True)
        self.blend = blend_datasets(cfg.data) if cfg.data.blend else []  # validated one by one
        self.classifier = self.objective.name == "classification"
        self.best = None  # classifiers: the best validation record so far, with its step
        self.step = 0
        self.last_saved = None  # (step, path)
        self.last_eval_step = None
        self.failure: RunFailed | None = None  # a local failure the ranks have yet to agree on
        self.stop: StopRequest | None = None  # run()'s
        self.log = MetricsLogger(self.run_dir, enabled=False, total_steps=cfg.train.steps, start_step=0,
                                 log_interval=1, tensorboard=False)

    def _stream(self, split: str, *, shuffle: bool, infinite: bool, data_cfg=None):
        """This rank's batches of `split` of data_cfg's data (default the run's, data.blend's
        mix for training): the LRA reader's for a classification dataset (a manifest with a
        `classification` section), else the token stream's."""
        return split_stream(data_cfg or self.cfg.data, self.info, split=split, dp_rank=self.layout.dp_rank,
                            dp_size=self.layout.dp_size, micro_batch_size=self.cfg.train.micro_batch_size,
                            seed=self.cfg.train.seed, shuffle=shuffle, infinite=infinite)

    # ------------------------------------------------------------- failures
    def _local(self, phase: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), collective-free work; a failure is kept for the ranks' next
        agreement. Returns None after a failure (and does nothing once one is pending)."""
        if self.failure is not None:
            return None
        self.stop.phase = phase
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            self.failure = describe_failure(e, phase, self.cfg)
            self.failure.__cause__ = e
            return None

    def _agree(self, *values: int) -> list[int]:
        """[stop signal, failure code, *values], each the max over all ranks. A failure on
        another rank becomes this rank's too (silent: that rank reports it)."""
        signum, failed, *rest = world_max([self.stop.signum, self.failure.code if self.failure else 0,
                                            *values], self.layout.device)
        if failed and self.failure is None:
            self.failure = RunFailed(failed, "")
        if signum:
            self.stop.acknowledge()
        return [signum, failed, *rest]

    def _stop_on_failure(self, data_state: dict) -> None:
        """Every rank agreed that one failed: save the state of this step, then raise."""
        if self.step > 0 and (self.last_saved is None or self.last_saved[0] != self.step):
            self._save(data_state)
            self.log.message(f"checkpoint saved at step {self.step} before stopping on the error")
        raise self.failure

    # ----------------------------------------------------------------- resume
    def _resume_path(self) -> Path | None:
        # The same choice cli.prepare_run checked the layout against, made by rank 0 for all.
        path = resume_target(self.cfg.train.resume, self.ckpt_root) if self.is_rank0 else None
        path = _from_rank0(path)
        return None if path is None else Path(path)

    def resume(self) -> None:
        if self.is_rank0 and self.cfg.train.overwrite and not continues_run(self.cfg):
            # cli.prepare_run allowed this run into a directory holding another one because
            # train.overwrite is set; the broadcast in _resume_path keeps the other ranks
            # waiting until it is gone.
            self._local(f"deleting the previous run in {self.run_dir}", clear_previous_run, self.run_dir)
        self.stop.phase = "looking for the checkpoint to resume"
        path = self._resume_path()
        if path is not None:
            self.stop.phase = f"resuming from {path}"
            client_state, rank_state = self.rt.load_checkpoint(path)
            self.step = int(client_state["step"])
            self.train_stream.load_state_dict(rank_state["data"])
            self.last_saved = (self.step, path)
            self.last_eval_step = client_state.get("last_eval_step")
            self.best = client_state.get("best")
        if self.is_rank0:
            # Records written after the checkpoint (by an attempt that died; all of them when
            # it died before its first checkpoint) are replaced by the ones this attempt writes.
            metrics = self.run_dir / "metrics.jsonl"
            self._local(f"truncating {metrics} to step {self.step}", truncate_metrics, metrics, self.step)
            if path is not None:
                print(f"resumed from {path} at step {self.step}", flush=True)

    # ------------------------------------------------------------ checkpoints
    def save(self, data_state: dict | None = None, root: Path | None = None) -> Path:
        """Collective. data_state: the data stream's state at this step (default: its state now).
        root: where (default the run's checkpoints/; the best-validation copy goes elsewhere)."""
        client_state = {"step": self.step, "config": resolved_config(self.cfg),
                        "last_eval_step": self.last_eval_step, "best": self.best}
        # The runtime adds the model, optimizer, scheduler and this rank's RNG states.
        rank_state = {"data": data_state if data_state is not None else self.train_stream.state_dict()}
        if root is not None:
            return Path(self.rt.save_checkpoint(root, self.step, client_state, rank_state))
        path = self.rt.save_checkpoint(self.ckpt_root, self.step, client_state, rank_state)
        self.last_saved = (self.step, Path(path))
        return Path(path)

    def _save(self, data_state: dict | None = None) -> Path:
        """save(), outside the stop deadline, with a failure reported as a full disk where it is one."""
        phase = f"saving the checkpoint of step {self.step} in {self.ckpt_root}"
        self.stop.phase = phase
        try:
            with self.stop.holding():
                path = self.save(data_state)
        except OSError:
            raise
        except Exception as e:
            try:
                free = shutil.disk_usage(self.ckpt_root).free
            except OSError:
                free = None
            if free is not None and free < _NEARLY_FULL:
                partial = self.ckpt_root / (step_dirname(self.step) + ".tmp")
                raise RunFailed(1, f"no space left on device while {phase}: {partial} ({free} bytes free "
                                   f"there; the incomplete checkpoint is left in place)") from e
            raise
        self.stop.unsaved = False
        return path

    # ------------------------------------------------------------- validation
    def validate(self) -> dict | None:
        """Evaluate the validation split (all of it, or train.eval_batches batches). Returns
        the record, None if the split holds less than one global batch, or {} when a stop
        signal or a failure (kept in self.failure on every rank) ended it early."""
        record = self.evaluate(self.cfg.data.valid_split, "val", f"validating at step {self.step}")
        if record != {}:
            self.last_eval_step = self.step
        return record

    def evaluate(self, split: str, prefix: str, phase: str) -> dict | None:
        """validate()'s pass over any split, its record's keys prefixed `<prefix>_`. A blend
        (data.blend) evaluates each dataset's split on its own: `<prefix>_<name>_*` keys for
        each, and `<prefix>_*` for all of them together (per labelled token)."""
        if not self.cfg.data.blend:
            totals = self._evaluate_split(split, phase, self.cfg.data)
            return totals if not totals else {"step": self.step, **self._record(totals, self.info, split, prefix)}
        per_dataset, together = {}, SplitTotals()
        split_nll = split_tokens = words = 0.0  # each dataset's mean scaled to its whole split
        for d in self.blend:
            totals = self._evaluate_split(split, f"{phase} ({d.name})", dataset_config(self.cfg.data, d.path))
            if totals == {}:
                return {}
            if totals is None:
                continue
            per_dataset.update(self._record(totals, d.info, split, f"{prefix}_{d.name}"))
            together.nll_sum += totals.nll_sum
            together.tokens += totals.tokens
            split_nll += totals.nll_sum / totals.tokens * d.info.split_tokens(split)
            split_tokens += d.info.split_tokens(split)
            words += d.info.split_words(split) if self.objective.word_perplexity else 0
        if together.tokens == 0:
            return None
        record = split_record(together, None, split, word_level=False)
        if self.objective.word_perplexity:  # the paper's per-word perplexity over the blend's words
            record["word_ppl"] = word_perplexity(split_nll / split_tokens, int(split_tokens), int(words))
        return {"step": self.step, **{f"{prefix}_{k}": v for k, v in record.items()}, **per_dataset}

    def _record(self, totals: SplitTotals, info, split: str, prefix: str) -> dict:
        record = split_record(totals, info, split, self.objective.word_perplexity)
        return {f"{prefix}_{key}": value for key, value in record.items()}

    def _evaluate_split(self, split: str, phase: str, data_cfg) -> SplitTotals | dict | None:
        """One dataset's split evaluated by all ranks: its totals, None if it holds less than one
        global batch, or {} when a stop signal or a failure ended the pass."""
        stream = self._local(phase, self._stream, split, shuffle=False, infinite=False, data_cfg=data_cfg)
        batches = iter(stream) if stream is not None else iter(())
        interrupted = False

        def go_on(exhausted: bool) -> bool:
            # The stream gives every rank the same number of batches; agreeing on it anyway
            # (with the stop and failure flags, one all-reduce) turns a mismatch into an
            # early stop instead of a hang in eval_batch's data-parallel reduction.
            nonlocal interrupted
            self.stop.phase = phase
            signum, failed, done = self._agree(int(exhausted))
            if signum and not failed:
                self.log.message(f"validation at step {self.step} interrupted by signal {signal_name(signum)}")
            interrupted = bool(failed or signum)
            return not (interrupted or done)

        totals = evaluate_split(lambda: self._local(phase, next, batches, None), self.rt.eval_batch, go_on,
                                max_batches=self.cfg.train.eval_batches)
        if interrupted:
            return {}
        return totals if totals.tokens else None  # None: less than one global batch

    def _log_validation(self) -> None:
        rec = self.validate()
        if rec is None:
            self.log.message(f"validation skipped: split {self.cfg.data.valid_split!r} holds less than one "
                             f"batch of {self.cfg.train.micro_batch_size} x {self.layout.dp_size} samples")
        elif rec:
            self._local(f"writing the validation of step {self.step} to the metrics", self.log.validation, rec)
            if self.classifier and (self.best is None or rec["val_accuracy"] > self.best["val_accuracy"]):
                self._save_best(rec)

    # ------------------------------------------------- classifiers: best and test
    def _save_best(self, rec: dict) -> None:
        """Collective (every rank has the same record): keep this step as the best validation."""
        self.best = dict(rec)
        phase = f"saving the best-validation checkpoint of step {self.step} in {self.run_dir / BEST_SUBDIR}"
        self.stop.phase = phase
        with self.stop.holding():
            self.save(root=self.run_dir / BEST_SUBDIR)
        self.log.message(f"best validation accuracy so far: {rec['val_accuracy']:.2f}% at step {self.step}")

    def _test_best(self) -> None:
        """Score the best-validation checkpoint on data.test_split; record it in metrics.jsonl and
        test_result.json. The engine is left holding that checkpoint (the run's own is saved)."""
        c = self.cfg
        root = self.run_dir / BEST_SUBDIR
        self.stop.phase = f"loading the best-validation checkpoint from {root}"
        path = _from_rank0(latest_checkpoint(root) if self.is_rank0 else None)
        if path is None:
            self.log.message(f"no best-validation checkpoint in {root}: test evaluation skipped")
            return
        client_state, _ = self.rt.load_checkpoint(path)
        best = client_state.get("best") or self.best
        rec = self.evaluate(c.data.test_split, "test", f"testing the checkpoint of step {client_state['step']}")
        if not rec:
            if rec is None:
                self.log.message(f"test evaluation skipped: split {c.data.test_split!r} holds less than one "
                                 f"batch of {c.train.micro_batch_size} x {self.layout.dp_size} samples")
            return
        rec.update(step=self.step, best_step=int(client_state["step"]), best_checkpoint=str(path),
                   best_val_accuracy=best["val_accuracy"] if best else None)
        self._local("writing the test evaluation to the metrics", self.log.validation, rec, "test")
        if self.is_rank0:
            self._local(f"writing {self.run_dir / TEST_RESULT}", self._write_test_result, rec, best)

    def _write_test_result(self, rec: dict, best: dict | None) -> None:
        """test_result.json: what tools/lra_table.py collects (the run's settings and scores)."""
        dataset = self.info.manifest
        result = {"step": rec["best_step"], "final_step": self.step, "checkpoint": rec["best_checkpoint"],
                  "task": dataset.get("classification", {}).get("task"), "dataset": self.info.path,
                  "test_split": self.cfg.data.test_split,
                  **{k: v for k, v in rec.items() if k.startswith("test_")},
                  **{k: v for k, v in (best or {}).items() if k.startswith("val_")},
                  "config": resolved_config(self.cfg)}
        tmp = self.run_dir / (TEST_RESULT + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(self.run_dir / TEST_RESULT)

    # ------------------------------------------------------------------- loop
    def run(self, stop: StopRequest | None = None) -> int:
        """Train to train.steps or until a stop signal; returns the exit code, or raises
        RunFailed. `stop` is installed by the caller as early as possible; without one it
        is installed here, still before resuming."""
        own = stop is None
        self.stop = stop = stop or StopRequest(grace_s=self.cfg.train.stop_grace_s)
        self._plotted = False
        try:
            return self._run()
        except RunFailed:
            raise
        except Exception as e:
            raise describe_failure(e, stop.phase, self.cfg) from e
        finally:
            if not self._plotted:  # stopped early: what the run logged is still worth a plot
                try:
                    self.log.close()
                    self._plot()
                except Exception:
                    pass  # a failure of the run itself is the one to report
            if own:
                stop.restore()

    def _plot(self) -> None:
        self._plotted = True
        if self.is_rank0 and self.cfg.train.plot:
            plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png",
                        title=f"{self.cfg.name}: {self.run_dir.resolve().name}")  # config and run

    def _next_batches(self, batches) -> list:
        micro = []
        for _ in range(self.rt.grad_accum):
            micro.append(next(batches))  # the training stream is infinite
        return micro

    def _run(self) -> int:
        c, t, stop = self.cfg, self.cfg.train, self.stop
        self.resume()
        if self.is_rank0:
            config_file = self.run_dir / "config.yaml"
            self._local(f"writing {config_file}", config_file.write_text,
                        yaml.safe_dump(resolved_config(c), sort_keys=False))
        self.log = None
        if self.is_rank0:
            self.log = self._local(f"opening {self.run_dir / 'metrics.jsonl'}", MetricsLogger, self.run_dir,
                                   enabled=True, total_steps=t.steps, start_step=self.step,
                                   log_interval=t.log_interval, tensorboard=t.tensorboard, wandb=t.wandb,
                                   wandb_project=t.wandb_project, config=resolved_config(c))
        if self.log is None:  # other ranks log nothing; rank 0 neither once opening failed
            self.log = MetricsLogger(self.run_dir, enabled=False, total_steps=t.steps, start_step=self.step,
                                     log_interval=t.log_interval, tensorboard=False)
        if self.step >= t.steps and self.failure is None:
            self.log.message(f"nothing to do: checkpoint {self.last_saved[1]} is at step {self.step} "
                             f">= train.steps={t.steps}")
            self.log.close()
            self._plotted = True  # the finished run's plot is there
            return 0
        if self.is_rank0 and self.step == 0:
            self.log.message(f"training {c.name}: {self.rt.num_parameters:,} parameters, {t.steps} steps, "
                             f"{self.layout.world_size} ranks (tp {self.layout.tp_size}, pp {self.layout.pp_size}, "
                             f"dp {self.layout.dp_size}), run dir {self.run_dir}")
        if (t.eval_interval and 0 < self.step < t.steps and self.step % t.eval_interval == 0
                and self.last_eval_step != self.step):
            self._log_validation()  # the attempt that saved this checkpoint was stopped before validating
        from megatron_transnormer.model import flops_per_token
        peak = peak_tflops(self.layout.device)
        # TFLOP/s and MFU are reported for accelerators; on CPU only tokens/s.
        fpt = None
        if self.layout.device.type != "cpu" or peak:
            fpt = flops_per_token(c.model, c.data.seq_len, self.objective.predicted_fraction)
        batches = iter(self.train_stream)
        while True:
            # ---- the boundary after step self.step
            _synchronize(self.layout.device)
            t0 = time.perf_counter()  # throughput counts the loading of the batches, as it always did
            data_state = self.train_stream.state_dict()  # what a checkpoint of this step records
            micro = None
            if self.step < t.steps:
                micro = self._local(f"loading the batches of step {self.step + 1}", self._next_batches, batches)
            stop.phase = f"waiting for the other ranks after step {self.step}"
            signum, failed = self._agree()
            if failed:
                self._stop_on_failure(data_state)
            if self.step >= t.steps:
                break
            if signum:
                return self._stop_on_signal(signum, data_state)
            # ---- the update
            stop.phase = f"running training step {self.step + 1}"
            result = self.rt.train_step(iter(micro))  # <- the step: one optimizer update
            _synchronize(self.layout.device)
            seconds = time.perf_counter() - t0
            self.step += 1
            stop.unsaved = True
            rec = {"step": self.step, "loss": result.loss, "ppl": token_perplexity(result.loss, 1),
                   "lr": result.lr, "grad_norm": result.grad_norm,
                   **throughput(result.tokens, seconds, fpt, self.layout.world_size, peak),
                   "tokens": result.tokens, "labels": result.labels, "skipped": bool(result.skipped),
                   "step_s": seconds, "time": time.time()}  # wall clock: throughput over whole iterations
            if self.layout.device.type == "cuda":
                # This rank's peak allocation since the process started (rank 0 logs).
                rec["max_memory_gib"] = torch.cuda.max_memory_allocated(self.layout.device) / 2**30
            self._local(f"writing step {self.step} to the metrics", self.log.train_step, rec)
            if t.eval_interval and self.step % t.eval_interval == 0:
                self._log_validation()
            if t.save_interval and self.step % t.save_interval == 0:
                self._save()  # on every rank, whatever failed locally: it is a collective
        # ---- the end: save first, so that a failing final validation or plot loses nothing
        final_validation = self.last_eval_step != self.step
        self.last_eval_step = self.step  # the validation below belongs to this checkpoint
        if self.last_saved is None or self.last_saved[0] != self.step:
            self._save()
        if final_validation:
            self._log_validation()
        if self.classifier and self.failure is None:
            self._test_best()
        if self.failure is not None:
            raise self.failure  # the checkpoint is saved; the validation (or its record) failed
        stop.phase = "closing the metrics"
        self.log.close()
        stop.phase = f"plotting {self.run_dir / 'loss.png'}"
        self._plot()
        if self.is_rank0:
            print(f"checkpoint:  {self.last_saved[1]}\n"
                  f"metrics:     {self.run_dir / 'metrics.jsonl'}"
                  + (f"\nplot:        {self.run_dir / 'loss.png'}" if t.plot else "")
                  + (f"\ntensorboard: {self.run_dir / 'tensorboard'}" if t.tensorboard else ""), flush=True)
        return 0

    def _stop_on_signal(self, signum: int, data_state: dict) -> int:
        name = signal_name(signum)
        if self.last_saved is None or self.last_saved[0] != self.step:
            if self.step == 0:
                self.log.message(f"stopped at step 0 after signal {name}: no update yet, nothing to save")
                return 0
            self._save(data_state)
        self.log.message(f"checkpoint saved at step {self.step} after signal {name}")
        return 0


def run_training(cfg: Config, info, stop: StopRequest | None = None) -> int:
    """Start the process groups, train, tear them down. Returns the exit code (0), or
    raises RunFailed."""
    from megatron_transnormer.parallel import destroy_distributed, init_distributed
    own = stop is None
    stop = stop or StopRequest(grace_s=cfg.train.stop_grace_s)
    rank = ""
    try:
        stop.phase = "starting the process group"
        try:
            layout = init_distributed(cfg.parallel.tensor, cfg.parallel.pipeline,
                                      timeout_s=cfg.train.collective_timeout_s, context=cfg.parallel.context,
                                      sequence=cfg.parallel.sequence)
            rank = f"rank {layout.rank}: " if layout.world_size > 1 else ""
            stop.phase = "building the model and the DeepSpeed engine"
            return Trainer(cfg, info, layout).run(stop)
        except Exception as e:
            raise_failure(e, stop.phase, cfg, rank)
        finally:
            destroy_distributed()
    finally:
        if own:
            stop.restore()
