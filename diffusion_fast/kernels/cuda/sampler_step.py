"""The fused sampler step through the CUDA kernel of csrc/sampler_step.cu.

One pass over the data: CFG combine, raw output -> denoised, update, history write and next network input,
with the coefficient row and the slots read from device memory (so a CUDA graph replays a step with a new
row copied into ``coef``). Products and sums are rounded one by one in the reference's order. The kernel
uses 16-byte fp32 accesses when the element count is a multiple of 4 and every pointer is aligned.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _ext


def available() -> str | None:
    return _ext.available()


def supports(x, model_output, coef, slots, hist, noise, out, net_input) -> str | None:
    reason = _ext.device_reason(x=x, model_output=model_output, coef=coef, slots=slots, hist=hist,
                                noise=noise, out=out, net_input=net_input)
    if reason is not None:
        return reason
    f64 = [name for name, t in (("x", x), ("model_output", model_output), ("noise", noise), ("net_input", net_input))
           if t is not None and t.dtype == torch.float64]
    if f64:
        return (f"{', '.join(f64)} float64: the cuda sampler_step computes in float32 "
                "(the reference backend 'torch' serves float64)")
    for name, t in (("x", x), ("model_output", model_output), ("hist", hist), ("noise", noise),
                    ("out", out), ("net_input", net_input)):
        if t is not None and not t.is_contiguous():
            return f"{name} must be contiguous for the cuda kernel, got strides {tuple(t.stride())}"
    return None


def forward(
    x: torch.Tensor,
    model_output: torch.Tensor,
    coef: torch.Tensor,
    slots: Optional[torch.Tensor],
    hist: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    out: torch.Tensor,
    net_input: Optional[torch.Tensor],
) -> torch.Tensor:
    """x ``[B, *S]``; model_output ``[B or 2B, *S]``; coef ``[9 + 2K]``; slots ``[2]``; hist ``[K, B, *S]``;
    noise ``[B, *S]``; out ``[B, *S]``; net_input ``[B or 2B, *S]``. Returns ``out``."""
    B = x.shape[0]
    _ext.ext().sampler_step(
        x=x.data_ptr(), mo=model_output.data_ptr(), mo_dtype=_ext.dtype_code(model_output),
        cfg=model_output.shape[0] == 2 * B, coef=coef.data_ptr(), coef_stride=coef.stride(0),
        slots=_ext.ptr(slots), slots_stride=slots.stride(0) if slots is not None else 1,
        slots_int64=slots is not None and slots.dtype == torch.int64,
        hist=_ext.ptr(hist), K=0 if hist is None else hist.shape[0],
        noise=_ext.ptr(noise), noise_dtype=_ext.dtype_code(noise), out=out.data_ptr(),
        net=_ext.ptr(net_input), net_dtype=_ext.dtype_code(net_input),
        net_cfg=net_input is not None and net_input.shape[0] == 2 * B, n=x.numel(),
        sm_count=_ext.sm_count(x), device=_ext.device_index(x), stream=_ext.stream(x))
    return out
