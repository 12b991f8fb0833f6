"""Channel mixers: TransNormer's SiLU GLU (spec §6) and the two-layer FFN (ReLU for the ALM
baselines, GELU for RoBERTa-style and LRA models). `build_mlp` picks one by `model.mlp`.

W_1, W_2 column-parallel (hidden split over TP), W_3 row-parallel; all layers keep
torch.nn.Linear's default initialisation, as the original code does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .init import linear_default
from .linear import column_linear, row_linear


class _SiluGate(torch.autograd.Function):
    """silu(a) ⊙ b, keeping only a and b for the backward (autograd would also keep silu(a)
    and its own copy of a: a third of the GLU's activation memory); silu(a) is recomputed
    there. Same values and gradients as the composed ops."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        sig = torch.sigmoid(a)
        silu = a * sig
        # d silu(a)/da = σ(a)(1 + a(1 − σ(a)))
        return grad * b * (sig * (1 + a * (1 - sig))), grad * silu


class GLU(nn.Module):
    """GLU(x) = W_3(silu(W_1 x) ⊙ W_2 x), all with bias, no inner dropout."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w1 = column_linear(d, hidden, linear_default(d), linear_default(d))
        self.w2 = column_linear(d, hidden, linear_default(d), linear_default(d))
        self.w3 = row_linear(hidden, d, linear_default(hidden), linear_default(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(_SiluGate.apply(self.w1(x)[0], self.w2(x)[0]))[0]


class FFN(nn.Module):
    """fairseq's feed-forward block: fc2(act(fc1 x)), act = relu or gelu."""

    def __init__(self, d: int, hidden: int, activation: str = "relu"):
        super().__init__()
        self.fc1 = column_linear(d, hidden, linear_default(d), linear_default(d))
        self.fc2 = row_linear(hidden, d, linear_default(hidden), linear_default(hidden))
        self.activation = {"relu": F.relu, "gelu": F.gelu}[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)[0]))[0]


def build_mlp(kind: str, d: int, hidden: int) -> nn.Module:
    """kind: glu | relu | gelu (model.mlp)."""
    return GLU(d, hidden) if kind == "glu" else FFN(d, hidden, activation=kind)
