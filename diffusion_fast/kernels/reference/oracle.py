"""Float64 oracles of the three ops, the NaN-poison helper and the tolerance rule: one copy for tests,
``diffusion-fast bench`` and ``diffusion-fast verify``.

The oracles are written independently of the reference backend beside them (different formulations, float64
throughout), so they also check the reference itself. They return fresh float64 tensors and never write into
their arguments.

The tolerance rule is flash-attention's: a result ``out`` stored in dtype ``dt`` passes when

    max|out - exact| <= 2 * max|yardstick - exact| + floor * max(1, max|exact|)

where ``exact`` is the oracle's float64 result and ``yardstick`` the same op computed a plain way in the
precision it claims (PyTorch's own op in ``dt``; for the sampler step, whose math is float32 by contract, the
float32 reference; for a pure storage rounding, ``exact`` rounded to ``dt``). The bound adapts to the shape and
the data instead of being a magic number; ``floor`` (default :data:`FLOOR`: half an ulp of fp16/bf16, 1e-5
for fp32) covers outputs whose yardstick happens to be exact. A non-finite element never passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...ops.rows import AD, AH, AX, AZ, BD, BH, BX, CIN, G, P, Q

__all__ = ["FLOOR", "Check", "assert_close", "attention", "attention_lowp", "bound", "check", "group_norm",
           "group_norm_lowp", "max_error", "nan_like", "poisoned", "sampler_step", "sampler_step_lowp"]

FLOOR = {torch.float32: 1e-5, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 0.0}


# ------------------------------------------------------------------------------------------------ oracles


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, activation: str | None = None,
               add: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm(+SiLU) of ``x + add`` in float64: x ``[N, C, *spatial]``, add ``[N, C]`` -> ``[N, C, *spatial]``.

    Statistics per (sample, group) over ``C / num_groups`` channels and every spatial position, biased
    variance, ``y = (h - mean) / sqrt(var + eps) * weight + bias``, then ``y * sigmoid(y)`` for SiLU.
    """
    N, C = x.shape[:2]
    tail = (1,) * (x.dim() - 2)
    h = x.double()
    if add is not None:
        h = h + add.double().reshape(N, C, *tail)
    g = h.reshape(N, num_groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = (g - mean).square().mean(-1, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(h.shape)
    if weight is not None:
        y = y * weight.double().reshape(1, C, *tail)
    if bias is not None:
        y = y + bias.double().reshape(1, C, *tail)
    if activation == "silu":
        y = y * torch.sigmoid(y)
    return y


_CHUNK_SCORES = 1 << 26  # score elements per chunk of queries (512 MiB of float64): large shapes stay in memory


def _query_chunks(q: torch.Tensor, k: torch.Tensor):
    B, Sq, H, _ = q.shape
    step = max(1, _CHUNK_SCORES // max(1, B * H * k.shape[1]))
    return ((s, min(Sq, s + step)) for s in range(0, Sq, step))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` in float64: q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]`` -> ``[B, Sq, H, D]``."""
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    kd, vd = k.double(), v.double()
    for a, b in _query_chunks(q, k):
        s = torch.einsum("bqhd,bkhd->bhqk", q[:, a:b].double(), kd) * scale
        p = torch.exp(s - s.amax(-1, keepdim=True))
        p = p / p.sum(-1, keepdim=True)
        out[:, a:b] = torch.einsum("bhqk,bkhd->bqhd", p, vd)
    return out


def sampler_step(x: torch.Tensor, model_output: torch.Tensor, coef: torch.Tensor, slots: torch.Tensor | None,
                 hist: torch.Tensor | None, noise: torch.Tensor | None, net_input: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The fused sampler step's documented formula in float64 (``diffusion_fast.ops.sampler_step``).

    Args:
        x: ``[B, ...]`` state; model_output ``[B or 2B, ...]`` (2B: CFG, unconditional half first);
        coef: one coefficient row (``ops.rows``); slots: ``[2]`` (slot of D, slot of y; -1 or out of range:
            no write; equal slots: D wins) or None; hist ``[K, B, ...]`` or None; noise ``[B, ...]`` or None.
        net_input: only its batch size is read (``B`` or ``2B``): the next network input is produced for it.

    Returns:
        ``(out, hist, net_input)`` in float64: the new state, the history after the writes (None without
        history) and the next network input before rounding to its dtype (None without ``net_input``).
    """
    c = [float(v) for v in coef.double().tolist()]
    B = x.shape[0]
    xd = x.double()
    mo = model_output.double()
    raw = mo[:B] + c[G] * (mo[B:] - mo[:B]) if mo.shape[0] == 2 * B else mo
    d = c[P] * xd + c[Q] * raw
    K = 0 if hist is None else hist.shape[0]
    x_new = c[AX] * xd + c[AD] * d
    if noise is not None:
        x_new = x_new + c[AZ] * noise.double()
    y = c[BX] * xd + c[BD] * d
    for k in range(K):
        x_new = x_new + c[AH + k] * hist[k].double()
        y = y + c[BH(K) + k] * hist[k].double()
    new_hist = None
    if K:
        new_hist = hist.double().clone()
        s_d, s_y = (int(s) for s in slots.tolist())
        if 0 <= s_y < K:
            new_hist[s_y] = y
        if 0 <= s_d < K:  # written last: D wins when both slots are equal
            new_hist[s_d] = d
    net = None
    if net_input is not None:
        v = c[CIN] * x_new
        net = torch.cat([v, v]) if net_input.shape[0] == 2 * B else v
    return x_new, new_hist, net


# ----------------------------------------------------------------------------------------------- yardsticks


def group_norm_lowp(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5, activation: str | None = None,
                    add: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's own group_norm (+SiLU) in ``x.dtype``: the same-precision yardstick."""
    dt = x.dtype
    h = x if add is None else x + add.to(dt).reshape(*add.shape, *([1] * (x.dim() - 2)))
    y = F.group_norm(h, num_groups, None if weight is None else weight.to(dt),
                     None if bias is None else bias.to(dt), eps)
    return F.silu(y) if activation == "silu" else y


def attention_lowp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention with the products in the inputs' dtype and the softmax rounded to it: the yardstick."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    for a, b in _query_chunks(q, k):
        s = (q[:, a:b].transpose(1, 2) @ kt.transpose(-1, -2)) * scale
        p = torch.softmax(s.float(), dim=-1).to(q.dtype)
        out[:, a:b] = (p @ vt).transpose(1, 2)
    return out


def sampler_step_lowp(x, model_output, coef, slots, hist, noise, net_input=None):
    """The float32 reference backend on copies of the buffers: ``(out, hist, net_input)``. The op's math is
    float32 by contract, so float32 is the precision it claims."""
    from . import sampler_step as ref

    h = None if hist is None else hist.clone()
    net = None if net_input is None else torch.empty_like(net_input)
    out = torch.empty_like(x)
    ref.forward(x, model_output, coef, slots, h, noise, out, net)
    return out, h, net


# ------------------------------------------------------------------------------------------ tolerance rule


def max_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    """``max|out - exact|`` in float64; ``inf`` when ``out`` holds a NaN or an infinity."""
    if out.numel() == 0:
        return 0.0
    o = out.double()
    if not torch.isfinite(o).all():
        return math.inf
    return float((o - exact.double()).abs().max())


def bound(exact: torch.Tensor, yardstick: torch.Tensor | None, dtype: torch.dtype,
          floor: float | None = None) -> float:
    """``2 * max|yardstick - exact| + floor * max(1, max|exact|)`` (see the module docstring)."""
    scale = max(1.0, float(exact.abs().max())) if exact.numel() else 1.0
    f = FLOOR.get(dtype, 0.0) if floor is None else floor
    y_err = 0.0 if yardstick is None else max_error(yardstick, exact)
    return 2.0 * y_err + f * scale


@dataclass(frozen=True)
class Check:
    """One comparison under the rule: ``ok`` when ``err <= bound`` (a non-finite ``err`` never passes)."""

    ok: bool
    err: float
    bound: float
    what: str = ""
    detail: str = ""

    def message(self) -> str:
        return (f"{self.what}: max error {self.err:.3g} > bound {self.bound:.3g}" + (f"; {self.detail}" if
                                                                                     self.detail else ""))


def check(out: torch.Tensor, exact: torch.Tensor, yardstick: torch.Tensor | None = None, *,
          dtype: torch.dtype | None = None, floor: float | None = None, what: str = "") -> Check:
    """Compare ``out`` with ``exact`` under the rule; ``dtype`` (default ``out.dtype``) picks the floor."""
    dt = out.dtype if dtype is None else dtype
    err = max_error(out, exact)
    b = bound(exact, yardstick, dt, floor)
    ok = err <= b
    detail = ""
    if not ok:
        diff = (out.double() - exact.double()).abs()
        diff = torch.where(torch.isfinite(diff), diff, torch.full_like(diff, math.inf))
        idx = torch.nonzero(diff > b)[:5].tolist()
        detail = "first mismatches " + ", ".join(
            f"{tuple(i)}: got {out[tuple(i)].item():.6g} want {exact[tuple(i)].item():.6g}" for i in idx)
        n_bad = int((~torch.isfinite(out.double())).sum())
        if n_bad:
            detail = f"{n_bad} non-finite elements (never written?); " + detail
    return Check(ok, err, b, what, detail)


def assert_close(out: torch.Tensor, exact: torch.Tensor, yardstick: torch.Tensor | None = None, *,
                 dtype: torch.dtype | None = None, floor: float | None = None, what: str = "") -> Check:
    """:func:`check`, raising ``AssertionError`` with the first mismatches when the rule fails."""
    c = check(out, exact, yardstick, dtype=dtype, floor=floor, what=what)
    if not c.ok:
        raise AssertionError(c.message())
    return c


# ------------------------------------------------------------------------------------------- NaN poison


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """A buffer like ``t`` (shape, dtype, device, strides) filled with NaN: an element a kernel never writes
    stays NaN and fails :func:`check`."""
    return torch.full_like(t, math.nan)


def poisoned(alloc: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap an output allocator so every buffer it returns starts as NaN (for a kernel module's
    ``_empty_output``: ``monkeypatch.setattr(mod, "_empty_output", poisoned(mod._empty_output))``)."""

    def alloc_nan(*args, **kwargs) -> torch.Tensor:
        out = alloc(*args, **kwargs)
        out.fill_(math.nan)
        return out

    return alloc_nan
