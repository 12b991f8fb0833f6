"""The references with a memory-lean backward: what autograd keeps is q, k, v and, for
NormAttention, the state at each segment boundary; everything else is recomputed.

The chunked reference builds, per chunk, a [chunk, chunk] score matrix, a masked copy and
a new state, and autograd would keep all of them: several times the size of q, k and v at
any length. Here the sequence is cut into segments of SEGMENT tokens (whole chunks or
blocks), each run under `torch.utils.checkpoint`: the forward keeps only each segment's
inputs (views of q, k, v) and the state passed to the next segment; the backward reruns one
segment at a time, so its intermediates exist for one segment only. This is the Triton
kernels' memory contract (they save q, k, v and the chunk states), kept on the reference
path that CPU runs use. Values and gradients are the reference's: the same operations run
on the same segments, with the state carried exactly as the kernel's `initial_state`.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from . import reference

SEGMENT = 1024  # tokens recomputed at a time; a multiple of reference.CHUNK


def _recording(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def norm_attention(q, k, v, decay=None, initial_state=None, output_final_state: bool = False,
                   segment: int = SEGMENT):
    """Causal NormAttention -> (O, final state), as `reference.norm_attention(causal=True)`."""
    n = q.shape[2]
    if n <= segment or not _recording(q, k, v, initial_state):
        return reference.norm_attention(q, k, v, True, decay, initial_state, output_final_state)
    if segment % reference.CHUNK:
        raise ValueError(f"segment={segment} must be a multiple of the chunk ({reference.CHUNK})")

    def run(qs, ks, vs, state):
        return reference.norm_attention(qs, ks, vs, True, decay, state, True)

    outputs, state = [], initial_state
    for start in range(0, n, segment):
        part = slice(start, start + segment)
        # Every segment's state is needed by the next one; the last one only if asked for.
        o, state = checkpoint(run, q[:, :, part], k[:, :, part], v[:, :, part], state, use_reentrant=False)
        outputs.append(o)
    return torch.cat(outputs, dim=2), (state if output_final_state else None)


def diag_attention(q, k, v, block_size: int = 64, causal: bool = True, kind: str = "softmax",
                   dropout_p: float = 0.0, training: bool = False, key_mask=None, segment: int = SEGMENT):
    """Block-diagonal attention, as `reference.diag_attention`. Blocks are independent, so
    segments of whole blocks need nothing from each other; checkpoint replays the RNG, so a
    recomputed segment draws the same dropout mask."""
    n = q.shape[2]
    span = max(1, segment // block_size) * block_size
    if n <= span or not _recording(q, k, v):
        return reference.diag_attention(q, k, v, block_size, causal, kind, dropout_p, training, key_mask)

    def run(qs, ks, vs, mask):
        return reference.diag_attention(qs, ks, vs, block_size, causal, kind, dropout_p, training, mask)

    outputs = []
    for start in range(0, n, span):
        part = slice(start, start + span)
        mask = None if key_mask is None else key_mask[:, part]
        outputs.append(checkpoint(run, q[:, :, part], k[:, :, part], v[:, :, part], mask, use_reentrant=False))
    return torch.cat(outputs, dim=2)
