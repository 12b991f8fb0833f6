import pytest

from megatron_transnormer.config.schema import Config, validate_config


def small_config(**model):
    """A validated tiny model config; keyword arguments override model fields."""
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.hidden_size, m.num_heads, m.num_layers, m.block_size = 96, 32, 4, 4, 8
    m.dropout = 0.0
    m.kernels = "torch"
    if model.get("causal") is False:
        model.setdefault("head", "masked_lm")  # a bidirectional model: the LM head would be refused
    for key, value in model.items():
        setattr(m, key, value)
    return validate_config(cfg).model


@pytest.fixture(scope="module")
def single_process():
    """World size 1 with megatron's groups (TP=1, PP=1), torn down after the module so
    no later test finds a process group it did not make."""
    from megatron_transnormer.parallel import destroy_distributed, init_distributed
    yield init_distributed(1, 1)
    destroy_distributed()


@pytest.fixture(autouse=True)
def _seeded():
    """Deterministic random inputs in every test."""
    import torch
    torch.manual_seed(1234)
