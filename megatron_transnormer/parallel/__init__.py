"""Process groups (megatron-core parallel_state), DeepSpeed's mpu adapter, TP helpers.

Knows nothing of the model.
"""
from .deepspeed_mpu import MegatronMPU
from .process_groups import (Layout, current_layout, destroy_distributed, expand_nodelist,
                             init_distributed, read_launch_env)

__all__ = ["Layout", "MegatronMPU", "current_layout", "destroy_distributed", "expand_nodelist",
           "init_distributed", "read_launch_env"]
