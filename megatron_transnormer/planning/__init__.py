"""Memory planning: per-GPU memory of a config and parallel layout, and the longest context
that fits (planner.py), from per-token activation formulas (activations.py) and
DeepSpeed's state layout (states.py), held to measurements of real forwards and steps
(saved.py, measure.py). `tools/plan.py` prints the table."""
from .planner import GIB, GPU_GIB, HEADROOM, MemoryPlan, gpu_capacity_bytes, plan_memory
from .saved import saved_activation_bytes

__all__ = ["GIB", "GPU_GIB", "HEADROOM", "MemoryPlan", "gpu_capacity_bytes", "plan_memory",
           "saved_activation_bytes"]
