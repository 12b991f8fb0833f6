"""Weights & Biases logging (train.wandb): real short runs of pretrain.py with the real wandb
package in offline mode, read back from the binary run log that wandb writes.

The offline run log (<run_dir>/wandb/offline-run-*/run-<id>.wandb) is a LevelDB-style log
of protobuf `Record`s (wandb.proto.wandb_internal_pb2); `wandb sync` uploads exactly
these records, so what is read here is what W&B would show.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest

from megatron_transnormer.config import Config, ConfigError
from megatron_transnormer.training.metrics import MetricsLogger, read_metrics
from megatron_transnormer.training.wandb_logging import (ID_FILE, INSTALL, SUBDIR, WandbError, WandbRun, check_wandb,
                                                         run_id)
from tests.training.plays import prepare_plays
from tests.training.test_pretrain import TINY, _env, pretrain

pb = pytest.importorskip("wandb.proto.wandb_internal_pb2", reason="the wandb extra is not installed")

FOUR_STEPS = ["train.steps=4", "train.plot=false", "train.wandb=offline"]


def _wandb_env(home: Path) -> dict:
    """_env() for a W&B run that must not need the network, a login or the user's W&B files."""
    env = {k: v for k, v in _env().items() if not k.startswith("WANDB_")}  # no WANDB_MODE, RUN_ID, API_KEY...
    env.update(WANDB_DISABLE_GIT="true", NETRC=str(home / "netrc"), WANDB_CONFIG_DIR=str(home / "config"),
               WANDB_CACHE_DIR=str(home / "cache"), WANDB_DATA_DIR=str(home / "data"),
               # Any attempt to reach a server goes to a closed port: offline must not need one.
               HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    return env


def _records(path: Path):
    """The protobuf records of a .wandb file: a 7-byte file header (":W&B", magic, version),
    then 32 KiB blocks of chunks, each with a 7-byte header (crc32c, length, type: 1 a whole
    record, 2/3/4 its first/middle/last part); a block's tail shorter than a header is padding."""
    block, header = 32768, 7
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run log"
    pos, parts = header, b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0:  # zero fill: the rest of the block is unused
            pos += left
            continue
        parts += data[pos + header:pos + header + length]
        pos += header + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def read_wandb_run(offline_dir: Path) -> dict:
    """What one offline run directory holds: its run record, its history as
    {step: {key: value}}, and its exit code."""
    (log,) = offline_dir.glob("run-*.wandb")
    out = {"run": None, "history": {}, "exit_code": None}
    for record in _records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            out["history"].setdefault(record.history.step.num, {}).update(row)
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / SUBDIR).glob("offline-run-*"))  # the timestamp in the name sorts them


def _config(run) -> dict:
    return {item.key: json.loads(item.value_json) for item in run.config.update}


def assert_history_matches_metrics(history: dict, run_dir: Path, steps) -> None:
    """Every training and validation number of `steps` in metrics.jsonl, as W&B logged it."""
    for rec in read_metrics(run_dir / "metrics.jsonl"):
        if rec["step"] not in steps:
            continue
        row = history[rec["step"]]
        if "val_loss" in rec:
            assert row["val/val_loss"] == rec["val_loss"] and row["val/val_ppl"] == rec["val_ppl"]
        else:
            assert row["train/loss"] == rec["loss"] and row["train/lr"] == rec["lr"], rec["step"]
            assert row["train/grad_norm"] == rec["grad_norm"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_plays(tmp_path_factory.mktemp("data") / "small")


@pytest.fixture(scope="module")
def offline_run(dataset, tmp_path_factory) -> Path:
    """Four steps with the validation at the end, logged to W&B offline."""
    root = tmp_path_factory.mktemp("wandb")
    run_dir = root / "tiny-wandb"
    p = pretrain(f"data.path={dataset}", f"train.run_dir={run_dir}", *TINY, *FOUR_STEPS,
                 "train.wandb_project=transnormer-tests", env=_wandb_env(root / "home"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert not [line for line in (p.stdout + p.stderr).splitlines() if line.startswith("wandb:")], \
        "W&B printed its own lines among ours"
    assert "W&B run" in p.stdout and "wandb sync" in p.stdout  # where the offline run is
    return run_dir


def test_offline_run_logs_every_record_with_its_step_and_the_config(offline_run):
    (offline,) = offline_runs(offline_run)
    logged = read_wandb_run(offline)
    run = logged["run"]
    assert run.run_id == (offline_run / SUBDIR / ID_FILE).read_text().strip()
    assert run.display_name == "tiny-wandb" and run.project == "transnormer-tests"
    config = _config(run)
    assert config["train"]["wandb"] == "offline" and config["train"]["steps"] == 4
    assert config["model"]["hidden_size"] == 32
    assert sorted(logged["history"]) == [1, 2, 3, 4]
    assert_history_matches_metrics(logged["history"], offline_run, steps={1, 2, 3, 4})
    assert "val/val_loss" in logged["history"][4]  # the validation at the end, at the last step
    assert logged["exit_code"] == 0


def test_resumed_run_continues_the_same_wandb_run(offline_run, dataset, tmp_path):
    # A copy (same directory name), so that the other tests see the four-step run unchanged.
    run_dir = tmp_path / offline_run.name
    shutil.copytree(offline_run, run_dir, symlinks=True)
    p = pretrain(f"data.path={dataset}", f"train.run_dir={run_dir}", *TINY, *FOUR_STEPS, "train.steps=6",
                 "train.wandb_project=transnormer-tests", env=_wandb_env(tmp_path / "home"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "resumed from" in p.stdout
    first, second = (read_wandb_run(d) for d in offline_runs(run_dir))
    assert second["run"].run_id == first["run"].run_id
    assert sorted(second["history"]) == [5, 6]
    assert_history_matches_metrics(second["history"], run_dir, steps={5, 6})
    assert "val/val_loss" in second["history"][6]


def test_unknown_wandb_mode_exits_2_naming_the_key(dataset, tmp_path):
    p = pretrain(f"data.path={dataset}", f"train.run_dir={tmp_path / 'run'}", *TINY, "train.wandb=bogus",
                 env=_wandb_env(tmp_path / "home"), timeout=90)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "train.wandb" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unimportable_wandb_exits_2_before_training(dataset, tmp_path):
    # Needs check_wandb(cfg) in cli.prepare_run: without it the run still fails with the same
    # message, but only once training has started (after the process group).
    blocked = tmp_path / "blocked" / "wandb"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text('raise ImportError("wandb is blocked for this test")\n')
    env = _wandb_env(tmp_path / "home")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocked.parent), env.get("PYTHONPATH")]))
    p = pretrain(f"data.path={dataset}", f"train.run_dir={tmp_path / 'run'}", *TINY, "train.wandb=offline",
                 env=env, timeout=90)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "train.wandb=offline" in p.stderr and INSTALL in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any training


def test_check_wandb_names_the_key_and_the_install_command(monkeypatch):
    cfg = Config()
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    check_wandb(cfg)  # off: wandb is not needed, not even imported
    cfg.train.wandb = "online"
    with pytest.raises(ConfigError, match=r"train\.wandb=online") as e:
        check_wandb(cfg)
    assert INSTALL in str(e.value)


def test_run_id_is_kept_for_a_resume_and_replaced_for_a_fresh_start(tmp_path):
    first = run_id(tmp_path, start_step=0)
    assert run_id(tmp_path, start_step=10) == first  # resumed from a checkpoint: the same W&B run
    fresh = run_id(tmp_path, start_step=0)  # overwrite, or an attempt that died before its checkpoint
    assert fresh != first and run_id(tmp_path, start_step=3) == fresh
    assert (tmp_path / SUBDIR / ID_FILE).read_text().strip() == fresh


def _isolate(monkeypatch, home: Path) -> None:
    """_wandb_env for W&B runs made in this process."""
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    for key, value in _wandb_env(home).items():
        if key.startswith(("WANDB_", "HTTP", "NETRC")):
            monkeypatch.setenv(key, value)


def test_logger_marks_the_wandb_run_failed_when_closed_by_a_failing_run(tmp_path, monkeypatch):
    _isolate(monkeypatch, tmp_path / "home")
    log = MetricsLogger(tmp_path, enabled=True, total_steps=2, start_step=0, log_interval=1, tensorboard=False,
                        wandb="offline", wandb_project="transnormer-tests", config={"train": {"steps": 2}})
    rec = {"step": 1, "loss": 2.0, "lr": 1e-3, "grad_norm": float("nan"), "tokens_per_s": 10.0, "time": 1.0}
    with pytest.raises(RuntimeError):
        try:
            log.train_step(rec)
            raise RuntimeError("a failing step")
        finally:  # as Trainer.run closes it
            log.close()
    logged = read_wandb_run(offline_runs(tmp_path)[0])
    assert logged["exit_code"] == 1
    row = logged["history"][1]
    assert row["train/loss"] == 2.0 and row["train/grad_norm"] != row["train/grad_norm"]  # NaN kept
    assert "train/time" not in row and "train/step" not in row


def test_online_without_a_login_fails_naming_the_setting(tmp_path, monkeypatch):
    _isolate(monkeypatch, tmp_path / "home")  # no API key anywhere
    with pytest.raises(WandbError, match=r"train\.wandb=online: W&B could not start the run"):
        WandbRun(tmp_path, mode="online", project="transnormer-tests", config={}, start_step=0)
