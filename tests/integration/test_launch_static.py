"""Fast checks of the launch scripts that need no cluster (they run in `make test`).

The preemption contract rests on a few sbatch directives that a real cluster only
exercises near a time limit: USR1 must reach the batch shell (`B:`), and the job must
be requeueable with its log appended to.
"""
from __future__ import annotations

import re
import subprocess

from .conftest import REPO

SCRIPT = REPO / "launch" / "alm.slurm"


def directives() -> list[str]:
    return re.findall(r"^#SBATCH\s+(\S+)", SCRIPT.read_text(), re.M)


def test_scripts_parse():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    subprocess.run(["sh", "-n", str(REPO / "docker" / "entrypoint.sh")], check=True)


def test_usr1_reaches_the_batch_shell_and_the_job_requeues():
    d = directives()
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", x) for x in d), d
    assert "--requeue" in d and "--open-mode=append" in d, d
    text = SCRIPT.read_text()
    assert re.search(r"^trap \S+ USR1", text, re.M)
    assert "scontrol requeue" in text and 'wait "$step_pid"' in text
