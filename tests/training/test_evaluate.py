"""tools/evaluate.py end to end: tiny runs trained by pretrain.py, their checkpoints evaluated
by the tool in real processes, compared with the runs' own validation records."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multiproc import free_port
from tests.training.plays import prepare_plays
from tests.training.test_pretrain import REPO, TINY, TINY_MLM, _env, finished_run, pretrain, records

QUICK = ["train.steps=4", "train.plot=false", "train.tensorboard=false"]
EVAL_BATCHES = 3  # TINY's train.eval_batches: --batches 3 scores the batches the run validated on
BATCH = 2  # samples per rank in an evaluation batch: TINY's train.micro_batch_size


def evaluate(*args, launcher=(), timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *launcher, "tools/evaluate.py", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def torchrun(n: int) -> list[str]:
    return ["-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(free_port())]


def final_validation(run_dir: Path) -> dict:
    return [r for r in records(run_dir) if "val_loss" in r][-1]


def split_samples(dataset: Path, split: str) -> int:
    return json.loads((dataset / "manifest.json").read_text())["splits"][split]["samples"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_plays(tmp_path_factory.mktemp("data") / "small")


@pytest.fixture(scope="module")
def alm_run(dataset, tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory.mktemp("alm"), dataset, *QUICK)


@pytest.fixture(scope="module")
def alm_eval(alm_run) -> tuple[subprocess.CompletedProcess, dict]:
    p = evaluate("--checkpoint", str(alm_run), "--batches", str(EVAL_BATCHES))
    assert p.returncode == 0, p.stdout + p.stderr
    return p, json.loads((alm_run / "eval_valid_step4.json").read_text())


def test_causal_lm_checkpoint_scores_as_the_runs_final_validation(dataset, alm_run, alm_eval):
    p, result = alm_eval
    val = final_validation(alm_run)
    assert val["step"] == result["step"] == 4
    assert result["loss"] == pytest.approx(val["val_loss"], rel=1e-6)
    assert result["ppl"] == pytest.approx(val["val_ppl"], rel=1e-6)
    assert result["word_ppl"] == pytest.approx(val["val_word_ppl"], rel=1e-6)
    assert result["tokens"] == val["val_tokens"] == EVAL_BATCHES * BATCH * 64  # 64 predicted tokens a sample
    assert result["checkpoint"] == str((alm_run / "checkpoints" / "step_00000004").resolve())
    assert (result["split"], result["objective"], result["batches"]) == ("valid", "causal_lm", EVAL_BATCHES)
    assert result["coverage"] == pytest.approx(EVAL_BATCHES * BATCH / split_samples(dataset, "valid"))
    assert result["whole_split"] is False and result["wall_s"] > 0
    assert result["layout"]["world_size"] == 1 and result["layout"]["model"]["head"] == "lm"
    assert result["config"]["model"]["hidden_size"] == 32
    # Not a terminal: plain progress lines, then one summary line naming the file.
    lines = p.stdout.strip().splitlines()
    assert f"evaluated {EVAL_BATCHES}/{EVAL_BATCHES} batches" in lines[-2]
    assert lines[-1].startswith("valid at step 4: loss ") and "word ppl" in lines[-1]
    assert lines[-1].endswith(str(alm_run / "eval_valid_step4.json"))


def test_table_sets_the_run_beside_the_papers_numbers(alm_run, alm_eval):
    _, result = alm_eval
    p = evaluate("--table", str(alm_run), timeout=60)
    assert p.returncode == 0, p.stderr
    assert "| model | run | step | data | valid ppl | test ppl | paper valid | paper test |" in p.stdout
    # sentencepiece tokens: the per-word perplexity is the one comparable with the paper; * marks
    # an evaluation of part of the split.
    ppl = f"{result['word_ppl']:.2f}*"
    row = f"| TransNormer T2 | {alm_run} | 4 | input (sentencepiece) | {ppl} | — | 29.57 | 31.01 |"
    assert row in p.stdout.splitlines()
    assert "| Vanilla (softmax) | — | — | — | — | — | 29.63 | 31.01 |" in p.stdout
    assert "| 1+elu | — | — | — | — | — | 32.63 | 34.25 |" in p.stdout
    assert "Bidirectional" not in p.stdout  # no masked-LM run given


def test_bad_arguments_exit_2_with_one_line(alm_run, tmp_path):
    checkpoint = str(alm_run / "checkpoints" / "step_00000004")
    for args, needle in ((["--checkpoint", str(tmp_path / "nothing")], "--checkpoint"),
                         (["--checkpoint", checkpoint, "--split", "test"], "no split 'test'"),
                         (["--checkpoint", checkpoint, "train.stepz=3"], "train.stepz"),
                         (["--checkpoint", checkpoint, "model.head=classification", "model.num_classes=2"],
                          "has no 'classification' section"),
                         (["--table", str(tmp_path)], "no evaluations")):
        p = evaluate(*args, timeout=90)
        assert p.returncode == 2, p.stdout + p.stderr
        assert needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_masked_lm_checkpoint_scores_as_the_runs_final_validation(tmp_path_factory):
    data = prepare_plays(tmp_path_factory.mktemp("data") / "small-mlm", "--packing", "mlm")
    run_dir = tmp_path_factory.mktemp("mlm")
    p = pretrain(f"data.path={data}", f"train.run_dir={run_dir}", *TINY_MLM, *QUICK)
    assert p.returncode == 0, p.stdout + p.stderr
    p = evaluate("--checkpoint", str(run_dir / "checkpoints" / "step_00000004"), "--batches", str(EVAL_BATCHES),
                 "--output", str(run_dir / "mlm.json"))
    assert p.returncode == 0, p.stdout + p.stderr
    result, val = json.loads((run_dir / "mlm.json").read_text()), final_validation(run_dir)
    assert result["objective"] == "masked_lm" and "word_ppl" not in result
    # The same masked positions as the run's validation: (seed, epoch 0, sample index).
    assert result["tokens"] == val["val_tokens"] < 0.2 * EVAL_BATCHES * BATCH * 64
    assert result["loss"] == pytest.approx(val["val_loss"], rel=1e-6)
    assert result["ppl"] == pytest.approx(val["val_ppl"], rel=1e-6)
    assert "masked-token loss" in p.stdout.splitlines()[-1]


def test_data_parallel_checkpoint_needs_its_layout(dataset, tmp_path):
    p = subprocess.run([sys.executable, *torchrun(2), "pretrain.py", f"data.path={dataset}",
                        f"train.run_dir={tmp_path}", *TINY, *QUICK], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    checkpoint = tmp_path / "checkpoints" / "step_00000004"

    p = evaluate("--checkpoint", str(checkpoint), "--batches", str(EVAL_BATCHES), timeout=90)
    assert p.returncode == 2, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert str(checkpoint) in p.stderr and "data-parallel size: 2 in the checkpoint, 1 in this run" in p.stderr
    assert not (tmp_path / "eval_valid_step4.json").exists()

    p = evaluate("--checkpoint", str(checkpoint), "--batches", str(EVAL_BATCHES), launcher=torchrun(2), timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    result, val = json.loads((tmp_path / "eval_valid_step4.json").read_text()), final_validation(tmp_path)
    assert result["layout"]["data_parallel"] == 2 and result["samples"] == EVAL_BATCHES * BATCH * 2
    assert result["tokens"] == val["val_tokens"]
    for key in ("loss", "ppl", "word_ppl"):
        assert result[key] == pytest.approx(val[f"val_{key}"], rel=1e-6)
    assert sum(line.startswith("valid at step 4:") for line in p.stdout.splitlines()) == 1  # rank 0 only
