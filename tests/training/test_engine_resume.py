"""Exact resume: 6 steps saving at 3, then new processes load step 3 and run 4-6 bit-identically.

With dropout on, so that the restored RNG states matter. Also the checkpoint directory
protocol: complete directories only, the `latest` pointer, pruning.
"""
from __future__ import annotations

import os
import random

import numpy as np
import pytest

from megatron_transnormer.training.checkpoint import (latest_checkpoint, layout_differences, layout_record,
                                                      read_meta)
from tests.multiproc import run_ranks
from tests.training.runtime_helpers import quiet_deepspeed, step_batches, tiny_config

# name -> (tensor, pipeline, zero stage, precision, context)
LAYOUTS = {
    "dp2_zero3": (1, 1, 3, "fp32", 1),
    "pp2": (1, 2, 0, "fp32", 1),
    "pp2_zero1_bf16": (1, 2, 1, "bf16", 1),
    "dp2_zero0_bf16": (1, 1, 0, "bf16", 1),
    "dp2_zero1": (1, 1, 1, "fp32", 1),
    "cp2": (1, 1, 0, "fp32", 2),  # the sequence split over two ranks, dropout per slice
}
SAVE_AT, STEPS = (1, 3, 6), 6


def _config(tp, pp, zero, precision, cp):
    cfg = tiny_config(tensor=tp, pipeline=pp, zero=zero, precision=precision, dropout=0.1, clip=0.05,
                      steps=STEPS, context=cp, block_size=16)
    cfg.train.keep_checkpoints = 2
    return cfg


def _probe() -> tuple:
    """Draws from every generator a checkpoint restores."""
    import torch
    return (random.random(), float(np.random.rand()), float(torch.rand(1)))


def _rank_state(layout, step):
    # What a data loader might keep, NumPy array included.
    return {"position": step * 10 + layout.dp_rank, "order": np.arange(4, dtype=np.int64) + step}


def _runtimes():
    """(name, cfg, layout, runtime) for every layout in turn, in this rank's process."""
    from megatron_transnormer.parallel import destroy_distributed, init_distributed
    from megatron_transnormer.training.runtime import build_runtime

    quiet_deepspeed()
    try:
        for name, (tp, pp, zero, precision, cp) in LAYOUTS.items():
            cfg = _config(tp, pp, zero, precision, cp)
            layout = init_distributed(tp, pp, context=cp)
            yield name, cfg, layout, build_runtime(cfg, layout)
    finally:
        destroy_distributed()


def _run_and_save(rank, world_size, root):
    out = {}
    for name, cfg, layout, rt in _runtimes():
        losses, probe, saved = [], None, []
        for step in range(1, STEPS + 1):
            losses.append(rt.train_step(step_batches(step, layout, cfg)).loss)
            if step in SAVE_AT:
                saved.append(rt.save_checkpoint(os.path.join(root, name), step, {"step": step},
                                                _rank_state(layout, step)))
                if step == 3:
                    probe = _probe()
        out[name] = {"losses": losses, "probe": probe, "saved": saved,
                     "listing": sorted(os.listdir(os.path.join(root, name)))}
    return out


def _resume(rank, world_size, root):
    out = {}
    for name, cfg, layout, rt in _runtimes():
        client_state, rank_state = rt.load_checkpoint(os.path.join(root, name, "step_00000003"))
        probe = _probe()
        expected = _rank_state(layout, 3)
        assert rank_state["position"] == expected["position"]
        assert np.array_equal(rank_state["order"], expected["order"])
        assert client_state["step"] == 3
        assert client_state["config"]["parallel"]["pipeline"] == cfg.parallel.pipeline
        losses = [rt.train_step(step_batches(step, layout, cfg)).loss for step in range(4, STEPS + 1)]
        out[name] = {"losses": losses, "probe": probe}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("checkpoints"))
    first = run_ranks(_run_and_save, 2, root, timeout=600)
    resumed = run_ranks(_resume, 2, root, timeout=600)  # new processes
    return root, first, resumed


@pytest.mark.parametrize("name", LAYOUTS)
def test_resume_is_bit_identical(runs, name):
    _, first, resumed = runs
    for rank in range(2):
        assert resumed[rank][name]["losses"] == first[rank][name]["losses"][3:], f"{name}, rank {rank}"
        assert resumed[rank][name]["probe"] == first[rank][name]["probe"], f"{name}, rank {rank}: RNG"


@pytest.mark.parametrize("name", LAYOUTS)
def test_checkpoint_directory_protocol(runs, name):
    root, first, _ = runs
    rec = first[0][name]
    assert rec["saved"] == [os.path.join(root, name, f"step_{s:08d}") for s in SAVE_AT]
    # keep_checkpoints=2: step 1 pruned; nothing half-written left behind. (Under ZeRO,
    # DeepSpeed also drops its consolidation scripts, zero_to_fp32.py..., in the root.)
    assert [f for f in rec["listing"] if not f.endswith(".py")] == ["latest", "step_00000003", "step_00000006"]
    assert latest_checkpoint(os.path.join(root, name)) == os.path.join(root, name, "step_00000006")
    files = os.listdir(os.path.join(root, name, "step_00000006"))
    assert {"rank_00000.pt", "rank_00001.pt", "meta.json"} <= set(files)
    tp, pp, zero, precision, cp = LAYOUTS[name]
    meta = read_meta(os.path.join(root, name, "step_00000006"))
    assert meta["step"] == 6 and meta["model"]["num_layers"] == 4
    assert (meta["world_size"], meta["tensor"], meta["pipeline"], meta["context"], meta["data_parallel"]) == \
        (2, tp, pp, cp, 2 // (pp * cp))
    assert (meta["zero_stage"], meta["precision"]) == (zero, precision)


def test_latest_checkpoint_ignores_incomplete(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    (tmp_path / "step_00000005.tmp").mkdir()  # a save that died before the rename
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "step_00000002").mkdir()
    (tmp_path / "step_00000004").mkdir()
    assert latest_checkpoint(tmp_path) == str(tmp_path / "step_00000004")
    (tmp_path / "latest").write_text("step_00000002\n")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "step_00000002")
    (tmp_path / "latest").write_text("step_00000009\n")  # points at a directory that is gone
    assert latest_checkpoint(tmp_path) == str(tmp_path / "step_00000004")


def test_layout_differences_name_each_changed_setting(tmp_path):
    import json

    saved = json.loads(json.dumps({"step": 3, **layout_record(tiny_config(), 1)}))  # as read back
    assert layout_differences(saved, layout_record(tiny_config(), 1)) == []
    other = tiny_config(zero=1, precision="bf16")
    other.model.hidden_size = 128
    assert layout_differences(saved, layout_record(other, 2)) == [
        ("world size", 1, 2), ("data-parallel size", 1, 2), ("parallel.zero_stage", 0, 1),
        ("train.precision", "fp32", "bf16"), ("model.hidden_size", 64, 128)]
    tp2 = tiny_config()
    tp2.parallel.tensor = 2
    assert layout_differences(saved, layout_record(tp2, 2)) == [("world size", 1, 2), ("parallel.tensor", 1, 2)]
    cp2 = tiny_config()
    cp2.parallel.context = 2
    assert layout_differences(saved, layout_record(cp2, 2)) == [("world size", 1, 2), ("parallel.context", 1, 2)]
    del saved["zero_stage"]  # what a checkpoint does not record is not compared
    assert ("parallel.zero_stage", 0, 1) not in layout_differences(saved, layout_record(other, 2))
    assert read_meta(tmp_path) is None  # a checkpoint from before meta.json
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(ValueError, match="meta.json is not valid JSON"):
        read_meta(tmp_path)


def test_resume_with_another_layout_fails_before_any_collective(runs):
    import torch

    from megatron_transnormer.parallel import Layout
    from megatron_transnormer.training import checkpoint

    root, _, _ = runs
    single = Layout(rank=0, world_size=1, local_rank=0, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1,
                    dp_rank=0, dp_size=1, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"written with layout .*'world_size': 2.*resume with the same"):
        checkpoint.load(None, single, os.path.join(root, "dp2_zero3", "step_00000003"))
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.load(None, single, os.path.join(root, "dp2_zero3", "step_00000001"))  # pruned
