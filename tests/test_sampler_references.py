"""The samplers added to the first ten, each against a literal transcription of its reference loop —
k-diffusion's ``sample_*`` (crowsonkb/k-diffusion, k_diffusion/sampling.py) or, where k-diffusion has none,
ComfyUI's (comfy/k_diffusion/sampling.py, comfy/extra_samplers/uni_pc.py) — with the same noise fed to both,
and against diffusers' scheduler classes where one matches.

The transcriptions keep the references' statements and order (``torch.randn_like(x)`` becomes ``randn(x)``,
the model call drops ``extra_args``); they run in float64. Our float32 loop must agree to float32 rounding
(1e-5 relative on states of size ~1-10), our float64 loop to 1e-10; the noise_sampler calls must name the
same ``(sigma, sigma_next)`` pairs in the same order.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import diffusion_fast as df
from diffusion_fast.samplers.tables import BROWNIAN_DEFAULT, build_plan

MU, S2 = 0.3, 0.25

# diffusers' schedulers pass torch tensors through numpy, which NumPy 2 warns about on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def den(x, sigma):
    """The exact denoiser of Gaussian data N(MU, S2), computed in float64, returned in x's dtype."""
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *[1] * (x.dim() - 1))
    return (MU + S2 / (S2 + s * s) * (x.double() - MU)).to(x.dtype)


class Noise:
    """A noise source fed identically to both loops: randn draws in ``dtype`` from one generator seeded like the
    one handed to ``sample`` (so they equal its draws for a state of that dtype), in call order; records the
    (sigma, sigma_next) of every call."""

    def __init__(self, shape, seed=7, dtype=torch.float32):
        self.g = torch.Generator().manual_seed(seed)
        self.shape, self.dtype, self.calls = shape, dtype, []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return torch.randn(self.shape, generator=self.g, dtype=self.dtype)

    def randn(self, x):  # k-diffusion's torch.randn_like(x), which records nothing
        return torch.randn(self.shape, generator=self.g, dtype=self.dtype)


# ------------------------------------------------------------------------------------- k-diffusion loops
# Verbatim up to the noise source and extra_args.

def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta=1.):
    if not eta:
        return sigma_to, 0.
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def kd_euler(model, x, sigmas, randn, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.
        eps = randn(x) * s_noise
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        x = x + d * dt
    return x


def kd_heun(model, x, sigmas, randn, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.
        eps = randn(x) * s_noise
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            d_prime = (d + d_2) / 2
            x = x + d_prime * dt
    return x


def kd_dpm_2(model, x, sigmas, randn, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.
        eps = randn(x) * s_noise
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in)
        d = to_d(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            dt = sigmas[i + 1] - sigma_hat
            x = x + d * dt
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            dt_1 = sigma_mid - sigma_hat
            dt_2 = sigmas[i + 1] - sigma_hat
            x_2 = x + d * dt_1
            denoised_2 = model(x_2, sigma_mid * s_in)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * dt_2
    return x


def comfy_euler(model, x, sigmas, randn, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.):
    """ComfyUI's sample_euler: the churn noise is drawn only where gamma > 0."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        if s_churn > 0:
            gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.
            sigma_hat = sigmas[i] * (gamma + 1)
        else:
            gamma = 0
            sigma_hat = sigmas[i]
        if gamma > 0:
            eps = randn(x) * s_noise
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        x = x + d * dt
    return x


def kd_dpm_2_ancestral(model, x, sigmas, noise_sampler, eta=1., s_noise=1.):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            dt_1 = sigma_mid - sigmas[i]
            dt_2 = sigma_down - sigmas[i]
            x_2 = x + d * dt_1
            denoised_2 = model(x_2, sigma_mid * s_in)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * dt_2
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def kd_dpmpp_2s_ancestral(model, x, sigmas, noise_sampler, eta=1., s_noise=1.):
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0:
            d = to_d(x, sigmas[i], denoised)
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - (-h * r).expm1() * denoised
            denoised_2 = model(x_2, sigma_fn(s) * s_in)
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def kd_dpmpp_sde(model, x, sigmas, noise_sampler, eta=1., s_noise=1., r=1 / 2):
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            d = to_d(x, sigmas[i], denoised)
            dt = sigmas[i + 1] - sigmas[i]
            x = x + d * dt
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            fac = 1 / (2 * r)
            sd, su = get_ancestral_step(sigma_fn(t), sigma_fn(s), eta)
            s_ = t_fn(sd)
            x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - (t - s_).expm1() * denoised
            x_2 = x_2 + noise_sampler(sigma_fn(t), sigma_fn(s)) * s_noise * su
            denoised_2 = model(x_2, sigma_fn(s) * s_in)
            sd, su = get_ancestral_step(sigma_fn(t), sigma_fn(t_next), eta)
            t_next_ = t_fn(sd)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (sigma_fn(t_next_) / sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_d
            x = x + noise_sampler(sigma_fn(t), sigma_fn(t_next)) * s_noise * su
    return x


class KDPMSolver:
    """k-diffusion's DPMSolver (the parts sample_dpm_fast and sample_dpm_adaptive use)."""

    def __init__(self, model):
        self.model = model
        self.nfe = 0

    def t(self, sigma):
        return -sigma.log()

    def sigma(self, t):
        return t.neg().exp()

    def eps(self, eps_cache, key, x, t):
        if key in eps_cache:
            return eps_cache[key], eps_cache
        sigma = self.sigma(t) * x.new_ones([x.shape[0]])
        eps = (x - self.model(x, sigma)) / self.sigma(t)
        self.nfe += 1
        return eps, {key: eps, **eps_cache}

    def dpm_solver_1_step(self, x, t, t_next, eps_cache=None):
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, 'eps', x, t)
        x_1 = x - self.sigma(t_next) * h.expm1() * eps
        return x_1, eps_cache

    def dpm_solver_2_step(self, x, t, t_next, r1=1 / 2, eps_cache=None):
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, 'eps', x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, eps_cache = self.eps(eps_cache, 'eps_r1', u1, s1)
        x_2 = x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)
        return x_2, eps_cache

    def dpm_solver_3_step(self, x, t, t_next, r1=1 / 3, r2=2 / 3, eps_cache=None):
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, 'eps', x, t)
        s1 = t + r1 * h
        s2 = t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, eps_cache = self.eps(eps_cache, 'eps_r1', u1, s1)
        u2 = x - self.sigma(s2) * (r2 * h).expm1() * eps - self.sigma(s2) * (r2 / r1) * (
            (r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps)
        eps_r2, eps_cache = self.eps(eps_cache, 'eps_r2', u2, s2)
        x_3 = x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)
        return x_3, eps_cache

    def dpm_solver_fast(self, x, t_start, t_end, nfe, eta=0., s_noise=1., noise_sampler=None):
        m = math.floor(nfe / 3) + 1
        ts = torch.linspace(t_start, t_end, m + 1, dtype=torch.float64)
        if nfe % 3 == 0:
            orders = [3] * (m - 2) + [2, 1]
        else:
            orders = [3] * (m - 1) + [nfe % 3]
        for i in range(len(orders)):
            eps_cache = {}
            t, t_next = ts[i], ts[i + 1]
            if eta:
                sd, su = get_ancestral_step(self.sigma(t), self.sigma(t_next), eta)
                t_next_ = torch.minimum(t_end, self.t(sd))
                su = (self.sigma(t_next) ** 2 - self.sigma(t_next_) ** 2) ** 0.5
            else:
                t_next_, su = t_next, 0.
            eps, eps_cache = self.eps(eps_cache, 'eps', x, t)
            if orders[i] == 1:
                x, eps_cache = self.dpm_solver_1_step(x, t, t_next_, eps_cache=eps_cache)
            elif orders[i] == 2:
                x, eps_cache = self.dpm_solver_2_step(x, t, t_next_, eps_cache=eps_cache)
            else:
                x, eps_cache = self.dpm_solver_3_step(x, t, t_next_, eps_cache=eps_cache)
            x = x + su * s_noise * noise_sampler(self.sigma(t), self.sigma(t_next))
        return x

    def dpm_solver_adaptive(self, x, t_start, t_end, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.,
                            icoeff=1., dcoeff=0., accept_safety=0.81, eta=0., s_noise=1., noise_sampler=None):
        forward = t_end > t_start
        h_init = abs(h_init) * (1 if forward else -1)
        atol = torch.tensor(atol, dtype=torch.float64)
        rtol = torch.tensor(rtol, dtype=torch.float64)
        s = t_start
        x_prev = x
        pid = KPID(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
        info = {'steps': 0, 'nfe': 0, 'n_accept': 0, 'n_reject': 0}
        while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
            eps_cache = {}
            t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
            if eta:
                sd, su = get_ancestral_step(self.sigma(s), self.sigma(t), eta)
                t_ = torch.minimum(t_end, self.t(sd))
                su = (self.sigma(t) ** 2 - self.sigma(t_) ** 2) ** 0.5
            else:
                t_, su = t, 0.
            eps, eps_cache = self.eps(eps_cache, 'eps', x, s)
            if order == 2:
                x_low, eps_cache = self.dpm_solver_1_step(x, s, t_, eps_cache=eps_cache)
                x_high, eps_cache = self.dpm_solver_2_step(x, s, t_, eps_cache=eps_cache)
            else:
                x_low, eps_cache = self.dpm_solver_2_step(x, s, t_, r1=1 / 3, eps_cache=eps_cache)
                x_high, eps_cache = self.dpm_solver_3_step(x, s, t_, eps_cache=eps_cache)
            delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            accept = pid.propose_step(error)
            if accept:
                x_prev = x_low
                x = x_high + su * s_noise * noise_sampler(self.sigma(s), self.sigma(t))
                s = t
                info['n_accept'] += 1
            else:
                info['n_reject'] += 1
            info['nfe'] += order
            info['steps'] += 1
        return x, info


class KPID:
    """k-diffusion's PIDStepSizeController, verbatim."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs = []

    def limiter(self, x):
        return 1 + math.atan(x - 1)

    def propose_step(self, error):
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = self.limiter(factor)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


def kd_dpm_fast(model, x, sigmas, noise_sampler, eta=0., s_noise=1.):
    # ComfyUI's wrapper: sigma_min = the last nonzero sigma, sigma_max = sigmas[0], n = len(sigmas) - 1
    sigma_min = sigmas[-1] if sigmas[-1] != 0 else sigmas[-2]
    solver = KDPMSolver(model)
    return solver.dpm_solver_fast(x, solver.t(sigmas[0]), solver.t(sigma_min), len(sigmas) - 1, eta, s_noise,
                                  noise_sampler)


# ------------------------------------------------------------------------------------------ ComfyUI loops

def comfy_lcm(model, x, sigmas, noise_sampler, s_noise=1.0, s_noise_end=None):
    s_in = x.new_ones([x.shape[0]])
    n_steps = max(1, len(sigmas) - 1)
    s_start = float(s_noise)
    s_end = s_start if s_noise_end is None else float(s_noise_end)
    for i in range(n_steps):
        denoised = model(x, sigmas[i] * s_in)
        x = denoised
        if sigmas[i + 1] > 0:
            noise = noise_sampler(sigmas[i], sigmas[i + 1])
            t = (i / (n_steps - 1)) if n_steps > 1 else 0.0
            s_noise_i = s_start + (s_end - s_start) * t
            if s_noise_i != 1.0:
                noise = noise * s_noise_i
            x = noise * sigmas[i + 1] + x  # EPS.noise_scaling(sigma, noise, latent)
    return x


def DDPMSampler_step(x, sigma, sigma_prev, noise, noise_sampler):
    alpha_cumprod = 1 / ((sigma * sigma) + 1)
    alpha_cumprod_prev = 1 / ((sigma_prev * sigma_prev) + 1)
    alpha = (alpha_cumprod / alpha_cumprod_prev)
    mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * noise / (1 - alpha_cumprod).sqrt())
    if sigma_prev > 0:
        mu += ((1 - alpha) * (1. - alpha_cumprod_prev) / (1. - alpha_cumprod)).sqrt() * noise_sampler(sigma, sigma_prev)
    return mu


def comfy_ddpm(model, x, sigmas, noise_sampler):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        x = DDPMSampler_step(x / torch.sqrt(1.0 + sigmas[i] ** 2.0), sigmas[i], sigmas[i + 1],
                             (x - denoised) / sigmas[i], noise_sampler)
        if sigmas[i + 1] != 0:
            x *= torch.sqrt(1.0 + sigmas[i + 1] ** 2.0)
    return x


def comfy_ipndm(model, x, sigmas, max_order=4):
    s_in = x.new_ones([x.shape[0]])
    x_next = x
    buffer_model = []
    for i in range(len(sigmas) - 1):
        t_cur = sigmas[i]
        t_next = sigmas[i + 1]
        x_cur = x_next
        denoised = model(x_cur, t_cur * s_in)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        elif order == 2:
            x_next = x_cur + (t_next - t_cur) * (3 * d_cur - buffer_model[-1]) / 2
        elif order == 3:
            x_next = x_cur + (t_next - t_cur) * (23 * d_cur - 16 * buffer_model[-1] + 5 * buffer_model[-2]) / 12
        elif order == 4:
            x_next = x_cur + (t_next - t_cur) * (55 * d_cur - 59 * buffer_model[-1] + 37 * buffer_model[-2]
                                                 - 9 * buffer_model[-3]) / 24
        if len(buffer_model) == max_order - 1:
            for k in range(max_order - 2):
                buffer_model[k] = buffer_model[k + 1]
            buffer_model[-1] = d_cur
        else:
            buffer_model.append(d_cur)
    return x_next


def comfy_ipndm_v(model, x, sigmas, max_order=4):
    s_in = x.new_ones([x.shape[0]])
    x_next = x
    t_steps = sigmas
    buffer_model = []
    for i in range(len(sigmas) - 1):
        t_cur = sigmas[i]
        t_next = sigmas[i + 1]
        x_cur = x_next
        denoised = model(x_cur, t_cur * s_in)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        elif order == 2:
            h_n = (t_next - t_cur)
            h_n_1 = (t_cur - t_steps[i - 1])
            coeff1 = (2 + (h_n / h_n_1)) / 2
            coeff2 = -(h_n / h_n_1) / 2
            x_next = x_cur + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer_model[-1])
        elif order == 3:
            h_n = (t_next - t_cur)
            h_n_1 = (t_cur - t_steps[i - 1])
            h_n_2 = (t_steps[i - 1] - t_steps[i - 2])
            temp = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
            coeff1 = (2 + (h_n / h_n_1)) / 2 + temp
            coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp
            coeff3 = temp * h_n_1 / h_n_2
            x_next = x_cur + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer_model[-1]
                                                 + coeff3 * buffer_model[-2])
        elif order == 4:
            h_n = (t_next - t_cur)
            h_n_1 = (t_cur - t_steps[i - 1])
            h_n_2 = (t_steps[i - 1] - t_steps[i - 2])
            h_n_3 = (t_steps[i - 2] - t_steps[i - 3])
            temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
            temp2 = ((1 - h_n / (3 * (h_n + h_n_1))) / 2 + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (
                6 * (h_n + h_n_1 + h_n_2))) * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2)) / (
                h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
            coeff1 = (2 + (h_n / h_n_1)) / 2 + temp1 + temp2
            coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 - (1 + (h_n_1 / h_n_2) + (
                h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3)))) * temp2
            coeff3 = temp1 * h_n_1 / h_n_2 + ((h_n_1 / h_n_2) + (h_n_1 * (h_n_1 + h_n_2) / (
                h_n_2 * (h_n_2 + h_n_3))) * (1 + h_n_2 / h_n_3)) * temp2
            coeff4 = -temp2 * (h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))) * h_n_1 / h_n_2
            x_next = x_cur + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer_model[-1] + coeff3 * buffer_model[-2]
                                                 + coeff4 * buffer_model[-3])
        if len(buffer_model) == max_order - 1:
            for k in range(max_order - 2):
                buffer_model[k] = buffer_model[k + 1]
            buffer_model[-1] = d_cur.detach()
        else:
            buffer_model.append(d_cur.detach())
    return x_next


def comfy_deis_coeff_list(t_steps, max_order, N=10000):
    """comfy/k_diffusion/deis.py get_deis_coeff_list, deis_mode='tab' (float64; the integrand's derivative taken
    in closed form where the original uses autograd for it)."""
    epsilon_s, sigma_min, sigma_max = 1e-3, 0.002, 80
    vp_sigma_inv = lambda beta_d, beta_min: lambda sigma: ((beta_min ** 2 + 2 * beta_d * (  # noqa: E731
        sigma ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    vp_beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    vp_beta_min = np.log(sigma_max ** 2 + 1) - 0.5 * vp_beta_d
    t_steps = vp_sigma_inv(torch.tensor(vp_beta_d), torch.tensor(vp_beta_min))(t_steps)
    beta_0, beta_1 = vp_beta_min, vp_beta_d + vp_beta_min

    def cal_poly(prev_t, j, taus):
        poly = 1
        for k in range(prev_t.shape[0]):
            if k == j:
                continue
            poly *= (taus - prev_t[k]) / (prev_t[j] - prev_t[k])
        return poly

    def cal_intergrand(taus):
        alpha = torch.exp(-0.5 * taus ** 2 * (beta_1 - beta_0) - taus * beta_0)
        d_log_alpha_dtau = -taus * (beta_1 - beta_0) - beta_0
        return -0.5 * d_log_alpha_dtau / torch.sqrt(alpha * (1 - alpha))

    C = []
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        order = min(i + 1, max_order)
        if order == 1:
            C.append([])
        else:
            taus = torch.linspace(t_cur, t_next, N, dtype=torch.float64)
            dtau = (t_next - t_cur) / N
            prev_t = t_steps[[i - k for k in range(order)]]
            coeff_temp = []
            integrand = cal_intergrand(taus)
            for j in range(order):
                poly = cal_poly(prev_t, j, taus)
                coeff_temp.append(torch.sum(integrand * poly) * dtau)
            C.append(coeff_temp)
    return C


def comfy_deis(model, x, sigmas, coeff_list, max_order=3):
    s_in = x.new_ones([x.shape[0]])
    x_next = x
    buffer_model = []
    for i in range(len(sigmas) - 1):
        t_cur = sigmas[i]
        t_next = sigmas[i + 1]
        x_cur = x_next
        denoised = model(x_cur, t_cur * s_in)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next <= 0:
            order = 1
        if order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        elif order == 2:
            coeff_cur, coeff_prev1 = coeff_list[i]
            x_next = x_cur + coeff_cur * d_cur + coeff_prev1 * buffer_model[-1]
        elif order == 3:
            coeff_cur, coeff_prev1, coeff_prev2 = coeff_list[i]
            x_next = x_cur + coeff_cur * d_cur + coeff_prev1 * buffer_model[-1] + coeff_prev2 * buffer_model[-2]
        elif order == 4:
            coeff_cur, coeff_prev1, coeff_prev2, coeff_prev3 = coeff_list[i]
            x_next = x_cur + coeff_cur * d_cur + coeff_prev1 * buffer_model[-1] + coeff_prev2 * buffer_model[-2] \
                + coeff_prev3 * buffer_model[-3]
        if len(buffer_model) == max_order - 1:
            for k in range(max_order - 2):
                buffer_model[k] = buffer_model[k + 1]
            buffer_model[-1] = d_cur.detach()
        else:
            buffer_model.append(d_cur.detach())
    return x_next


def comfy_res_multistep(model, x, sigmas, noise_sampler, s_noise=1., eta=1.):
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    phi1_fn = lambda t: torch.expm1(t) / t  # noqa: E731
    phi2_fn = lambda t: (phi1_fn(t) - 1.0) / t  # noqa: E731
    old_sigma_down = None
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0 or old_denoised is None:
            d = to_d(x, sigmas[i], denoised)
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            t, t_old, t_next, t_prev = t_fn(sigmas[i]), t_fn(old_sigma_down), t_fn(sigma_down), t_fn(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = phi1_fn(-h), phi2_fn(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            x = sigma_fn(h) * x + h * (b1 * denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised = denoised
        old_sigma_down = sigma_down
    return x


class SigmaConvert:
    """comfy/extra_samplers/uni_pc.py: the VE sigma read as a VP noise schedule."""

    def marginal_log_mean_coeff(self, sigma):
        return 0.5 * torch.log(1 / ((sigma * sigma) + 1))

    def marginal_alpha(self, t):
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t):
        return torch.sqrt(1. - torch.exp(2. * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t):
        log_mean_coeff = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * torch.log(1. - torch.exp(2. * log_mean_coeff))
        return log_mean_coeff - log_std


def comfy_unipc(model, noise, sigmas, variant='bh1'):
    """ComfyUI's sample_unipc with UniPC.sample(method='multistep', lower_order_final=True) and
    multistep_uni_pc_bh_update (predict_x0=True), the model wrapped as a noise prediction."""
    timesteps = sigmas.clone()
    if sigmas[-1] == 0:
        timesteps[-1] = 0.001
    ns = SigmaConvert()
    x = noise / torch.sqrt(1.0 + timesteps[0] ** 2.0)

    def noise_pred(inp, sigma):  # predict_eps_sigma
        s = sigma.reshape(-1, *[1] * (inp.dim() - 1))
        inp = inp * ((s ** 2 + 1.0) ** 0.5)
        return (inp - model(inp, sigma)) / s

    def model_fn(x, t):  # UniPC.data_prediction_fn
        noise = noise_pred(x, t)
        alpha_t, sigma_t = ns.marginal_alpha(t), ns.marginal_std(t)
        return (x - sigma_t[:, None] * noise) / alpha_t[:, None]

    def update(x, model_prev_list, t_prev_list, t, order, use_corrector=True):
        t_prev_0 = t_prev_list[-1]
        lambda_prev_0 = ns.marginal_lambda(t_prev_0)
        lambda_t = ns.marginal_lambda(t)
        model_prev_0 = model_prev_list[-1]
        sigma_prev_0, sigma_t = ns.marginal_std(t_prev_0), ns.marginal_std(t)
        alpha_t = torch.exp(ns.marginal_log_mean_coeff(t))
        h = lambda_t - lambda_prev_0
        rks, D1s = [], []
        for i in range(1, order):
            t_prev_i = t_prev_list[-(i + 1)]
            model_prev_i = model_prev_list[-(i + 1)]
            lambda_prev_i = ns.marginal_lambda(t_prev_i)
            rk = ((lambda_prev_i - lambda_prev_0) / h)[0]
            rks.append(rk)
            D1s.append((model_prev_i - model_prev_0) / rk)
        rks.append(1.)
        rks = torch.tensor(rks, dtype=torch.float64)
        R, b = [], []
        hh = -h[0]
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        B_h = hh if variant == 'bh1' else torch.expm1(hh)
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= (i + 1)
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        R = torch.stack(R)
        b = torch.tensor(b, dtype=torch.float64)
        if len(D1s) > 0:
            D1s = torch.stack(D1s, dim=1)
            rhos_p = torch.tensor([0.5], dtype=torch.float64) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        else:
            D1s = None
        if use_corrector:
            rhos_c = torch.tensor([0.5], dtype=torch.float64) if order == 1 else torch.linalg.solve(R, b)
        model_t = None
        e = lambda v: v[:, None]  # noqa: E731  (expand_dims for x [B, 5])
        x_t_ = e(sigma_t / sigma_prev_0) * x - e(alpha_t * h_phi_1) * model_prev_0
        pred_res = torch.einsum('k,bk...->b...', rhos_p, D1s) if D1s is not None else 0
        x_t = x_t_ - e(alpha_t * B_h) * pred_res
        if use_corrector:
            model_t = model_fn(x_t, t)
            corr_res = torch.einsum('k,bk...->b...', rhos_c[:-1], D1s) if D1s is not None else 0
            D1_t = (model_t - model_prev_0)
            x_t = x_t_ - e(alpha_t * B_h) * (corr_res + rhos_c[-1] * D1_t)
        return x_t, model_t

    order = min(3, len(timesteps) - 2)
    steps = len(timesteps) - 1
    for step_index in range(steps):
        if step_index == 0:
            vec_t = timesteps[0].expand(x.shape[0])
            model_prev_list = [model_fn(x, vec_t)]
            t_prev_list = [vec_t]
        elif step_index < order:
            init_order = step_index
            vec_t = timesteps[init_order].expand(x.shape[0])
            x, model_x = update(x, model_prev_list, t_prev_list, vec_t, init_order, use_corrector=True)
            if model_x is None:
                model_x = model_fn(x, vec_t)
            model_prev_list.append(model_x)
            t_prev_list.append(vec_t)
        else:
            extra_final_step = 1 if step_index == (steps - 1) else 0
            for step in range(step_index, step_index + 1 + extra_final_step):
                vec_t = timesteps[step].expand(x.shape[0])
                step_order = min(order, steps + 1 - step)
                use_corrector = step != steps
                x, model_x = update(x, model_prev_list, t_prev_list, vec_t, step_order, use_corrector=use_corrector)
                for i in range(order - 1):
                    t_prev_list[i] = t_prev_list[i + 1]
                    model_prev_list[i] = model_prev_list[i + 1]
                t_prev_list[-1] = vec_t
                if step < steps:
                    if model_x is None:
                        model_x = model_fn(x, vec_t)
                    model_prev_list[-1] = model_x
    x = x / ns.marginal_alpha(timesteps[-1])
    return x


# ----------------------------------------------------------------------------------------------- tests

SHAPE = (3, 5)


def _setup(n, sigma_min=0.03, sigma_max=12.0, seed=None):
    sig = df.schedules.karras(n, sigma_min, sigma_max)
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(n if seed is None else seed)) * float(sig[0])
    return sig, x


def _compare(ours, ref, what, dtype=torch.float32):
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


STOCHASTIC_KD = [
    # name, reference, options
    ("dpm_2_ancestral", kd_dpm_2_ancestral, {}),
    ("dpm_2_ancestral", kd_dpm_2_ancestral, {"eta": 0.5, "s_noise": 0.8}),
    ("dpmpp_2s_ancestral", kd_dpmpp_2s_ancestral, {}),
    ("dpmpp_2s_ancestral", kd_dpmpp_2s_ancestral, {"eta": 0.7}),
    ("dpmpp_sde", kd_dpmpp_sde, {}),
    ("dpmpp_sde", kd_dpmpp_sde, {"eta": 0.6, "s_noise": 1.3, "r": 0.3}),
    ("lcm", comfy_lcm, {}),
    ("lcm", comfy_lcm, {"s_noise": 1.2, "s_noise_end": 0.4}),
    ("ddpm", comfy_ddpm, {}),
    ("res_multistep_ancestral", comfy_res_multistep, {}),
    ("res_multistep_ancestral", comfy_res_multistep, {"eta": 0.5, "s_noise": 0.9}),
]


@pytest.mark.parametrize("name,ref,opts", STOCHASTIC_KD)
@pytest.mark.parametrize("n", [1, 2, 5, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stochastic_samplers_match_reference_loop(name, ref, opts, n, dtype):
    """Same schedule, same noise: from the generator in the order the reference calls its noise_sampler, and
    through a noise_sampler that must be called with the same (sigma, sigma_next) pairs."""
    sig, x = _setup(n)
    ref_noise = Noise(SHAPE, dtype=dtype)
    want = ref(den, x.double(), sig, ref_noise, **opts)
    # 1. the generator path: draws in the same order (a float64 state draws float64 noise); dpmpp_sde's default
    #    is a Brownian tree seeded from the generator, as k-diffusion's
    got = df.sample(den, x.to(dtype), sig, name, generator=torch.Generator().manual_seed(7), **opts)
    assert got.dtype == dtype
    if name in BROWNIAN_DEFAULT:
        brownian = df.sample(den, x.to(dtype), sig, name, generator=torch.Generator().manual_seed(7),
                             noise_sampler="brownian", **opts)
        assert torch.equal(got, brownian)
    else:
        _compare(got, want, f"{name} {opts} generator", dtype)
    # 2. the noise_sampler path: the same calls
    ours_noise = Noise(SHAPE, dtype=dtype)
    got = df.sample(den, x.to(dtype), sig, name, noise_sampler=ours_noise, **opts)
    _compare(got, want, f"{name} {opts} noise_sampler", dtype)
    assert len(ours_noise.calls) == len(ref_noise.calls)
    np.testing.assert_allclose(np.array(ours_noise.calls).reshape(-1, 2), np.array(ref_noise.calls).reshape(-1, 2),
                               rtol=1e-12)


@pytest.mark.parametrize("name,ref", [("euler", kd_euler), ("heun", kd_heun), ("dpm_2", kd_dpm_2)])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_karras_churn_matches_k_diffusion(name, ref, n):
    """s_churn / s_tmin / s_tmax / s_noise with k-diffusion's semantics. k-diffusion draws eps every step; with
    every step churned both use the same draws in the same order."""
    sig, x = _setup(n)
    opts = {"s_churn": 2.0 * n, "s_noise": 1.003}
    for dtype in (torch.float32, torch.float64):
        want = ref(den, x.double(), sig, Noise(SHAPE, dtype=dtype).randn, **opts)
        got = df.sample(den, x.to(dtype), sig, name, generator=torch.Generator().manual_seed(7), **opts)
        _compare(got, want, f"{name} churn {dtype}", dtype)
    # s_churn = 0 is the plain sampler
    torch.testing.assert_close(df.sample(den, x, sig, name, s_churn=0.0), df.sample(den, x, sig, name))


def test_karras_churn_window_draws_only_where_it_churns():
    """With s_tmin / s_tmax excluding some steps, noise is drawn only where gamma > 0 (ComfyUI's loop;
    k-diffusion's draws and discards an unused eps on the other steps)."""
    sig, x = _setup(10)
    opts = {"s_churn": 8.0, "s_tmin": 0.2, "s_tmax": 5.0}
    want = comfy_euler(den, x.double(), sig, Noise(SHAPE).randn, **opts)
    got = df.sample(den, x, sig, "euler", generator=torch.Generator().manual_seed(7), **opts)
    _compare(got, want, "euler churn window")
    plan = build_plan("euler", sig.numpy(), **opts)
    inside = [(0.2 <= float(v) <= 5.0) for v in sig[:-1]]
    assert len(plan.draws) == sum(inside) and plan.pre_noise == 0.0  # sigmas[0] = 12 is outside the window


def test_churn_noise_goes_through_the_noise_sampler():
    sig, x = _setup(4)
    ns = Noise(SHAPE, dtype=torch.float32)
    df.sample(den, x, sig, "heun", noise_sampler=ns, s_churn=4.0)
    gamma = min(4.0 / 4, 2 ** 0.5 - 1)
    want = [(float(s), float(s) * (1 + gamma)) for s in sig[:-1]]
    np.testing.assert_allclose(ns.calls, want, rtol=1e-12)


@pytest.mark.parametrize("name,ref,opts", [
    ("ipndm", comfy_ipndm, {}), ("ipndm", comfy_ipndm, {"order": 2}), ("ipndm", comfy_ipndm, {"order": 3}),
    ("ipndm_v", comfy_ipndm_v, {}), ("ipndm_v", comfy_ipndm_v, {"order": 3}), ("ipndm_v", comfy_ipndm_v, {"order": 2}),
    ("res_multistep", comfy_res_multistep, {}),
])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deterministic_samplers_match_comfyui_loop(name, ref, opts, n, dtype):
    sig, x = _setup(n)
    kw = {"max_order": opts.get("order", 4)} if name.startswith("ipndm") else {"noise_sampler": Noise(SHAPE),
                                                                                 "eta": 0.0}
    want = ref(den, x.double(), sig, **kw)
    got = df.sample(den, x.to(dtype), sig, name, **opts)
    _compare(got, want, f"{name} {opts}", dtype)


@pytest.mark.parametrize("order", [2, 3, 4])
@pytest.mark.parametrize("n", [2, 4, 10, 25])
def test_deis_matches_comfyui_loop(order, n):
    """ComfyUI's sample_deis with the coefficients computed as we do (exact integrals) matches to rounding; with
    ComfyUI's own 10,000-point sum the trajectories differ by that sum's O(1/N) quadrature error."""
    sig, x = _setup(n)
    plan = build_plan("deis", sig.numpy(), order=order)
    # our coefficients, read back from the table: C_0 = (a_x - 1) * sigma_i, C_j from the history columns
    from diffusion_fast.ops.rows import AH, AX
    exact = []
    for i in range(n):
        cur = min(order, i + 1)
        row = plan.coef[i]
        exact.append([(row[AX] - 1) * float(sig[i])] + [row[AH + (i - j) % (order - 1)] for j in range(1, cur)]
                     if cur > 1 else [])
    want = comfy_deis(den, x.double(), sig, exact, max_order=order)
    got = df.sample(den, x, sig, "deis", order=order)
    _compare(got, want, f"deis order {order}")
    got64 = df.sample(den, x.double(), sig, "deis", order=order)
    _compare(got64, want, f"deis order {order} float64", torch.float64)
    # ComfyUI's own coefficient list (N = 10000): close, and the gap is its quadrature error
    comfy = comfy_deis(den, x.double(), sig, comfy_deis_coeff_list(sig, order), max_order=order)
    gap = (got64 - comfy).abs().max().item()
    assert gap < 2e-3 * float(sig[0]), gap


def test_deis_coefficients_are_the_limit_of_comfyui_sum():
    """|C(N) - C_exact| falls like 1/N: ours is ComfyUI's quadrature with infinitely many points."""
    sig = df.schedules.karras(8, 0.03, 14.6)
    plan = build_plan("deis", sig.numpy(), order=3)
    from diffusion_fast.ops.rows import AH, AX
    errs = []
    for N in (2000, 20000):
        C = comfy_deis_coeff_list(sig, 3, N=N)
        e = 0.0
        for i in range(2, 7):
            c = plan.coef[i]
            ours = [(c[AX] - 1) * float(sig[i]), c[AH + (i - 1) % 2], c[AH + (i - 2) % 2]]
            e = max(e, max(abs(float(c) - o) / abs(o) for c, o in zip(C[i], ours)))
        errs.append(e)
    assert errs[0] / errs[1] == pytest.approx(10.0, rel=0.05), errs
    assert errs[1] < 1e-3


def test_deis_coefficients_against_scipy_quadrature():
    from scipy import integrate

    from diffusion_fast.samplers.tables import _deis_tau, _lagrange_integrals

    sig = [14.6, 9.7, 4.1, 0.9, 0.05]
    nodes = [float(_deis_tau(sig[3 - k])) for k in range(3)]  # tau at sigma_i, sigma_{i-1}, sigma_{i-2}, i = 3
    ours = _lagrange_integrals(sig[3], sig[4], nodes, _deis_tau)
    for j in range(3):
        def f(s, j=j):
            u = float(_deis_tau(s))
            return np.prod([(u - nodes[k]) / (nodes[j] - nodes[k]) for k in range(3) if k != j])
        want = -integrate.quad(f, sig[4], sig[3], epsabs=0, epsrel=1e-13, limit=200)[0]
        assert ours[j] == pytest.approx(want, rel=1e-11, abs=1e-13)


@pytest.mark.parametrize("name,variant", [("uni_pc", "bh1"), ("uni_pc_bh2", "bh2")])
@pytest.mark.parametrize("n", [2, 3, 4, 6, 15])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uni_pc_matches_comfyui_loop(name, variant, n, dtype):
    sig, x = _setup(n)
    want = comfy_unipc(den, x.double(), sig, variant)
    got = df.sample(den, x.to(dtype), sig, name)
    _compare(got, want, name, dtype)
    assert build_plan(name, sig.numpy()).sigmas[-1] == 1e-3  # ComfyUI's terminal sigma


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 9, 10, 20])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("end", [0.0, 0.05])
def test_dpm_fast_matches_k_diffusion(n, eta, end):
    sig = df.schedules.karras(n, 0.05, 12.0)
    if end:  # a schedule that stops at sigma = 0.05 instead of 0: n + 1 values, the last 0.05
        sig = torch.cat([df.schedules.karras(n, 0.2, 12.0)[:-1], torch.tensor([end], dtype=torch.float64)])
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(n)) * float(sig[0])
    if n == 1 and not end:  # [sigma_max, 0]: nothing to integrate between sigma_max and the last nonzero sigma
        with pytest.raises(ValueError, match="two nonzero"):
            df.sample(den, x, sig, "dpm_fast")
        return
    ref_noise = Noise(SHAPE)
    want = kd_dpm_fast(den, x.double(), sig, ref_noise, eta=eta)
    ours_noise = Noise(SHAPE, dtype=torch.float32)
    got = df.sample(den, x, sig, "dpm_fast", eta=eta, noise_sampler=ours_noise)
    _compare(got, want, f"dpm_fast n={n} eta={eta}")
    if eta:  # k-diffusion also calls it for the last step, whose noise amplitude is 0 (it ends at sigma_min)
        assert len(ref_noise.calls) - len(ours_noise.calls) == 1
        np.testing.assert_allclose(ours_noise.calls, ref_noise.calls[:-1], rtol=1e-12)
    plan = build_plan("dpm_fast", sig.numpy(), eta=eta)
    assert plan.evaluations == len(sig) - 1  # one network evaluation per step of the schedule: k-diffusion's nfe


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("eta,rtol", [(0.0, 0.05), (0.0, 0.005), (0.6, 0.05)])
def test_dpm_adaptive_matches_k_diffusion(order, eta, rtol):
    sig = df.schedules.karras(10, 0.05, 12.0)
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(3)) * float(sig[0])
    solver = KDPMSolver(den)
    ref_noise = Noise(SHAPE, dtype=torch.float64)
    want, info = solver.dpm_solver_adaptive(x.double(), solver.t(sig[0]), solver.t(sig[-2]), order=order, rtol=rtol,
                                            eta=eta, noise_sampler=ref_noise)
    calls = []

    def counting(x, s):
        calls.append(1)
        return den(x, s)

    got = df.sample(counting, x.double(), sig, "dpm_adaptive", order=order, rtol=rtol, eta=eta,
                    noise_sampler=Noise(SHAPE, dtype=torch.float64))
    _compare(got, want, f"dpm_adaptive order={order} eta={eta} rtol={rtol}", torch.float64)
    assert len(calls) == info["nfe"]
    if eta == 0:
        # In float32 the error estimate rounds, the controller's step sizes move with it and the grid differs
        # (k-diffusion's own float32 run moves as much): the run stays within the solver's own error of the
        # exact probability-flow solution.
        exact = MU + (x.double() - MU) * math.sqrt(S2 + float(sig[-2]) ** 2) / math.sqrt(S2 + float(sig[0]) ** 2)
        got32 = df.sample(den, x, sig, "dpm_adaptive", order=order, rtol=rtol)
        own = (want - exact).abs().max().item()
        assert (got32.double() - want).abs().max().item() <= 2 * own + 1e-5, own


def test_dpm_adaptive_reads_one_value_per_attempted_step():
    """The documented exception: one host read (the error) per attempted step, nothing else."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name == "aten::_local_scalar_dense":
                Count.n += 1
            return func(*args, **(kwargs or {}))

    sig = df.schedules.karras(10, 0.05, 12.0)
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(3)) * 12.0
    steps = []
    with Count():
        df.sample(den, x, sig, "dpm_adaptive", callback=lambda d: steps.append(d["attempts"]))
    assert Count.n == steps[-1] > 0
    with pytest.raises(ValueError, match="cuda_graph=True cannot capture dpm_adaptive"):
        df.sample(den, x, sig, "dpm_adaptive", cuda_graph=True)


# ------------------------------------------------------------------------------------------------ flow

def _flow_as_ve(flow_sig):
    """A flow state x = (1 - s) x0 + s n is (1 - s) times a VE state at sigma s / (1 - s)."""
    return torch.tensor([s / (1 - s) for s in flow_sig.tolist()], dtype=torch.float64)


def flow_den(x, sigma):
    t = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *[1] * (x.dim() - 1))
    a = 1 - t
    return (MU + a * S2 / (a * a * S2 + t * t) * (x.double() - a * MU)).to(x.dtype)


@pytest.mark.parametrize("name,ref,opts", [
    ("dpm_2_ancestral", kd_dpm_2_ancestral, {}), ("dpmpp_2s_ancestral", kd_dpmpp_2s_ancestral, {"eta": 0.8}),
    ("dpmpp_sde", kd_dpmpp_sde, {}), ("res_multistep_ancestral", comfy_res_multistep, {}),
    ("lcm", comfy_lcm, {}),
])
def test_flow_samplers_are_the_ve_loop_in_x_over_alpha(name, ref, opts):
    """In the flow parametrization every exponential-integrator sampler is k-diffusion's loop run on the VE
    state x / alpha at sigma / alpha (the same model, reparametrized)."""
    flow_sig = torch.linspace(0.95, 0.0, 8, dtype=torch.float64)
    ve_sig = _flow_as_ve(flow_sig)
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(0)) * 0.95 + 0.05 * MU

    def ve_model(xv, sv):  # the flow model seen in VE variables
        s = sv / (1 + sv)
        return flow_den(xv * (1 - s).reshape(-1, *[1] * (xv.dim() - 1)), s)

    want = ref(ve_model, x.double() / 0.05, ve_sig, Noise(SHAPE), **opts)
    got = df.sample(flow_den, x, flow_sig, name, parametrization="flow", noise_sampler=Noise(SHAPE), **opts)
    _compare(got, want, f"{name} flow")


# --------------------------------------------------------------------------------------- diffusers classes

def _vp_run(sched, x_ve0, sigma_of_t, model_eps):
    """Run a diffusers scheduler in its VP state, returning the VE state at its last sigma."""
    sig = sched.sigmas.double()
    x = x_ve0 / math.sqrt(1 + float(sig[0]) ** 2)
    for t in sched.timesteps:
        s = sigma_of_t(t)
        x = sched.step(model_eps(x, s, t), t, x).prev_sample
    return x * math.sqrt(1 + float(sig[-1]) ** 2)


def _diffusers(cls_name, **kw):
    diffusers = pytest.importorskip("diffusers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(diffusers, cls_name)(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                            beta_schedule="scaled_linear", **kw)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("n", [3, 8, 25])
def test_deis_logrho_matches_diffusers(order, n):
    """diffusers' DEIS in float64 (its sigmas cast after set_timesteps: its float32 third-order coefficients
    lose ~1e-4 to cancellation) against our float64 run to 1e-10 and our float32 run to float32 rounding."""
    sched = _diffusers("DEISMultistepScheduler", solver_order=order)
    sched.set_timesteps(n)
    sched.sigmas = sched.sigmas.double()
    sig = sched.sigmas
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(n), dtype=torch.float64) * float(sig[0])

    def eps(x_vp, s, t):
        a = 1 / math.sqrt(1 + s * s)
        return (x_vp - a * den(x_vp / a, s)) / (s * a)

    idx = iter(range(len(sig)))
    ref = _vp_run(sched, x0, lambda t: float(sig[next(idx)]), eps)
    torch.testing.assert_close(df.sample(den, x0, sig, "deis", mode="logrho", order=order), ref, rtol=1e-10,
                               atol=1e-10)
    ours = df.sample(den, x0.float(), sig, "deis", mode="logrho", order=order)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("n", [2, 5, 12])
def test_dpm_2_ancestral_matches_diffusers_kdpm2_ancestral(n):
    """KDPM2AncestralDiscreteScheduler run in float64: its per-step arrays recomputed from its own sigmas with its
    own set_timesteps formulas in float64 (it builds them in float32, and the last step of its schedule, e.g.
    0.32 -> 0.029 -> 0, amplifies that rounding 50-500-fold in both implementations)."""
    sched = _diffusers("KDPM2AncestralDiscreteScheduler")
    sched.set_timesteps(n)
    sigmas = sched.sigmas[0::2].double()  # [s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0, 0]: every other one
    sigmas_next = sigmas.roll(-1)
    sigmas_next[-1] = 0.0
    sigmas_up = (sigmas_next ** 2 * (sigmas ** 2 - sigmas_next ** 2) / sigmas ** 2) ** 0.5
    sigmas_down = (sigmas_next ** 2 - sigmas_up ** 2) ** 0.5
    sigmas_down[-1] = 0.0
    sigmas_interpol = sigmas.log().lerp(sigmas_down.log(), 0.5).exp()
    sigmas_interpol[-2:] = 0.0
    inter = lambda v: torch.cat([v[:1], v[1:].repeat_interleave(2), v[-1:]])  # noqa: E731
    sched.sigmas, sched.sigmas_interpol = inter(sigmas), inter(sigmas_interpol)
    sched.sigmas_up, sched.sigmas_down = inter(sigmas_up), inter(sigmas_down)
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(n), dtype=torch.float64) * float(sigmas[0])
    g = torch.Generator().manual_seed(5)
    x = x0.clone()
    for t in sched.timesteps:
        if sched.step_index is None:
            sched._init_step_index(t)
        i = sched.step_index
        s = sched.sigmas[i] if sched.state_in_first_order else sched.sigmas_interpol[i - 1]
        d = den(x, float(s))
        x = sched.step((x - d) / s, t, x, generator=g).prev_sample
    ours = df.sample(den, x0, sigmas, "dpm_2_ancestral", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("n", [1, 4, 8])
def test_lcm_matches_diffusers_lcm_scheduler(n):
    """LCMScheduler with its boundary-condition scalings folded into the denoiser (they belong to the model)."""
    sched = _diffusers("LCMScheduler")
    sched.set_timesteps(n)
    ac = sched.alphas_cumprod.double()
    ts = [int(t) for t in sched.timesteps]
    sig = torch.tensor([math.sqrt((1 - ac[t]) / ac[t]) for t in ts] + [0.0], dtype=torch.float64)

    def lcm_den(x, sigma):  # the consistency function c_skip * x_vp + c_out * x0, in VE units
        s = float(sigma.reshape(-1)[0])
        t = ts[int(np.argmin([abs(v - s) for v in sig[:-1].tolist()]))]
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
        return (c_out * den(x, sigma).double() + c_skip * x.double() / math.sqrt(1 + s * s)).to(x.dtype)

    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(n)) * float(sig[0])
    g = torch.Generator().manual_seed(9)
    x = x0 / math.sqrt(1 + float(sig[0]) ** 2)
    for t, s in zip(sched.timesteps, sig.tolist()):
        a = math.sqrt(float(ac[int(t)]))
        eps = (x - a * den(x / a, s)) / math.sqrt(1 - a * a)
        x = sched.step(eps.float(), t, x.float(), generator=g).prev_sample
    ours = df.sample(lcm_den, x0, sig, "lcm", generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(ours, x.float(), rtol=1e-5, atol=2e-6)
