"""GroupNorm(+SiLU, + per-(sample, channel) pre-add) through the CUDA kernels of csrc/group_norm.cu.

x ``[N, C, *spatial]`` is served contiguous (viewed as ``[N, C, HW]``) or channels_last (``[N, HW, C]`` in
memory); the output has x's strides. The kernels use 16-byte vector accesses when the inner dimension (HW,
or C for channels_last) is a multiple of the vector width and the pointers are aligned, scalar ones
otherwise. Each (sample, group) [NCHW] or sample [channels_last] is split into enough blocks to fill the
GPU at batch 1; the split count comes from the extension (``group_norm_splits``) and the float32 partial
statistics live in a scratch tensor allocated per call (capturable in a CUDA graph).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _ext

_MAX_GROUP = 2**31 - 1


def _empty_output(x: torch.Tensor) -> torch.Tensor:
    """The output buffer: x's shape, dtype and strides (tests replace this to poison it with NaN)."""
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)


def available() -> str | None:
    return _ext.available()


def supports(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, add=None) -> str | None:
    reason = _ext.device_reason(x=x, weight=weight, bias=bias, add=add)
    if reason is not None:
        return reason
    N, C = x.shape[:2]
    HW = math.prod(x.shape[2:])
    if C // num_groups * HW > _MAX_GROUP:
        return f"a group has {C // num_groups * HW} elements; the cuda kernels index groups with int32"
    if not x.is_contiguous():
        if not _ext.is_channels_last(x):
            return f"x must be contiguous or channels_last, got strides {tuple(x.stride())}"
        C_ = _ext.ext()
        vec = C_.group_norm_vec(x.data_ptr(), x.data_ptr(), _ext.dtype_code(x), C, HW, True)
        if not C_.group_norm_nhwc_fits(C, vec):
            return (f"channels_last with C={C} needs C/{vec} <= 512 threads per row "
                    f"(C at most {512 * vec} for {str(x.dtype).replace('torch.', '')})")
    return None


def forward(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    activation: Optional[str] = None,
    add: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """GroupNorm of x ``[N, C, *spatial]``; weight, bias ``[C]``; add ``[N, C]``. Returns x's shape, dtype
    and strides."""
    C_ = _ext.ext()
    N, C = x.shape[:2]
    HW = math.prod(x.shape[2:])
    channels_last = not x.is_contiguous()
    out = _empty_output(x)
    code = _ext.dtype_code(x)
    vec = C_.group_norm_vec(x.data_ptr(), out.data_ptr(), code, C, HW, channels_last)
    splits = C_.group_norm_splits(N, C, HW, num_groups, channels_last, vec, _ext.sm_count(x))
    ws = None
    if splits > 1:
        ws = torch.empty(C_.group_norm_workspace(N, num_groups, splits), dtype=torch.float32, device=x.device)
    C_.group_norm(
        x=x.data_ptr(), out=out.data_ptr(), weight=_ext.ptr(weight), bias=_ext.ptr(bias),
        w_stride=weight.stride(0) if weight is not None else 0,
        b_stride=bias.stride(0) if bias is not None else 0,
        add=_ext.ptr(add), add_sn=add.stride(0) if add is not None else 0,
        add_sc=add.stride(1) if add is not None else 0, ws=_ext.ptr(ws), dtype=code,
        param_dtype=_ext.dtype_code(weight) if weight is not None else _ext.F32,
        add_dtype=_ext.dtype_code(add) if add is not None else _ext.F32,
        N=N, C=C, HW=HW, G=num_groups, channels_last=channels_last, eps=float(eps),
        silu=activation == "silu", vec=vec, splits=splits, device=_ext.device_index(x), stream=_ext.stream(x))
    return out
