"""Scaled dot-product attention, [B, S, H, D] layout, no mask (self- and cross-attention of a UNet)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import library, registry
from ._checks import check_finite_float, check_same_device, check_same_dtype, check_tensor

registry.register("attention", "torch", "diffusion_fast.kernels.reference.attention")
registry.register("attention", "triton", "diffusion_fast.kernels.triton.attention")
registry.register("attention", "cuda", "diffusion_fast.kernels.cuda.attention")
registry.register("attention", "sdpa", "diffusion_fast.kernels.sdpa.attention")

MAX_HEAD_DIM = 256
#: Largest ``|scale|``. Scores are computed in float32: with fp16 inputs (|x| <= 65504) and D <= 256,
#: |q.k * scale| <= 256 * 65504**2 * 2**16 ~ 7.2e16, far from float32's 3.4e38, so the scores of any finite fp16
#: call stay finite and the softmax never meets inf - inf. Real scales are 1/sqrt(D) <= 1 (or a learned
#: temperature of at most ~100); scale=1e38 overflowed ordinary fp16 scores and gave an all-NaN result.
MAX_SCALE = 2.0**16


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` per batch and head.

    Semantics (the ``"torch"`` reference): scores, softmax and the weighted sum in float32, result stored in
    ``q.dtype``.

    Args:
        q: ``[B, Sq, H, D]``; k, v: ``[B, Sk, H, D]``. Same dtype (float32/float16/bfloat16) and device.
            ``D`` is a multiple of 8, at most 256. Views whose last dim is contiguous (slices of a fused QKV
            projection) are accepted as they are; fast backends read them through their strides.
        scale: multiplies the scores; default ``1 / sqrt(D)``; finite, ``|scale| <= MAX_SCALE`` (65536).
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"`` or ``"sdpa"`` (torch's
            ``scaled_dot_product_attention``).

    Returns:
        ``[B, Sq, H, D]``, contiguous, ``q.dtype``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 [B, S, H, D], got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    check_same_dtype(q=q, k=k, v=v)
    device = check_same_device(q=q, k=k, v=v)
    B, Sq, H, D = q.shape
    if D % 8 != 0 or D > MAX_HEAD_DIM:
        raise ValueError(f"head dimension D={D} must be a multiple of 8 and at most {MAX_HEAD_DIM}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(
            f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}: "
            "batch B, heads H and head dim D must be equal"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    scale = check_finite_float("scale", scale)
    if abs(scale) > MAX_SCALE:
        raise ValueError(f"scale={scale:g} is beyond the limit |scale| <= {MAX_SCALE:g}: larger scales overflow the "
                         "float32 scores (an all-NaN result)")
    if torch.compiler.is_compiling():  # traced as one opaque custom op (ops/library.py)
        return library.attention(q, k, v, scale, backend)
    call = dict(q=q, k=k, v=v, scale=scale)
    return registry.resolve("attention", backend, device, call)(**call)
