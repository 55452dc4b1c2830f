"""``dpm_adaptive``: DPM-Solver-12 / 23 with a PID step-size controller (Lu et al. 2022; k-diffusion
``sample_dpm_adaptive``) — the one sampler that is not a fixed table and that reads a device value per step.

Why it cannot be a table: each attempted step runs a lower- and a higher-order DPM-Solver step from the same
point, and the controller decides from the norm of their difference whether to accept and how long the next
step is. The number of network evaluations, every later noise level and so every later coefficient depend
on that value of the sample. A table fixes all of them before the loop, so the decision has to happen per
step: on the host, which needs the error on the host (``error.item()``: one device-to-host read and wait per
attempted step), or on the device, which would need device-computed coefficients and a loop of data-dependent
length — neither a coefficient table nor something a CUDA graph can replay. So ``dpm_adaptive`` runs eagerly
(``cuda_graph=True`` is refused) with one synchronisation per attempted step, and everything else as the other
samplers: each stage is one row of coefficients (built on the host in float64 for the step just chosen) run
by the fused :func:`~diffusion_fast.ops.sampler_step`, guidance and the raw-output conversion included.

Semantics follow k-diffusion: the step runs from ``sigmas[0]`` to the smallest nonzero sigma of the
schedule (the intermediate sigmas are not used; ComfyUI passes them the same way) in ``t = -log sigma``, and
the result is the state at that smallest sigma. The error is one number for the whole batch. A rejected
attempt re-evaluates the network at the same point, as k-diffusion does.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..ops import sampler_step
from ..ops.rows import coef_width
from .loop import call_noise_sampler, draw_noise
from .tables import _ancestral, _dpm_solver_step, _log_down, conversion, fill_row

K = 3  # slot 0: x at the step's start, slot 1: its D, slot 2: the lower-order solution


class PID:
    """k-diffusion's PIDStepSizeController: proposes the next step size from the last errors."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, accept_safety: float,
                 eps: float = 1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose_step(self, error: float) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


def run_adaptive(model, x: torch.Tensor, sigmas: np.ndarray, opts: dict, *, generator=None, callback=None,
                 guidance_scale=None, cond=None, uncond=None, prediction="denoised", net_dtype=torch.float32,
                 backend="auto", noise_sampler=None, dtype=torch.float32, max_attempts: int = 100_000):
    """Run dpm_adaptive (arguments checked by :func:`diffusion_fast.sample`); returns the state at the
    schedule's smallest nonzero sigma, in ``dtype``."""
    order = opts["order"]
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3 for dpm_adaptive, got {order!r}")
    for k in ("rtol", "atol", "h_init", "accept_safety"):
        if not math.isfinite(float(opts[k])) or float(opts[k]) <= 0:
            raise ValueError(f"{k} must be a finite number > 0 for dpm_adaptive, got {opts[k]!r}")
    for k in ("pcoeff", "icoeff", "dcoeff"):
        if not math.isfinite(float(opts[k])):
            raise ValueError(f"{k} must be finite for dpm_adaptive, got {opts[k]!r}")
    eta, s_noise = float(opts["eta"]), float(opts["s_noise"])
    positive = sigmas[sigmas > 0]
    if positive.size < 2:
        raise ValueError("dpm_adaptive needs a schedule with two nonzero sigmas (it runs from sigmas[0] to the "
                         f"smallest nonzero one), got {sigmas.tolist()}")
    sigma_max, sigma_min = float(sigmas[0]), float(positive.min())
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    if noise_sampler == "brownian":
        from .noise import BrownianTreeNoiseSampler, seed_from

        noise_sampler = BrownianTreeNoiseSampler(torch.empty(x.shape, dtype=dtype, device=x.device), sigma_min,
                                                 sigma_max, seed=seed_from(generator))
    param = "ve"
    g = 1.0 if guidance_scale is None else float(guidance_scale)
    B = x.shape[0]
    cfg = guidance_scale is not None
    ctx = torch.cat([uncond, cond]) if cfg else cond
    dev = x.device
    state = x.detach().to(dtype, copy=True).contiguous()
    work = torch.empty_like(state)
    hist = torch.zeros((K, *x.shape), dtype=dtype, device=dev)
    net_in = torch.empty((2 * B if cfg else B, *x.shape[1:]), dtype=net_dtype, device=dev)
    atol = torch.tensor(float(opts["atol"]), dtype=dtype, device=dev)
    rtol = float(opts["rtol"])
    x_prev = state.clone()
    pid = PID(abs(float(opts["h_init"])), float(opts["pcoeff"]), float(opts["icoeff"]), float(opts["dcoeff"]),
              1.5 if eta else order, float(opts["accept_safety"]))
    s, steps, attempts = t_start, 0, 0
    while s < t_end - 1e-5:
        attempts += 1
        if attempts > max_attempts:
            raise RuntimeError(f"dpm_adaptive: no progress after {max_attempts} attempted steps (at sigma "
                               f"{math.exp(-s):.4g}); loosen rtol / atol")
        t = min(t_end, s + pid.h)
        if eta:
            down, _ = _ancestral(s, t, eta)
            t_ = min(t_end, _log_down(t, down))
            su = math.sqrt(max(0.0, math.exp(-2 * t) - math.exp(-2 * t_)))
        else:
            t_, su = t, 0.0
        stages = _dpm_solver_step(s, t_, order, steps, low=True)
        v = (state * conversion(prediction, param, stages[0].sigma)[2]).to(net_dtype)
        net_in[:B] = v
        if cfg:
            net_in[B:] = v
        denoised = None
        for j, st in enumerate(stages):
            last = j == len(stages) - 1
            row = np.zeros(coef_width(K))
            fill_row(row, st, K, prediction, param, g, 0.0 if last else stages[j + 1].sigma)
            coef = torch.as_tensor(row, dtype=dtype).to(dev)
            sigma = torch.full((net_in.shape[0],), st.sigma, dtype=dtype, device=dev)
            out = model(net_in, sigma) if ctx is None else model(net_in, sigma, ctx)
            slots = torch.tensor((st.slot_d, st.slot_y), dtype=torch.int64, device=dev)
            sampler_step(state if j == 0 else work, out, coef, slots, hist, None, out=work,
                         net_input=None if last else net_in, backend=backend)
            if j == 0 and callback is not None:
                denoised = hist[1].clone()
        x_low, x_high = hist[2], work
        delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x_high.numel() ** 0.5
        err = float(error)  # the one host read per attempted step: the controller needs the value
        if not math.isfinite(err):
            raise RuntimeError(f"dpm_adaptive: the error estimate is {err} at sigma {math.exp(-s):.4g}; the model "
                               "returned non-finite values")
        if pid.propose_step(err):
            x_prev.copy_(x_low)
            state.copy_(x_high)
            if su > 0.0 and s_noise > 0.0:
                z = (call_noise_sampler(noise_sampler, math.exp(-s), math.exp(-t), state) if noise_sampler
                     else draw_noise(state.shape, generator, dev, dtype))
                state.add_(z.to(dtype), alpha=su * s_noise)
            if callback is not None:
                callback({"x": state.clone(), "i": steps, "sigma": math.exp(-s), "sigma_next": math.exp(-t),
                          "denoised": denoised, "error": err, "h": pid.h, "attempts": attempts})
            s = t
            steps += 1
    return state
