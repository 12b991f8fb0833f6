"""What autograd keeps for the backward: the bytes of the tensors a forward saves.

Every tensor an operation saves for its backward passes through the pack hook of
`torch.autograd.graph.saved_tensors_hooks`, including the inputs of a non-reentrant
`torch.utils.checkpoint` region (the region's inner tensors are held by checkpoint's own
hook and are not kept). Views share their base's storage (a segment of q is q), so the
count is over distinct storages, each at its full size; parameters (and anything sharing
their storage) are excluded, since they live with the model, not with the micro-batch.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def saved_activation_bytes(forward: Callable[[], object],
                           parameters: Iterable[torch.Tensor] = ()) -> tuple[object, int]:
    """Run `forward()` and return (its result, bytes of the distinct storages saved for backward
    that are not those of `parameters`). Keep the result alive until the bytes are used: the
    saved tensors belong to its graph."""
    excluded = {p.untyped_storage().data_ptr() for p in parameters}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            if storage.data_ptr() not in excluded:
                sizes[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    return result, sum(sizes.values())
