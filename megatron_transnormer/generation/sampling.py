"""The next token from a row of logits: greedy (temperature 0), or a draw at a temperature
from the top-k tokens and the top-p nucleus, from a seeded generator."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """temperature: logits are divided by it before the softmax; 0 is greedy (argmax, no draw).
    top_k: keep the k most likely tokens (0: all). top_p: keep the smallest set of most likely
    tokens whose probability reaches p (1: all). seed: the generator's seed, so the same
    prompts, model and settings give the same tokens."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: no limit), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A generator seeded with `seed` on `device`; None when greedy (nothing is drawn)."""
        return None if self.greedy else torch.Generator(device=device).manual_seed(self.seed)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [..., V] with every token outside the top k and outside the top-p nucleus set to
    -inf. The nucleus is taken from the softmax of these logits: a token stays if the tokens
    more likely than it hold less than top_p of the probability (the most likely always stays).
    Tokens tied with the k-th stay too."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # the probability of the more likely tokens
        logits = logits.masked_fill((before >= top_p).scatter(-1, order, before >= top_p), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> the next token of every row [B] (int64)."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    if generator is None:
        raise ValueError("sampling at a temperature > 0 needs a generator (Sampling.generator)")
    scaled = logits.to(torch.promote_types(logits.dtype, torch.float32)) / sampling.temperature
    probs = filter_logits(scaled, sampling.top_k, sampling.top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
