"""Generation with the causal LM's recurrent path: the prompts run through the parallel
forward once (`TransNormerModel.prefill`), then every new token costs one `step`.

    for tokens in generate(model, [[5, 17, 9], [4]], max_new_tokens=32, sampling=Sampling(temperature=0)):
        ...  # tokens: [B], the next token of every prompt

Prompts of different lengths are left-padded (`left_pad`): each row's real tokens end at
the last column and sit at positions 0..len-1, as they would alone; padding keys are zero
or masked in every layer, so no padding reaches any state, and every row's tokens are
those it would get alone (greedy; a draw at a temperature depends on the batch, since the
rows share one generator).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .sampling import Sampling, next_tokens


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (input_ids [B, N], valid [B, N]): each prompt right-aligned, `pad_id` before it
    (any id: padding is masked), valid False on the padding."""
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), n), dtype=torch.bool)
    for i, prompt in enumerate(prompts):
        ids[i, n - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        valid[i, n - len(prompt):] = True
    return ids.to(device), valid.to(device)


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
             stop_ids: Sequence[int] = ()) -> Iterator[torch.Tensor]:
    """Streams the new tokens: yields [B] (one per prompt) per step, at most max_new_tokens
    times, and stops early once every row has produced one of `stop_ids`. A row that has
    stopped goes on yielding tokens while others have not (`generate_tokens` cuts them).
    The model must be in eval mode (no dropout)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if model.training:
        raise ValueError("the model is in training mode (dropout is on): call model.eval() before generating")
    device = model.embedding.weight.device
    ids, valid = left_pad(prompts, device=device)
    if max_new_tokens == 0:
        return
    last = torch.zeros_like(valid)
    last[:, -1] = True  # every row's last real token: project only those onto the vocabulary
    generator = sampling.generator(device)
    stops = torch.as_tensor(list(stop_ids), dtype=torch.long, device=device)
    stopped = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    # inference_mode around each model call, not around the loop: a generator suspended
    # inside the context would leave it on for the caller between tokens.
    with torch.inference_mode():
        logits, cache = model.prefill(ids, None if bool(valid.all()) else valid, output_mask=last)
    for i in range(max_new_tokens):
        tokens = next_tokens(logits, sampling, generator)
        yield tokens
        stopped |= torch.isin(tokens, stops)
        if i == max_new_tokens - 1 or bool(stopped.all()):
            return
        with torch.inference_mode():
            logits = model.step(tokens[:, None], cache)[:, 0]


def generate_tokens(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                    stop_ids: Sequence[int] = ()) -> list[list[int]]:
    """Every prompt's new tokens, each list ending before its first stop id (if any)."""
    out: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    stop = set(int(s) for s in stop_ids)
    for tokens in generate(model, prompts, max_new_tokens, sampling, stop_ids):
        for row, token in enumerate(tokens.tolist()):
            if not stopped[row]:
                stopped[row] = token in stop
                if not stopped[row]:
                    out[row].append(token)
    return out
