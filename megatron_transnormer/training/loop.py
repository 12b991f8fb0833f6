"""The training loop: resume, steps, periodic validation, checkpoints, stop signals, plot.

One iteration of `Trainer.run` is one optimizer update: `self.rt.train_step(...)`
pulls the update's micro-batches from the data stream, runs forward/backward (and the
pipeline schedule when PP > 1) and steps the optimizer. Everything else here is
bookkeeping around that call.

Resume is exact: a checkpoint holds the runtime's model/optimizer/scheduler, and per
rank the data stream position and the RNG states, so a run stopped at step k (by a
signal or SIGKILL) and resumed produces the same per-step losses as one that never
stopped.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from megatron_transnormer.config import Config
from megatron_transnormer.data import TokenStream
from megatron_transnormer.evaluation.perplexity import report, token_perplexity

from . import rng
from .checkpoint import RUN_SUBDIR, resume_target
from .cli import resolved_config
from .metrics import MetricsLogger, peak_tflops, throughput, truncate_metrics
from .objectives import build_objective
from .plotting import plot_losses
from .runtime import build_runtime
from .signals import StopRequest, signal_name


def _world_max(value: int, device: torch.device) -> int:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


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


class Trainer:
    def __init__(self, cfg: Config, info, layout):
        self.cfg, self.info, self.layout = cfg, info, layout
        self.is_rank0 = layout.rank == 0
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_root = self.run_dir / RUN_SUBDIR
        self.run_dir.mkdir(parents=True, exist_ok=True)
        rng.seed_all(cfg.train.seed, layout.tp_rank, layout.pp_rank, layout.dp_rank)
        self.objective = build_objective(cfg, info)
        self.rt = build_runtime(cfg, layout, self.objective)
        self.train_stream = TokenStream(cfg.data, split=cfg.data.train_split, dp_rank=layout.dp_rank,
                                        dp_size=layout.dp_size, micro_batch_size=cfg.train.micro_batch_size,
                                        seed=cfg.train.seed, shuffle=True, infinite=True)
        self.step = 0
        self.last_saved = None  # (step, path)
        self.last_eval_step = None

    # ----------------------------------------------------------------- resume
    def _resume_path(self) -> Path | None:
        # The same choice cli.prepare_run checked the layout against, made by rank 0 for all.
        path = resume_target(self.cfg.train.resume, self.ckpt_root) if self.is_rank0 else None
        path = _from_rank0(path)
        return None if path is None else Path(path)

    def resume(self) -> None:
        path = self._resume_path()
        if path is None:
            return
        client_state, rank_state = self.rt.load_checkpoint(path)
        self.step = int(client_state["step"])
        self.train_stream.load_state_dict(rank_state["data"])
        self.last_saved = (self.step, path)
        self.last_eval_step = client_state.get("last_eval_step")
        if self.is_rank0:
            # Records written after the checkpoint (by the attempt that died) are replaced by
            # the ones this attempt writes.
            truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            print(f"resumed from {path} at step {self.step}", flush=True)

    # ------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        client_state = {"step": self.step, "config": resolved_config(self.cfg),
                        "last_eval_step": self.last_eval_step}
        # The runtime adds the model, optimizer, scheduler and this rank's RNG states.
        rank_state = {"data": self.train_stream.state_dict()}
        path = self.rt.save_checkpoint(self.ckpt_root, self.step, client_state, rank_state)
        self.last_saved = (self.step, Path(path))
        return Path(path)

    # ------------------------------------------------------------- validation
    def validate(self) -> dict | None:
        c = self.cfg
        stream = TokenStream(c.data, split=c.data.valid_split, dp_rank=self.layout.dp_rank,
                             dp_size=self.layout.dp_size, micro_batch_size=c.train.micro_batch_size,
                             seed=c.train.seed, shuffle=False, infinite=False)
        nll, tokens, batches = 0.0, 0, iter(stream)
        n = 0
        while not c.train.eval_batches or n < c.train.eval_batches:
            batch = next(batches, None)
            # The stream gives every rank the same number of batches; agreeing on it anyway
            # (one scalar all-reduce) turns a mismatch into an early stop instead of a hang
            # in eval_batch's data-parallel reduction.
            if _world_max(int(batch is None), self.layout.device):
                break
            s, t = self.rt.eval_batch(batch)
            nll, tokens, n = nll + float(s), tokens + int(t), n + 1
        self.last_eval_step = self.step
        if tokens == 0:
            return None  # the split holds less than one global batch
        rec = {"step": self.step, "val_loss": nll / tokens, "val_ppl": token_perplexity(nll, tokens),
               "val_tokens": tokens}
        if self.objective.word_perplexity:
            rec["val_word_ppl"] = report(nll, tokens, self.info, c.data.valid_split).word_ppl
        return rec

    def _log_validation(self, log: MetricsLogger) -> None:
        rec = self.validate()
        if rec is None:
            log.message(f"validation skipped: split {self.cfg.data.valid_split!r} holds less than one "
                        f"batch of {self.cfg.train.micro_batch_size} x {self.layout.dp_size} samples")
        else:
            log.validation(rec)

    # ------------------------------------------------------------------- loop
    def run(self, stop: StopRequest | None = None) -> int:
        """Train to train.steps or until a stop signal. `stop` is installed by the caller as
        early as possible; without one it is installed here, still before resuming."""
        own = stop is None
        stop = stop or StopRequest()
        try:
            return self._run(stop)
        finally:
            if own:
                stop.restore()

    def _run(self, stop: StopRequest) -> int:
        c, t = self.cfg, self.cfg.train
        self.resume()
        if self.is_rank0:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(resolved_config(c), sort_keys=False))
        log = MetricsLogger(self.run_dir, enabled=self.is_rank0, total_steps=t.steps,
                            start_step=self.step, log_interval=t.log_interval, tensorboard=t.tensorboard)
        if self.step >= t.steps:
            log.message(f"nothing to do: checkpoint {self.last_saved[1]} is at step {self.step} "
                        f">= train.steps={t.steps}")
            log.close()
            return 0
        if self.is_rank0 and self.step == 0:
            log.message(f"training {c.name}: {self.rt.num_parameters:,} parameters, {t.steps} steps, "
                        f"{self.layout.world_size} ranks (tp {self.layout.tp_size}, pp {self.layout.pp_size}, "
                        f"dp {self.layout.dp_size}), run dir {self.run_dir}")
        from megatron_transnormer.model import flops_per_token
        peak = peak_tflops(self.layout.device)
        # TFLOP/s and MFU are reported for accelerators; on CPU only tokens/s.
        fpt = None
        if self.layout.device.type != "cpu" or peak:
            fpt = flops_per_token(c.model, c.data.seq_len, self.objective.predicted_fraction)
        batches = iter(self.train_stream)
        try:
            while self.step < t.steps:
                _synchronize(self.layout.device)
                t0 = time.perf_counter()
                result = self.rt.train_step(batches)  # <- the step: one optimizer update
                _synchronize(self.layout.device)
                seconds = time.perf_counter() - t0
                self.step += 1
                rec = {"step": self.step, "loss": result.loss, "ppl": token_perplexity(result.loss, 1),
                       "lr": result.lr, "grad_norm": result.grad_norm,
                       **throughput(result.tokens, seconds, fpt, self.layout.world_size, peak),
                       "tokens": result.tokens, "labels": result.labels, "skipped": bool(result.skipped),
                       "time": time.time()}  # wall clock: throughput over whole iterations
                if self.layout.device.type == "cuda":
                    # This rank's peak allocation since the process started (rank 0 logs).
                    rec["max_memory_gib"] = torch.cuda.max_memory_allocated(self.layout.device) / 2**30
                log.train_step(rec)
                if t.eval_interval and self.step % t.eval_interval == 0:
                    self._log_validation(log)
                if t.save_interval and self.step % t.save_interval == 0:
                    self.save()
                signum = stop.agreed(self.layout.device)
                if signum and self.step < t.steps:
                    if self.last_saved is None or self.last_saved[0] != self.step:
                        self.save()
                    log.message(f"checkpoint saved at step {self.step} after signal {signal_name(signum)}")
                    return 0
            if self.last_eval_step != self.step:
                self._log_validation(log)
            if self.last_saved is None or self.last_saved[0] != self.step:
                self.save()
        finally:
            log.close()
            if self.is_rank0 and t.plot:
                plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png", title=c.name)
        if self.is_rank0:
            print(f"checkpoint:  {self.last_saved[1]}\n"
                  f"metrics:     {self.run_dir / 'metrics.jsonl'}"
                  + (f"\nplot:        {self.run_dir / 'loss.png'}" if t.plot else "")
                  + (f"\ntensorboard: {self.run_dir / 'tensorboard'}" if t.tensorboard else ""), flush=True)
        return 0


def run_training(cfg: Config, info, stop: StopRequest | None = None) -> int:
    """Start the process groups, train, tear them down. Returns the exit code."""
    from megatron_transnormer.parallel import destroy_distributed, init_distributed
    layout = init_distributed(cfg.parallel.tensor, cfg.parallel.pipeline)
    try:
        return Trainer(cfg, info, layout).run(stop)
    finally:
        destroy_distributed()
