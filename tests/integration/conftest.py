"""Session fixtures for the integration tests: a prepared corpus, a real SLURM cluster.

Both are made once per session; the cluster is torn down (daemons by pid, network
namespaces, veths, bridge) even when a test fails.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def apt_install(*packages: str) -> None:
    """Installs Debian packages, or skips the test saying why that is impossible here."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root to install and run {', '.join(packages)}")
    if shutil.which("apt-get") is None:
        pytest.skip(f"{', '.join(packages)} missing and no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = subprocess.run(["apt-get", "install", "-y", "-q", *packages], env=env, capture_output=True, text=True)
    if r.returncode:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        r = subprocess.run(["apt-get", "install", "-y", "-q", *packages], env=env, capture_output=True, text=True)
    if r.returncode:
        pytest.fail(f"apt-get install {' '.join(packages)} failed:\n{r.stderr[-2000:]}")


@pytest.fixture(scope="session")
def shakespeare_data(tmp_path_factory) -> Path:
    """The bundled corpus in 64-token samples (short steps), prepared once."""
    out = tmp_path_factory.mktemp("data") / "shakespeare64"
    subprocess.run([sys.executable, str(REPO / "tools/prepare_data.py"), "--source", "shakespeare",
                    "--seq-len", "64", "--output", str(out)], check=True, cwd=REPO, capture_output=True)
    return out


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Two SLURM nodes, 2 CPUs each, each in its own network namespace."""
    from slurm_cluster import SlurmCluster, missing_programs

    if os.geteuid() != 0:
        pytest.skip("a SLURM cluster needs root (daemons, network namespaces)")
    if missing_programs():
        apt_install("slurm-wlm", "munge", "iproute2")
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode:
        pytest.skip("network namespaces are not available here (ip netns)")
    # A short path: munged's socket path must fit in a sockaddr_un.
    workdir = Path(tmp_path_factory.mktemp("slurm"))
    cluster = SlurmCluster(workdir, nodes=2, cpus_per_node=2)
    # A CI timeout ends the run with SIGTERM: turn it into an interrupt so that the
    # teardown below still stops the daemons and removes the network.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
