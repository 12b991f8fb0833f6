"""Weights & Biases logging next to TensorBoard (train.wandb=online or offline).

Rank 0's `MetricsLogger` opens one W&B run per run directory: named after the directory,
holding the resolved config, written under <run_dir>/wandb (offline: no network and no
login; `wandb sync <run_dir>/wandb/offline-run-*` uploads it later). Every record that
goes to metrics.jsonl is logged at its training step, its numbers under TensorBoard's
names (`train/loss`, `val/val_loss`, ...).

The run's id is kept in <run_dir>/wandb/run_id, so that a run resumed from a checkpoint
continues the same W&B run. A run that starts at step 0 (a new run, train.overwrite, an
attempt that died before its first checkpoint) gets a new id: W&B ignores steps at or
below the last one a run holds, so reusing the id would drop the new attempt's steps.

wandb is imported only when enabled (it takes about a second). `check_wandb`
runs before any process group starts, so that a missing package is one line and exit
code 2 instead of a failure on every rank after start-up.
"""
from __future__ import annotations

import os
import secrets
import string
from pathlib import Path

from megatron_transnormer.config import ConfigError

INSTALL = 'pip install "megatron_transnormer[wandb]"'
SUBDIR = "wandb"  # under the run dir: wandb's own files and ID_FILE
ID_FILE = "run_id"
_ID_CHARS = string.ascii_lowercase + string.digits  # what W&B's own run ids are made of


class WandbError(Exception):
    """W&B could not start the run (no login, no network). Not a RuntimeError: the loop reads
    a RuntimeError saying "timed out" as a peer rank that stopped answering."""


def _import_wandb(mode: str):
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(f"train.wandb={mode} needs the wandb package, which cannot be imported ({e}); "
                          f"install it with: {INSTALL}, or set train.wandb=off") from None
    return wandb


def check_wandb(cfg) -> None:
    """Raise a ConfigError naming train.wandb when it asks for W&B and wandb cannot be imported."""
    if cfg.train.wandb != "off":
        _import_wandb(cfg.train.wandb)


def run_id(run_dir: Path, start_step: int) -> str:
    """The W&B run id of the run in run_dir: the stored one when the run resumes from a
    checkpoint (start_step > 0), else a new one, stored for the next resume."""
    path = Path(run_dir) / SUBDIR / ID_FILE
    if start_step > 0 and path.is_file():
        stored = path.read_text().strip()
        if stored:
            return stored
    new = "".join(secrets.choice(_ID_CHARS) for _ in range(8))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new + "\n")
    os.replace(tmp, path)  # atomic: a killed writer never leaves an empty id behind
    return new


def numbers(prefix: str, rec: dict, skip: tuple[str, ...] = ("step", "time")) -> dict:
    """The numeric values of rec as `<prefix>/<key>`, for wandb.log. NaN is kept (W&B shows
    it, and a diverged loss is worth seeing); None and text (checkpoint paths) are not."""
    return {f"{prefix}/{key}": value for key, value in rec.items()
            if key not in skip and isinstance(value, (int, float))}


class WandbRun:
    """One W&B run of the training run in run_dir (rank 0 only)."""

    def __init__(self, run_dir: Path, *, mode: str, project: str | None, config: dict | None,
                 start_step: int):
        wandb = _import_wandb(mode)
        run_dir = Path(run_dir)
        self.mode = mode
        id_ = run_id(run_dir, start_step)  # outside the try: a failed write is an OSError naming the file
        try:
            self._run = wandb.init(
                project=project, name=run_dir.resolve().name, dir=str(run_dir), mode=mode, config=config,
                id=id_, resume="allow",
                # silent: no banner or hints among our log lines; console off: W&B would otherwise
                # capture stdout/stderr through its own pipes, tqdm's bar included.
                settings=wandb.Settings(silent=True, console="off"))
        except Exception as e:
            raise WandbError(f"train.wandb={mode}: W&B could not start the run: {e}") from e

    @property
    def id(self) -> str:
        return self._run.id

    def describe(self) -> str:
        """One line saying where the run goes (the URL is only known online)."""
        where = self._run.settings.sync_dir
        if self.mode == "offline":
            return f"W&B run {self.id} (offline): upload it with `wandb sync {where}`"
        return f"W&B run {self.id}: {self._run.url}"

    def log(self, prefix: str, rec: dict) -> None:
        values = numbers(prefix, rec)
        if values:
            self._run.log(values, step=int(rec["step"]))

    def finish(self, exit_code: int = 0) -> None:
        run, self._run = self._run, None
        if run is not None:
            run.finish(exit_code=exit_code)

