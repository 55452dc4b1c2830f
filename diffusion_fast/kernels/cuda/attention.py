"""Attention forward through the tensor-core kernels of csrc/attention.cu (mma.sync, sm_80+).

Served: float16 and bfloat16, head dims 40, 64, 80, 128 and 160 at their real size, any Sq and Sk, q/k/v
views whose last dim is contiguous and whose rows are 16-byte aligned (e.g. slices of a fused QKV
projection). Sk <= 128 takes the short path (K and V resident in shared memory, single-pass softmax);
longer Sk the flash path (online softmax over K/V tiles). float32 is declined: the kernels feed the tensor
cores 16-bit operands, and a silent downcast would not be the float32 result asked for.
"""

from __future__ import annotations

import torch

from . import _ext

HEAD_DIMS = (40, 64, 80, 128, 160)
_MAX_INT32 = 2**31 - 1


def _empty_output(q: torch.Tensor) -> torch.Tensor:
    """The output buffer ``[B, Sq, H, D]``, contiguous, q's dtype (tests replace this to poison it with NaN)."""
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def available() -> str | None:
    return _ext.available()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, seq, head) strides in elements; a size-1 dim's stride is never used, so it reads as 0."""
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(3))  # type: ignore[return-value]


def supports(q, k, v, scale) -> str | None:
    reason = _ext.device_reason(q=q, k=k, v=v)
    if reason is not None:
        return reason
    if q.dtype not in (torch.float16, torch.bfloat16):
        return (f"dtype {str(q.dtype).replace('torch.', '')} is not served: the tensor-core kernels take "
                "float16/bfloat16 (cast q, k, v, or use backend='torch' for float32)")
    D = q.shape[3]
    if D not in HEAD_DIMS:
        return f"head dim D={D} is not compiled in the cuda backend (served: {', '.join(map(str, HEAD_DIMS))})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(3) != 1:
            return f"{name} must have a contiguous last dim (stride 1), got strides {tuple(t.stride())}"
        if t.data_ptr() % 16 != 0 or any(s % 8 for s in _strides(t)):
            return (f"{name} rows must be 16-byte aligned (data_ptr % 16 == 0 and strides multiples of 8 "
                    f"elements), got data_ptr % 16 = {t.data_ptr() % 16}, strides {tuple(t.stride())}")
    B, Sq, H, _ = q.shape
    if B * H * ((Sq + 63) // 64) > _MAX_INT32:
        return f"B*H*ceil(Sq/64) = {B * H * ((Sq + 63) // 64)} blocks exceed the grid limit {_MAX_INT32}"
    return None


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]`` -> ``[B, Sq, H, D]`` contiguous in q's dtype."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    out = _empty_output(q)
    qs, ks, vs, os_ = _strides(q), _strides(k), _strides(v), _strides(out)
    _ext.ext().attention(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), dtype=_ext.dtype_code(q),
        B=B, H=H, Sq=Sq, Sk=Sk, D=D, q_sb=qs[0], q_ss=qs[1], q_sh=qs[2], k_sb=ks[0], k_ss=ks[1], k_sh=ks[2],
        v_sb=vs[0], v_ss=vs[1], v_sh=vs[2], o_sb=os_[0], o_ss=os_[1], o_sh=os_[2], scale=float(scale),
        device=_ext.device_index(q), stream=_ext.stream(q))
    return out


def path(q: torch.Tensor, k: torch.Tensor) -> str:
    """Which kernel path a call takes on q's device: ``"short"`` or ``"flash"`` (for tests and benchmarks)."""
    return _ext.ext().attention_path(k.shape[1], q.shape[3], _ext.device_index(q))
