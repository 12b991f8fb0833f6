"""Fast checks of the launch scripts that need no cluster (they run in `make test`).

The preemption contract rests on a few sbatch directives that a real cluster only
exercises near a time limit: USR1 must reach the batch shell (`B:`), and the job must
be requeueable with its log appended to. Both batch scripts carry these directives
(sbatch reads them from the submitted file only) and run one shared body, sourced so
that its USR1 trap is the batch shell's own.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from .conftest import REPO

LAUNCH = REPO / "launch"
BATCH_SCRIPTS = [LAUNCH / "alm.slurm", LAUNCH / "blm.slurm"]
SHARED = LAUNCH / "train_job.sh"
PREPARE = LAUNCH / "prepare.slurm"


def directives(script) -> list[str]:
    return re.findall(r"^#SBATCH\s+(\S+)", script.read_text(), re.M)


def test_scripts_parse():
    for script in [*BATCH_SCRIPTS, SHARED, LAUNCH / "lra.slurm", PREPARE]:
        subprocess.run(["bash", "-n", str(script)], check=True)
    subprocess.run(["sh", "-n", str(REPO / "docker" / "entrypoint.sh")], check=True)


@pytest.mark.parametrize("script", BATCH_SCRIPTS, ids=lambda p: p.name)
def test_usr1_reaches_the_batch_shell_and_the_job_requeues(script):
    d = directives(script)
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", x) for x in d), d
    assert "--requeue" in d and "--open-mode=append" in d and f"--job-name={script.stem}" in d, d
    code = "\n".join(ln for ln in script.read_text().splitlines() if not ln.lstrip().startswith("#"))
    # the logic lives in the shared body, sourced (not run) so its trap is this shell's
    assert re.search(r'^source "\$REPO_DIR/launch/train_job\.sh" "\$@"', code, re.M), code
    for copy in ("scontrol", "srun", "trap ", "wait ", "prepare_data", "MASTER_ADDR"):
        assert copy not in code, f"{script.name} repeats the shared logic ({copy!r})"


def test_shared_logic_traps_usr1_waits_and_requeues():
    text = SHARED.read_text()
    assert re.search(r"^trap \S+ USR1", text, re.M)
    assert "scontrol requeue" in text and 'wait "$step_pid"' in text
    assert 'grep -q "after signal"' in text  # requeue only once the step has checkpointed
    assert "#SBATCH" not in text  # sbatch would not read directives from here


@pytest.mark.parametrize("script", BATCH_SCRIPTS, ids=lambda p: p.name)
def test_a_spooled_copy_finds_the_shared_body_in_the_submit_dir(script, tmp_path):
    # sbatch runs a copy of the batch script from its spool directory; outside a job
    # the body stops at once, naming the script that ran it
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(script, spool / "slurm_script")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "REPO_DIR"}
    r = subprocess.run(["bash", str(spool / "slurm_script")], cwd=tmp_path, capture_output=True, text=True,
                       env={**env, "SLURM_SUBMIT_DIR": str(REPO)})
    assert r.returncode == 2 and f"{script.name}: submit it with sbatch" in r.stderr, r.stderr


@pytest.mark.parametrize("env, args, needle", [
    ({}, ["data/x", "--input", "a.txt"], "submit it as an array job"),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "1",
      "SLURM_ARRAY_TASK_MAX": "2"}, ["data/x"], "--array must be 0-1 without gaps"),
    ({"SLURM_ARRAY_TASK_ID": "7", "PARTS": "4"}, ["data/x"], "array index 7 is not a part of PARTS=4"),
    ({}, ["--merge", "{tmp}"], "no part-* folders in"),
])
def test_prepare_script_refuses_what_would_make_a_wrong_dataset(tmp_path, env, args, needle):
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("PARTS", "REPO_DIR")}
    r = subprocess.run(["bash", str(PREPARE), *(a.format(tmp=tmp_path) for a in args)], cwd=tmp_path,
                       capture_output=True, text=True, env={**base, "SLURM_SUBMIT_DIR": str(REPO), **env})
    assert r.returncode == 2 and needle in r.stderr, r.stderr
