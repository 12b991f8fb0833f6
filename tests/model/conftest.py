import pytest

from megatron_transnormer.config.schema import Config, validate_config


def small_config(**model):
    """A validated tiny model config; keyword arguments override model fields."""
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.hidden_size, m.num_heads, m.num_layers, m.block_size = 96, 32, 4, 4, 8
    m.dropout = 0.0
    m.kernels = "torch"
    for key, value in model.items():
        setattr(m, key, value)
    return validate_config(cfg).model


@pytest.fixture(scope="session")
def single_process():
    """World size 1 with megatron's groups (TP=1, PP=1)."""
    from megatron_transnormer.parallel import init_distributed
    return init_distributed(1, 1)


@pytest.fixture(autouse=True)
def _seeded():
    """Deterministic random inputs in every test."""
    import torch
    torch.manual_seed(1234)
