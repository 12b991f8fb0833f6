"""Measured memory of real forwards and training steps, to hold the planner to.

`model_saved_bytes`: what one micro-batch's forward and loss keep for the backward on this
rank (`saved.saved_activation_bytes`), through the model the runtime trains, with this
rank's context-parallel slice of the sequence. `training_peak`: over real optimizer
updates of the DeepSpeed runtime, the peak of the bytes of live tensors created during
them (`LiveTensorBytes`: what a GPU's `max_memory_allocated` would count) and the growth
of the process's peak resident set. The resident set also holds the C heap's
fragmentation (with heap-only malloc, as bench/seq_scaling.py runs, freed blocks are
reused but a larger request that fits no hole grows the heap), which on CPU can double
the tensors' own peak; only a fresh process measures it (ru_maxrss only rises).
Both need the process groups (`parallel.init_distributed`) for cfg's layout.
"""
from __future__ import annotations

import resource
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..data.stream import TokenBatch
from ..model import build_model
from ..parallel import context
from ..training.objectives import build_objective
from .saved import saved_activation_bytes


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class LiveTensorBytes(TorchDispatchMode):
    """While active: the bytes of the CPU tensors' storages that operations create (`now`)
    and their maximum (`peak`). Every operation, the autograd engine's backward included,
    passes through the dispatcher; a storage counts from the operation that creates it
    until it is freed (a finalizer on the storage). Tensors made before, such as the
    parameters, do not count."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self._live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._live:
                    self._live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, key)
        return out


def random_batch(cfg, seed: int, seq_len: int | None = None) -> TokenBatch:
    """A micro-batch of random tokens for the causal LM (the content does not change memory)."""
    g = torch.Generator().manual_seed(seed)
    rows, n = cfg.train.micro_batch_size, seq_len or cfg.data.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (rows, n + 1), generator=g)
    return TokenBatch(tokens, torch.zeros(rows, 2, dtype=torch.long))


def _local(objective, batch):
    inputs, labels = objective.prepare(batch)
    return tuple(context.local_slice(t) for t in inputs), context.local_slice(labels)


def forward_saved_bytes(module, objective, batch) -> int:
    """Saved bytes of one forward + loss of `module` on `batch` (this rank's slice)."""
    inputs, labels = _local(objective, batch)
    loss, saved = saved_activation_bytes(lambda: objective.loss_sum(module(*inputs), labels), module.parameters())
    del loss  # frees the graph and what it saved
    return saved


def model_saved_bytes(cfg, seed: int = 1) -> int:
    """Build cfg's model as the runtime trains it (precision, checkpointing) and measure one
    micro-batch's saved bytes on this rank. cfg: a validated Config with data.seq_len set."""
    model = build_model(cfg.model, cfg.train.seed)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    if cfg.train.precision == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    return forward_saved_bytes(model, build_objective(cfg), random_batch(cfg, seed))


def warmup_unit(cfg) -> int:
    """What a sequence length must be a multiple of in cfg's layout."""
    return cfg.parallel.context * (cfg.model.block_size if "diag" in cfg.model.layers else 1)


def training_peak(cfg, layout, steps: int = 2) -> dict:
    """Run `steps` optimizer updates of the DeepSpeed runtime on random tokens, after one on a
    short sequence; return over them the peak of the tensor bytes they create and the growth
    of the peak RSS, and one micro-batch's saved bytes. Call it in a fresh process: the peak
    RSS of anything run before in it would hide the growth."""
    from ..training.runtime import build_runtime
    rt = build_runtime(cfg, layout)
    accumulation = rt.grad_accum

    def update(step: int, seq_len: int | None = None):
        # Every context-parallel rank of a replica sees the same samples; replicas differ.
        seeds = [(step * accumulation + i) * 1000 + layout.dp_rank for i in range(accumulation)]
        rt.train_step(iter([random_batch(cfg, s, seq_len) for s in seeds]))

    # A first update on a short sequence loads what the step imports lazily and creates the
    # optimizer state (both would count as growth) at a peak below the measured ones.
    update(0, max(cfg.data.seq_len // 16 // warmup_unit(cfg) * warmup_unit(cfg), warmup_unit(cfg)))
    before = peak_rss_bytes()
    with LiveTensorBytes() as live:
        for step in range(1, steps + 1):
            update(step)
    growth = peak_rss_bytes() - before
    saved = forward_saved_bytes(rt.engine.module, rt.objective, random_batch(cfg, 0))
    return {"peak_tensor_bytes": live.peak, "peak_rss_growth": growth, "saved_bytes": saved, "rank": layout.rank}
