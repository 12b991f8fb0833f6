"""The `mpu` object DeepSpeed's plain engine asks for, answered by megatron-core's parallel_state.

DeepSpeed speaks the vocabulary of the old Megatron `mpu`, where "model parallel" meant
tensor parallel; megatron-core's own `get_model_parallel_group` is TP x PP. DeepSpeed uses
the model-parallel group to sum gradient norms over shards and to skip TP duplicates,
so here "model parallel" is the tensor-parallel group. The pipeline engine builds its own
groups from a `PipeModelDataParallelTopology` (same rank order, see process_groups).
"""
from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps


class MegatronMPU:
    """Forwards DeepSpeed's mpu queries to megatron-core's parallel_state."""

    # Tensor parallel, under both names DeepSpeed uses.
    def get_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    # Data parallel, for DeepSpeed: the ranks that hold the same parameters and average their
    # gradients, i.e. data x context parallel (context-parallel ranks see other slices of
    # the same samples; the data loader shards over data parallelism alone).
    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    # Pipeline parallel.
    def get_pipeline_model_parallel_rank(self) -> int:
        return ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()

    def is_pipeline_first_stage(self) -> bool:
        return ps.is_pipeline_first_stage()

    def is_pipeline_last_stage(self) -> bool:
        return ps.is_pipeline_last_stage()
