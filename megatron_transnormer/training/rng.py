"""Every random-number state a training step can consume, per rank, for exact resume.

Dropout draws from torch's CPU or CUDA generator, and from megatron-core's model-parallel
RNG tracker when the model uses it; Python's and NumPy's generators are included in
case a data or augmentation path uses them.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def _tracker():
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    except ImportError:
        return None
    tracker = get_cuda_rng_tracker()
    return tracker if tracker.get_states() else None


def capture() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    tracker = _tracker()
    if tracker is not None:
        state["megatron_tracker"] = tracker.get_states()
    return state


def restore(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "megatron_tracker" in state:
        tracker = _tracker()
        if tracker is not None:
            tracker.set_states(state["megatron_tracker"])


def seed_all(seed: int, tp_rank: int, pp_rank: int, dp_rank: int, cp_rank: int = 0) -> None:
    """Seed the default generators, which dropout draws from, before the model is built.

    Tensor-parallel ranks get the same seed: the residual stream is replicated across
    them and its dropout masks must agree. Pipeline stages, data-parallel replicas and
    context-parallel slices get different streams. (tp_rank is taken only to make that
    choice explicit.)
    """
    del tp_rank
    parts = [seed, pp_rank, dp_rank] + ([cp_rank] if cp_rank else [])  # CP 1: the streams as before
    key = int(np.random.SeedSequence(parts).generate_state(1)[0])
    random.seed(key)
    np.random.seed(key)
    torch.manual_seed(key)  # also seeds every CUDA device
