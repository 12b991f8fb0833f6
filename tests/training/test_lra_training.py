"""Training the LRA models (spec §9) on this stack: data parallelism with ZeRO equals one
process (batch norm synchronised over the ranks), and pretrain.py on generated ListOps:
validation accuracy, the best-validation checkpoint scored on the test split, exact resume,
and the Retrieval / pixel settings refused when they do not fit the dataset."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_transnormer.config import Config, validate_config
from megatron_transnormer.data.lra.reader import IGNORE_LABEL, LRABatch
from tests.multiproc import run_ranks

from .runtime_helpers import quiet_deepspeed
from .test_pretrain import REPO, _env, records

SEQ, CLASSES, STEPS = 32, 4, 3


def lra_config(micro: int, zero: int) -> Config:
    c = Config()
    m = c.model
    m.head, m.causal, m.num_classes, m.classifier, m.norm, m.mlp = "classification", False, CLASSES, "linear", \
        "batch", "gelu"
    m.vocab_size, m.pad_id, m.hidden_size, m.num_layers, m.num_heads, m.local_heads = 20, 0, 32, 2, 4, 2
    m.block_size, m.positions, m.embedding_scale, m.recompute_attention = 16, "none", False, False
    m.dropout, m.kernels = 0.0, "torch"
    c.data.seq_len = SEQ
    c.parallel.zero_stage = zero
    c.train.micro_batch_size, c.train.global_batch_size = micro, 8
    c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 1e-2, 1, "cosine"
    # Biases that feed a batch norm get gradients that are zero but for rounding, which Adam's
    # default eps would blow up to full-size steps in directions that differ between layouts
    # (evaluation's running statistics would show them); a large eps keeps them rounding-sized.
    c.optim.eps = 1e-3
    return c


def lra_batch(seed: int, rows: int = 8, filler: int = 0) -> LRABatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, SEQ + 1, (rows,), generator=g)
    tokens = torch.randint(1, 20, (rows, SEQ), generator=g)
    tokens[torch.arange(SEQ) >= lengths[:, None]] = 0
    labels = torch.randint(0, CLASSES, (rows,), generator=g)
    labels[rows - filler:] = IGNORE_LABEL  # the reader's filler rows at the end of a split
    return LRABatch(tokens, lengths, labels, torch.arange(rows))


def _rows(batch: LRABatch, layout) -> LRABatch:
    return LRABatch(*(t.chunk(layout.dp_size)[layout.dp_rank] if t is not None else None for t in batch))


def _train(rank, world_size, zero: int) -> dict:
    from megatron_transnormer.model.norms import MaskedBatchNorm
    from megatron_transnormer.parallel import destroy_distributed, init_distributed
    from megatron_transnormer.training.objectives import Classification
    from megatron_transnormer.training.runtime import build_runtime

    quiet_deepspeed()
    cfg = validate_config(lra_config(micro=8 // world_size, zero=zero), world_size=world_size)
    try:
        layout = init_distributed(1, 1)
        rt = build_runtime(cfg, layout, Classification(cfg.model, SEQ, 0))
        results = [rt.train_step(iter([_rows(lra_batch(s), layout)])) for s in range(STEPS)]
        evaluation = rt.eval_batch(_rows(lra_batch(99, filler=3), layout))
        norms = [m for m in rt.engine.module.modules() if isinstance(m, MaskedBatchNorm)]
        return {"loss": [r.loss for r in results], "labels": [r.labels for r in results], "eval": evaluation,
                # plain lists: a tensor would travel as shared memory that dies with this process
                "running": torch.stack([torch.cat([n.running_mean, n.running_var]) for n in norms]).tolist()}
    finally:
        destroy_distributed()


@pytest.mark.parametrize("zero", [1, 2])
def test_two_ranks_match_one_process(zero):
    """The same global batch of 8 padded samples per update: 1 rank x 8 rows, or 2 ranks x 4
    (ZeRO 1, 2). Batch norm takes its statistics over the real tokens of all 8 either way, so
    the losses, the evaluation (loss, samples, right answers) and the running statistics agree."""
    one = run_ranks(_train, 1, zero)[0]
    two = run_ranks(_train, 2, zero, timeout=300)
    for rec in two:
        torch.testing.assert_close(torch.tensor(rec["loss"]), torch.tensor(one["loss"]), rtol=1e-5, atol=1e-6)
        assert rec["labels"] == one["labels"] == [8] * STEPS
        assert rec["eval"][1:] == one["eval"][1:] and rec["eval"][1] == 5  # filler rows not counted
        assert rec["eval"][0] == pytest.approx(one["eval"][0], rel=1e-5)
        torch.testing.assert_close(torch.tensor(rec["running"]), torch.tensor(one["running"]), rtol=1e-4, atol=1e-5)
    assert one["loss"][-1] != one["loss"][0]  # it trains


# ------------------------------------------------------------------ pretrain.py
def prepare_listops(output) -> None:
    cmd = [sys.executable, "tools/prepare_lra.py", "--task", "listops", "--generate", "4800", "--seed", "1",
           "--gen-max-depth", "3", "--gen-max-args", "5", "--gen-min-length", "10", "--gen-max-length", "120",
           "--max-length", "128", "--output", str(output), "--quiet"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def pretrain(*args) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "pretrain.py", "--config", "lra/tiny_cpu", *args], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
    return p


def scores(run_dir, after: int = 0) -> dict:
    """(kind, step) -> the record's loss or accuracy, for every record after step `after`."""
    out = {}
    for r in records(run_dir):
        kind = "test" if "test_loss" in r else "val" if "val_loss" in r else "train"
        if r["step"] > after:
            key = (kind, r["step"])
            assert key not in out, f"{key} logged twice in {run_dir}"
            out[key] = (r.get("loss"), r.get(f"{kind}_loss"), r.get(f"{kind}_accuracy"), r.get("best_step"))
    return out


# One forward per update (the config's 4 x 8 accumulation suits 8 ranks), 30 updates.
FAST = ["train.micro_batch_size=32", "train.steps=30", "train.eval_interval=10", "train.save_interval=10",
        "train.keep_checkpoints=5", "train.plot=false", "optim.warmup_steps=5"]


@pytest.fixture(scope="module")
def listops(tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "lra-listops-tiny"
    prepare_listops(data)
    return data


@pytest.fixture(scope="module")
def finished(listops, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lra_run")
    p = pretrain(f"data.path={listops}", f"train.run_dir={run_dir}", *FAST)
    assert p.returncode == 0, p.stdout + p.stderr
    return run_dir, p.stdout


def test_tiny_listops_learns_and_scores_the_best_checkpoint_on_test(listops, finished):
    run_dir, stdout = finished
    recs = records(run_dir)
    val = [r for r in recs if "val_accuracy" in r]
    assert [r["step"] for r in val] == [10, 20, 30]
    best = max(val, key=lambda r: r["val_accuracy"])
    counts = json.loads((listops / "manifest.json").read_text())["splits"]["valid"]["class_counts"]
    assert best["val_accuracy"] > 100 * max(counts) / sum(counts)  # above the majority class
    assert f"accuracy {best['val_accuracy']:.2f}%" in stdout
    [test] = [r for r in recs if "test_accuracy" in r]
    result = json.loads((run_dir / "test_result.json").read_text())
    first_best = min(r["step"] for r in val if r["val_accuracy"] == best["val_accuracy"])
    assert result["step"] == test["best_step"] == first_best and result["task"] == "listops"
    assert result["test_accuracy"] == test["test_accuracy"] and result["val_accuracy"] == best["val_accuracy"]
    assert result["test_tokens"] == 100  # every test sample once (filler rows not counted)
    assert (run_dir / "best" / f"step_{first_best:08d}").is_dir()
    assert "test evaluation at step 30" in stdout
    table = subprocess.run([sys.executable, "tools/lra_table.py", str(run_dir)], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert f"| TransNormer T2 (these runs) | {result['test_accuracy']:.2f} | — |" in table.stdout
    assert "| TransNormer T2 (paper) | 41.60 | 72.20 | 83.82 | 49.60 | 76.80 | — | 64.80 |" in table.stdout


def test_evaluate_tool_scores_the_best_checkpoint_as_the_run_did(finished, tmp_path):
    """tools/evaluate.py on the best-validation checkpoint gives the run's own test result."""
    run_dir, _ = finished
    result = json.loads((run_dir / "test_result.json").read_text())
    out = tmp_path / "test.json"
    p = subprocess.run([sys.executable, "tools/evaluate.py", "--checkpoint",
                        str(run_dir / "best" / f"step_{result['step']:08d}"), "--split", "test", "--output", str(out)],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    got = json.loads(out.read_text())
    assert got["objective"] == "classification" and got["tokens"] == result["test_tokens"] == 100
    assert got["accuracy"] == result["test_accuracy"] and got["loss"] == pytest.approx(result["test_loss"], rel=1e-6)
    assert f"accuracy {got['accuracy']:.2f}%" in p.stdout and "100 samples scored" in p.stdout


def test_resume_from_a_checkpoint_is_exact(listops, finished, tmp_path):
    """A run continued from the finished run's step-10 checkpoint (data position, RNG, best
    validation so far) logs the same losses and accuracies for steps 11-30 and the same test
    result."""
    run_dir, _ = finished
    shutil.copytree(run_dir / "best", tmp_path / "best")  # the best-validation copies it had kept so far
    for late in (tmp_path / "best").iterdir():
        if late.name.startswith("step_") and int(late.name[5:]) > 10:
            shutil.rmtree(late)
    p = pretrain(f"data.path={listops}", f"train.run_dir={tmp_path}", *FAST,
                 f"train.resume={run_dir / 'checkpoints' / 'step_00000010'}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "at step 10" in p.stdout
    assert scores(tmp_path) == scores(run_dir, after=10)
    a, b = (json.loads((d / "test_result.json").read_text()) for d in (run_dir, tmp_path))
    assert (a["step"], a["test_accuracy"], a["test_loss"]) == (b["step"], b["test_accuracy"], b["test_loss"])


@pytest.mark.parametrize("override, needle", [
    ("model.num_classes=3", "model.num_classes: 3, but"),
    ("model.input=pixels", "model.input: 'pixels', but"),
    ("model.classifier=two_tower", "model.classifier: 'two_tower', but"),
    ("data.test_split=nope", "data.test_split='nope'"),
    ("model.head=lm", "is an LRA classification dataset"),
])
def test_a_model_that_does_not_fit_the_dataset_is_refused_before_start(listops, tmp_path, override, needle):
    """pretrain.py's checks before any process group (it exits 2 with this one line)."""
    from megatron_transnormer.training.cli import UsageError, prepare_run
    args = ["--config", "lra/tiny_cpu", f"data.path={listops}", f"train.run_dir={tmp_path}", override]
    if override == "model.head=lm":
        args += ["model.causal=true", "model.norm=", "model.classifier=mlp"]
    with pytest.raises(UsageError, match=re.escape(needle)):
        prepare_run(args)
    prepare_run(args[:-1] if override != "model.head=lm" else args[:4])  # the config as it is fits


def test_lra_launcher_picks_the_array_tasks_config_and_refuses_a_bad_index(tmp_path):
    """launch/lra.slurm outside a job stops in the shared body (after choosing the config);
    an array index past the twelve configs, or no config at all, stops it first."""
    spool = tmp_path / "slurm_script"
    shutil.copy(REPO / "launch" / "lra.slurm", spool)
    env = {k: v for k, v in _env().items() if not k.startswith("SLURM_") and k != "REPO_DIR"}
    env["SLURM_SUBMIT_DIR"] = str(REPO)

    def run(*args, **extra):
        return subprocess.run(["bash", str(spool), *args], cwd=tmp_path, capture_output=True, text=True,
                              env={**env, **extra}, timeout=60)

    for r in (run("lra/listops_t2"), run(SLURM_ARRAY_TASK_ID="11")):
        assert r.returncode == 2 and "lra.slurm: submit it with sbatch" in r.stderr, r.stderr
    r = run(SLURM_ARRAY_TASK_ID="12")
    assert r.returncode == 2 and "array index 12: there are 12 LRA configs" in r.stderr, r.stderr
    r = run()
    assert r.returncode == 2 and "name a config" in r.stderr, r.stderr
    configs = re.search(r"LRA_CONFIGS=\(([^)]*)\)", (REPO / "launch" / "lra.slurm").read_text()).group(1).split()
    assert sorted(configs) == sorted(f"lra/{t}_{v}" for t in ("listops", "text", "retrieval", "image",
                                                                 "pathfinder", "pathx") for v in ("t1", "t2"))


def test_stream_position_survives_an_epoch_boundary(listops):
    """LRAStream's state after 6 batches of 4-batch epochs (epoch 1, batch 2) resumes a new
    stream at the 7th batch; epoch 1's order is not epoch 0's."""
    from megatron_transnormer.config import DataConfig
    from megatron_transnormer.data.lra.stream import LRAStream

    data = DataConfig(path=str(listops))
    make = lambda: LRAStream(data, "train", micro_batch_size=1200, seed=3, shuffle=True, infinite=True)  # noqa: E731
    stream = make()
    it = iter(stream)
    seen = [next(it).indices for _ in range(6)]
    state = stream.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 2)
    following = next(it).indices
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert torch.equal(next(iter(resumed)).indices, following)
    assert not torch.equal(seen[4], seen[0])  # epoch 1 reads another order
    with pytest.raises(Exception, match="micro_batch_size"):
        LRAStream(data, "train", micro_batch_size=600, seed=3).load_state_dict(state)
