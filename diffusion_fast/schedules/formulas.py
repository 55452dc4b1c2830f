"""Closed-form noise schedules: the sigmas a sampler walks down (k-diffusion's and ComfyUI's rules, float64).

* :func:`karras`, :func:`exponential`, :func:`polyexponential` — k-diffusion's ``get_sigmas_*`` formulas.
* :func:`flow_matching` — the shifted linspace of diffusers' ``FlowMatchEulerDiscreteScheduler``.
* :func:`normal`, :func:`sgm_uniform`, :func:`simple`, :func:`ddim_uniform`, :func:`beta` — ComfyUI's
  schedulers of those names, which pick noise levels from the model's own table of training sigmas
  (``model_sigmas``: :func:`discrete_sigmas` for a DDPM/LDM model such as SD, :func:`edm_sigmas` for a
  continuous-sigma model).
* :func:`align_your_steps` — NVIDIA's published Align Your Steps levels (:mod:`.ays`), log-linearly
  interpolated to any step count.
* :func:`get` — name lookup for the CLI (names in :data:`SCHEDULES`).

Every schedule is a float64 CPU tensor of ``n + 1`` sigmas, decreasing to a final 0 (``ddim_uniform`` and
``beta`` can give a step more or fewer, as ComfyUI's do).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .ays import NOISE_LEVELS

SCHEDULES = ("karras", "exponential", "polyexponential", "flow", "normal", "sgm_uniform", "simple", "ddim_uniform",
             "beta", "ays_sd15", "ays_sdxl", "ays_svd")

# --------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------


def _check_n(n: object, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return int(n)


def _check_float(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()  # host-side construction only
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return v


def _check_range(sigma_min: object, sigma_max: object) -> tuple[float, float]:
    lo = _check_float("sigma_min", sigma_min, positive=True)
    hi = _check_float("sigma_max", sigma_max, positive=True)
    if not lo < hi:
        raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return lo, hi


def _append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(1)])


# --------------------------------------------------------------------------------------------------------
# Closed-form schedules (k-diffusion's formulas, float64)
# --------------------------------------------------------------------------------------------------------


def _karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) noise levels, k-diffusion's ``get_sigmas_karras``.

    ``sigma_i = (max^(1/rho) + i / (n - 1) * (min^(1/rho) - max^(1/rho)))^rho`` for i = 0 .. n-1.

    Args:
        n: number of sampling steps (>= 1).
        sigma_min, sigma_max: the range, ``0 < sigma_min < sigma_max``.
        rho: the spacing exponent (> 0); 7 is the paper's choice.

    Returns:
        ``[n + 1]`` float64 CPU tensor from ``sigma_max`` down to ``sigma_min``, then 0.
    """
    n = _check_n(n)
    lo, hi = _check_range(sigma_min, sigma_max)
    rho = _check_float("rho", rho, positive=True)
    return _append_zero(_karras(n, lo, hi, rho))


def exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Noise levels evenly spaced in log sigma (k-diffusion's ``get_sigmas_exponential``).

    Returns:
        ``[n + 1]`` float64 CPU tensor from ``sigma_max`` down to ``sigma_min``, then 0.
    """
    n = _check_n(n)
    lo, hi = _check_range(sigma_min, sigma_max)
    return _append_zero(_exponential(n, lo, hi))


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """Log sigma on a polynomial ramp (k-diffusion's ``get_sigmas_polyexponential``; rho=1 is exponential).

    Returns:
        ``[n + 1]`` float64 CPU tensor from ``sigma_max`` down to ``sigma_min``, then 0.
    """
    n = _check_n(n)
    lo, hi = _check_range(sigma_min, sigma_max)
    rho = _check_float("rho", rho, positive=True)
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    return _append_zero(torch.exp(ramp * (math.log(hi) - math.log(lo)) + math.log(lo)))


def _flow_train_range(shift: float | None, num_train_timesteps: int) -> tuple[float, float]:
    # FlowMatchEulerDiscreteScheduler.__init__ builds its float32 training grid t/T, shifts it once (unless
    # the shift is dynamic, shift=None here) and keeps the ends as sigma_min / sigma_max; set_timesteps then
    # spans [sigma_max, sigma_min] and shifts again. Same float32 arithmetic here, so the ends are equal.
    s = torch.tensor([float(num_train_timesteps), 1.0], dtype=torch.float32) / num_train_timesteps
    if shift is not None:
        s = shift * s / (1 + (shift - 1) * s)
    return float(s[1]), float(s[0])


def _shift(s: np.ndarray, shift: float) -> np.ndarray:
    return shift * s / (1 + (shift - 1) * s)


def _flow_linspace(n: int, sigma_min: float, sigma_max: float, t_train: int) -> np.ndarray:
    # diffusers spaces in timestep units (sigma * T) and divides back; same float64 numbers here.
    return np.linspace(sigma_max * t_train, sigma_min * t_train, n) / t_train


def flow_matching(n: int, shift: float = 1.0, *, sigma_min: float | None = None,
                  sigma_max: float | None = None, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Rectified-flow sigmas with a timestep shift, as diffusers' ``FlowMatchEulerDiscreteScheduler``.

    ``s`` runs linearly from ``sigma_max`` to ``sigma_min`` over ``n`` points and each is shifted,
    ``sigma = shift * s / (1 + (shift - 1) * s)``; shift > 1 spends more steps at high noise (SD3 uses 3).
    The sampler's state is ``x = (1 - sigma) * x0 + sigma * noise``.

    Args:
        n: number of sampling steps (>= 1), at most ``num_train_timesteps``.
        shift: the shift (> 0); 1 leaves the linspace unchanged.
        sigma_min: the low end of the unshifted linspace. Default: diffusers' value, ``shift`` applied
            once to ``1 / num_train_timesteps`` (diffusers shifts that end twice; kept for equality).
        sigma_max: the high end of the unshifted linspace, in (sigma_min, 1]. Default: 1 (diffusers'
            float32 value of the shifted 1, which can be 1 ulp off).
        num_train_timesteps: the model's training grid size.

    Returns:
        ``[n + 1]`` float64 CPU tensor, decreasing, ending in 0. The model's timestep for each sigma is
        ``sigma * num_train_timesteps``.
    """
    n = _check_n(n)
    shift = _check_float("shift", shift, positive=True)
    t_train = _check_n(num_train_timesteps, "num_train_timesteps")
    if n > t_train:
        raise ValueError(f"n must be <= num_train_timesteps ({t_train}), got {n}")
    lo_default, hi_default = _flow_train_range(shift, t_train)
    if sigma_max is not None and _check_float("sigma_max", sigma_max, positive=True) > 1:
        raise ValueError(f"sigma_max must be <= 1 for flow matching, got {sigma_max}")
    lo, hi = _check_range(lo_default if sigma_min is None else sigma_min,
                          hi_default if sigma_max is None else sigma_max)
    return _append_zero(torch.from_numpy(_shift(_flow_linspace(n, lo, hi, t_train), shift)))


# --------------------------------------------------------------------------------------------------------
# ComfyUI's schedulers: noise levels picked from the model's table of training sigmas
# --------------------------------------------------------------------------------------------------------


def _discrete_sigmas64(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    t_train = _check_n(num_train_timesteps, "num_train_timesteps")
    lo = _check_float("beta_start", beta_start, positive=True)
    hi = _check_float("beta_end", beta_end, positive=True)
    if not lo < hi < 1:
        raise ValueError(f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    betas = torch.linspace(lo ** 0.5, hi ** 0.5, t_train, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - ac) / ac) ** 0.5


def discrete_sigmas(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                    beta_end: float = 0.012) -> torch.Tensor:
    """The training noise levels of a DDPM / latent-diffusion model (SD 1.x, SD 2.x, SDXL), as ComfyUI's
    ``ModelSamplingDiscrete`` holds them: betas linear in sqrt (diffusers' "scaled_linear", ComfyUI's "linear"),
    ``sigma_t = sqrt((1 - alphas_cumprod) / alphas_cumprod)`` in float64, stored as float32.

    Returns:
        ``[num_train_timesteps]`` float64 CPU tensor, increasing (index = the model's timestep).
    """
    return _discrete_sigmas64(num_train_timesteps, beta_start, beta_end).float().double()


def edm_sigmas(sigma_min: float, sigma_max: float, n: int = 1000) -> torch.Tensor:
    """The table ComfyUI keeps for a continuous-sigma (EDM-style) model: ``n`` levels evenly spaced in log sigma.

    Returns:
        ``[n]`` float64 CPU tensor, increasing from ``sigma_min`` to ``sigma_max``.
    """
    lo, hi = _check_range(sigma_min, sigma_max)
    return torch.linspace(math.log(lo), math.log(hi), _check_n(n), dtype=torch.float64).exp()


def _table(model_sigmas) -> tuple[torch.Tensor, torch.Tensor]:
    """(the table as float64, its log as ComfyUI keeps it: float32 of the float64 log)."""
    if model_sigmas is None:  # SD's table; ComfyUI takes the log before rounding the sigmas to float32
        raw = _discrete_sigmas64(1000, 0.00085, 0.012)
        return raw.float().double(), raw.log().float()
    t = torch.as_tensor(model_sigmas, dtype=torch.float64).reshape(-1)
    if t.numel() < 2 or not bool(torch.isfinite(t).all()) or bool((t <= 0).any()) or bool((t[1:] <= t[:-1]).any()):
        raise ValueError("model_sigmas must be the model's training sigmas: at least 2 finite values > 0, "
                         f"increasing (index = timestep), got {t.numel()} values")
    return t, t.log().float()


def _interp_log_sigma(log_sigmas: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    # ComfyUI's ModelSamplingDiscrete.sigma: log sigma linear between the neighbouring timesteps, in float32,
    # one timestep at a time as ComfyUI calls it (a vectorised exp can differ from the scalar one by an ulp).
    out = []
    for t in ts:
        t = t.float().clamp(0, log_sigmas.numel() - 1)
        lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
        out.append(((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp())
    return torch.stack(out)


def _timestep_spaced(n: int, model_sigmas, sgm: bool) -> torch.Tensor:
    n = _check_n(n)
    _, log_sigmas = _table(model_sigmas)
    start = int((log_sigmas[-1] - log_sigmas).abs().argmin())  # ModelSamplingDiscrete.timestep(sigma_max)
    end = int((log_sigmas[0] - log_sigmas).abs().argmin())
    if sgm:
        ts = torch.linspace(start, end, n + 1)[:-1]
    else:
        ts = torch.linspace(start, end, n)
    return _append_zero(_interp_log_sigma(log_sigmas, ts).double())


def normal(n: int, model_sigmas=None) -> torch.Tensor:
    """ComfyUI's ``normal`` scheduler: ``n`` timesteps evenly spaced from the model's largest to its smallest
    training sigma (both ends included), sigma interpolated in log between timesteps, then 0.

    Args:
        n: steps (>= 1).
        model_sigmas: the model's training sigmas, increasing (default :func:`discrete_sigmas`: SD's).

    Returns:
        ``[n + 1]`` float64 CPU tensor.
    """
    return _timestep_spaced(n, model_sigmas, sgm=False)


def sgm_uniform(n: int, model_sigmas=None) -> torch.Tensor:
    """ComfyUI's ``sgm_uniform`` (Stability's SGM sampling): ``n + 1`` timesteps evenly spaced over the model's
    range, the last (the smallest sigma) dropped for the final 0 — the spacing LCM and Turbo models expect.

    Returns:
        ``[n + 1]`` float64 CPU tensor.
    """
    return _timestep_spaced(n, model_sigmas, sgm=True)


def simple(n: int, model_sigmas=None) -> torch.Tensor:
    """ComfyUI's ``simple`` scheduler: every ``len(table) / n``-th training sigma from the top, then 0.

    Returns:
        ``[n + 1]`` float64 CPU tensor.
    """
    n = _check_n(n)
    table, _ = _table(model_sigmas)
    ss = table.numel() / n
    return _append_zero(torch.stack([table[-(1 + int(x * ss))] for x in range(n)]))


def ddim_uniform(n: int, model_sigmas=None) -> torch.Tensor:
    """ComfyUI's ``ddim_uniform``: training sigmas 1, 1 + k, 1 + 2k, ... with ``k = len(table) // n``, reversed,
    then 0 (DDIM's "uniform" timestep skipping). As in ComfyUI, when ``n`` does not divide the table the
    stride leaves room for one more: e.g. 7 steps of a 1000-level table give 8.

    Returns:
        ``[m + 1]`` float64 CPU tensor, ``m`` = ``n`` or ``n + 1``.
    """
    n = _check_n(n)
    table, _ = _table(model_sigmas)
    picks = table[1::max(table.numel() // n, 1)]
    return _append_zero(picks.flip(0))


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b): the continued fraction of Numerical Recipes'
    ``betacf`` (modified Lentz), on the side of the mean where it converges fast; ~1e-15."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    front = math.exp(a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b))
    return front * h / a


def _beta_ppf(q: float, a: float, b: float) -> float:
    """The Beta(a, b) quantile (inverse of :func:`_betainc`) by bisection to float64 resolution."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def beta(n: int, model_sigmas=None, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """ComfyUI's ``beta`` scheduler (Lee et al. 2024, "Beta sampling is all you need"): timesteps at the
    quantiles ``1 - i / n`` of a Beta(alpha, beta) distribution over the model's table (rounded to a
    timestep; repeats dropped, so rounding can leave fewer than ``n`` steps), then 0. alpha = beta = 0.6 puts
    more steps at both ends.

    Returns:
        ``[m + 1]`` float64 CPU tensor, ``m <= n``.
    """
    n = _check_n(n)
    a = _check_float("alpha", alpha, positive=True)
    b = _check_float("beta", beta, positive=True)
    table, _ = _table(model_sigmas)
    total = table.numel() - 1
    qs = 1 - np.linspace(0, 1, n, endpoint=False)
    ts = np.rint(np.array([_beta_ppf(float(q), a, b) for q in qs]) * total)
    picked, last = [], -1.0
    for t in ts:
        if t != last:
            picked.append(table[int(t)])
        last = t
    return _append_zero(torch.stack(picked))


def align_your_steps(n: int, model: str = "sd15") -> torch.Tensor:
    """Align Your Steps (Sabour et al. 2024): NVIDIA's published 10-step sigmas for ``"sd15"``, ``"sdxl"`` or
    ``"svd"`` (:mod:`.ays`); for other ``n`` interpolated log-linearly to ``n + 1`` levels. As in ComfyUI's
    ``AlignYourStepsScheduler`` the last level (the model's smallest sigma) becomes 0.

    Returns:
        ``[n + 1]`` float64 CPU tensor.
    """
    n = _check_n(n)
    if model not in NOISE_LEVELS:
        raise ValueError(f"model must be one of {', '.join(NOISE_LEVELS)} (the published tables), got {model!r}")
    levels = np.array(NOISE_LEVELS[model], dtype=np.float64)
    if n + 1 != levels.size:
        xs = np.linspace(0, 1, levels.size)
        levels = np.exp(np.interp(np.linspace(0, 1, n + 1), xs, np.log(levels[::-1])))[::-1].copy()
    levels[-1] = 0.0
    return torch.from_numpy(levels)


_GETTERS = {"karras": karras, "exponential": exponential, "polyexponential": polyexponential,
            "flow": flow_matching, "normal": normal, "sgm_uniform": sgm_uniform, "simple": simple,
            "ddim_uniform": ddim_uniform, "beta": beta,
            "ays_sd15": lambda n: align_your_steps(n, "sd15"), "ays_sdxl": lambda n: align_your_steps(n, "sdxl"),
            "ays_svd": lambda n: align_your_steps(n, "svd")}


def get(name: str, n: int, **kw: Any) -> torch.Tensor:
    """Look a schedule up by name (one of :data:`SCHEDULES`) and build it for ``n`` steps.

    ``get("karras", 30, sigma_min=0.03, sigma_max=14.6)``; keyword arguments go to the schedule function
    (``model_sigmas=`` for the ComfyUI table schedulers; none for ``ays_*``).

    Returns:
        ``[n + 1]`` float64 CPU tensor ending in 0.
    """
    if name not in _GETTERS:
        raise ValueError(f"schedule {name!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    return _GETTERS[name](n, **kw)
