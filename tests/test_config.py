import pytest

from megatron_transnormer.config import ConfigError, load_config, override_keys, validate_config


def test_overrides_are_typed_and_validated():
    cfg = load_config(None, ["train.steps=7", "optim.betas=[0.9,0.95]", "optim.lr=1e-4", "optim.min_lr=1e-5",
                             "model.variant=t1"])
    validate_config(cfg, world_size=1)
    assert (cfg.train.steps, cfg.optim.betas, cfg.optim.lr, cfg.model.variant) == (7, (0.9, 0.95), 1e-4, "t1")
    assert cfg.model.ffn_hidden_size == 344  # tiny_cpu: divisible by 2 and 4 (8/3 x 128 = 341 is not)
    assert validate_config(load_config(None, ["model.ffn_hidden_size=0"])).model.ffn_hidden_size == 341
    keys = {k for k, _, _ in override_keys()}
    assert {"model.hidden_size", "parallel.tensor", "data.path", "train.run_dir"} <= keys


@pytest.mark.parametrize("overrides, key", [
    (["train.stepz=3"], "train.stepz"),
    (["train.steps=abc"], "train.steps"),
    (["model.variant=t3"], "model.variant"),
    (["parallel.tensor=3"], "parallel.tensor"),
    (["parallel.pipeline=2", "parallel.zero_stage=2"], "parallel.zero_stage"),
    (["model.ffn_hidden_size=341", "parallel.tensor=2"], "parallel.tensor"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(load_config(None, overrides), world_size=None)


def test_world_size_must_match_layout():
    cfg = load_config(None, ["parallel.tensor=2", "parallel.pipeline=2", "model.ffn_hidden_size=344"])
    with pytest.raises(ConfigError, match="world size 6"):
        validate_config(cfg, world_size=6)


@pytest.mark.parametrize("overrides, message", [
    (["optim.betas=[0.9,1.0]"], r"optim.betas: each must be in \[0, 1\), got \[0.9, 1.0\]"),
    (["optim.betas=[-0.1,0.98]"], r"optim.betas: each must be in \[0, 1\)"),
    (["optim.eps=0"], r"optim.eps: must be positive, got 0.0"),
    (["optim.weight_decay=-0.01"], r"optim.weight_decay: must be >= 0, got -0.01"),
    (["optim.lr=1e-3", "optim.min_lr=2e-3"], r"optim.min_lr: must be in \[0, optim.lr=0.001\], got 0.002"),
    (["train.seed=-1"], r"train.seed: must be >= 0, got -1"),
    (["train.eval_batches=-1"], r"train.eval_batches: must be >= 0, got -1"),
    (["train.save_interval=-5"], r"train.save_interval: must be >= 0, got -5"),
    (["train.log_interval=-1"], r"train.log_interval: must be >= 0, got -1"),
    (["train.collective_timeout_s=0"], r"train.collective_timeout_s: must be positive, got 0.0"),
    (["train.stop_grace_s=-1"], r"train.stop_grace_s: must be positive, got -1.0"),
    (["train.overwrite=yes please"], r"train.overwrite: expected true or false"),
])
def test_bad_optimizer_and_train_values_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(load_config(None, overrides))


def test_fault_settings_have_bounded_defaults():
    cfg = validate_config(load_config(None, []))
    assert cfg.train.collective_timeout_s == 600 and cfg.train.stop_grace_s == 120
    assert cfg.train.overwrite is False


def test_missing_base_and_bad_yaml_name_the_file(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: parent.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(child))
    assert str(e.value) == (f"{tmp_path / 'parent.yaml'}: cannot read the file (base: 'parent.yaml' in {child}): "
                            f"No such file or directory")
    (tmp_path / "parent.yaml").write_text("train: {steps: [1,\n")
    with pytest.raises(ConfigError, match=r"parent.yaml: not valid YAML: ") as e:
        load_config(str(child))
    assert "\n" not in str(e.value)
    child.write_text("base: 3\n")
    with pytest.raises(ConfigError, match=r"child.yaml: base: expected the path of a YAML file, got 3"):
        load_config(str(child))
