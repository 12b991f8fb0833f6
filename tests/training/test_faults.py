"""Failure modes of pretrain.py, each caused for real: a frozen rank (SIGSTOP), a shard
command that never returns, corrupt shards, a full disk (/dev/full and a tiny tmpfs),
stop signals while no step boundary comes, and settings or datasets that must be refused
before any process group starts. Nothing may hang, no work may be lost or mixed into
another run's records, and every error is one line."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_transnormer.training.signals import descendants
from tests.multiproc import free_port
from tests.training.plays import prepare_plays
from tests.training.test_pretrain import REPO, TINY, _env, pretrain, records, records_tolerant

pytestmark = pytest.mark.faults

# Quiet and quick: no plot, no TensorBoard, a console line only now and then.
QUICK = [*TINY, "train.plot=false", "train.tensorboard=false", "train.log_interval=1000"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two plays in shards of 16 samples (134 train, 15 valid), so that a run opens a new
    shard every few steps."""
    return prepare_plays(tmp_path_factory.mktemp("data") / "many", "--shard-samples", "16")


def corrupted(dataset: Path, dest: Path, prefix: str, count: int | None = None) -> Path:
    """A copy of the dataset whose first `count` shards of a split (all: None) hold garbage."""
    shutil.copytree(dataset, dest)
    shards = sorted(dest.glob(f"{prefix}-*.tar"))
    for shard in shards[:count]:
        shard.write_bytes(b"not a tar file")
    return dest


def launch(args: list[str], log: Path, torchrun: int = 0) -> subprocess.Popen:
    """pretrain.py (under torchrun with `torchrun` processes), output to a file: a pipe nobody
    reads would fill up and block the run, which is not the hang under test."""
    cmd = [sys.executable, "pretrain.py"]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
               "--master_port", str(free_port()), "pretrain.py"]
    return subprocess.Popen(cmd + args, cwd=REPO, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    """Until the run in `run_dir` has logged `step` (a `launch`ed run: its output is in a file)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.get("step", 0) >= step and "loss" in r for r in records_tolerant(run_dir)):
            return
        assert proc.poll() is None, "the run ended early"
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"step {step} not reached in {timeout}s")


def alive(pid: int) -> bool:
    """Running, or stopped: not exited (a zombie waiting for its parent counts as exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error:" in line]


# ---------------------------------------------------------------- nothing hangs

def test_a_frozen_rank_makes_the_other_exit_within_the_collective_timeout(dataset, tmp_path):
    """torchrun, two data-parallel ranks; rank 1 is frozen with SIGSTOP. Rank 0 must give
    up after train.collective_timeout_s, naming what it was waiting in, and when rank 1
    thaws it finds its peer gone and exits too: no process is left."""
    timeout = 10
    log = tmp_path / "out.txt"
    proc = launch([f"data.path={dataset}", f"train.run_dir={tmp_path / 'run'}", *QUICK, "train.steps=100000",
                   f"train.collective_timeout_s={timeout}"], log, torchrun=2)
    try:
        wait_for(proc, tmp_path / "run", 5)
        workers = descendants(proc.pid)
        rank = {int(Path(f"/proc/{p}/environ").read_bytes().split(b"\0RANK=")[1].split(b"\0")[0]): p
                for p in workers if b"\0RANK=" in Path(f"/proc/{p}/environ").read_bytes()}
        assert sorted(rank) == [0, 1]
        os.kill(rank[1], signal.SIGSTOP)
        frozen_at = time.monotonic()
        while alive(rank[0]) and time.monotonic() - frozen_at < timeout + 30:
            time.sleep(0.1)
        waited = time.monotonic() - frozen_at
        assert not alive(rank[0]), "rank 0 still waits for the frozen rank"
        assert timeout - 1 <= waited <= timeout + 15
        os.kill(rank[1], signal.SIGCONT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            for pid in descendants(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
    out = log.read_text()
    assert proc.returncode != 0
    line = next(l for l in error_lines(out) if "rank 0:" in l)
    assert f"a collective operation timed out after {timeout} s while " in line
    assert "waiting for the other ranks after step" in line or "running training step" in line
    assert not [p for p in workers if alive(p)]


def test_stop_signal_while_stuck_in_a_shard_command_ends_the_run(dataset, tmp_path):
    """A `pipe:` shard command that never returns: SIGUSR1 cannot be honoured at a step
    boundary, so the run ends train.stop_grace_s later, non-zero (updates were lost),
    saying where it was stuck, and takes the stuck command with it. The same command
    again (resume=auto, no checkpoint was written) starts over without duplicate records."""
    stuck, run_dir, grace = tmp_path / "STUCK", tmp_path / "run", 3
    shards = f"pipe:sh -c '[ -e {stuck} ] && exec sleep 300; exec cat {dataset}/{{name}}'"
    args = [f"data.path={dataset}", f"train.run_dir={run_dir}", *QUICK, "data.shuffle_buffer=16"]
    proc = launch([*args, "train.steps=100000", f"data.shards={shards}", f"train.stop_grace_s={grace}"],
                  tmp_path / "out.txt")
    try:
        wait_for(proc, run_dir, 3)
        stuck.touch()  # the next shard the run opens never delivers a byte
        time.sleep(3)
        last = max(r["step"] for r in records_tolerant(run_dir))
        time.sleep(1)
        assert max(r["step"] for r in records_tolerant(run_dir)) == last, "the run is not stuck"
        children = descendants(proc.pid)
        assert children  # the shell running the shard command
        proc.send_signal(signal.SIGUSR1)
        sent = time.monotonic()
        proc.wait(timeout=grace + 30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "out.txt").read_text()
    assert proc.returncode == 128 + signal.SIGUSR1, out
    assert grace - 0.5 <= took <= grace + 10
    (line,) = error_lines(out)
    assert f"no step boundary came within {grace} s of SIGUSR1" in line
    assert f"loading the batches of step {last + 1}" in line and "updates since the last one are lost" in line
    assert not [p for p in children if alive(p)]  # `sleep 300` is gone too
    assert not (run_dir / "checkpoints").exists()

    p = pretrain(*args, "train.steps=3")
    assert p.returncode == 0, p.stdout + p.stderr
    assert [(r["step"], "loss" in r) for r in records(run_dir)] == [(1, True), (2, True), (3, True), (3, False)]


STOP_SCRIPT = textwrap.dedent("""
    import sys, time
    from megatron_transnormer.training.signals import StopRequest
    grace, unsaved, hold = float(sys.argv[1]), sys.argv[2] == "1", float(sys.argv[3])
    stop = StopRequest(grace_s=grace)
    stop.unsaved, stop.phase = unsaved, "loading the batches of step 8"
    print("ready", flush=True)
    with stop.holding():  # as while a checkpoint is written
        time.sleep(hold)
    while True:  # a loop that never reaches a step boundary
        time.sleep(0.05)
""")


LOST = "(the run was loading the batches of step 8); exiting without a checkpoint"


@pytest.mark.parametrize("grace, unsaved, hold, signals, code, expect", [
    # a second signal before the boundary: at once
    (60, True, 0, ("SIGUSR1", "SIGTERM"), 128 + signal.SIGUSR1,
     f"pretrain.py: error: a second stop signal (SIGTERM) came before the step boundary {LOST}"),
    # no boundary within the grace time, nothing to lose: exit 0, as after a checkpoint
    (1, False, 0, ("SIGTERM",), 0, "stopped while loading the batches of step 8 after signal SIGTERM: "
                                   "no step boundary came within 1 s of SIGTERM; nothing was trained"),
    # checkpoint writing does not count against the grace time
    (1, True, 3, ("SIGTERM",), 128 + signal.SIGTERM,
     f"pretrain.py: error: no step boundary came within 1 s of SIGTERM {LOST}"),
], ids=["second-signal", "deadline-nothing-lost", "deadline-not-counting-a-checkpoint-write"])
def test_stop_deadline_and_second_signal(grace, unsaved, hold, signals, code, expect):
    proc = subprocess.Popen([sys.executable, "-c", STOP_SCRIPT, str(grace), str(int(unsaved)), str(hold)],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    sent = time.monotonic()
    for name in signals:
        time.sleep(0.5)
        assert proc.poll() is None  # the first signal alone ends nothing before the deadline
        proc.send_signal(getattr(signal, name))
    out, err = proc.communicate(timeout=30)
    took = time.monotonic() - sent
    assert proc.returncode == code, err
    assert expect in (err if code else out), out + err
    if len(signals) > 1:
        assert took < 5
    else:
        assert hold + grace - 0.2 <= took < hold + grace + 3


def test_skip_corrupt_with_every_shard_corrupt_stops_after_one_pass(dataset, tmp_path, caplog):
    """data.skip_corrupt over a split whose shards are all corrupt: a DataError after one
    pass (one warning per shard), in the loader and in pretrain.py (one line, exit 2)."""
    from megatron_transnormer.config.schema import DataConfig
    from megatron_transnormer.data import DataError, TokenStream
    bad = corrupted(dataset, tmp_path / "bad", "train")
    n_shards = len(list(bad.glob("train-*.tar")))
    for infinite in (True, False):
        caplog.clear()
        stream = TokenStream(DataConfig(path=str(bad), skip_corrupt=True), "train", micro_batch_size=2,
                             shuffle=infinite, infinite=infinite)
        with pytest.raises(DataError, match=r"split 'train': no readable sample in a whole pass .* "
                                            r"every shard read was corrupt and skipped \(data.skip_corrupt\); "
                                            r"the last: .*train-\d+.tar: sha256 mismatch"):
            next(iter(stream))
        assert caplog.text.count("skipping corrupt shard") == n_shards
    p = pretrain(f"data.path={bad}", f"train.run_dir={tmp_path / 'run'}", *QUICK, "data.skip_corrupt=true",
                 timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    (line,) = error_lines(p.stderr)
    assert line.startswith("pretrain.py: error: ") and "no readable sample in a whole pass" in line
    assert p.stderr.count("skipping corrupt shard") == n_shards


# ------------------------------------------------- work is never lost or mixed

def test_a_corrupt_shard_on_one_rank_stops_every_rank_with_a_checkpoint(dataset, tmp_path):
    """Two data-parallel ranks; the third shard rank 1 reads is corrupt. Rank 1 finds it
    while loading a step's batches, with updates done since the start: both ranks save
    the checkpoint of the last step together, rank 1 names the shard in one line, and
    both exit 2 (instead of rank 0 waiting for rank 1 in the next collective)."""
    from megatron_transnormer.data.order import Shard, range_parts, reader_range, shard_order
    manifest = json.loads((dataset / "manifest.json").read_text())["splits"]["train"]
    shards = [Shard(s["name"], s["sha256"], s["samples"]) for s in manifest["shards"]]
    start, length = reader_range(manifest["samples"], 2, 1)  # rank 1 of 2 readers, epoch 0, seed 1
    name = range_parts(shards, shard_order(len(shards), 1, 0, True), start, length)[2][0].url
    bad = tmp_path / "bad"
    shutil.copytree(dataset, bad)
    (bad / name).write_bytes(b"not a tar file")
    run_dir, log = tmp_path / "run", tmp_path / "out.txt"
    proc = launch([f"data.path={bad}", f"train.run_dir={run_dir}", *QUICK, "train.steps=1000",
                   "data.shuffle_buffer=16"], log, torchrun=2)
    proc.wait(timeout=120)
    out = log.read_text()
    assert proc.returncode != 0, out
    assert "megatron_transnormer/" not in out and 'pretrain.py", line' not in out  # torchrun's traceback only
    (line,) = [l for l in out.splitlines() if l.startswith("pretrain.py: error:")]  # rank 0 follows silently
    assert line.startswith(f"pretrain.py: error: rank 1: {bad / name}: sha256 mismatch"), line
    assert "exitcode  : 2" in out  # torchrun's summary: both ranks
    step = max(r["step"] for r in records(run_dir))
    assert step > 0 and f"checkpoint saved at step {step} before stopping on the error" in out
    assert [r["step"] for r in records(run_dir)] == list(range(1, step + 1))
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    assert (ckpt / "rank_00000.pt").is_file() and (ckpt / "rank_00001.pt").is_file()


def test_failing_validation_keeps_the_checkpoint_and_runs_never_mix(dataset, tmp_path, capsys):
    """A corrupt validation shard found by the final validation: the final checkpoint is
    already saved; one line naming the shard, exit 2. A new run in that directory is
    refused unless train.overwrite=true, which starts clean."""
    from megatron_transnormer.commands import train as pretrain_py
    bad, run_dir = corrupted(dataset, tmp_path / "bad", "valid", 1), tmp_path / "run"
    p = pretrain(f"data.path={bad}", f"train.run_dir={run_dir}", *QUICK, "train.steps=3", "train.tensorboard=true")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    (line,) = error_lines(p.stderr)
    assert line == f"pretrain.py: error: {bad / 'valid-00000.tar'}: sha256 mismatch " + line.split("mismatch ")[1]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["latest", "step_00000003"]
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3]
    old_events = set((run_dir / "tensorboard").iterdir())
    assert old_events

    args = [f"data.path={dataset}", f"train.run_dir={run_dir}", *QUICK, "train.steps=2", "train.tensorboard=true"]
    assert pretrain_py.main([*args, "train.resume=none"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run" in err and "train.overwrite=true" in err
    assert not dist.is_initialized()
    p = pretrain(*args, "train.resume=none", "train.overwrite=true")
    assert p.returncode == 0, p.stdout + p.stderr
    assert [(r["step"], "loss" in r) for r in records(run_dir)] == [(1, True), (2, True), (2, False)]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["latest", "step_00000002"]
    assert not old_events & set((run_dir / "tensorboard").iterdir())


def test_full_metrics_disk_saves_the_checkpoint_and_names_the_file(dataset, tmp_path):
    """metrics.jsonl on a full device (/dev/full: every write fails with ENOSPC) after the
    first update: the checkpoint of that update is saved, the error names the file."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")
    p = pretrain(f"data.path={dataset}", f"train.run_dir={run_dir}", *QUICK, "train.steps=5")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    (line,) = error_lines(p.stderr)
    assert line == f"pretrain.py: error: no space left on device while writing step 1 to the metrics: " \
                   f"{run_dir / 'metrics.jsonl'}"
    assert "checkpoint saved at step 1 before stopping on the error" in p.stdout
    assert (run_dir / "checkpoints" / "step_00000001" / "rank_00000.pt").is_file()


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user and mount namespaces (unshare -rm)")
def test_full_checkpoint_disk_is_reported_as_such(dataset, tmp_path):
    """The run directory on a 256 KiB tmpfs: the metrics fit, the checkpoint does not."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cmd = " ".join([f"mount -t tmpfs -o size=256k tmpfs {run_dir} && exec", sys.executable, "pretrain.py",
                    f"data.path={dataset}", f"train.run_dir={run_dir}", *QUICK, "train.steps=2"])
    p = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    (line,) = error_lines(p.stderr)
    assert line.startswith(f"pretrain.py: error: no space left on device while saving the checkpoint of step 2 "
                           f"in {run_dir / 'checkpoints'}"), line


# ------------------------------------------------ refused before any process group

def _manifest(dataset: Path, dest: Path, edit) -> Path:
    shutil.copytree(dataset, dest)
    m = json.loads((dest / "manifest.json").read_text())
    edit(m)
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


@pytest.mark.parametrize("case", ["triton", "run_dir_file", "missing_base", "no_valid", "counts", "betas"])
def test_refused_before_any_process_group(dataset, tmp_path, monkeypatch, capsys, case):
    import torch

    from megatron_transnormer.commands import train as pretrain_py
    data, args = dataset, [f"train.run_dir={tmp_path / 'run'}"]
    if case == "triton":
        if torch.cuda.is_available():
            pytest.skip("a GPU is there: Triton may run")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        args.append("model.kernels=triton")
        needle = "model.kernels=triton: no GPU here, and TRITON_INTERPRET=1"
    elif case == "run_dir_file":
        (tmp_path / "file").write_text("x")
        args.append(f"train.run_dir={tmp_path / 'file'}")
        needle = "exists and is not a directory"
    elif case == "missing_base":
        (tmp_path / "child.yaml").write_text("base: parent.yaml\ntrain: {steps: 3}\n")
        args = ["--config", str(tmp_path / "child.yaml"), *args]
        needle = f"{tmp_path / 'parent.yaml'}: cannot read the file (base: 'parent.yaml' in {tmp_path / 'child.yaml'})"
    elif case == "no_valid":
        data = _manifest(dataset, tmp_path / "ds", lambda m: m["splits"].pop("valid"))
        needle = "data.valid_split='valid': dataset"
    elif case == "counts":
        data = _manifest(dataset, tmp_path / "ds", lambda m: m["splits"]["train"].update(samples=9999))
        shards = json.loads((data / "manifest.json").read_text())["splits"]["train"]["shards"]
        needle = (f"splits.train.samples is 9999, but its {len(shards)} shards hold "
                  f"{sum(s['samples'] for s in shards)} samples")
    else:
        args.append("optim.betas=[0.9,1.0]")
        needle = "optim.betas: each must be in [0, 1), got [0.9, 1.0]"
    code = pretrain_py.main([*args, *QUICK, f"data.path={data}"] if case == "missing_base"
                            else [*QUICK, f"data.path={data}", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("pretrain.py: error: ") and err.count("\n") == 1 and needle in err, err
    assert not dist.is_initialized()
