"""The DeepSpeed config dict, from the project's Config. Every setting that matters is explicit."""
from __future__ import annotations

from megatron_transnormer.config import Config


def deepspeed_config(cfg: Config, dp_size: int, cp_size: int, deepspeed_clips: bool) -> dict:
    """deepspeed_clips: whether DeepSpeed applies optim.clip_grad itself (see grad_norm.py).

    When it does not, `gradient_clipping` is 0 rather than absent: DeepSpeed's default
    clips at 1.0. DeepSpeed's data-parallel group is data x context parallel (the ranks
    that average gradients), and it checks that its batch size is micro-batch x
    accumulation x that group's size, so each context-parallel slice counts as a sample.
    """
    t, p = cfg.train, cfg.parallel
    accumulation = t.global_batch_size // (t.micro_batch_size * dp_size)
    return {
        "train_batch_size": t.micro_batch_size * accumulation * dp_size * cp_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.optim.clip_grad if deepspeed_clips else 0.0,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": {"stage": p.zero_stage},
        # A torch AdamW (nothing to compile) under ZeRO.
        "zero_allow_untested_optimizer": True,
        # The training loop logs; DeepSpeed's own progress lines would interleave with it.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # The pipeline engine sends each stage's activation split over the TP ranks and
        # all-gathers it on arrival, which assumes every TP rank holds the same tensor; under
        # sequence parallelism each holds its own slice of the sequence, sent whole.
        "pipeline": {"pipe_partitioned": not p.sequence, "grad_partitioned": not p.sequence},
    }
