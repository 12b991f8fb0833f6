"""pretrain.py meets the habits of its users: option-style keys, typos, YAML booleans, --help."""
import os
import subprocess
import sys

import pytest

from megatron_transnormer.config import (ConfigError, config_warnings, describe_keys, load_config, option_habit,
                                         validate_config)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pretrain(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "pretrain.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("argv, answer", [
    (["--train.steps=20"], "write train.steps=20"),
    (["--steps", "20"], "write train.steps=20"),
    (["--lr=1e-3"], "write optim.lr=1e-3"),
    (["--config", "alm/tiny_cpu", "--micro-batch-size", "4"], "write train.micro_batch_size=4"),
    (["--stepz", "3"], "'stepz' is no key; did you mean"),
])
def test_option_style_overrides_get_the_key_value_form(argv, answer):
    assert answer in option_habit(argv)
    assert option_habit(["--config", "alm/tiny_cpu", "train.steps=3", "--local_rank=0"]) is None


def test_option_style_override_exits_2_with_the_answer():
    r = pretrain("--train.steps=20")
    assert r.returncode == 2
    assert r.stderr.strip() == ("pretrain.py: error: --train.steps=20: settings are given as key=value, without "
                                "dashes: write train.steps=20")


@pytest.mark.parametrize("override, suggestion", [
    ("train.stepz=3", "did you mean train.steps?"),
    ("train.lr=1e-3", "did you mean optim.lr?"),  # the right name in the wrong section
    ("model.hiden_size=64", "did you mean model.hidden_size?"),
])
def test_unknown_key_suggests_the_closest(override, suggestion):
    with pytest.raises(ConfigError, match=suggestion.replace(".", r"\.").replace("?", r"\?")):
        load_config(None, [override])


def test_yaml_words_stay_text_for_string_keys(tmp_path):
    cfg = load_config(None, ["train.resume=none", "model.kernels=on", "train.run_dir=no", "data.path=off",
                             "train.overwrite=yes", "train.plot=off"])
    assert (cfg.model.kernels, cfg.train.run_dir, cfg.data.path) == ("on", "no", "off")
    assert type(cfg.data.path) is str
    assert cfg.train.overwrite is True and cfg.train.plot is False  # bool keys keep YAML 1.1's meaning
    y = tmp_path / "c.yaml"
    y.write_text("base: " + os.path.join(ROOT, "configs", "alm", "tiny_cpu.yaml") + "\n"
                 "train: {run_dir: yes, tensorboard: no}\nmodel: {variant: t1}\n")
    cfg = load_config(str(y))
    assert cfg.train.run_dir == "yes" and cfg.train.tensorboard is False
    with pytest.raises(ConfigError, match=r"model.kernels: 'on' is not one of"):
        validate_config(load_config(None, ["model.kernels=on"]))
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_config(None, ["train.steps=yes"])


def test_warmup_beyond_the_run_is_warned():
    assert config_warnings(validate_config(load_config(None, []))) == []
    (line,) = config_warnings(validate_config(load_config(None, ["train.steps=20"])))
    assert line.startswith("optim.warmup_steps=30 >= train.steps=20")


def test_help_shows_meaning_and_allowed_values_from_the_schema():
    text = describe_keys(validate_config(load_config(None, [])))
    lines = text.splitlines()
    after = {l.split()[0]: lines[i + 1] for i, l in enumerate(lines[:-1]) if l.startswith("  ") and
             not l.startswith("      ")}
    flat = " ".join(text.split())
    assert "Allowed: transnormer, vanilla, linear_1elu." in flat
    assert "Allowed: fp32, bf16." in after["train.precision"]
    assert "taken from the dataset manifest" in after["model.vocab_size"]
    assert "sha256" in after["data.verify"] and "0: only at the end" in after["train.save_interval"]
    r = pretrain("--help", "train.steps=7")
    assert r.returncode == 0, r.stderr
    assert "Allowed: inverse_sqrt, polynomial, cosine, linear, constant." in " ".join(r.stdout.split())
    row = {l.split()[0]: l.split()[2:] for l in r.stdout.splitlines() if l.startswith("  train.")}
    assert row["train.steps"] == ["7", "(default", "100)"]


@pytest.mark.parametrize("layout", [["parallel.tensor=2"], ["parallel.tensor=4"], ["parallel.pipeline=2"],
                                    ["parallel.tensor=2", "parallel.pipeline=2"], ["parallel.context=2"],
                                    ["parallel.tensor=2", "parallel.sequence=true"]])
def test_the_default_config_runs_under_every_layout(layout):
    cfg = validate_config(load_config(None, layout))
    assert cfg.model.ffn_hidden_size == 344
