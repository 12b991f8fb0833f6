"""The plan as a markdown table, in GiB per GPU."""
from __future__ import annotations

from .planner import GIB, GPU_GIB, HEADROOM, MemoryPlan, gpu_capacity_bytes


def layout_line(plan: MemoryPlan) -> str:
    cfg, p = plan.cfg, plan.cfg.parallel
    sp = " + sequence parallel" if getattr(p, "sequence", False) and p.tensor > 1 else ""
    return (f"{cfg.name}: {plan.world_size} GPUs = tensor {p.tensor}{sp} x context {p.context} x pipeline "
            f"{p.pipeline} x data {plan.data_parallel}; ZeRO {p.zero_stage}, {cfg.train.precision}, "
            f"micro-batch {cfg.train.micro_batch_size} x {plan.seq_len:,} tokens "
            f"({plan.worst.tokens:,} per rank), activation checkpointing "
            f"{'on' if cfg.train.activation_checkpointing else 'off'}, attention-core recomputation "
            f"{'on' if cfg.model.recompute_attention else 'off'}")


def markdown(plan: MemoryPlan, gpu_memory: float = 80, headroom: float = HEADROOM) -> str:
    worst = plan.worst
    lines = [layout_line(plan), "",
             f"| per GPU (pipeline stage {worst.stage}) | GiB |", "|---|---:|"]
    lines += [f"| {'**peak**' if name == 'peak' else name} | "
              f"{'**' if name == 'peak' else ''}{value / GIB:.2f}{'**' if name == 'peak' else ''} |"
              for name, value in plan.rows()]
    capacity = gpu_capacity_bytes(gpu_memory)
    budget = capacity * (1 - headroom)
    verdict = "fits" if plan.peak_bytes <= budget else "does NOT fit"
    lines += ["", f"{verdict} one GPU of {gpu_memory:g} GB ({capacity / GIB:.1f} GiB usable, "
                  f"{headroom:.0%} left as headroom: budget {budget / GIB:.1f} GiB)", "",
              "| GPU | longest context (tokens per sequence, micro-batch 1) |", "|---|---:|"]
    for size in GPU_GIB:
        lines.append(f"| {size} GB | {plan.max_context(gpu_capacity_bytes(size), headroom):,} |")
    return "\n".join(lines)
