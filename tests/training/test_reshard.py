"""Layout-free checkpoints: save on one layout, convert, resume on others.

Real DeepSpeed engines in real gloo process groups, fp32, dropout off, clipping on (0.05,
so the global norm shapes every update). TP=2 x DP=2 (ZeRO 1) and CP=2 x DP=2 (ZeRO 3)
train 3 updates and save; each checkpoint is converted (the first in its own processes,
also as a model-only export, the second by tools/convert_checkpoint.py, which starts its
4 CPU ranks itself); then one process, PP=2, DP=2 at ZeRO 3 and DP=3 at ZeRO 2 load the
first layout-free checkpoint, one process the second too, and run updates 4-6, whose
losses, gradient norms and learning rates must be those of an uninterrupted
single-process run. Every layout trains on the same global batches
(runtime_helpers), so the uninterrupted run is the same on all of them.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multiproc import run_ranks
from tests.training.runtime_helpers import quiet_deepspeed, step_batches, tiny_config
from tests.training.test_pretrain import _env

REPO = Path(__file__).resolve().parents[2]
SAVED_AT, STEPS, RTOL = 3, 6, 1e-5
DATA = {"version": 1, "mode": "infinite", "batches": 9, "dp_size": 2}  # what the loop's data position looks like
SOURCES = {"tp2_dp2_zero1": (2, 1, 1, 1), "cp2_dp2_zero3": (1, 1, 3, 2)}  # (tensor, pipeline, zero, context)


def _config(tp=1, pp=1, zero=0, cp=1):
    # Global batch 6: whole micro-batches of 1 for DP 1, 2 and 3.
    return tiny_config(tensor=tp, pipeline=pp, zero=zero, context=cp, clip=0.05, micro_batch=1, global_batch=6,
                       block_size=16)


def _runtime(tp=1, pp=1, zero=0, cp=1):
    from megatron_transnormer.parallel import init_distributed
    from megatron_transnormer.training.runtime import build_runtime

    cfg = _config(tp, pp, zero, cp)
    layout = init_distributed(tp, pp, context=cp)
    return cfg, layout, build_runtime(cfg, layout)


def _steps(rt, layout, cfg, first, last) -> dict:
    results = [rt.train_step(step_batches(s, layout, cfg)) for s in range(first, last + 1)]
    return {"loss": [r.loss for r in results], "grad_norm": [r.grad_norm for r in results],
            "lr": [r.lr for r in results]}


def _train_and_save(rank, world_size, root):
    """Both sources, 3 updates each; the first is converted here, in its own processes."""
    from megatron_transnormer.parallel import destroy_distributed
    from megatron_transnormer.training import universal_convert

    quiet_deepspeed()
    out = {}
    try:
        for name, layout_args in SOURCES.items():
            cfg, layout, rt = _runtime(*layout_args)
            out[name] = _steps(rt, layout, cfg, 1, SAVED_AT)
            path = rt.save_checkpoint(os.path.join(root, name), SAVED_AT, {"step": SAVED_AT, "last_eval_step": None},
                                      {"data": DATA})
            if name == "tp2_dp2_zero1":
                conversion = universal_convert.prepare_conversion(path)
                universal_convert.convert(conversion, os.path.join(root, "free_tp2"))
                universal_convert.convert(conversion, os.path.join(root, "model_tp2"), model_only=True)
    finally:
        destroy_distributed()
    return out


# name -> (tensor, pipeline, zero, context) of the layouts that resume, by world size
TARGETS = {1: {"single": (1, 1, 0, 1)}, 2: {"pp2": (1, 2, 0, 1), "dp2_zero3": (1, 1, 3, 1)},
           3: {"dp3_zero2": (1, 1, 2, 1)}}


def _resume(rank, world_size, root, sources):
    """For each target layout of this world size and each layout-free checkpoint: load it and
    run updates 4-6. One process also runs the uninterrupted reference."""
    from megatron_transnormer.parallel import destroy_distributed

    quiet_deepspeed()
    out = {}
    try:
        if world_size == 1:
            cfg, layout, rt = _runtime()
            out["reference"] = _steps(rt, layout, cfg, 1, STEPS)
        for target, layout_args in TARGETS[world_size].items():
            for source in sources if world_size == 1 else sources[:1]:
                cfg, layout, rt = _runtime(*layout_args)
                client_state, rank_state = rt.load_checkpoint(os.path.join(root, source))
                out[target, source] = {**_steps(rt, layout, cfg, SAVED_AT + 1, STEPS),
                                       "client_state": client_state, "rank_state": rank_state}
    finally:
        destroy_distributed()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    saved = run_ranks(_train_and_save, 4, str(root), timeout=600)
    # The ZeRO 3 x CP checkpoint through the command line: it starts its own 4 ranks.
    done = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"),
                           str(root / "cp2_dp2_zero3" / "step_00000003"), str(root / "free_cp2")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sources = ["free_tp2", "free_cp2"]
    resumed = {}
    for world_size in TARGETS:
        results = run_ranks(_resume, world_size, str(root), sources, timeout=600)
        for other in results[1:]:
            for key, rec in other.items():
                assert rec["loss"] == results[0][key]["loss"], f"{key}: loss differs between ranks"
        resumed.update(results[0])
    return root, saved[0], done.stdout, resumed


def _close(got, want, what):
    assert len(got) == len(want), what
    for step, (g, w) in enumerate(zip(got, want), start=SAVED_AT + 1):
        assert math.isfinite(g) and g == pytest.approx(w, rel=RTOL), f"{what}, step {step}: {g} vs {w}"


def test_sources_match_the_reference_before_saving(runs):
    _, saved, stdout, resumed = runs
    ref = resumed["reference"]
    for name, rec in saved.items():
        for field in ("loss", "grad_norm"):
            assert rec[field] == pytest.approx(ref[field][:SAVED_AT], rel=RTOL), (name, field)
    assert "converted" in stdout and "ZeRO 3" in stdout and "context 2" in stdout, stdout


# Each target resumes the TP x DP checkpoint; one process also the CP x ZeRO 3 one.
RESUMED = [(t, "free_tp2") for targets in TARGETS.values() for t in targets] + [("single", "free_cp2")]


@pytest.mark.parametrize("target, source", RESUMED)
def test_resume_on_another_layout_continues_the_run(runs, target, source):
    _, _, _, resumed = runs
    ref, rec = resumed["reference"], resumed[target, source]
    what = f"{source} resumed as {target}"
    _close(rec["loss"], ref["loss"][SAVED_AT:], f"{what}: loss")
    _close(rec["grad_norm"], ref["grad_norm"][SAVED_AT:], f"{what}: grad norm")
    assert rec["lr"] == pytest.approx(ref["lr"][SAVED_AT:], rel=1e-12), what  # the schedule continues
    assert rec["client_state"] == {"step": SAVED_AT, "last_eval_step": None}, what
    assert rec["rank_state"] == {"data": DATA}, what


def test_layout_free_files(runs):
    from safetensors.torch import load_file

    from megatron_transnormer.model import count_parameters
    from megatron_transnormer.training import universal

    root, _, _, _ = runs
    free = root / "free_tp2"
    assert sorted(os.listdir(free)) == ["checksums.json", "config.yaml", "meta.json", "model.safetensors",
                                        "optimizer.safetensors", "state.json"]
    meta = json.loads((free / "meta.json").read_text())
    assert (meta["format"], meta["step"], meta["model_only"]) == ("layout-free", SAVED_AT, False)
    assert (meta["source"]["tensor"], meta["source"]["data_parallel"], meta["source"]["zero_stage"]) == (2, 2, 1)
    assert "world_size" not in meta  # no layout: any layout may resume it
    weights = load_file(str(free / "model.safetensors"))
    assert weights["embedding.word.weight"].shape == (128, 64)  # whole, not a TP shard
    assert sum(t.numel() for t in weights.values()) == count_parameters(_config().model)
    moments = load_file(str(free / "optimizer.safetensors"))
    assert set(moments) == {f"{n}.{k}" for n in weights for k in ("exp_avg", "exp_avg_sq")}
    state = json.loads((free / "state.json").read_text())
    assert state["adam_step"] == SAVED_AT and state["scheduler"]["last_epoch"] == SAVED_AT
    # Both conversions hold the same model: the layouts trained the same updates.
    other = load_file(str(root / "free_cp2" / "model.safetensors"))
    assert set(other) == set(weights)
    for name, value in weights.items():
        assert (other[name] - value).abs().max() <= 1e-5 * max(1.0, value.abs().max()), name
    # What generation reads: the config and the single-process model's state dict.
    config, state_dict = universal.read_model(free)
    assert config["parallel"]["tensor"] == 2 and set(state_dict) == set(weights)
    # A model-only export: the same weights, no optimizer state.
    model_only = root / "model_tp2"
    assert sorted(os.listdir(model_only)) == ["checksums.json", "config.yaml", "meta.json", "model.safetensors"]
    assert json.loads((model_only / "meta.json").read_text())["model_only"] is True
    _, exported = universal.read_model(model_only)
    assert all(bool((exported[n] == v).all()) for n, v in state_dict.items())


def test_generate_loads_a_layout_free_checkpoint(runs):
    from megatron_transnormer.commands import generate
    root, _, _, _ = runs
    config, weights = generate.load_checkpoint(root / "free_tp2")
    assert config["model"]["hidden_size"] == 64 and weights["embedding.word.weight"].shape == (128, 64)


def test_pretrain_accepts_any_layout_and_refuses_another_model(runs, tmp_path, monkeypatch):
    from megatron_transnormer.training.cli import UsageError, check_resume_layout

    root, _, _, _ = runs

    def config(tp, pp, zero, world_size, resume="free_tp2"):
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        cfg = tiny_config(tensor=tp, pipeline=pp, zero=zero)
        cfg.train.resume, cfg.train.run_dir = str(root / resume), str(tmp_path / "run")
        return cfg

    for tp, pp, zero, world_size in ((1, 1, 0, 1), (1, 2, 1, 2), (2, 2, 0, 8)):
        check_resume_layout(config(tp, pp, zero, world_size), world_size)  # no error: layout-free
    other = config(1, 1, 0, 1)
    other.model.hidden_size = 128
    with pytest.raises(UsageError, match=r"holds another model \(model.hidden_size: 64 in the checkpoint, 128"):
        check_resume_layout(other, 1)
    with pytest.raises(UsageError, match=r"model-only export \(no optimizer state\)"):
        check_resume_layout(config(1, 1, 0, 1, resume="model_tp2"), 1)


def test_damaged_checkpoints_are_refused_naming_the_file(runs, tmp_path, capsys):
    from megatron_transnormer.commands import convert as convert_checkpoint
    from megatron_transnormer.training import universal
    from megatron_transnormer.training.deepspeed_loading import CheckpointError

    root, _, _, _ = runs
    with pytest.raises(SystemExit) as exit_:
        convert_checkpoint.main(["--help"])
    assert exit_.value.code == 0 and "--model-only" in capsys.readouterr().out
    # A native checkpoint with a rank's file gone: refused before any process starts.
    broken = tmp_path / "step_00000003"
    shutil.copytree(root / "tp2_dp2_zero1" / "step_00000003", broken)
    (broken / "rank_00003.pt").unlink()
    assert convert_checkpoint.main([str(broken), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "rank_00003.pt is missing" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    # A layout-free checkpoint whose weights were changed.
    free = tmp_path / "free"
    shutil.copytree(root / "free_tp2", free)
    with open(free / "model.safetensors", "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match its sha256"):
        universal.read_model(free)
