"""Where training numbers go: console (tqdm bar or plain lines), metrics.jsonl, TensorBoard,
and Weights & Biases when train.wandb is online or offline (wandb_logging.py).

Only rank 0 writes; on other ranks `MetricsLogger` is built with `enabled=False` and
does nothing. `metrics.jsonl` holds one JSON object per line: a training step
(`step, loss, ppl, lr, grad_norm, tokens_per_s, labels, ...`; loss and ppl are per
labelled token: every next token of a causal LM, the masked tokens of a masked LM) or a
validation (`step, val_loss, val_ppl`, and `val_word_ppl` for causal LMs). Each line is flushed when written, so a
killed run leaves every finished step on disk; on resume `truncate_metrics` drops what
came after the checkpoint. A failed write (a full disk) raises an OSError naming the file.
TensorBoard gets the main scalars of each record (`train/loss`, `val/val_loss`, ...); W&B
gets every number of each record under the same names, at the record's step, in one W&B
run per run directory that a resumed run continues.
Plain console lines (no terminal) come every train.log_interval steps: wall-clock time,
the interval's mean loss, its throughput and step time, and the time left at that pace.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from .wandb_logging import WandbRun

# Dense bf16 tensor-core peak per GPU, TFLOP/s (vendor data sheets). Matched as a substring
# of the device name, first match wins, so more specific names come first.
PEAK_BF16_TFLOPS = (
    ("B200", 2250.0),
    ("H100 PCIe", 756.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
)
PEAK_ENV = "TRANSNORMER_PEAK_TFLOPS"  # per-GPU peak for MFU on devices not in the table


def peak_tflops(device: torch.device) -> float | None:
    """Peak TFLOP/s of one accelerator, or None (CPU, unknown GPU without the env override)."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None


def throughput(tokens: int, seconds: float, flops_per_token: float | None, world_size: int,
               peak: float | None) -> dict:
    """tokens/s over all ranks; with flops_per_token (accelerators) achieved TFLOP/s per
    device, and MFU when the device's peak is known."""
    out = {"tokens_per_s": tokens / seconds if seconds > 0 else float("nan")}
    if flops_per_token:
        out["tflops_per_device"] = flops_per_token * out["tokens_per_s"] / world_size / 1e12
        if peak:
            out["mfu"] = out["tflops_per_device"] / peak
    return out


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl; a torn last line (a killed writer) is skipped."""
    records = []
    if not path.is_file():  # absent, or a device/FIFO (e.g. /dev/full) that would read forever
        return records
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


def _naming(e: OSError, path: Path) -> OSError:
    """e with `path` as its file name: a failed write or flush does not say which file."""
    return e if e.filename else OSError(e.errno, e.strerror, str(path))


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the records with step <= last_step (the resumed checkpoint's); atomic rewrite.
    Only a regular file is rewritten (a device or FIFO someone pointed it at is left alone)."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r["step"] <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    try:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    except OSError as e:
        raise _naming(e, tmp) from None
    os.replace(tmp, path)


def _fmt(value, spec: str) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def interval_record(recs: list[dict]) -> dict:
    """The steps since the last printed line as one record: the last step's, with the
    interval's mean loss (ppl from it), mean grad norm, tokens/s over the interval and mean
    step time. Per-step values stay in metrics.jsonl."""
    last = dict(recs[-1])
    finite = [r["loss"] for r in recs if r["loss"] is not None and not math.isnan(r["loss"])]
    last["loss"] = sum(finite) / len(finite) if finite else float("nan")
    last["ppl"] = math.exp(min(last["loss"], 700.0)) if finite else float("nan")
    norms = [r["grad_norm"] for r in recs if r["grad_norm"] is not None and not math.isnan(r["grad_norm"])]
    last["grad_norm"] = sum(norms) / len(norms) if norms else float("nan")
    seconds = sum(r.get("step_s", 0.0) for r in recs)
    if seconds > 0:
        last["tokens_per_s"] = sum(r.get("tokens", 0) for r in recs) / seconds
        last["step_s"] = seconds / len(recs)
    last["steps"] = len(recs)
    return last


def format_step(rec: dict, total: int) -> str:
    """A plain log line: wall-clock time, the step, the loss (an interval's mean when `rec`
    comes from interval_record), ..., the step time and the time left at that pace."""
    loss = f"loss {_fmt(rec['loss'], '.4f')}" + (f" (mean of {rec['steps']})" if rec.get("steps", 1) > 1 else "")
    parts = [time.strftime("%Y-%m-%d %H:%M:%S"), f"step {rec['step']}/{total}", loss,
             f"ppl {_fmt(rec.get('ppl'), '.2f')}", f"lr {rec['lr']:.3e}",
             f"grad_norm {_fmt(rec['grad_norm'], '.3f')}", f"{rec['tokens_per_s']:,.0f} tok/s"]
    if "step_s" in rec:
        parts.append(f"{rec['step_s']:.3f} s/step")
        parts.append(f"ETA {_duration(rec['step_s'] * max(total - rec['step'], 0))}")
    if "tflops_per_device" in rec:
        parts.append(f"{rec['tflops_per_device']:.1f} TFLOP/s/dev")
    if "mfu" in rec:
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    if "max_memory_gib" in rec:
        parts.append(f"max mem {rec['max_memory_gib']:.1f} GiB")
    if rec.get("skipped"):
        parts.append("skipped")
    return " | ".join(parts)


_EVAL_KEYS = ("loss", "ppl", "word_ppl", "accuracy")


def evaluated_parts(rec: dict, prefix: str = "val") -> list[str]:
    """The key prefixes of an evaluation record: `prefix` itself, then each blended dataset's
    (`val_web` of `val_web_loss`, data.blend)."""
    parts = [key[:-len("_loss")] for key in rec if key.startswith(f"{prefix}_") and key.endswith("_loss")]
    return [prefix] + [part for part in parts if part != prefix]


def format_validation(rec: dict, prefix: str = "val") -> str:
    """A line for an evaluation record whose keys carry `prefix` (val_loss, test_accuracy, ...),
    and one more per blended dataset."""
    name = "validation" if prefix == "val" else f"{prefix} evaluation"
    lines = []
    for part in evaluated_parts(rec, prefix):
        head = f"{name} at step {rec['step']}:" if part == prefix else f"  {part[len(prefix) + 1:]}:"
        text = f"{head} loss {rec[f'{part}_loss']:.4f} | ppl {rec[f'{part}_ppl']:.2f}"
        if f"{part}_word_ppl" in rec:
            text += f" | word ppl {rec[f'{part}_word_ppl']:.2f}"
        if f"{part}_accuracy" in rec:
            text += f" | accuracy {rec[f'{part}_accuracy']:.2f}%"
        lines.append(text)
    return "\n".join(lines)


class MetricsLogger:
    """wandb: train.wandb (off, online, offline); wandb_project and config (the resolved
    config, a dict) go to the W&B run."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int,
                 log_interval: int, tensorboard: bool, wandb: str = "off", wandb_project: str | None = None,
                 config: dict | None = None):
        self.enabled = enabled
        self.total = total_steps
        self.log_interval = max(1, log_interval)
        self._interval: list[dict] = []  # the steps since the last printed line
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self._writer = self._bar = self._wandb = None
        if not enabled:
            return
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step hides events a previous attempt logged after the resumed checkpoint
            # (all of them when it had none to resume from).
            self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        if sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if wandb != "off":
            try:
                self._wandb = WandbRun(run_dir, mode=wandb, project=wandb_project, config=config,
                                       start_step=start_step)
            except BaseException:
                self.close()  # what opened above, before the failure is reported
                raise
            self.message(self._wandb.describe())

    def _write(self, rec: dict) -> None:
        try:
            self._file.write(json.dumps(rec) + "\n")  # line-buffered: written (and failing) here
        except OSError as e:
            raise _naming(e, self.path) from None

    def _scalars(self, prefix: str, rec: dict, keys) -> None:
        if self._writer is None:
            return
        for key in keys:
            value = rec.get(key)
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self._writer.add_scalar(f"{prefix}/{key}", value, rec["step"])

    def train_step(self, rec: dict) -> None:
        if not self.enabled:
            return
        self._write(rec)
        if self._wandb is not None:
            self._wandb.log("train", rec)
        self._scalars("train", rec, ("loss", "ppl", "lr", "grad_norm", "tokens_per_s",
                                     "tflops_per_device", "mfu", "max_memory_gib"))
        if self._bar is not None:
            self._bar.update(rec["step"] - self._bar.n)
            post = {"loss": _fmt(rec["loss"], ".4f"), "ppl": _fmt(rec.get("ppl"), ".2f"), "lr": f"{rec['lr']:.2e}",
                    "gnorm": _fmt(rec["grad_norm"], ".3f"), "tok/s": f"{rec['tokens_per_s']:,.0f}"}
            if "mfu" in rec:
                post["mfu"] = f"{100 * rec['mfu']:.1f}%"
            self._bar.set_postfix(post, refresh=False)
        else:
            self._interval.append(rec)
            if rec["step"] % self.log_interval == 0 or rec["step"] == self.total:
                print(format_step(interval_record(self._interval), self.total), flush=True)
                self._interval = []

    def validation(self, rec: dict, prefix: str = "val") -> None:
        """An evaluation record (keys `<prefix>_loss`, ...): validation, or the classifiers' test."""
        if not self.enabled:
            return
        self._write(rec)
        if self._wandb is not None:
            self._wandb.log(prefix, rec)
        self._scalars(prefix, rec, tuple(f"{part}_{k}" for part in evaluated_parts(rec, prefix) for k in _EVAL_KEYS))
        self.message(format_validation(rec, prefix))

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        file, writer, bar, run = self._file, self._writer, self._bar, self._wandb
        self._file = self._writer = self._bar = self._wandb = None  # closed once, even if closing fails
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        if run is not None:
            # The loop closes the logger in a `finally` too: an exception on its way out there
            # means the run failed, and W&B should mark it failed rather than finished.
            run.finish(exit_code=1 if sys.exc_info()[0] is not None else 0)
        if file is not None:
            try:
                file.close()
            except OSError as e:
                raise _naming(e, self.path) from None
