"""launch/alm.slurm on a real SLURM cluster: one node, two nodes, preemption + requeue.

The per-step losses of a 1-node x 2-task run are the reference: a 2-node x 1-task run
(the same two data-parallel ranks, now on two hosts) and a run interrupted by USR1,
requeued and resumed from its checkpoint must reproduce them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.integration

# Enough steps (~30 ms each) that a signal sent after the first few lands mid-run.
STEPS = 150
# A tiny model and short sequences keep a job to seconds of training on 2 shared cores;
# dropout stays on, so resuming must restore the random state too.
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.block_size=32",
        "train.micro_batch_size=4", "train.global_batch_size=8",
        f"train.steps={STEPS}", "train.save_interval=0", "train.eval_batches=2",
        "train.tensorboard=false", "train.plot=false"]


def submit(cluster, run_dir: Path, data: Path, nodes: int, tasks_per_node: int, *extra: str) -> int:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return cluster.sbatch(
        [f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", f"--output={run_dir}.slurm-%j.out",
         "launch/alm.slurm", "--config", "alm/tiny_cpu", f"data.path={data}", f"train.run_dir={run_dir}",
         *TINY, *extra],
        # eth0 is each node's link to the others; without it gloo may pick loopback.
        env={"GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1"}, cwd=str(REPO))


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss; a step logged twice (before and after a resume) keeps the last."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def job_output(run_dir: Path) -> str:
    texts = [p.read_text(errors="replace") for p in sorted(run_dir.parent.glob(run_dir.name + ".slurm-*.out"))]
    texts += [p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("*.log"))]
    return "\n".join(texts)


def finish(cluster, job: int, run_dir: Path, timeout: float = 420) -> dict:
    info = cluster.wait(job, timeout=timeout)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"job {job}: {info['JobState']} {info['ExitCode']}\n{job_output(run_dir)[-6000:]}"
    return info


def assert_complete_run(run_dir: Path) -> None:
    steps = losses(run_dir)
    assert sorted(steps) == list(range(1, STEPS + 1)), steps
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}").is_dir(), list((run_dir / "checkpoints").iterdir())


@pytest.fixture(scope="session")
def reference_run(slurm_cluster, shakespeare_data, tmp_path_factory) -> Path:
    """One node, two tasks, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("runs") / "one_node"
    job = submit(slurm_cluster, run_dir, shakespeare_data, 1, 2)
    info = finish(slurm_cluster, job, run_dir)
    assert info["NodeList"] == "node1"
    return run_dir


def test_one_node_two_tasks(reference_run):
    assert_complete_run(reference_run)
    log = job_output(reference_run)
    assert "2 task(s)" in log and "attempt 0" in log
    assert list((reference_run / "logs").glob("train-*-attempt0.log")), "training log not in the run directory"


def test_two_nodes_match_one_node(slurm_cluster, shakespeare_data, reference_run, tmp_path):
    run_dir = tmp_path / "two_nodes"
    job = submit(slurm_cluster, run_dir, shakespeare_data, 2, 1)
    info = finish(slurm_cluster, job, run_dir)
    assert info["NodeList"] == "node[1-2]"
    assert_complete_run(run_dir)
    # The rendezvous went through node1's own address, not loopback, and both hosts ran a rank.
    log = job_output(run_dir)
    assert f"rendezvous {slurm_cluster.net.addresses['node1']}:" in log, log[-3000:]
    # The same two data-parallel ranks, the same reductions: the same losses, bit for bit.
    assert losses(run_dir) == losses(reference_run)


def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, shakespeare_data, reference_run, tmp_path):
    run_dir = tmp_path / "preempted"
    job = submit(slurm_cluster, run_dir, shakespeare_data, 1, 2)
    # Wait until training is under way, then deliver what SLURM sends near the time
    # limit (--signal=B:USR1@N): USR1 to the batch shell only.
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(losses(run_dir)) >= 5):
        assert time.time() < deadline, f"no training progress\n{job_output(run_dir)[-4000:]}"
        assert slurm_cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), job_output(run_dir)[-4000:]
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(job))

    info = finish(slurm_cluster, job, run_dir, timeout=600)
    log = job_output(run_dir)
    assert int(info["Restarts"]) == 1, log[-4000:]
    assert "after signal SIGUSR1" in log and "requeueing job" in log, log[-4000:]
    saved = [ln for ln in log.splitlines() if "checkpoint saved at step" in ln]
    step = int(saved[0].split("checkpoint saved at step")[1].split()[0])
    assert step < STEPS, f"the signal arrived only after the last step ({step})"
    assert list((run_dir / "logs").glob("train-*-attempt1.log")), "no second attempt"
    assert_complete_run(run_dir)
    # Same per-step losses as the uninterrupted run, bit for bit.
    assert losses(run_dir) == losses(reference_run)
