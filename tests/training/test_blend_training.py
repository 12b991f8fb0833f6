"""Training on a blend (data.blend) end to end: two ranks under torchrun, validation per
dataset, exact resume, resume on another data-parallel size, refusals before start-up."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multiproc import free_port
from tests.training.plays import prepare_plays
from tests.training.test_pretrain import REPO, TINY, _env, losses, pretrain, records


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[Path, Path]:
    """Two plays, and two others tokenized with the first dataset's tokenizer."""
    root = tmp_path_factory.mktemp("blend")
    first = prepare_plays(root / "tragedies")
    second = prepare_plays(root / "comedies", "--tokenizer-model", str(first / "tokenizer.model"),
                           plays=("tempest_gut.txt", "much_ado_about_nothing_gut.txt"))
    return first, second


def torchrun(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "pretrain.py", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def test_blend_trains_validates_each_dataset_and_resumes(datasets, tmp_path):
    first, second = datasets
    blend = f"data.blend=0.7 {first},0.3 {second}"
    common = ("data.path=", blend, *TINY, "train.eval_interval=6", "train.save_interval=3",
              "train.keep_checkpoints=4")
    whole = tmp_path / "whole"
    p = torchrun(*common, f"train.run_dir={whole}", "train.steps=12")
    assert p.returncode == 0, p.stdout + p.stderr
    val = [r for r in records(whole) if "val_loss" in r]
    assert [r["step"] for r in val] == [6, 12]
    for r in val:  # each dataset on its own, and the blend's total per labelled token
        for name in ("tragedies", "comedies"):
            assert r[f"val_{name}_ppl"] > 1 and r[f"val_{name}_word_ppl"] > r[f"val_{name}_ppl"]
        a, b = r["val_tragedies_tokens"], r["val_comedies_tokens"]
        assert r["val_tokens"] == a + b
        assert r["val_loss"] == pytest.approx((r["val_tragedies_loss"] * a + r["val_comedies_loss"] * b) / (a + b))
    assert "\n  tragedies: loss " in p.stdout and "\n  comedies: loss " in p.stdout  # on the console too

    # resumed from the checkpoint of step 6: the same per-step losses as the uninterrupted run
    part = tmp_path / "part"
    p = torchrun(*common, f"train.run_dir={part}", "train.steps=12", f"train.resume={whole}/checkpoints/step_00000006")
    assert p.returncode == 0, p.stdout + p.stderr
    later = {k: v for k, v in losses(whole).items() if k[1] > 6}
    assert losses(part) == later

    # the checkpoint of step 6, made layout-free, continues on one process: the mix and each
    # dataset go on from where the two ranks were
    free = tmp_path / "free"
    p = subprocess.run([sys.executable, "tools/convert_checkpoint.py", f"{whole}/checkpoints/step_00000006",
                        str(free)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    one = tmp_path / "one"
    p = pretrain(*common, f"train.run_dir={one}", "train.steps=9", f"train.resume={free}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert [r["step"] for r in records(one) if "loss" in r] == [7, 8, 9]

    # the tools: evaluation names one of the blend's datasets (the same numbers as the run's
    # validation: 6 batches of 2 are its 3 of 2 x 2), generation takes the shared tokenizer
    tool = lambda *a: subprocess.run([sys.executable, *a], cwd=REPO, env=_env(), capture_output=True, text=True,
                                     timeout=300)
    p = tool("tools/evaluate.py", "--checkpoint", str(free), "--batches", "6")
    assert p.returncode == 2 and "name the one to evaluate with data.path=PATH" in p.stderr, p.stdout + p.stderr
    p = tool("tools/evaluate.py", "--checkpoint", str(free), "--batches", "6", f"data.path={second}",
             "--output", str(tmp_path / "eval.json"))
    assert p.returncode == 0, p.stdout + p.stderr
    at6 = next(r for r in val if r["step"] == 6)
    assert json.loads((tmp_path / "eval.json").read_text())["loss"] == pytest.approx(at6["val_comedies_loss"],
                                                                                      rel=1e-5)
    p = tool("tools/generate.py", "--checkpoint", str(free), "--prompt", "KING", "--max-new-tokens", "5")
    assert p.returncode == 0 and p.stdout.startswith("KING"), p.stdout + p.stderr

    # a single-dataset run does not resume a blend's checkpoint
    p = pretrain(f"data.path={first}", *TINY, f"train.run_dir={tmp_path / 'single'}", "train.steps=9",
                 f"train.resume={free}")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "was saved by a run reading a blend of 2 datasets with weights [0.7, 0.3], this run reads one " \
           "dataset (data.path)" in p.stderr, p.stderr
    assert not (tmp_path / "single").exists()  # refused before anything started


@pytest.mark.parametrize("args, needle", [
    (("data.blend=0.5 {first},0.5 {tmp}/missing",), r"data.blend[1]: no manifest at"),
    (("data.blend=1 {first}", "data.valid_split=heldout"), "data.valid_split='heldout': dataset"),
    (("data.path={first}", "data.blend=1 {first}"), "data.blend are both set"),
])
def test_bad_blends_exit_2_before_any_process_group(datasets, tmp_path, args, needle):
    first, _ = datasets
    args = [a.format(first=first, tmp=tmp_path) for a in args]
    if not any(a.startswith("data.path=") for a in args):
        args.insert(0, "data.path=")
    p = pretrain(*args, *TINY, f"train.run_dir={tmp_path / 'run'}")
    assert p.returncode == 2 and needle in p.stderr, p.stdout + p.stderr
    assert not (tmp_path / "run").exists()
