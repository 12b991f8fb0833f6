"""LRPE, the linearised relative positional encoding (spec §5).

LRPE(x_t) = R(θ, t) · H · x_t with H = I − 2uuᵀ (a fixed Householder reflection, u a random
unit vector per attention module) and R(θ, t) rotating each interleaved pair
(x_{2i}, x_{2i+1}) by θ_i·t. Both R and H are orthogonal and R(θ,s)ᵀR(θ,t) = R(θ,t−s),
so LRPE(q_s)·LRPE(k_t) depends on s − t only.
"""
from __future__ import annotations

import torch
from torch import nn

from ..parallel.tensor_parallel import declare_init, replicated_param
from .init import lrpe_theta, random_unit_vector


class LRPE(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        # θ is learned; u is fixed but a Parameter (requires_grad=False) so it is saved and
        # counted like the original's. Both are shared by all heads, replicated over TP.
        self.theta = nn.Parameter(torch.empty(head_dim // 2))
        self.u = nn.Parameter(torch.empty(head_dim), requires_grad=False)
        declare_init(self.theta, lrpe_theta)
        declare_init(self.u, random_unit_vector)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, H, N, D]; positions: [B or 1, N] integers (any offset: only differences matter)."""
        acc = torch.promote_types(x.dtype, torch.float32)
        xf, u = x.to(acc), self.u.to(acc)
        u = u / u.norm()  # keeps H a reflection when the runtime stores u in bf16
        xf = xf - 2.0 * (xf @ u).unsqueeze(-1) * u  # H x
        # Each rank sees only its heads: sum θ's gradient over the TP group.
        angle = positions.to(acc)[:, None, :, None] * replicated_param(self.theta).to(acc)  # [B|1, 1, N, D/2]
        cos, sin = angle.cos(), angle.sin()
        even, odd = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return out.flatten(-2).to(x.dtype)
