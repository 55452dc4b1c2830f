"""Attention through ``torch.nn.functional.scaled_dot_product_attention``.

The op's layout is ``[B, S, H, D]``; SDPA takes ``[B, H, S, D]``. The inputs are passed as ``transpose(1, 2)``
views (no copy: SDPA reads strides, and its CUDA kernels want exactly this layout, a contiguous last dim with
heads between sequence rows), and the output is transposed back. The flash and cuDNN kernels already write
``[B, S, H, D]`` order, so the final ``contiguous()`` is a no-op there and a copy only where a kernel wrote
``[B, H, S, D]`` order.

torch picks among its kernels per call (cuDNN, flash, memory-efficient, math on CUDA; a fused kernel with
float32 accumulation on CPU). Their numerics are those of a flash-attention kernel: scores and softmax in
float32, the probabilities rounded to the input dtype for the second product; the tests hold them to the same
rule as the other backends (``kernels/reference/oracle.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def available() -> str | None:
    return None


def supports(q, k, v, scale) -> str | None:
    return None


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]`` -> ``[B, Sq, H, D]`` contiguous in q's dtype."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2).contiguous()
