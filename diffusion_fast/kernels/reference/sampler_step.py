"""Reference sampler step: the formula of :mod:`diffusion_fast.ops.sampler_step` in the state's dtype
(float32, or float64 for a float64 reference run), on any device.

Coefficients are indexed as 0-dim device tensors (views, no host round trip) and slot selection uses
``torch.where`` on device values, so this reference is also free of host-device synchronisation.
"""

from __future__ import annotations

import torch

from ...ops.rows import AD, AH, AX, AZ, BD, BH, BX, CIN, G, P, Q


def available() -> str | None:
    return None


def supports(**call) -> str | None:
    return None


def forward(x, model_output, coef, slots, hist, noise, out, net_input):
    B = x.shape[0]
    K = 0 if hist is None else hist.shape[0]
    c = coef
    mo = model_output.to(x.dtype)
    if mo.shape[0] == 2 * B:
        u, cond = mo[:B], mo[B:]
        raw = u + c[G] * (cond - u)
    else:
        raw = mo
    d = c[P] * x + c[Q] * raw
    x_new = c[AX] * x + c[AD] * d
    if noise is not None:
        x_new = x_new + c[AZ] * noise.to(x.dtype)
    if K:
        y = c[BX] * x + c[BD] * d
        for k in range(K):
            x_new = x_new + c[AH + k] * hist[k]
            y = y + c[BH(K) + k] * hist[k]
        for k in range(K):
            hist[k] = torch.where(slots[0] == k, d, torch.where(slots[1] == k, y, hist[k]))
    out.copy_(x_new)
    if net_input is not None:
        v = (c[CIN] * x_new).to(net_input.dtype)
        net_input[:B] = v
        if net_input.shape[0] == 2 * B:
            net_input[B:] = v
    return out
