"""tools/generate.py end to end: a checkpoint of a short real pretrain.py run, generated from
by the tool in its own process and by the library here, token for token; a random model from
a config; checkpoints of other layouts refused with a message saying what is needed."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_transnormer.config import config_from_dict, validate_config
from megatron_transnormer.data import load_dataset_info
from megatron_transnormer.data.tokenizers import dataset_tokenizer
from megatron_transnormer.generation import Sampling, generate_tokens
from megatron_transnormer.model import build_model
from tests.model.conftest import single_process  # noqa: F401  (the fixture, used below)
from tests.training.plays import prepare_plays
from tests.training.test_pretrain import _env, finished_run

REPO = Path(__file__).resolve().parents[2]
PROMPT = "KING.\nWhat"
STEPS = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_plays(tmp_path_factory.mktemp("data") / "plays")


@pytest.fixture(scope="module")
def run_dir(dataset, tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory.mktemp("run"), dataset, f"train.steps={STEPS}", "train.tensorboard=false",
                        "train.plot=false")


def generate_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/generate.py", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.usefixtures("single_process")
@pytest.mark.parametrize("sampling", [Sampling(temperature=0), Sampling(temperature=0.9, top_k=50, top_p=0.95, seed=3)],
                         ids=["greedy", "sampled"])
def test_tool_streams_what_the_checkpoint_generates(run_dir, sampling):
    p = generate_tool("--checkpoint", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "24",
                      "--temperature", str(sampling.temperature), "--top-k", str(sampling.top_k),
                      "--top-p", str(sampling.top_p), "--seed", str(sampling.seed))
    assert p.returncode == 0, p.stderr
    # The same checkpoint read here: its weights-only model file, its config, its dataset's tokenizer.
    model_file = run_dir / "checkpoints" / f"step_{STEPS:08d}" / "mp_rank_00_model_states.pt"
    saved = torch.load(model_file, map_location="cpu", weights_only=True)
    cfg = validate_config(config_from_dict(saved["config"]))
    model = build_model(cfg.model, seed=cfg.train.seed)
    model.load_state_dict(saved["module"])
    tokenizer = dataset_tokenizer(load_dataset_info(cfg.data.path))
    prompt = [tokenizer.eod_id] + tokenizer.encode(PROMPT)
    tokens = generate_tokens(model.eval(), [prompt], 24, sampling, stop_ids=[tokenizer.eod_id])[0]
    assert len(tokens) > 0
    assert p.stdout == PROMPT + tokenizer.decode(tokens) + "\n"


def test_tool_runs_a_random_model_from_a_config(dataset):
    p = generate_tool("--config", "alm/tiny_cpu", f"data.path={dataset}", "model.hidden_size=32", "model.num_heads=2",
                      "--prompt", PROMPT, "--max-new-tokens", "8", "--seed", "1")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(PROMPT) and p.stdout.endswith("\n")


def _tool():
    from megatron_transnormer.commands import generate
    return generate


@pytest.mark.parametrize("change", [dict(world_size=2, data_parallel=2), dict(zero_stage=1), dict(tensor=2)])
def test_other_layouts_are_refused(run_dir, tmp_path, change):
    copy = tmp_path / "step"
    shutil.copytree(run_dir / "checkpoints" / f"step_{STEPS:08d}", copy)
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, **change}))
    tool = _tool()
    with pytest.raises(Exception, match="a layout-free export of the weights is needed") as caught:
        tool.load_checkpoint(copy)
    assert type(caught.value).__name__ == "UsageError"
    assert f"{next(iter(change))}={next(iter(change.values()))}" in str(caught.value)


def test_a_checkpoint_without_the_model_file_is_refused(run_dir, tmp_path):
    copy = tmp_path / "step"
    shutil.copytree(run_dir / "checkpoints" / f"step_{STEPS:08d}", copy)
    (copy / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(Exception) as caught:
        _tool().load_checkpoint(copy)
    assert str(caught.value) == (f"--checkpoint {copy}: mp_rank_00_model_states.pt is missing; a layout-free "
                                 f"export of the weights is needed")
