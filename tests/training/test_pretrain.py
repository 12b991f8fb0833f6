"""pretrain.py end to end, as a user runs it: real processes, a real (small) dataset.

One uninterrupted reference run is compared with runs stopped by SIGKILL and by
SIGUSR1 and then resumed: their per-step losses (and validation losses) in
metrics.jsonl must be bit-identical (CPU, fp32, dropout on).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.multiproc import free_port
from tests.training.plays import prepare_plays

REPO = Path(__file__).resolve().parents[2]

# A model small enough that a step takes milliseconds; dropout stays on, so the RNG
# state must survive a resume too.
TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.block_size=32",
        "model.dropout=0.1", "train.micro_batch_size=2", "train.global_batch_size=4",
        "optim.warmup_steps=5", "train.eval_batches=3", "train.log_interval=1"]
# Long enough that a signal sent after the first checkpoint lands well before the end.
LONG = ["train.steps=150", "train.save_interval=10", "train.eval_interval=50"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                "SLURM_NTASKS"):
        env.pop(key, None)
    return env


def pretrain(*args, env=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pretrain.py", *args], cwd=REPO, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def finished_run(run_dir: Path, dataset: Path, *args) -> Path:
    """A run of pretrain.py with the TINY settings (and `args`) on `dataset` that must succeed."""
    p = pretrain(f"data.path={dataset}", f"train.run_dir={run_dir}", *TINY, *args)
    assert p.returncode == 0, p.stdout + p.stderr
    return run_dir


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "pretrain.py", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(run_dir: Path) -> dict:
    """(step, kind) -> value for every train and validation record."""
    out = {}
    for r in records(run_dir):
        key = ("val", r["step"]) if "val_loss" in r else ("train", r["step"])
        assert key not in out, f"{key} logged twice in {run_dir}"
        out[key] = r.get("val_loss", r.get("loss"))
    return out


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout=180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [r["step"] for r in records_tolerant(run_dir) if "loss" in r]
        if done and max(done) >= step:
            return
        assert proc.poll() is None, f"run ended early:\n{proc.stdout.read()}"
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"step {step} not reached in {timeout}s")


def records_tolerant(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_plays(tmp_path_factory.mktemp("data") / "small")


@pytest.fixture(scope="module")
def mlm_dataset(tmp_path_factory) -> Path:
    """The same plays as masked-LM samples: whole lines in <s> ... </s>, padded to 64 ids."""
    return prepare_plays(tmp_path_factory.mktemp("data") / "small-mlm", "--packing", "mlm")


# The masked LM of blm/tiny_cpu, tiny; dropout and attention dropout stay on.
TINY_MLM = ["--config", "blm/tiny_cpu", *TINY, "optim.warmup_steps=5"]
LONG_MLM = ["train.steps=60", "train.save_interval=10", "train.eval_interval=30"]


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """An uninterrupted run; also the end-to-end check of what a run leaves behind."""
    return finished_run(tmp_path_factory.mktemp("reference"), dataset, *LONG)


def test_run_writes_metrics_checkpoint_plot_tensorboard(reference):
    recs = records(reference)
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 151))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        assert all(isinstance(r[key], float) for r in train), key
    assert train[-1]["loss"] < train[0]["loss"] - 0.5  # it learns
    val = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in val] == [50, 100, 150]
    assert all(r["val_ppl"] > 1 and r["val_word_ppl"] > r["val_ppl"] for r in val)  # > 1 token per word
    ckpts = sorted(p.name for p in (reference / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_00000140", "step_00000150"]  # keep_checkpoints=2
    assert (reference / "loss.png").stat().st_size > 10_000
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    cfg = (reference / "config.yaml").read_text()
    assert "vocab_size: 512" in cfg and "seq_len: 64" in cfg  # resolved from the manifest


def test_sigkill_then_resume_is_bit_identical(dataset, reference, tmp_path):
    args = (f"data.path={dataset}", f"train.run_dir={tmp_path}", *TINY, *LONG)
    proc = start(*args)
    wait_for_step(proc, tmp_path, 25)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(r["step"] for r in records_tolerant(tmp_path))
    assert killed_at < 150
    p = pretrain(*args)
    assert p.returncode == 0, p.stdout + p.stderr
    resumed = int(p.stdout.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert 10 <= resumed <= killed_at and resumed % 10 == 0
    assert losses(tmp_path) == losses(reference)


def test_masked_lm_trains_and_resumes_after_sigkill_bit_identically(mlm_dataset, tmp_path_factory):
    """The BLM end to end: masked-token loss and perplexity in the records, validation
    without word perplexity, and the same per-step losses after a SIGKILL and resume (the
    masks come from (seed, epoch, sample), the dropout streams from the checkpoint)."""
    args = [f"data.path={mlm_dataset}", *TINY_MLM, *LONG_MLM]
    ref_dir, run_dir = tmp_path_factory.mktemp("mlm_reference"), tmp_path_factory.mktemp("mlm_killed")
    p = pretrain(*args, f"train.run_dir={ref_dir}", "train.plot=false")
    assert p.returncode == 0, p.stdout + p.stderr
    recs = records(ref_dir)
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 61))
    assert all(r["ppl"] == pytest.approx(math.exp(r["loss"])) for r in train)
    # 15% of each sample's real tokens are scored: far fewer labels than positions.
    assert all(0 < r["labels"] < 0.2 * r["tokens"] for r in train)
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    val = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in val] == [30, 60] and all("val_word_ppl" not in r for r in val)
    assert "masked_lm" in (ref_dir / "config.yaml").read_text()

    proc = start(*args, f"train.run_dir={run_dir}", "train.plot=false")
    wait_for_step(proc, run_dir, 25)
    proc.kill()
    proc.wait()
    p = pretrain(*args, f"train.run_dir={run_dir}", "train.plot=false")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "resumed from" in p.stdout
    assert losses(run_dir) == losses(ref_dir)


@pytest.mark.parametrize("config, data, needle", [
    ([], "mlm", "is packed for 'mlm' samples, but model.head=lm trains on 'causal' ones"),
    (["--config", "blm/tiny_cpu"], "causal", "is packed for 'causal' samples, but model.head=masked_lm"),
])
def test_objective_and_data_must_match_before_any_process_group(dataset, mlm_dataset, config, data, needle):
    path = mlm_dataset if data == "mlm" else dataset
    env = dict(_env(), MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    p = pretrain(*config, f"data.path={path}", env=env, timeout=90)
    assert p.returncode == 2, p.stdout + p.stderr
    assert needle in p.stderr and str(path) in p.stderr and "Traceback" not in p.stderr


def test_sigusr1_saves_exits_zero_and_resumes(dataset, reference, tmp_path):
    args = (f"data.path={dataset}", f"train.run_dir={tmp_path}", *TINY, *LONG)
    proc = start(*args)
    wait_for_step(proc, tmp_path, 13)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    line = next(l for l in out.splitlines() if "after signal" in l)
    step = int(line.split("checkpoint saved at step ")[1].split()[0])
    assert line.endswith("after signal SIGUSR1") and 13 <= step < 150
    assert (tmp_path / "checkpoints" / f"step_{step:08d}").is_dir()
    p = pretrain(*args)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"at step {step}" in p.stdout
    assert losses(tmp_path) == losses(reference)


def test_torchrun_two_ranks_and_signal_to_one_rank(dataset, tmp_path):
    """DP=2 under torchrun; SIGTERM to one worker only: both save at the same step and exit 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "pretrain.py", f"data.path={dataset}",
           f"train.run_dir={tmp_path}", *TINY, *LONG]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    wait_for_step(proc, tmp_path, 12)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 2
    os.kill(int(children[-1]), signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "after signal SIGTERM" in out
    step = max(r["step"] for r in records(tmp_path))
    assert (tmp_path / "checkpoints" / f"step_{step:08d}" / "rank_00001.pt").is_file()
    train = [r for r in records(tmp_path) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, step + 1))


def test_help_lists_configs_and_keys():
    p = pretrain("--help", timeout=60)
    assert p.returncode == 0
    for text in ("alm/tiny_cpu", "alm/wikitext103_t2", "scale/7b", "train.steps", "parallel.zero_stage"):
        assert text in p.stdout
    # With --config and overrides: their values, then the default where it differs.
    p = pretrain("--config", "alm/wikitext103_t2", "--help", "train.steps=7", timeout=60)
    assert p.returncode == 0, p.stderr
    row = {line.split()[0]: line.split()[2:] for line in p.stdout.splitlines() if line.startswith("  train.")}
    assert row["train.global_batch_size"] == ["128", "(default", "8)"]
    assert row["train.steps"] == ["7", "(default", "100)"]
    assert row["train.seed"] == ["1"]


@pytest.mark.parametrize("args, env, needle", [
    (["train.stepz=3"], {}, "train.stepz"),
    (["--config", "no_such_config"], {}, "no_such_config"),
    (["data.path=/nonexistent/ds"], {}, "/nonexistent/ds"),
    (["train.resume=/nonexistent/step_00000010"], {}, "train.resume"),
    # A launcher announcing two ranks whose peer never comes: the error must come before
    # any process group exists, otherwise this rank would wait for the peer.
    (["data.path=/nonexistent/ds"], {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "data.path"),
    (["parallel.tensor=2", "model.ffn_hidden_size=344"],
     {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1"}, "world size 3"),
    (["model.block_size=48"], {}, "cannot be tiled by model.block_size=48"),
    (["parallel.tensor=3"], {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1"},
     "not divisible by tensor-parallel size 3"),
])
def test_bad_settings_exit_2_before_any_process_group(dataset, args, env, needle):
    env = dict(_env(), MASTER_PORT=str(free_port()), **env)
    if not any(a.startswith("data.path=") for a in args):
        args = [f"data.path={dataset}", *args]
    t0 = time.time()
    p = pretrain(*args, env=env, timeout=90)
    assert p.returncode == 2, p.stdout + p.stderr
    assert needle in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert time.time() - t0 < 60


@pytest.fixture(scope="module")
def saved_run(dataset, tmp_path_factory) -> Path:
    """A finished one-process run whose checkpoint (step 2) the resume tests start from."""
    return finished_run(tmp_path_factory.mktemp("saved"), dataset, "train.steps=2", "train.plot=false",
                        "train.tensorboard=false")


def test_checkpoint_records_its_layout(saved_run):
    ckpt = saved_run / "checkpoints" / "step_00000002"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta == {"step": 2, "world_size": 1, "tensor": 1, "pipeline": 1, "data_parallel": 1,
                    "zero_stage": 0, "precision": "fp32",
                    "model": {"arch": "transnormer", "vocab_size": 512, "hidden_size": 32, "num_layers": 2,
                              "num_heads": 2, "ffn_hidden_size": 344, "layers": ["diag", "norm"], "mlp": "glu",
                              "norm_position": "pre", "positions": "sinusoidal", "max_positions": 0,
                              "embedding_norm": False, "head": "lm", "num_classes": 0, "norm": "",
                              "input": "tokens", "classifier": "mlp", "local_heads": 0},
                    "context": 1, "data_blend": [], "checksums": "checksums.json", "client_keys": ["best", "config", "last_eval_step",
                                                                                  "step"]}


@pytest.mark.parametrize("args, env, needle", [
    (["parallel.zero_stage=1"], {}, "parallel.zero_stage: 0 in the checkpoint, 1 in this run"),
    # Two ranks announced, the peer never comes: a check after the process group started
    # would wait for it until the timeout.
    ([], {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"},
     "data-parallel size: 1 in the checkpoint, 2 in this run"),
    (["model.hidden_size=64"], {}, "model.hidden_size: 32 in the checkpoint, 64 in this run"),
    (["model.layers=norm*2"], {}, "model.layers: ['diag', 'norm'] in the checkpoint, ['norm', 'norm'] in this run"),
    # An explicit path, from another run directory.
    (["train.resume={ckpt}", "train.run_dir={other}", "train.precision=bf16"], {},
     "train.precision: fp32 in the checkpoint, bf16 in this run"),
])
def test_resume_with_another_layout_exits_2_before_any_process_group(dataset, saved_run, tmp_path, args,
                                                                     env, needle):
    ckpt = saved_run / "checkpoints" / "step_00000002"
    args = [a.format(ckpt=ckpt, other=tmp_path) for a in args]
    env = dict(_env(), MASTER_PORT=str(free_port()), **env)
    t0 = time.time()
    p = pretrain(f"data.path={dataset}", f"train.run_dir={saved_run}", *TINY, "train.steps=4", *args,
                 env=env, timeout=90)
    assert p.returncode == 2, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert needle in p.stderr and str(ckpt) in p.stderr and "train.resume=none" in p.stderr
    assert time.time() - t0 < 60
    assert sorted(os.listdir(saved_run / "checkpoints")) == ["latest", "step_00000002"]  # untouched
