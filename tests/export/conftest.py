"""What the export tests share: short real pretrain.py runs (a causal LM and a masked LM on two
Shakespeare plays), their exports by tools/export_hf.py, and the project's own model of a
checkpoint, read by the same reader.

Nothing may be downloaded: the Hugging Face libraries are put offline, and their cache of
remote-code modules into a temporary directory, before any test imports them (they read
these variables at import).
"""
from __future__ import annotations

import atexit
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
if "HF_MODULES_CACHE" not in os.environ:
    _modules = tempfile.mkdtemp(prefix="transnormer-hf-modules-")
    os.environ["HF_MODULES_CACHE"] = _modules
    atexit.register(shutil.rmtree, _modules, ignore_errors=True)

from tests.training.plays import prepare_plays  # noqa: E402
from tests.model.conftest import single_process  # noqa: E402,F401  (the fixture, for the project's model)
from tests.training.test_pretrain import REPO, TINY_MLM, _env, finished_run, pretrain  # noqa: E402

STEPS = 4
QUICK = [f"train.steps={STEPS}", "train.tensorboard=false", "train.plot=false"]


def run_tool(script: str, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"tools/{script}", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _tool(name: str):
    return importlib.import_module(f"megatron_transnormer.commands.{name}")


def checkpoint_reader():
    """The generate command (tools/generate.py), whose `load_checkpoint` the exporter reads checkpoints with."""
    return _tool("generate")


def export_tool():
    return _tool("export_hf")


def project_model(run_dir: Path):
    """(the project's model of the run's last checkpoint in eval mode, its validated config)."""
    from megatron_transnormer.config import config_from_dict, validate_config
    from megatron_transnormer.model import build_model

    config, weights = checkpoint_reader().load_checkpoint(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    cfg = validate_config(config_from_dict(config))
    model = build_model(cfg.model, seed=cfg.train.seed)
    model.load_state_dict(weights, strict=False)  # megatron's empty _extra_state entries aside
    return model.eval(), cfg


@pytest.fixture(scope="session")
def plays(tmp_path_factory) -> Path:
    return prepare_plays(tmp_path_factory.mktemp("data") / "plays")


@pytest.fixture(scope="session")
def alm_run(plays, tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory.mktemp("alm"), plays, *QUICK)


@pytest.fixture(scope="session")
def mlm_plays(tmp_path_factory) -> Path:
    """The plays as masked-LM samples; its tokenizer has a <mask> piece."""
    return prepare_plays(tmp_path_factory.mktemp("data") / "plays-mlm", "--packing", "mlm")


@pytest.fixture(scope="session")
def blm_run(mlm_plays, tmp_path_factory) -> Path:
    data = mlm_plays
    run_dir = tmp_path_factory.mktemp("blm")
    p = pretrain(f"data.path={data}", f"train.run_dir={run_dir}", *TINY_MLM, *QUICK)
    assert p.returncode == 0, p.stdout + p.stderr
    return run_dir


def _exported(run_dir: Path, out: Path) -> tuple[Path, subprocess.CompletedProcess]:
    p = run_tool("export_hf.py", str(run_dir), str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    return out, p


@pytest.fixture(scope="session")
def alm_export(alm_run, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """(the causal LM's export directory, the tool's process)."""
    return _exported(alm_run, tmp_path_factory.mktemp("hf") / "alm")


@pytest.fixture(scope="session")
def blm_export(blm_run, tmp_path_factory) -> Path:
    """The masked LM's export directory, written here by the tool's own `run` (the command line
    is tested on the causal LM; a second process would only import DeepSpeed again)."""
    out = tmp_path_factory.mktemp("hf") / "blm"
    assert export_tool().run(export_tool().parse_args([str(blm_run), str(out)])) == 0
    return out


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """The models here are tiny: a second intra-op thread only waits for the first, and on a
    shared machine such waits dominate. The tools' processes get OMP_NUM_THREADS=1 (_env)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
