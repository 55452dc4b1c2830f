"""The sampler step in Triton: CFG combine, raw -> denoised, update and history writes in one pass.

``_sampler_step_kernel`` — grid ``cdiv(n, BLOCK)`` over the ``n = B * prod(S)`` elements of the state, one
element per lane, ``BLOCK / (32 * num_warps)`` consecutive elements per thread (vector loads). Which inputs
exist is compile-time: ``K`` history slots (0..8), CFG (model output of 2B rows), noise, net_input (B or 2B
rows). The coefficient row (``9 + 2K`` floats) and the two slot indices are loaded from device memory by
every program, so the host never looks at them and a CUDA graph replays the step with a new row copied in.

Per element: every load (x, uncond/cond, noise, K slots) happens before any store, and each element is
loaded and stored by the same thread, so ``out`` may alias ``x`` and the slots written may be slots read.
Writes: ``out``, ``hist[slot_D]``, ``hist[slot_y]`` (masked off when the slot is outside ``[0, K)``, compared
at the slots' own 32- or 64-bit width), and ``net_input`` (once, or twice for 2B rows).

Bytes per element: 4 (x) + 1-2 model outputs + noise + 4K (slots) read; 4 (out) + up to 8 (two slots) +
net_input written. FLOPs: ~2 per coefficient. Memory-bound: the floor is bytes / copy bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...ops.rows import AD, AH, AX, AZ, BD, BX, CIN, G, P, Q
from ._common import INTERPRET, bf16_staging, device_reason, numel_reason
from ._common import available as _available


@triton.jit
def _sampler_step_kernel(
    x_ptr,  # [n] fp32 state where the network was evaluated
    mo_ptr,  # [n] or [2n] (CFG: uncond then cond) model output, any float dtype
    coef_ptr,  # [9 + 2K] fp32 coefficient row
    slots_ptr,  # [2] int32/int64 (slot for D, slot for y), -1 = none; read only when K > 0
    hist_ptr,  # [K, n] fp32 history, updated in place
    noise_ptr,  # [n] noise, any float dtype; read only when HAS_NOISE
    out_ptr,  # [n] fp32 x_new (may be x)
    net_ptr,  # [n] or [2n] (NET_CFG) next network input, any float dtype; written only when HAS_NET
    n,
    K: tl.constexpr,
    CFG: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    HAS_NET: tl.constexpr,
    NET_CFG: tl.constexpr,
    BLOCK: tl.constexpr,
    I_G: tl.constexpr, I_P: tl.constexpr, I_Q: tl.constexpr, I_AX: tl.constexpr, I_AD: tl.constexpr,
    I_AZ: tl.constexpr, I_BX: tl.constexpr, I_BD: tl.constexpr, I_CIN: tl.constexpr, I_AH: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # The row's scalars first (uniform loads, one cache line), then the streams.
    c_g = tl.load(coef_ptr + I_G)
    c_p = tl.load(coef_ptr + I_P)
    c_q = tl.load(coef_ptr + I_Q)
    c_ax = tl.load(coef_ptr + I_AX)
    c_ad = tl.load(coef_ptr + I_AD)
    c_az = tl.load(coef_ptr + I_AZ)
    c_bx = tl.load(coef_ptr + I_BX)
    c_bd = tl.load(coef_ptr + I_BD)
    c_in = tl.load(coef_ptr + I_CIN)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    raw = tl.load(mo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CFG:
        cond = tl.load(mo_ptr + n + offs, mask=mask, other=0.0).to(tl.float32)
        raw = raw + c_g * (cond - raw)
    d = c_p * x + c_q * raw
    x_new = c_ax * x + c_ad * d
    if HAS_NOISE:
        z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x_new = x_new + c_az * z
    if K > 0:
        y = c_bx * x + c_bd * d
        for k in tl.static_range(K):
            h = tl.load(hist_ptr + k * n + offs, mask=mask, other=0.0)
            x_new = x_new + tl.load(coef_ptr + I_AH + k) * h
            y = y + tl.load(coef_ptr + I_AH + K + k) * h
        # A slot outside [0, K) writes nothing, compared at the slots' own width (an int64 slot of 2**32 + 1
        # must not wrap to 1), then narrowed. Broadcast to vectors before any boolean mix (vector & scalar-bool
        # masks trip the interpreter).
        raw_d = tl.load(slots_ptr)
        raw_y = tl.load(slots_ptr + 1)
        slot_d = tl.full([BLOCK], 0, tl.int32) + tl.where((raw_d >= 0) & (raw_d < K), raw_d, -1).to(tl.int32)
        slot_y = tl.full([BLOCK], 0, tl.int32) + tl.where((raw_y >= 0) & (raw_y < K), raw_y, -1).to(tl.int32)
        # y first, then D: if both name one slot, D wins, as in the reference.
        ok_y = slot_y >= 0
        tl.store(hist_ptr + tl.where(ok_y, slot_y, 0) * n + offs, y, mask=mask & ok_y)
        ok_d = slot_d >= 0
        tl.store(hist_ptr + tl.where(ok_d, slot_d, 0) * n + offs, d, mask=mask & ok_d)
    tl.store(out_ptr + offs, x_new, mask=mask)
    if HAS_NET:
        v = (c_in * x_new).to(net_ptr.dtype.element_ty)
        tl.store(net_ptr + offs, v, mask=mask)
        if NET_CFG:
            tl.store(net_ptr + n + offs, v, mask=mask)


@dataclass(frozen=True)
class Config:
    block: int
    num_warps: int


# Large states: 16 fp32 per thread, four 16-byte loads in flight per stream. Small states (SD latents are
# 16K-64K elements): 4 per thread, so more programs share the work (the launch dominates at those sizes);
# 8 per thread made ptxas spill 8 bytes in a few sm_80 variants at 48 registers.
SMALL = Config(1024, 8)
LARGE = Config(4096, 8)
_LARGE_FROM = 1 << 20
_INTERPRET_CONFIG = Config(256, 4)


def configs() -> list[Config]:
    """Every launch configuration the host code may pick (for the ahead-of-time checks)."""
    return [SMALL, LARGE]


def pick_config(n: int) -> Config:
    if INTERPRET:
        return _INTERPRET_CONFIG
    return LARGE if n >= _LARGE_FROM else SMALL


def available() -> str | None:
    return _available()


def supports(x, model_output, coef, slots, hist, noise, out, net_input) -> str | None:
    reason = device_reason(x, model_output, coef, slots, hist, noise, out, net_input)
    reason = reason or numel_reason(model_output=model_output, hist=hist, net_input=net_input)
    if reason:
        return reason
    f64 = [name for name, t in (("x", x), ("model_output", model_output), ("noise", noise), ("net_input", net_input))
           if t is not None and t.dtype == torch.float64]
    if f64:
        return (f"{', '.join(f64)} float64: the Triton sampler_step computes in float32 "
                "(the reference backend 'torch' serves float64)")
    for name, t in (("x", x), ("model_output", model_output), ("coef", coef), ("slots", slots), ("hist", hist),
                    ("noise", noise), ("out", out), ("net_input", net_input)):
        if t is not None and not t.is_contiguous():
            return f"{name} is not contiguous (strides {t.stride()}); the Triton sampler_step reads flat buffers"
    return None


def forward(x, model_output, coef, slots, hist, noise, out, net_input):
    """One coefficient row applied in one pass; see :mod:`diffusion_fast.ops.sampler_step` for the formula."""
    B = x.shape[0]
    n = x.numel()
    K = 0 if hist is None else hist.shape[0]
    cfg = pick_config(n)
    grid = (triton.cdiv(n, cfg.block),)
    net_k, finish = bf16_staging(net_input)
    _sampler_step_kernel[grid](
        x, model_output, coef, slots if slots is not None else coef, hist if hist is not None else x,
        noise if noise is not None else x, out, net_k if net_k is not None else x, n,
        K=K, CFG=model_output.shape[0] == 2 * B, HAS_NOISE=noise is not None, HAS_NET=net_input is not None,
        NET_CFG=net_input is not None and net_input.shape[0] == 2 * B, BLOCK=cfg.block,
        I_G=G, I_P=P, I_Q=Q, I_AX=AX, I_AD=AD, I_AZ=AZ, I_BX=BX, I_BD=BD, I_CIN=CIN, I_AH=AH,
        num_warps=cfg.num_warps,
    )
    finish()
    return out

