"""Per-GPU memory of a config and layout: static state, activations, transients, the peak,
and the longest context that fits.

    plan = plan_memory(cfg, world_size=8)          # cfg: a validated Config
    plan.rows, plan.peak_bytes, plan.max_context(capacity_bytes)

The peak of a training step is the static state (parameters, gradients, fp32 master
weights, Adam moments) plus the larger of
  * the backward's start: every micro-batch in flight keeps its saved activations, plus
    the larger transient of the loss (logits) and of one block's recomputation, and
  * the optimizer step: the fp32 gradients of what this rank steps (activations are gone).
The backward's transient is the larger of the logits at the loss and the recomputation's
working set less what the head's backward has freed by then (activations.py).
Every pipeline stage is planned and the worst one reported; 1F1B keeps up to PP
micro-batches in flight on the first stage (PP - s on stage s).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..model.spec import block_specs, norm_kind
from . import activations as act
from .states import StageParameters, stage_layers, stage_parameters, state_bytes

GIB = 2 ** 30
# What a GPU sold as 80 GB (H100) or 141 GB (H200) offers to CUDA, in GiB (nvidia-smi's
# 81559 MiB and 143771 MiB).
GPU_GIB = {80: 79.6, 141: 140.4}
# Left free: the CUDA context, NCCL's buffers, the caching allocator's fragmentation and
# the kernels' workspaces are not in the model.
HEADROOM = 0.10


def gpu_capacity_bytes(gpu_memory: float) -> float:
    """Usable bytes of a GPU named by its size: 80 (H100), 141 (H200), or any size in GiB."""
    if gpu_memory <= 0:
        raise ValueError(f"--gpu-memory {gpu_memory}: must be positive (GiB, or 80 / 141 for H100 / H200)")
    return GPU_GIB.get(int(gpu_memory) if float(gpu_memory).is_integer() else gpu_memory, gpu_memory) * GIB


def widths(cfg, tensor: int | None = None) -> act.Widths:
    m, p = cfg.model, cfg.parallel
    return act.Widths(hidden=m.hidden_size, heads=m.num_heads, ffn=m.ffn_hidden_size, vocab=m.vocab_size,
                      act_bytes=act.F32 if cfg.train.precision == "fp32" else 2,
                      tp=p.tensor if tensor is None else tensor,
                      sequence_parallel=bool(getattr(p, "sequence", False)) and p.tensor > 1,
                      variant=m.variant, dropout=m.dropout > 0)


@dataclass(frozen=True)
class TokenBytes:
    """Activation bytes of one stage per token of a micro-batch on this rank."""

    saved: float  # kept for the backward, as configured
    saved_without_checkpointing: float
    saved_with_checkpointing: float
    recompute: float  # one block's recomputation in the backward (working set)
    loss_transient: float  # the logits at the loss, last stage only
    head_freed: float  # what the head's backward frees before any block recomputes (last stage)

    @property
    def transient(self) -> float:
        return max(self.loss_transient, self.recompute - self.head_freed, 0.0)


def stage_token_bytes(cfg, layers: range, first: bool, last: bool) -> TokenBytes:
    """Bytes per token of the stage holding `layers` (the embedding if first, the head if last)."""
    m, w = cfg.model, widths(cfg)
    specs = [block_specs(m)[i] for i in layers]
    recompute = m.recompute_attention
    full = [act.block_bytes(s.mixer, s.mlp, s.norm, w, recompute) for s in specs]
    common = act.embedding_bytes(w) if first else 0.0
    head = act.head_bytes(norm_kind(m) if m.norm_position == "pre" else None, w) + act.loss_saved_bytes(w)
    common += head if last else 0.0
    # Every recomputed region takes the positions as an input: one int64 tensor for all layers.
    recomputed = cfg.train.activation_checkpointing or (recompute and any(s.mixer != "softmax" for s in specs))
    common += act.INDEX if recomputed and specs else 0.0
    without = common + sum(full)
    with_ckpt = common + len(specs) * act.checkpointed_block_bytes(w)
    core = max((act.core_backward_bytes(s.mixer, w) for s in specs if recompute and s.mixer != "softmax"),
               default=0.0)
    # Checkpointing rebuilds a whole block in the backward; the core's recomputation rebuilds
    # one attention core (inside that block when both are on).
    working = (max(full, default=0.0) if cfg.train.activation_checkpointing else 0.0) + core
    return TokenBytes(saved=with_ckpt if cfg.train.activation_checkpointing else without,
                      saved_without_checkpointing=without, saved_with_checkpointing=with_ckpt,
                      recompute=working, loss_transient=act.loss_transient_bytes(w) if last else 0.0,
                      head_freed=head if last else 0.0)


@dataclass
class StagePlan:
    stage: int
    parameters: StageParameters
    in_flight: int
    tokens: int  # per micro-batch on this rank
    per_token: TokenBytes
    states: object  # StateBytes

    @property
    def static(self) -> float:
        s = self.states
        return s.parameters + s.gradients + s.master + s.moments + s.bucket

    def activations(self, tokens: int | None = None) -> float:
        t = self.tokens if tokens is None else tokens
        return self.in_flight * t * self.per_token.saved

    def transient(self, tokens: int | None = None) -> float:
        t = self.tokens if tokens is None else tokens
        return t * self.per_token.transient

    def peak(self, tokens: int | None = None) -> float:
        backward = self.activations(tokens) + self.transient(tokens)
        return self.static + max(backward, self.states.step_transient)


@dataclass
class MemoryPlan:
    cfg: object
    world_size: int
    seq_len: int
    stages: list[StagePlan] = field(default_factory=list)

    @property
    def worst(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.peak())

    @property
    def peak_bytes(self) -> float:
        return self.worst.peak()

    @property
    def data_parallel(self) -> int:
        p = self.cfg.parallel
        return self.world_size // (p.tensor * p.pipeline * p.context)

    def token_unit(self) -> int:
        """Sequence lengths must be multiples of this (context slices of whole DiagAttention
        blocks, and whole sequence-parallel slices)."""
        m, p = self.cfg.model, self.cfg.parallel
        unit = p.context * (m.block_size if "diag" in m.layers else 1)
        if widths(self.cfg).sequence_parallel:
            unit = unit * p.tensor // _gcd(unit, p.tensor)
        return unit

    def max_context(self, capacity_bytes: float, headroom: float = HEADROOM) -> int:
        """The longest sequence (micro-batch 1) whose peak on every stage stays within
        (1 - headroom) x capacity; 0 if not even the static state fits."""
        budget = capacity_bytes * (1.0 - headroom)
        cp, unit = self.cfg.parallel.context, self.token_unit()
        best = None
        for s in self.stages:
            per_token = s.in_flight * s.per_token.saved + s.per_token.transient
            room = budget - s.static
            if room <= 0 or budget < s.static + s.states.step_transient:
                return 0
            tokens = int(room // per_token) * cp  # tokens per sequence: each rank holds 1/cp
            best = tokens if best is None else min(best, tokens)
        return best // unit * unit

    def rows(self) -> list[tuple[str, float]]:
        """(what, bytes) of the worst stage, for the table."""
        s, t = self.worst, self.worst.tokens
        st = s.states
        return [("parameters", st.parameters), ("gradients", st.gradients), ("fp32 master weights", st.master),
                ("Adam moments", st.moments), ("ZeRO gradient reduce bucket", st.bucket),
                ("activations / micro-batch, no checkpointing", t * s.per_token.saved_without_checkpointing),
                ("activations / micro-batch, block checkpointing", t * s.per_token.saved_with_checkpointing),
                (f"activations kept ({s.in_flight} micro-batch{'es' if s.in_flight > 1 else ''} in flight, "
                 f"{'checkpointing' if self.cfg.train.activation_checkpointing else 'no checkpointing'})",
                 s.activations()),
                ("recompute working set (backward)", t * s.per_token.recompute),
                ("logits transient (loss)", t * s.per_token.loss_transient),
                ("optimizer-step transient (fp32 gradients)", st.step_transient),
                ("peak", s.peak())]


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def plan_memory(cfg, world_size: int, seq_len: int | None = None) -> MemoryPlan:
    """cfg: a Config validated for world_size; seq_len: tokens per sequence (default data.seq_len)."""
    p, t = cfg.parallel, cfg.train
    seq_len = seq_len or cfg.data.seq_len
    if seq_len <= 0:
        raise ValueError("data.seq_len is 0 (taken from the dataset manifest at training time): set "
                         "data.seq_len=N or pass the sequence length")
    if cfg.model.vocab_size <= 0:
        raise ValueError("model.vocab_size is 0 (taken from the dataset manifest at training time): set "
                         "model.vocab_size=N")
    plan = MemoryPlan(cfg, world_size, seq_len)
    replicas = plan.data_parallel * p.context
    accumulation = t.global_batch_size // (t.micro_batch_size * plan.data_parallel)
    tokens = t.micro_batch_size * seq_len // p.context
    for stage in range(p.pipeline):
        layers = stage_layers(cfg.model.num_layers, p.pipeline, stage)
        params = stage_parameters(cfg.model, p.tensor, p.pipeline, stage)
        in_flight = min(p.pipeline - stage, accumulation) if p.pipeline > 1 else 1
        plan.stages.append(StagePlan(stage, params, in_flight, tokens,
                                     stage_token_bytes(cfg, layers, stage == 0, stage == p.pipeline - 1),
                                     state_bytes(params, t.precision, p.zero_stage, replicas)))
    return plan
