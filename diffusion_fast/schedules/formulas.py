"""Closed-form noise schedules: the sigmas a sampler walks down (k-diffusion's formulas, float64).

* :func:`karras`, :func:`exponential`, :func:`polyexponential` — k-diffusion's ``get_sigmas_*`` formulas.
* :func:`flow_matching` — the shifted linspace of diffusers' ``FlowMatchEulerDiscreteScheduler``.
* :func:`get` — name lookup for the CLI (names in :data:`SCHEDULES`).

Every schedule is a float64 CPU tensor of ``n + 1`` sigmas, decreasing to a final 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

SCHEDULES = ("karras", "exponential", "polyexponential", "flow")

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


_GETTERS = {"karras": karras, "exponential": exponential, "polyexponential": polyexponential,
            "flow": flow_matching}


def get(name: str, n: int, **kw: Any) -> torch.Tensor:
    """Look a schedule up by name (one of :data:`SCHEDULES`) and build it for ``n`` steps.

    ``get("karras", 30, sigma_min=0.03, sigma_max=14.6)``; keyword arguments go to the schedule function.

    Returns:
        ``[n + 1]`` float64 CPU tensor ending in 0.
    """
    if name not in _GETTERS:
        raise ValueError(f"schedule {name!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    return _GETTERS[name](n, **kw)
