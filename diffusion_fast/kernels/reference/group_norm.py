"""Reference GroupNorm(+SiLU): float32, two-pass statistics."""

from __future__ import annotations

import torch


def available() -> str | None:
    return None


def supports(**call) -> str | None:
    return None


def forward(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, add=None):
    N, C = x.shape[:2]
    bshape = (1, C) + (1,) * (x.dim() - 2)
    h = x.float()
    if add is not None:
        h = h + add.float().view((N, C) + (1,) * (x.dim() - 2))
    g = h.reshape(N, num_groups, -1)
    mean = g.mean(dim=-1, keepdim=True)
    var = (g - mean).square().mean(dim=-1, keepdim=True)
    y = ((g - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    if weight is not None:
        y = y * weight.float().view(bshape) + bias.float().view(bshape)
    if activation == "silu":
        y = torch.nn.functional.silu(y)
    out = torch.empty_like(x)  # keeps x's memory format (contiguous or channels_last)
    out.copy_(y)
    return out
