"""metrics.jsonl handling on resume, the MFU arithmetic and the loss plot."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_transnormer.training.metrics import (PEAK_ENV, MetricsLogger, peak_tflops, read_metrics,
                                                   throughput, truncate_metrics)
from megatron_transnormer.training.plotting import plot_losses


def test_truncate_keeps_records_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 8)]
    lines.insert(5, json.dumps({"step": 5, "val_loss": 0.3}))
    path.write_text("\n".join(lines) + '\n{"step": 8, "lo')  # killed mid-write
    truncate_metrics(path, 5)
    assert [(r["step"], "val_loss" in r) for r in read_metrics(path)] == \
        [(1, False), (2, False), (3, False), (4, False), (5, False), (5, True)]
    assert not list(tmp_path.glob("*.tmp"))


def test_logger_appends_after_truncation_and_only_when_enabled(tmp_path):
    rec = {"step": 1, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 10.0}
    off = MetricsLogger(tmp_path, enabled=False, total_steps=2, start_step=0, log_interval=1, tensorboard=False)
    off.train_step(rec)
    off.close()
    assert not (tmp_path / "metrics.jsonl").exists()  # other ranks write nothing
    on = MetricsLogger(tmp_path, enabled=True, total_steps=2, start_step=0, log_interval=1, tensorboard=True)
    on.train_step(rec)
    on.validation({"step": 1, "val_loss": 1.5, "val_ppl": 4.48, "val_word_ppl": 9.0})
    on.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 1]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_mfu_arithmetic_and_peak_lookup(monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert peak_tflops(torch.device("cpu")) is None
    # 8 devices, 1e9 FLOPs per token, 4e6 tokens/s -> 500 TFLOP/s per device; half of a 1000 peak.
    out = throughput(tokens=4_000_000, seconds=1.0, flops_per_token=1e9, world_size=8, peak=1000.0)
    assert out["tokens_per_s"] == 4e6
    assert out["tflops_per_device"] == pytest.approx(500.0) and out["mfu"] == pytest.approx(0.5)
    assert "tflops_per_device" not in throughput(100, 1.0, None, 1, None)
    monkeypatch.setenv(PEAK_ENV, "123.5")
    assert peak_tflops(torch.device("cpu")) == 123.5


def test_plot_has_train_and_validation_curves(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 5.0 - s / 10}) + "\n" for s in range(1, 21))
                    + json.dumps({"step": 20, "val_loss": 3.5}) + "\n")
    out = plot_losses(path, tmp_path / "loss.png", title="t")
    assert out.stat().st_size > 5_000 and out.read_bytes()[:4] == b"\x89PNG"
    assert plot_losses(tmp_path / "missing.jsonl", tmp_path / "x.png") is None


def test_plain_lines_carry_time_interval_means_step_time_and_eta(tmp_path, capsys):
    import re

    log = MetricsLogger(tmp_path, enabled=True, total_steps=10, start_step=0, log_interval=4, tensorboard=False)
    for step in range(1, 11):
        log.train_step({"step": step, "loss": float(step), "ppl": 0.0, "lr": 1e-3, "grad_norm": 0.5,
                        "tokens_per_s": 100.0, "tokens": 50, "step_s": 0.5})
    log.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # steps 4, 8 and the last
    first = lines[0]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| step 4/10 \| loss 2\.5000 \(mean of 4\) \| ", first), first
    assert "ETA 0m03s" in first and "0.500 s/step" in first and "100 tok/s" in first  # 6 steps x 0.5 s left
    assert "loss 9.5000 (mean of 2)" in lines[2] and "ETA 0m00s" in lines[2]
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [float(s) for s in range(1, 11)]
