"""The megatron-core config our TP layers are built with, derived from ModelConfig."""
from __future__ import annotations

import torch
from megatron.core.model_parallel_config import ModelParallelConfig

from ..parallel.tensor_parallel import tp_size


def megatron_config() -> ModelParallelConfig:
    """Parameters are created in fp32 on the CPU and left uninitialised: we draw them
    ourselves (layout-independent init); the runtime casts and moves them."""
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size(),
        sequence_parallel=False,
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        params_dtype=torch.float32,
    )


def unused_init(tensor):
    """megatron's init_method slot; never called because perform_initialization=False."""
    raise RuntimeError("megatron initialisation is disabled; see parallel.tensor_parallel.declare_init")
