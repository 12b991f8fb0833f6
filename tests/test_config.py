import pytest

from megatron_transnormer.config import ConfigError, load_config, override_keys, validate_config


def test_overrides_are_typed_and_validated():
    cfg = load_config(None, ["train.steps=7", "optim.betas=[0.9,0.95]", "optim.lr=1e-4",
                             "model.variant=t1"])
    validate_config(cfg, world_size=1)
    assert (cfg.train.steps, cfg.optim.betas, cfg.optim.lr, cfg.model.variant) == (7, (0.9, 0.95), 1e-4, "t1")
    assert cfg.model.ffn_hidden_size == int(8 / 3 * cfg.model.hidden_size)
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
