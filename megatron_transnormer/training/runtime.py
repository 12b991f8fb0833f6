"""The DeepSpeed runtime: one object that builds the engine, runs an update, evaluates, checkpoints.

    rt = build_runtime(cfg, layout, objective)
    rt.train_step(batch_iter) -> StepResult        one optimizer update (its order: `train_step`)
    rt.eval_batch(batch) -> (loss_sum, n_labels)   summed over the data-parallel group (+ n_correct: classifiers)
    rt.save_checkpoint(root, step, client_state, rank_state) -> path
    rt.load_checkpoint(path) -> (client_state, rank_state)   this layout's, or a layout-free one

Pipeline size 1 uses DeepSpeed's plain engine (ZeRO 0-3) with megatron-core's groups
through the mpu adapter; pipeline > 1 uses DeepSpeed's PipelineEngine (ZeRO 0-1) over a
PipelineModule whose topology has the same rank order as megatron-core (checked at build).
Batches are the data stream's `TokenBatch`es; the objective (objectives.py) turns each
into the model's inputs and labels.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

import deepspeed
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_transnormer.config import Config, ConfigError, config_to_dict, validate_config
from megatron_transnormer.model import build_model
from megatron_transnormer.parallel import Layout, MegatronMPU, context

from . import checkpoint, universal
from .checkpoint import latest_checkpoint
from .deepspeed_config import deepspeed_config
from .grad_norm import NormAndClip, counted_here
from .objectives import build_objective, label_count
from .optimizer import build_optimizer
from .pipeline import Wire, build_pipeline_module
from .schedules import build_scheduler

__all__ = ["Runtime", "StepResult", "build_runtime", "latest_checkpoint"]


@dataclass
class StepResult:
    loss: float  # mean loss per labelled token over the global batch, identical on every rank
    grad_norm: float  # global L2 norm before clipping, every parameter counted once
    lr: float  # the learning rate this update used
    tokens: int  # input positions in the global batch
    labels: int  # labelled (scored) tokens in the global batch
    skipped: bool  # the optimizer skipped the update (non-finite gradients)


def _deepspeed_clips(cfg: Config) -> bool:
    """Whether DeepSpeed measures and clips the gradient norm (else NormAndClip does).

    At ZeRO 0 the torch optimizer is handed whole per-parameter gradients: the model's
    own (fp32) or fp32 master copies (bf16). DeepSpeed's norm there is wrong under
    pipeline x tensor parallelism (fp32) and under tensor parallelism (bf16: its
    FP16_UnfusedOptimizer drops every gradient of TP ranks > 0), so we compute it. The
    ZeRO 1-3 optimizers compute it from their own partitions, counting each parameter once.
    """
    return cfg.parallel.zero_stage > 0


def _carry_parallel_attributes(engine) -> None:
    """Give the fp32 master copies of FP16_UnfusedOptimizer (bf16 at ZeRO 0) the TP/PP
    attributes of the parameters they copy, which the norm counts by (grad_norm.py)."""
    attrs = ("tensor_model_parallel", "partition_dim", "partition_stride", "ds_pipe_replicated")
    for low_group, master_group in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups, strict=True):
        for low, master in zip(low_group, master_group, strict=True):
            for attr in attrs:
                if hasattr(low, attr):
                    setattr(master, attr, getattr(low, attr))


def _attach_deepspeed_comm() -> None:
    """DeepSpeed's communication layer over the existing torch process group.

    Needed before a PipelineModule is built (it asks deepspeed.comm for ranks). Its CPU
    backend would first compile a shared-memory op (~25 s, needs a C++ toolchain); gloo
    does the job, so the op is marked unavailable (without probing all ops).
    """
    vars(deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=dist.get_backend())


def _ranks(group) -> list[int]:
    return sorted(dist.get_process_group_ranks(group))


def _check_rank_order(engine, layout: Layout) -> None:
    """DeepSpeed's groups must be megatron-core's: a silent mismatch would mix shards."""
    ps = parallel_state
    mine = {"data": _ranks(ps.get_data_parallel_group(with_context_parallel=True)),
            "pipe": _ranks(ps.get_pipeline_model_parallel_group()),
            "tensor": _ranks(ps.get_tensor_model_parallel_group())}
    if layout.pp_size > 1:
        grid = engine.grid
        theirs = {"data": sorted(grid.dp_group), "pipe": sorted(grid.pp_group),
                  "tensor": sorted(grid.slice_group)}
        if grid.get_stage_id() != layout.pp_rank:
            raise RuntimeError(f"rank {layout.rank}: DeepSpeed stage {grid.get_stage_id()} "
                               f"!= megatron pipeline rank {layout.pp_rank}")
    else:
        theirs = {"data": _ranks(engine.data_parallel_group), "pipe": mine["pipe"],
                  "tensor": _ranks(engine.mpu.get_model_parallel_group())}
    if theirs != mine:
        raise RuntimeError(f"rank {layout.rank}: DeepSpeed's process groups {theirs} differ from "
                           f"megatron-core's {mine}")


def _count_parameters(model: torch.nn.Module, device: torch.device) -> int:
    """Parameters of the whole model: this rank's counted ones, summed over TP x PP."""
    n = sum(p.numel() for p in model.parameters() if counted_here(p))
    total = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return int(total.item())


def _dp_sum(values: list[torch.Tensor], device: torch.device) -> list[float]:
    """Sums of a few scalars over every rank that holds a different part of the batch (data
    parallel x context parallel), in fp64, in one all-reduce."""
    t = torch.stack([v.to(device=device, dtype=torch.float64).reshape(()) for v in values])
    dist.all_reduce(t, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return t.tolist()


class Runtime:
    def __init__(self, cfg: Config, layout: Layout, engine, optimizer: torch.optim.Optimizer,
                 norm_hook: NormAndClip | None, num_parameters: int, objective):
        self.cfg, self.layout, self.engine = cfg, layout, engine
        self.model_cfg = cfg.model
        self.objective = objective
        self._optimizer = optimizer  # the torch AdamW; the LR schedule writes its param groups
        self._norm_hook = norm_hook
        self.pipelined = layout.pp_size > 1
        self._wire = Wire(cfg.model) if self.pipelined else None
        t = cfg.train
        self.grad_accum = t.global_batch_size // (t.micro_batch_size * layout.dp_size)
        # The ranks DeepSpeed averages gradients over: data parallel x context parallel.
        self.replicas = layout.dp_size * layout.cp_size
        self.num_parameters = num_parameters  # the full model's, each parameter counted once

    def _prepare(self, batch) -> tuple[tuple, torch.Tensor]:
        """The objective's (model inputs, labels) of a batch, this context-parallel rank's slice
        of the sequence (labels were shifted before slicing), on this rank's device."""
        inputs, labels = self.objective.prepare(batch)
        device = self.layout.device
        return tuple(context.local_slice(t).to(device) for t in inputs), context.local_slice(labels).to(device)

    # ------------------------------------------------------------------ training
    def train_step(self, batch_iter) -> StepResult:
        """One optimizer update over `grad_accum` micro-batches pulled from batch_iter:

        1. the objective turns every micro-batch into model inputs and labels;
        2. the labelled tokens of all micro-batches and data-parallel ranks are counted
           (one all-reduce), before any backward;
        3. forward and backward of each micro-batch, its loss sum scaled by
           grad_accum x replicas / count: DeepSpeed averages the micro-batches' gradients
           and then the ranks' (data x context parallel), so what accumulates is the
           gradient of (Σ every labelled token's loss) / count;
        4. at the last micro-batch DeepSpeed all-reduces the gradients over data (x context)
           parallelism; the global norm is measured and the gradients clipped (NormAndClip
           at ZeRO 0, DeepSpeed's ZeRO optimizers otherwise; a non-finite norm skips the
           update); the optimizer steps; the LR schedule advances.
        """
        micro_batches = list(islice(batch_iter, self.grad_accum))
        if len(micro_batches) < self.grad_accum:
            raise StopIteration(f"the batch iterator ran out ({len(micro_batches)} of {self.grad_accum} "
                                f"micro-batches for this update)")
        lr = float(self._optimizer.param_groups[0]["lr"])
        skipped_before = self.engine.skipped_steps
        prepared = [self._prepare(b) for b in micro_batches]  # 1
        (count,) = _dp_sum([sum(label_count(labels) for _, labels in prepared)], self.layout.device)  # 2
        scale = self.grad_accum * self.replicas / max(count, 1.0)
        loss_sum = self._train_pipelined(prepared, scale) if self.pipelined else self._train_plain(prepared, scale)
        if self._norm_hook is not None:
            grad_norm = self._norm_hook.last_norm
        else:
            grad_norm = self.engine.get_global_grad_norm()
        seq_len = prepared[0][0][0].shape[1] * self.layout.cp_size  # input ids: [micro_batch, this slice]
        tokens = self.cfg.train.global_batch_size * seq_len
        return StepResult(loss=loss_sum / max(count, 1.0),
                          grad_norm=float("nan") if grad_norm is None else float(grad_norm),
                          lr=lr, tokens=tokens, labels=int(count), skipped=self.engine.skipped_steps > skipped_before)

    def _train_plain(self, prepared, scale: float) -> float:
        sums = []
        for inputs, labels in prepared:  # 3
            loss_sum = self.objective.loss_sum(self.engine(*inputs), labels)
            self.engine.backward(loss_sum * scale)  # DeepSpeed divides by grad_accum inside
            self.engine.step()  # 4: acts only at the accumulation boundary (the last micro-batch)
            sums.append(loss_sum.detach())
        return _dp_sum([torch.stack(sums).sum()], self.layout.device)[0]

    def _train_pipelined(self, prepared, scale: float) -> float:
        loss_fn = self.engine.module.loss_fn
        loss_fn.scale, loss_fn.sums = scale, []
        self.engine.train_batch(iter([(self._wire.pack(inputs), labels) for inputs, labels in prepared]))  # 3, 4
        return self._last_stage_sum(loss_fn.sums)

    def _last_stage_sum(self, sums: list[torch.Tensor]) -> float:
        """The loss sums exist on the last stage: total them over DP and send the total to every stage."""
        local = torch.stack(sums).sum() if sums else torch.zeros(())
        total = torch.tensor([_dp_sum([local], self.layout.device)[0]], dtype=torch.float64, device=self.layout.device)
        group = parallel_state.get_pipeline_model_parallel_group()
        dist.broadcast(total, src=dist.get_global_rank(group, self.layout.pp_size - 1), group=group)
        return float(total[0])

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def eval_batch(self, batch) -> tuple:
        """The objective's loss sum and the number of labelled tokens, summed over the DP group;
        a classifier's (its objective has `correct`) adds the samples answered right."""
        inputs, labels = self._prepare(batch)
        if self.pipelined:
            loss_sum = self._eval_pipelined(inputs, labels)
            (count,) = _dp_sum([label_count(labels)], self.layout.device)
            return loss_sum, int(count)
        self.engine.eval()
        try:
            output = self.engine(*inputs)
            local = self.objective.loss_sum(output, labels)
            scored = [self.objective.correct(output, labels)] if hasattr(self.objective, "correct") else []
        finally:
            self.engine.train()
        loss_sum, count, *correct = _dp_sum([local, label_count(labels), *scored], self.layout.device)
        return (loss_sum, int(count), *(int(c) for c in correct))

    def _eval_pipelined(self, inputs, labels) -> float:
        engine, loss_fn = self.engine, self.engine.module.loss_fn
        # An evaluation batch may differ in shape from training micro-batches: make the
        # stages exchange tensor shapes again, now and at the next training step.
        engine.reset_activation_shape()
        loss_fn.scale, loss_fn.sums = 1.0, []
        try:
            engine.eval_batch(iter([(self._wire.pack(inputs), labels)]), num_micro_batches=1, reduce_output=None,
                              bcast_loss=False)
        finally:
            engine.reset_activation_shape()
            engine.train()
        return self._last_stage_sum(loss_fn.sums)

    # --------------------------------------------------------------- checkpoints
    def save_checkpoint(self, root, step: int, client_state: dict, rank_state: dict) -> str:
        client_state = dict(client_state)
        client_state.setdefault("config", config_to_dict(self.cfg))
        return checkpoint.save(self.engine, self.layout, root, step, client_state, rank_state,
                               keep=self.cfg.train.keep_checkpoints,
                               meta=checkpoint.layout_record(self.cfg, self.layout.world_size))

    def load_checkpoint(self, path) -> tuple[dict, dict]:
        """A checkpoint of this layout, or a layout-free one (universal.py) of any layout."""
        if universal.is_layout_free(path):
            return universal.load(self, path)
        return checkpoint.load(self.engine, self.layout, path)


def build_runtime(cfg: Config, layout: Layout, objective=None) -> Runtime:
    """Build the model, optimizer, LR schedule and DeepSpeed engine for this rank.

    objective: from `objectives.build_objective(cfg, dataset_info)`; None builds the one
    cfg.model.head trains, which works where the objective needs nothing from the data
    (the causal LM)."""
    # 1. Refuse what cannot run: validate_config refuses ZeRO 2/3 and bf16 at ZeRO 0 with a
    #    pipeline, and layouts that do not fit the world. It ran before the process groups
    #    started; again here, so that no caller can skip it.
    validate_config(cfg, world_size=layout.world_size)
    p = cfg.parallel
    if (layout.tp_size, layout.pp_size, layout.cp_size) != (p.tensor, p.pipeline, p.context):
        raise ConfigError(f"parallel: the process groups are tensor {layout.tp_size} x pipeline {layout.pp_size} x "
                          f"context {layout.cp_size}, the config asks for {p.tensor} x {p.pipeline} x {p.context}")
    if objective is None:
        objective = build_objective(cfg)
    _attach_deepspeed_comm()

    # 2. The model: whole, or this pipeline stage's layers.
    seed, checkpointing = cfg.train.seed, cfg.train.activation_checkpointing
    if layout.pp_size > 1:
        model = build_pipeline_module(cfg.model, layout, seed, checkpointing, objective)
    else:
        model = build_model(cfg.model, seed)
        model.activation_checkpointing = checkpointing
    num_parameters = _count_parameters(model, layout.device)  # before ZeRO 3 partitions them

    # 3. Optimizer (AdamW, decay/no-decay groups) and LR schedule over it.
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)

    # 4. The engine. Who clips: DeepSpeed (ZeRO optimizers) or our step pre-hook.
    deepspeed_clips = _deepspeed_clips(cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      mpu=None if layout.pp_size > 1 else MegatronMPU(),
                                      config=deepspeed_config(cfg, layout.dp_size, layout.cp_size,
                                                              deepspeed_clips))
    _check_rank_order(engine, layout)
    if optimizer.state:
        # DeepSpeed's wrapper for bf16 at ZeRO 0 (FP16_UnfusedOptimizer) runs one
        # zero-gradient AdamW step to create the state. Forget it, so that the first real
        # update is Adam's step 1 as in every other layout (AdamW creates state lazily; that
        # step's weight decay, at warmup_init_lr, is below fp32 resolution).
        optimizer.state.clear()

    # 5. Gradient norm and clipping where DeepSpeed's are not used: a step pre-hook on the
    #    torch optimizer, which then holds whole, reduced, unscaled gradients.
    norm_hook = None
    if not deepspeed_clips:
        if isinstance(engine.optimizer, FP16_UnfusedOptimizer):
            _carry_parallel_attributes(engine)
        elif engine.optimizer is not optimizer:
            raise RuntimeError(f"at ZeRO 0 DeepSpeed was expected to step the torch optimizer (fp32) or "
                               f"FP16_UnfusedOptimizer (bf16), got {type(engine.optimizer).__name__}")
        norm_hook = NormAndClip(cfg.optim.clip_grad)
        optimizer.register_step_pre_hook(norm_hook)
    return Runtime(cfg, layout, engine, optimizer, norm_hook, num_parameters, objective)
