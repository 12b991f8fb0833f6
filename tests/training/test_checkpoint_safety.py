"""Resuming reads data, never code, and only from intact checkpoints of this run.

Real checkpoints (ZeRO 3 and ZeRO 2 in fp32 with data parallelism, pipeline 2 with
ZeRO 1 in bf16: between them every kind of file DeepSpeed writes, and the optimizer
files that pickle DeepSpeed's own types) are saved by real engines, then copied and
damaged: a pickle payload planted in each file in turn (and the checksums rewritten to
match, as whoever plants it could), a flipped byte, a truncated, missing or extra file.
New processes try to resume each copy; every attempt must fail on every rank with the
damaged file named, and the payload must never run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_transnormer.training import checkpoint
from megatron_transnormer.training.checkpoint import CheckpointError, latest_checkpoint, resume_target
from tests.multiproc import run_ranks
from tests.training.runtime_helpers import quiet_deepspeed, step_batches, tiny_config

# name -> (tensor, pipeline, zero stage, precision)
LAYOUTS = {"dp2_zero3": (1, 1, 3, "fp32"), "dp2_zero2": (1, 1, 2, "fp32"),
           "pp2_zero1_bf16": (1, 2, 1, "bf16")}
STEP2 = "step_00000002"


class Payload:
    """Unpickling this calls os.makedirs(marker): what a planted checkpoint file could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def _runtimes():
    """(name, cfg, layout, runtime) for every layout in turn, in this rank's process."""
    from megatron_transnormer.parallel import destroy_distributed, init_distributed
    from megatron_transnormer.training.runtime import build_runtime

    quiet_deepspeed()
    try:
        for name, (tp, pp, zero, precision) in LAYOUTS.items():
            cfg = tiny_config(tensor=tp, pipeline=pp, zero=zero, precision=precision, steps=6)
            layout = init_distributed(tp, pp)
            yield name, cfg, layout, build_runtime(cfg, layout)
    finally:
        destroy_distributed()


def _save(rank, world_size, root):
    for name, cfg, layout, rt in _runtimes():
        cfg.train.keep_checkpoints = 3
        for step in (1, 2):
            rt.train_step(step_batches(step, layout, cfg))
            rt.save_checkpoint(os.path.join(root, name), step, {"step": step}, {"step": step})
        if name == "dp2_zero3":
            # keep 1, and step 4 saved after step 6 (as by a run resumed from an earlier
            # checkpoint): 4 is kept with the newer 6, 2 is pruned, nothing else is touched.
            cfg.train.keep_checkpoints = 1
            for step in (2, 6, 4):
                rt.save_checkpoint(os.path.join(root, "prune"), step, {"step": step}, {"step": step})
    return True


def _attempt(fn) -> tuple:
    try:
        return ("ok", fn())
    except Exception as e:  # recorded, not raised: the tests assert its type and message
        return ("failed", type(e).__name__, str(e))


def _load(rank, world_size, cases):
    """Try each case of cases[layout]: (label, path, how); how is 'resume' (the runtime's
    load), 'save' (a checkpoint of step 3 under path) or 'engine' (DeepSpeed's own
    load_checkpoint, without our checks first)."""
    from megatron_transnormer.training.deepspeed_loading import install

    out = {}
    for name, _, _, rt in _runtimes():
        for label, path, how in cases[name]:
            if how == "resume":
                out[name, label] = _attempt(lambda: rt.load_checkpoint(path)[0]["step"])
            elif how == "save":
                out[name, label] = _attempt(lambda: rt.save_checkpoint(path, 3, {"step": 3}, {"step": 3}))
            else:
                install(rt.engine)
                out[name, label] = _attempt(lambda: rt.engine.load_checkpoint(str(Path(path).parent),
                                                                              tag=Path(path).name)[0])
    return out


def _reseal(directory: Path) -> None:
    """Rewrite checksums.json to the files' current sizes and digests, as a tamperer could."""
    record = json.loads((directory / "checksums.json").read_text())
    for name in record["files"]:
        data = (directory / name).read_bytes()
        record["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (directory / "checksums.json").write_text(json.dumps(record))


def _plant(file: Path, marker: Path) -> None:
    """Add a payload to a checkpoint file, keeping everything it held."""
    from megatron_transnormer.training.deepspeed_loading import load_weights_only

    state = load_weights_only(file)
    state["planted"] = Payload(marker)
    torch.save(state, file)


def _pickled_files(directory: Path) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f not in ("meta.json", "checksums.json"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    # What the root may hold besides this run's checkpoints, none of it to be pruned.
    prune = root / "prune"
    (prune / "unrelated").mkdir(parents=True)
    (prune / "notes.txt").write_text("mine\n")
    (prune / "step_00000001").mkdir()  # named like a checkpoint, but not one
    (prune / "step_00000001" / "notes.txt").write_text("mine too\n")
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "kept.txt").write_text("not a checkpoint\n")
    (prune / "step_00000000").symlink_to(elsewhere)  # a link, named like an old checkpoint
    run_ranks(_save, 2, str(root), timeout=600)

    marker = root / "payload_ran"
    copies = root / "copies"
    cases = {name: [] for name in LAYOUTS}
    expected = {}
    for name in LAYOUTS:
        saved = root / name / STEP2
        for i, f in enumerate(_pickled_files(saved)):  # the payload in each file in turn
            copy = copies / name / f"planted_{i:02d}"
            shutil.copytree(saved, copy)
            _plant(copy / f, marker)
            _reseal(copy)
            cases[name].append((f"planted {f}", str(copy), "resume"))
            expected[name, f"planted {f}"] = (copy, f)
        cases[name].append(("honest", str(saved), "resume"))
        cases[name].append(("save after resuming", str(root / "resaved" / name), "save"))
    saved = root / "dp2_zero3" / STEP2
    target = "zero_pp_rank_1_mp_rank_00_optim_states.pt"

    def damaged(label, how, reseal=False, after_honest=False):
        copy = copies / "dp2_zero3" / label
        shutil.copytree(saved, copy)
        how(copy)
        if reseal:
            _reseal(copy)
        # Tried before the honest load, since they fail before DeepSpeed reads anything; a
        # failed DeepSpeed load leaves the engine half restored, so that one comes after.
        case = (label, str(copy), "resume")
        if after_honest:
            cases["dp2_zero3"].append(case)
        else:
            cases["dp2_zero3"].insert(0, case)

    def flip(copy):
        data = bytearray((copy / target).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / target).write_bytes(bytes(data))

    def truncate(copy):
        (copy / target).write_bytes((copy / target).read_bytes()[:-100])

    damaged("flipped", flip)
    damaged("truncated", truncate)
    damaged("truncated, resealed", truncate, reseal=True)  # the checksums match, the archive is broken
    damaged("missing", lambda c: (c / target).unlink())
    damaged("extra", lambda c: shutil.copy(c / target, c / "zero_pp_rank_2_mp_rank_00_optim_states.pt"))
    damaged("no checksums", lambda c: (c / "checksums.json").unlink())
    damaged("all planted", lambda c: [_plant(c / f, marker) for f in _pickled_files(c)])

    def legacy(copy):  # as saved before checkpoints carried checksums: nothing to verify, all to refuse
        (copy / "checksums.json").unlink()
        meta = json.loads((copy / "meta.json").read_text())
        del meta["checksums"]
        (copy / "meta.json").write_text(json.dumps(meta))
        _plant(copy / target, marker)

    damaged("legacy, planted", legacy)

    def emptied(copy):  # safe and intact by its checksums, but not what DeepSpeed expects
        for f in _pickled_files(copy):
            if f.endswith("model_states.pt"):
                torch.save({"unexpected": torch.zeros(1)}, copy / f)

    damaged("wrong content", emptied, reseal=True, after_honest=True)
    # DeepSpeed's own load, our checks skipped: it reads through the weights-only loader.
    copy = copies / "pp2_zero1_bf16" / "engine"
    shutil.copytree(root / "pp2_zero1_bf16" / STEP2, copy)
    for f in _pickled_files(copy):
        if not f.startswith("rank_"):
            _plant(copy / f, marker)
    cases["pp2_zero1_bf16"].append(("engine", str(copy), "engine"))

    results = run_ranks(_load, 2, cases, timeout=600)
    return root, marker, expected, results


@pytest.mark.parametrize("name", LAYOUTS)
def test_planted_pickle_in_any_file_is_refused_and_never_runs(runs, name):
    root, marker, expected, results = runs
    planted = {label: v for (n, label), v in expected.items() if n == name}
    assert len(planted) >= 5, planted  # two rank files, model states, two optimizer states at least
    for label, (copy, f) in planted.items():
        messages = [r[name, label] for r in results]
        for got in messages:
            assert got[:2] == ("failed", "CheckpointError"), (label, got)
            assert got[2].startswith(f"checkpoint {copy}: {f} is refused by the weights-only loader ("), got
        # the rank that checked the file says what it holds
        assert any("os.makedirs" in got[2] for got in messages), (label, messages)
    assert all(r[name, "honest"] == ("ok", 2) for r in results)
    assert not marker.exists()
    # The engine that read through the weights-only loader still saves as DeepSpeed does.
    resaved = root / "resaved" / name
    assert results[0][name, "save after resuming"] == ("ok", str(resaved / "step_00000003"))
    assert latest_checkpoint(resaved) == str(resaved / "step_00000003")


def test_damage_is_named_before_anything_is_read(runs):
    root, marker, _, results = runs
    copies = root / "copies" / "dp2_zero3"
    target = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    expect = {
        "flipped": f"{target} does not match its sha256 in checksums.json: corrupt or replaced (",
        "truncated": f"{target} does not have the size checksums.json records",
        "truncated, resealed": f"{target} is refused by the weights-only loader (",
        "missing": f"{target} is missing or unreadable",
        "extra": "zero_pp_rank_2_mp_rank_00_optim_states.pt is not recorded in checksums.json",
        "all planted": "rank_00000.pt does not have the size checksums.json records",
        "legacy, planted": f"{target} is refused by the weights-only loader (Trying to load unsupported GLOBAL "
                           f"os.makedirs",
    }
    for label, text in expect.items():
        for r in results:
            got = r["dp2_zero3", label]
            assert got[:2] == ("failed", "CheckpointError"), (label, got)
            assert got[2].startswith(f"checkpoint {copies / label}: {text}"), (label, got[2])
    # the rank that checked the file says why (the others, which rank found it)
    assert any("(PytorchStreamReader failed reading zip archive" in r["dp2_zero3", "truncated, resealed"][2]
               for r in results)
    for r in results:
        got = r["dp2_zero3", "no checksums"]
        assert got[:2] == ("failed", "CheckpointError")
        assert got[2] == f"checkpoint {copies / 'no checksums'} is damaged: checksums.json is missing"
        got = r["dp2_zero3", "wrong content"]  # intact and safe, but not DeepSpeed's: named all the same
        assert got[:2] == ("failed", "CheckpointError"), got
        assert got[2].startswith(f"checkpoint {copies / 'wrong content'}: DeepSpeed could not restore it "
                                 f"(the last file it read: zero_pp_rank_"), got[2]
    assert "and 5 more: " in results[0]["dp2_zero3", "all planted"][2]
    assert not marker.exists()


def test_deepspeed_reads_every_file_through_the_weights_only_loader(runs, tmp_path):
    root, marker, _, results = runs
    copy = root / "copies" / "pp2_zero1_bf16" / "engine"
    for r in results:
        got = r["pp2_zero1_bf16", "engine"]
        assert got[:2] == ("failed", "CheckpointError"), got
        assert got[2].startswith(f"{copy}/") and "refused by the weights-only loader" in got[2], got[2]
        assert "os.makedirs" in got[2]
    assert not marker.exists()
    # The payload is live: DeepSpeed's own engine (weights_only=False) would have run it.
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ran = tmp_path / "ran"
    planted = tmp_path / "planted.pt"
    shutil.copy(root / "pp2_zero1_bf16" / STEP2 / "mp_rank_00_model_states.pt", planted)
    _plant(planted, ran)
    TorchCheckpointEngine().load(str(planted), map_location="cpu")
    assert ran.is_dir()


def test_checksums_cover_every_file(runs):
    root = runs[0]
    for name in LAYOUTS:
        directory = root / name / STEP2
        record = json.loads((directory / "checksums.json").read_text())["files"]
        assert sorted(record) == sorted(f for f in os.listdir(directory) if f != "checksums.json")
        for f, entry in record.items():
            data = (directory / f).read_bytes()
            assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert json.loads((directory / "meta.json").read_text())["checksums"] == "checksums.json"


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(runs, tmp_path, caplog):
    root = tmp_path / "checkpoints"
    shutil.copytree(runs[0] / "dp2_zero3", root)
    assert resume_target("auto", root) == str(root / STEP2)
    newest = root / STEP2 / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    data = bytearray(newest.read_bytes())
    data[-30] ^= 0xFF
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert resume_target("auto", root) == str(root / "step_00000001")
    assert (f"skipping a damaged checkpoint: checkpoint {root / STEP2}: "
            f"zero_pp_rank_0_mp_rank_00_model_states.pt does not match its sha256") in caplog.text
    (root / "step_00000001" / "rank_00001.pt").unlink()
    with pytest.raises(CheckpointError) as e:
        latest_checkpoint(root)
    assert str(e.value).startswith(f"no intact checkpoint under {root}: checkpoint {root / STEP2}: "
                                   f"zero_pp_rank_0_mp_rank_00_model_states.pt does not match")
    assert f"checkpoint {root / 'step_00000001'}: rank_00001.pt is missing" in str(e.value)
    assert resume_target("none", root) is None


def test_pruning_removes_only_older_checkpoints_of_this_run(runs):
    root = runs[0]
    prune = root / "prune"
    listing = sorted(f for f in os.listdir(prune) if not f.endswith(".py"))  # ZeRO's scripts
    assert listing == ["latest", "notes.txt", "step_00000000", "step_00000001", "step_00000004",
                       "step_00000006", "unrelated"]
    assert (prune / "latest").read_text().strip() == "step_00000004"
    assert latest_checkpoint(prune) == str(prune / "step_00000004")
    assert (prune / "step_00000001" / "notes.txt").read_text() == "mine too\n"
    assert (prune / "step_00000000").is_symlink() and (root / "elsewhere" / "kept.txt").is_file()
    assert checkpoint.read_meta(prune / "step_00000006")["step"] == 6
