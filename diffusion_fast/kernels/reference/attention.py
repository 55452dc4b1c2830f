"""Reference attention: explicit float32 softmax, chunked over queries to bound memory."""

from __future__ import annotations

import torch

_MAX_SCORE_ELEMENTS = 1 << 26


def available() -> str | None:
    return None


def supports(**call) -> str | None:
    return None


def forward(q, k, v, scale):
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    kf = k.float().transpose(1, 2)  # [B, H, Sk, D]
    vf = v.float().transpose(1, 2)
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, B * H * Sk))
    for s0 in range(0, Sq, chunk):
        qf = q[:, s0:s0 + chunk].float().transpose(1, 2)  # [B, H, c, D]
        p = torch.softmax((qf @ kf.transpose(-1, -2)) * scale, dim=-1)
        out[:, s0:s0 + chunk] = (p @ vf).transpose(1, 2).to(q.dtype)
    return out
