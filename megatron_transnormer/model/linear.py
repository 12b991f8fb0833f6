"""Column/row-parallel linears from megatron-core with our (declared) initialisation.

Under sequence parallelism (parallel/sequence.py) their forward gathers the sequence
(column) or reduce-scatters it (row) on the model's batch-first layout; the parameters
and their TP split are megatron's either way.
"""
from __future__ import annotations

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from ..parallel import sequence
from ..parallel.tensor_parallel import declare_init, tp_group
from .megatron_config import megatron_config, unused_init


class ColumnLinear(ColumnParallelLinear):
    def forward(self, x, *args, **kwargs):
        if sequence.enabled():
            return sequence.column_linear(x, self.weight, self.bias), None
        return super().forward(x, *args, **kwargs)


class RowLinear(RowParallelLinear):
    def forward(self, x):
        if sequence.enabled():
            return sequence.row_linear(x, self.weight, self.bias), None
        return super().forward(x)


def column_linear(d_in: int, d_out: int, weight_init, bias_init) -> ColumnLinear:
    """y = x Wᵀ + b with W's rows (outputs) split over TP; returns the local shard of y."""
    layer = ColumnLinear(d_in, d_out, config=megatron_config(), init_method=unused_init,
                         bias=True, gather_output=False, tp_group=tp_group())
    declare_init(layer.weight, weight_init, partition_dim=0)
    declare_init(layer.bias, bias_init, partition_dim=0)
    return layer


def row_linear(d_in: int, d_out: int, weight_init, bias_init) -> RowLinear:
    """y = x Wᵀ + b from a TP-sharded input; W's columns split, the output all-reduced, b replicated."""
    layer = RowLinear(d_in, d_out, config=megatron_config(), init_method=unused_init,
                      bias=True, input_is_parallel=True, skip_bias_add=False,
                      tp_group=tp_group())
    declare_init(layer.weight, weight_init, partition_dim=1)
    declare_init(layer.bias, bias_init, partition_dim=None)
    return layer
