"""Schedules equal to what a diffusers scheduler computes: :func:`from_diffusers_config` and :class:`Schedule`.

A :class:`Schedule` holds the sigmas, the network's timesteps, the prediction type, the training
``alphas_cumprod`` and a device-side ``sigma_to_timestep``, equal to what diffusers' scheduler computes for
the same ``scheduler_config.json`` and step count.

This reproduces diffusers' arithmetic where it decides values: the training tables (betas,
``alphas_cumprod``, the sigma table and its log) are built in float32 exactly as diffusers builds them, since
those float32 numbers are what the network was trained against; everything after that (sigma interpolation,
Karras / exponential spacing, sigma -> timestep) runs in float64, so ``Schedule.sigmas`` equals diffusers'
float32 sigmas to float32 rounding and ``Schedule.timesteps`` equals diffusers' timesteps exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .formulas import (
    _check_float,
    _check_n,
    _exponential,
    _flow_linspace,
    _flow_train_range,
    _karras,
    _shift,
    flow_matching,
)

# What the network outputs, in the names diffusion_fast.sample(prediction=...) takes. diffusers calls the
# flow velocity "flow_prediction"; configs may use either name.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
_CONFIG_PREDICTION_TYPES = PREDICTION_TYPES + ("flow_prediction",)


def _log_sigma_to_t(log_sigmas: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """diffusers' ``_sigma_to_t`` as tensor ops: log_sigmas [T] increasing, sigma any shape, same dtype."""
    flat = sigma.clamp_min(1e-10).log().reshape(-1).contiguous()
    # Index of the last table entry <= log sigma (diffusers' cumsum-argmax), kept inside the table.
    low_idx = (torch.searchsorted(log_sigmas, flat, right=True) - 1).clamp(0, log_sigmas.shape[0] - 2)
    low = log_sigmas[low_idx]
    high = log_sigmas[low_idx + 1]
    # The table holds float32 numbers and diffusers takes their difference in float32; so does this.
    w = ((low - flat) / (low - high).float().to(low.dtype)).clamp(0, 1)
    return ((1 - w) * low_idx + w * (low_idx + 1)).reshape(sigma.shape)


# --------------------------------------------------------------------------------------------------------
# Schedule: sigmas + the network's timesteps
# --------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Schedule:
    """A sampling schedule for a model trained with a diffusers-style noise schedule.

    ``diffusion_fast.sample(model, z * s.init_noise_sigma, s.sigmas, ...)`` walks the trajectory the diffusers
    scheduler walks (the state in the sampler's parametrization; see ``latent_space`` for how diffusers holds it).

    Attributes:
        sigmas: ``[steps + 1]`` float64 CPU, strictly decreasing, ending where diffusers' last step lands:
            0, or ``final_sigma`` when the config says ``final_sigmas_type="sigma_min"`` (or DDIM's
            ``set_alpha_to_one=False``). For Heun / KDPM2 these are the step boundaries (diffusers repeats the
            inner ones for its two-stage steps; the sampler forms its own intermediate points).
        timesteps: ``[steps]`` CPU, the network's timestep at ``sigmas[:-1]``, the values
            ``scheduler.timesteps`` holds after ``set_timesteps(steps)`` (one per step for Heun / KDPM2).
            dtype: int64 for the classes whose diffusers timesteps are int64 (DDIM, DPMSolverMultistep,
            UniPCMultistep), float32 otherwise (diffusers' KDPM2 holds float64 with Karras / exponential
            sigmas; the float32 values here are those, rounded).
        prediction_type: what the network outputs, named as ``diffusion_fast.sample(prediction=...)``
            names it: "epsilon", "v_prediction", "sample" or "flow" (the velocity ``noise - x0``;
            diffusers' "flow_prediction").
        parametrization: "ve" (``x = x0 + sigma * noise``, network input ``x / sqrt(sigma^2 + 1)``) or
            "flow" (``x = (1 - sigma) * x0 + sigma * noise``).
        alphas_cumprod: ``[num_train_timesteps]`` float64 (diffusers' float32 values), None for flow models.
        num_train_timesteps: the training grid size.
        timestep_type: how :meth:`sigma_to_timestep` maps sigma: "discrete" (log-sigma interpolation in the
            training table), "continuous" (``0.25 * log(sigma)``), "flow" (``sigma * num_train_timesteps``).
        final_sigma: where diffusers' last step lands (``sigmas[-1]``).
        class_name: the diffusers scheduler class whose rules built this schedule.
        train_sigmas: ``[num_train_timesteps]`` float64, the training sigma of each timestep (diffusers'
            float32 values, increasing); None for flow models.
        log_sigmas: ``[num_train_timesteps]`` float64, their logs taken in float32 as diffusers takes them:
            the table :meth:`sigma_to_timestep` interpolates. None for flow models.
        init_noise_sigma: the standard deviation of the starting noise in the sampler's state: start from
            ``x = z * init_noise_sigma`` with ``z`` standard normal. For the classes that keep their latents
            in the sampler's state (``latent_space`` "ve" or "flow") this is diffusers' ``init_noise_sigma``
            (e.g. ``sqrt(sigma_max^2 + 1)`` for "leading" / "trailing" spacing of the Euler family); DDIM,
            DPM-Solver and UniPC start from unit-variance latents (their ``init_noise_sigma`` is 1), which is
            ``sqrt(sigmas[0]^2 + 1)`` here.
        latent_space: how the diffusers class holds its latents: "ve" (the sampler's state itself: Euler,
            Euler ancestral, Heun, KDPM2, LMS), "vp" (``x / sqrt(sigma^2 + 1)``: DDIM, DPM-Solver, UniPC) or
            "flow" (the flow state itself).
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    prediction_type: str = "epsilon"
    parametrization: str = "ve"
    alphas_cumprod: torch.Tensor | None = None
    num_train_timesteps: int = 1000
    timestep_type: str = "discrete"
    final_sigma: float = 0.0
    class_name: str = "EulerDiscreteScheduler"
    train_sigmas: torch.Tensor | None = field(default=None, repr=False)
    log_sigmas: torch.Tensor | None = field(default=None, repr=False)
    init_noise_sigma: float = 1.0
    latent_space: str = "ve"
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def steps(self) -> int:
        """Number of sampling steps (``len(sigmas) - 1``)."""
        return int(self.sigmas.shape[0]) - 1

    @property
    def sigma_min(self) -> float:
        """Smallest training sigma (e.g. for ``karras(n, s.sigma_min, s.sigma_max)``); 1/T for flow."""
        if self.train_sigmas is not None:
            return float(self.train_sigmas[0])
        return 1.0 / self.num_train_timesteps

    @property
    def sigma_max(self) -> float:
        """Largest training sigma; 1 for flow."""
        if self.train_sigmas is not None:
            return float(self.train_sigmas[-1])
        return 1.0

    def _log_sigma_table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        table = self._tables.get(key)
        if table is None:
            table = self.log_sigmas.to(device=device, dtype=dtype)
            self._tables[key] = table
        return table

    def sigma_to_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Map (continuous) sigmas to the network's timestep, as diffusers' ``_sigma_to_t``.

        "discrete": piecewise-linear interpolation of the timestep index in log sigma over the training
        table, clamped to [0, num_train_timesteps - 1] (sigma 0 maps to 0). "continuous": ``0.25 log sigma``
        (-inf at sigma 0). "flow": ``sigma * num_train_timesteps`` (DPM-Solver / UniPC truncate that to
        int64 in their ``timesteps``; this returns the exact value).

        Pure tensor arithmetic on ``sigma``'s device (no host synchronisation), so it can run inside a
        captured sampling loop. The log-sigma table is copied to a device on the first call there and
        cached; call once before capturing a CUDA graph.

        Args:
            sigma: any shape, floating point.

        Returns:
            Timesteps, same shape; float64 for float64 input, float32 otherwise.
        """
        if not isinstance(sigma, torch.Tensor):
            raise TypeError(f"sigma must be a torch.Tensor, got {type(sigma).__name__}")
        if not sigma.is_floating_point():
            raise TypeError(f"sigma must be a floating-point tensor, got dtype {sigma.dtype}")
        dtype = torch.float64 if sigma.dtype == torch.float64 else torch.float32
        s = sigma.to(dtype)
        if self.timestep_type == "flow":
            return s * self.num_train_timesteps
        if self.timestep_type == "continuous":
            return 0.25 * s.log()
        return _log_sigma_to_t(self._log_sigma_table(s.device, dtype), s)


# --------------------------------------------------------------------------------------------------------
# diffusers scheduler configs
# --------------------------------------------------------------------------------------------------------

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_SPACINGS = ("linspace", "leading", "trailing")


@dataclass(frozen=True)
class _ClassRules:
    family: str                     # "euler" (float timesteps, sigma interp), "ddim", "multistep", "flow"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    spacing: str = "linspace"
    beta_schedules: tuple = _BETA_SCHEDULES
    spaced_sigmas: bool = True      # honours use_karras_sigmas / use_exponential_sigmas
    zero_snr: bool = False          # honours rescale_betas_zero_snr
    final_sigmas_type: bool = False  # honours final_sigmas_type
    flow_sigmas: bool = False       # honours use_flow_sigmas


_CLASSES = {
    "EulerDiscreteScheduler": _ClassRules("euler", zero_snr=True, final_sigmas_type=True),
    "EulerAncestralDiscreteScheduler": _ClassRules("euler", spaced_sigmas=False, zero_snr=True),
    "HeunDiscreteScheduler": _ClassRules("euler", 0.00085, 0.012, beta_schedules=_BETA_SCHEDULES + ("exp",)),
    "KDPM2DiscreteScheduler": _ClassRules("euler", 0.00085, 0.012),
    "LMSDiscreteScheduler": _ClassRules("euler"),
    "DDIMScheduler": _ClassRules("ddim", spacing="leading", spaced_sigmas=False, zero_snr=True),
    "DPMSolverMultistepScheduler": _ClassRules("multistep", zero_snr=True, final_sigmas_type=True,
                                               flow_sigmas=True),
    "UniPCMultistepScheduler": _ClassRules("multistep", zero_snr=True, final_sigmas_type=True,
                                           flow_sigmas=True),
    "FlowMatchEulerDiscreteScheduler": _ClassRules("flow"),
}
SCHEDULER_CLASSES = tuple(_CLASSES)


def _allowed(values) -> str:
    return ", ".join(repr(v) for v in values)


def _choice(cfg: Mapping, key: str, default: Any, allowed, cls: str) -> Any:
    value = cfg.get(key, default)
    if value is None:
        value = default
    if value not in allowed:
        raise ValueError(f"config[{key!r}] = {value!r} is not supported for {cls}; "
                         f"allowed: {_allowed(allowed)}")
    return value


def _flag(cfg: Mapping, key: str) -> bool:
    return bool(cfg.get(key) or False)


def _betas_for_alpha_bar(t_train: int, kind: str) -> torch.Tensor:
    if kind == "cosine":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    else:  # "exp"
        def alpha_bar(t: float) -> float:
            return math.exp(t * -12.0)
    betas = [min(1 - alpha_bar((i + 1) / t_train) / alpha_bar(i / t_train), 0.999) for i in range(t_train)]
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    # Lin et al. 2023, Algorithm 1, in diffusers' float32 operation order.
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0 = alphas_bar_sqrt[0].clone()
    a_last = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= a_last
    alphas_bar_sqrt *= a0 / (a0 - a_last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def _alphas_cumprod(cfg: Mapping, rules: _ClassRules, cls: str, t_train: int) -> torch.Tensor:
    """The float32 training ``alphas_cumprod`` [T], built as diffusers builds it."""
    trained = cfg.get("trained_betas")
    if trained is not None:
        betas = torch.tensor(np.asarray(trained, dtype=np.float64), dtype=torch.float32)
        if betas.ndim != 1 or betas.shape[0] != t_train:
            raise ValueError(f"config['trained_betas'] must hold num_train_timesteps ({t_train}) values, "
                             f"got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("config['trained_betas'] must lie in (0, 1)")
    else:
        schedule = _choice(cfg, "beta_schedule", "linear", rules.beta_schedules, cls)
        b0 = _check_float("config['beta_start']", cfg.get("beta_start", rules.beta_start), positive=True)
        b1 = _check_float("config['beta_end']", cfg.get("beta_end", rules.beta_end), positive=True)
        if schedule == "linear":
            betas = torch.linspace(b0, b1, t_train, dtype=torch.float32)
        elif schedule == "scaled_linear":
            betas = torch.linspace(b0**0.5, b1**0.5, t_train, dtype=torch.float32) ** 2
        elif schedule == "squaredcos_cap_v2":
            betas = _betas_for_alpha_bar(t_train, "cosine")
        else:
            betas = _betas_for_alpha_bar(t_train, "exp")
        if schedule in ("linear", "scaled_linear") and not (b0 < 1 and b1 < 1):
            raise ValueError(f"config['beta_start'] and config['beta_end'] must be < 1, got {b0}, {b1}")
    zero_snr = rules.zero_snr and _flag(cfg, "rescale_betas_zero_snr")
    if zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if zero_snr:
        # As diffusers' Euler / DPM-Solver / UniPC: keep the terminal sigma finite (4096). DDIM keeps 0
        # there (sigma = inf); the same substitution is made for it.
        alphas_cumprod[-1] = 2**-24
    return alphas_cumprod


def _spaced_timesteps(spacing: str, n: int, t_train: int, offset: int, integer: bool) -> np.ndarray:
    """The Euler-family (float32) and DDIM (int64) timestep spacings, in sampling order."""
    if spacing == "linspace":
        if integer:
            return np.linspace(0, t_train - 1, n).round()[::-1].copy().astype(np.int64)
        return np.linspace(0, t_train - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = t_train // n
        t = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64 if integer else np.float32)
        return t + offset
    # trailing. np.arange with a float step can overshoot by one element (a timestep of -1 after the
    # shift); diffusers keeps that extra step, here the schedule has exactly n.
    t = np.round(np.arange(t_train, 0, -t_train / n))[:n].astype(np.int64 if integer else np.float32)
    return t - 1


def _multistep_timesteps(spacing: str, n: int, t_train: int, last: int, offset: int) -> np.ndarray:
    """DPMSolverMultistep / UniPCMultistep spacings: n + 1 points, the last (t = 0) dropped."""
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + offset
    t = np.arange(last, 0, -t_train / n).round()[:n].copy().astype(np.int64)
    return t - 1


def _beta_ppf(n: int) -> np.ndarray:
    try:
        from scipy import stats
    except ImportError:  # pragma: no cover - scipy is in the test extra
        raise ImportError("config['use_beta_sigmas'] = True needs scipy (as diffusers does): "
                          "pip install scipy") from None
    return np.array([stats.beta.ppf(t, 0.6, 0.6) for t in 1 - np.linspace(0, 1, n)])


def _spaced_sigmas(kind: str, n: int, lo: float, hi: float) -> np.ndarray:
    if not (0 < lo and (n == 1 or lo <= hi)):
        raise ValueError(f"the {kind} sigma range must satisfy 0 < sigma_min <= sigma_max, got "
                         f"sigma_min={lo}, sigma_max={hi} (config['sigma_min'] / config['sigma_max'] override "
                         "the range taken from the training sigmas)")
    if kind == "beta":  # Lee et al. 2024, "Beta Sampling is All You Need", as diffusers' _convert_to_beta
        return lo + _beta_ppf(n) * (hi - lo)
    return (_karras(n, lo, hi) if kind == "karras" else _exponential(n, lo, hi)).numpy()


def _config_range(cfg: Mapping, lo: float, hi: float) -> tuple[float, float]:
    # diffusers' _convert_to_karras / _convert_to_exponential / _convert_to_beta read sigma_min / sigma_max
    # from the config whenever the key is present and not None (whether or not the class declares it).
    if cfg.get("sigma_min") is not None:
        lo = _check_float("config['sigma_min']", cfg["sigma_min"], positive=True)
    if cfg.get("sigma_max") is not None:
        hi = _check_float("config['sigma_max']", cfg["sigma_max"], positive=True)
    return lo, hi


_SPACED_KINDS = ("karras", "exponential", "beta")


def _spacing_kind(cfg: Mapping, rules: _ClassRules, cls: str) -> str | None:
    if not rules.spaced_sigmas:
        return None
    on = [k for k in _SPACED_KINDS if _flag(cfg, f"use_{k}_sigmas")]
    if len(on) > 1:
        raise ValueError(" and ".join(f"config['use_{k}_sigmas']" for k in on) + " are all True; choose one")
    return on[0] if on else None


def _mu(cfg: Mapping, mu: float | None, cls: str) -> float | None:
    if _flag(cfg, "use_dynamic_shifting"):
        if mu is None:
            raise ValueError(f"mu is required: config['use_dynamic_shifting'] is True for {cls} "
                             "(diffusers pipelines compute it from the image sequence length)")
        return _check_float("mu", mu)
    if mu is not None:
        raise ValueError(f"mu = {mu} was given but config['use_dynamic_shifting'] is not True for {cls}")
    return None


def _time_shift(cfg: Mapping, mu: float, t: np.ndarray, cls: str) -> np.ndarray:
    kind = _choice(cfg, "time_shift_type", "exponential", ("exponential", "linear"), cls)
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    return mu / (mu + (1 / t - 1) ** 1.0)


def _stretch_to_terminal(cfg: Mapping, t: np.ndarray) -> np.ndarray:
    # Rescale 1 - t so the last sigma lands on shift_terminal (LTX-Video's schedule).
    terminal = _check_float("config['shift_terminal']", cfg["shift_terminal"])
    if not 0 <= terminal < 1:
        raise ValueError(f"config['shift_terminal'] must be in [0, 1), got {terminal}")
    if t.shape[0] < 2:
        raise ValueError("config['shift_terminal'] needs steps >= 2 (with one step there is nothing to "
                         "stretch; diffusers produces NaN)")
    one_minus_z = 1 - t
    scale = one_minus_z[-1] / (1 - terminal)
    return 1 - one_minus_z / scale


def _train_sigma(alphas_cumprod: torch.Tensor, index: int) -> float:
    a = alphas_cumprod[index]
    return float(((1 - a) / a) ** 0.5)


def _sigma_to_t_numpy(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' ``_sigma_to_t`` literally, in the dtype of its inputs (float32 for custom sigmas)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


# --------------------------------------------------------------------------------------------------------
# from_diffusers_config
# --------------------------------------------------------------------------------------------------------

# Which custom schedules each class's set_timesteps takes (diffusers 0.42): "timesteps", "sigmas".
_CUSTOM = {
    "EulerDiscreteScheduler": ("timesteps", "sigmas"),
    "HeunDiscreteScheduler": ("timesteps",),
    "DPMSolverMultistepScheduler": ("timesteps",),
    "UniPCMultistepScheduler": ("sigmas",),
    "FlowMatchEulerDiscreteScheduler": ("timesteps", "sigmas"),
}


def _source(config: Any, class_name: str | None) -> tuple[dict, str]:
    """(config without the keys diffusers filled with defaults, the class whose rules apply)."""
    if isinstance(config, Mapping):
        cfg, source, what = config, config.get("_class_name"), "config['_class_name']"
    elif isinstance(getattr(config, "config", None), Mapping):  # a diffusers scheduler object
        cfg, source, what = config.config, type(config).__name__, "the scheduler passed"
    else:
        raise TypeError(f"config must be a dict (scheduler_config.json) or a diffusers scheduler, "
                        f"got {type(config).__name__}")
    if class_name is None and not source:
        raise ValueError("config has no '_class_name' (a live scheduler's .config carries none), so the timestep "
                         "rules are unknown: pass the scheduler object itself (from_diffusers_config(pipe.scheduler, "
                         f"steps)) or class_name= naming the diffusers class to follow, one of "
                         f"{_allowed(SCHEDULER_CLASSES)}")
    cls = class_name if class_name is not None else source
    if cls not in _CLASSES:
        if class_name is not None:
            raise ValueError(f"class_name = {cls!r} is not a supported scheduler class; "
                             f"allowed: {_allowed(SCHEDULER_CLASSES)}")
        name = f"{what} = {cls!r}" if isinstance(config, Mapping) else f"{cls} ({what})"
        raise ValueError(f"{name} is not a class whose timestep rules are reproduced here (PNDMScheduler's PLMS, "
                         "for one, has no sampler); its noise schedule (betas, steps_offset, prediction_type, ...) "
                         f"is used as is: pass class_name= naming the rules to sample with, one of "
                         f"{_allowed(SCHEDULER_CLASSES)}")
    # Keys the scheduler filled with its own defaults are not part of its config for another class (diffusers'
    # from_config drops them, so that class's defaults apply); for the same class they change nothing.
    defaults = set(cfg.get("_use_default_values") or ())
    return {k: v for k, v in cfg.items() if k not in defaults}, cls


def _custom_values(name: str, values: Any, integer: bool = False) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a 1-D sequence of numbers: {exc}") from None
    if arr.ndim != 1 or arr.shape[0] == 0 or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {arr.shape} "
                         f"and dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name} must be finite and >= 0, got {arr.tolist()}")
    return arr


def _check_custom(cls: str, cfg: Mapping, steps: Any, timesteps: Any, sigmas: Any, kind: str | None) -> int | None:
    """Validate steps / timesteps / sigmas the way diffusers' set_timesteps does; returns steps (or None)."""
    allowed = _CUSTOM.get(cls, ())
    for name, value in (("timesteps", timesteps), ("sigmas", sigmas)):
        if value is not None and name not in allowed:
            takes = f"takes only {' and '.join(f'{a}=' for a in allowed)}" if allowed else "takes neither"
            raise ValueError(f"{name}= is not accepted for {cls} (its set_timesteps {takes} of timesteps= and "
                             "sigmas=)")
    flow = cls == "FlowMatchEulerDiscreteScheduler"
    if timesteps is not None and sigmas is not None and not flow:
        raise ValueError("pass only one of timesteps= and sigmas=")
    custom = timesteps if timesteps is not None else sigmas
    if custom is None:
        if steps is None:
            raise ValueError("steps is required (or timesteps= / sigmas= where the class takes them)")
        return None
    if steps is not None and not flow and not cls == "UniPCMultistepScheduler":
        raise ValueError(f"pass steps or custom {'timesteps' if timesteps is not None else 'sigmas'}, not both")
    if kind is not None and not flow:
        raise ValueError(f"custom timesteps= / sigmas= cannot be combined with config['use_{kind}_sigmas'] for {cls}")
    if cls == "EulerDiscreteScheduler" and timesteps is not None and cfg.get("timestep_type") == "continuous" \
            and cfg.get("prediction_type") == "v_prediction":
        raise ValueError("custom timesteps= cannot be combined with config['timestep_type'] = 'continuous' and "
                         "v_prediction")
    if cls == "DPMSolverMultistepScheduler" and (_flag(cfg, "use_lu_lambdas") or _flag(cfg, "use_flow_sigmas")):
        key = "use_lu_lambdas" if _flag(cfg, "use_lu_lambdas") else "use_flow_sigmas"
        raise ValueError(f"custom timesteps= cannot be combined with config['{key}'] for {cls} (diffusers ignores "
                         "them there)")
    if cls == "UniPCMultistepScheduler" and not _flag(cfg, "use_flow_sigmas"):
        raise ValueError(f"custom sigmas= need config['use_flow_sigmas'] = True for {cls}")
    if flow and timesteps is not None and sigmas is not None and len(timesteps) != len(sigmas):
        raise ValueError(f"timesteps ({len(timesteps)} values) and sigmas ({len(sigmas)}) must have the same length")
    n = len(custom) - 1 if (cls == "EulerDiscreteScheduler" and sigmas is not None) else len(custom)
    if steps is not None and _check_n(steps, "steps") != n:
        raise ValueError(f"steps = {steps} but {len(custom)} custom values were given")
    if n < 1:
        raise ValueError("custom sigmas= for EulerDiscreteScheduler hold steps + 1 values (the last is where the "
                         "final step lands); got 1")
    return n


def from_diffusers_config(config: Mapping[str, Any] | Any, steps: int | None = None, *,
                          class_name: str | None = None, mu: float | None = None, timesteps: Any = None,
                          sigmas: Any = None) -> Schedule:
    """Build the schedule a diffusers scheduler computes for ``config`` and ``set_timesteps(steps)``.

    ``config`` is a diffusers scheduler object (``pipe.scheduler``) or the dict diffusers stores as
    ``scheduler_config.json``. The class named by the object's type or ``config["_class_name"]`` decides the
    timestep rules; ``class_name`` overrides it, e.g. to sample a model whose config names PNDMScheduler
    (whose PLMS method has no sampler here; its noise schedule is used as is) with DDIMScheduler's rules. A
    live scheduler's ``.config`` carries no ``_class_name``: passed bare without ``class_name`` it is an error.
    Keys the scheduler filled with its defaults (``_use_default_values``) are dropped, as diffusers'
    ``from_config`` drops them, so the rules class's own defaults apply. Keys the class does not take are
    ignored, as diffusers ignores them (e.g. ``use_karras_sigmas`` for EulerAncestral / DDIM).

    Honoured keys: num_train_timesteps, beta_start, beta_end, beta_schedule (linear, scaled_linear,
    squaredcos_cap_v2; Heun also exp), trained_betas, rescale_betas_zero_snr, timestep_spacing (linspace,
    leading, trailing), steps_offset, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas (needs
    scipy), sigma_min / sigma_max (the Karras / exponential / beta range), final_sigmas_type, prediction_type,
    timestep_type (Euler), lambda_min_clipped and use_lu_lambdas (DPM-Solver), use_flow_sigmas, flow_shift,
    shift, shift_terminal, use_dynamic_shifting (with ``mu``), time_shift_type, set_alpha_to_one (DDIM).

    Where this differs from diffusers, by design:

    * Heun / KDPM2: ``sigmas`` are the step boundaries and ``timesteps`` one per step (diffusers interleaves
      repeated / intermediate values for its two-stage steps).
    * DDIM has no sigmas in diffusers: here ``sigmas[i]`` is the training sigma at ``timesteps[i]``, so a
      step goes to the next listed timestep (diffusers' DDIM steps to ``t - T // steps``, the same for
      "leading" spacing), and the last step to its final alpha.
    * "trailing" spacing has exactly ``steps`` timesteps (diffusers' float ``arange`` sometimes adds a
      step at timestep -1, e.g. 1000 training steps, 61 sampling steps).
    * DPM-Solver with ``lambda_min_clipped`` and "trailing" spacing can give fewer than ``steps`` steps,
      as in diffusers; ``Schedule.steps`` says how many.
    * A final step of length zero (Karras sigmas ending at the training sigma_min together with
      ``final_sigmas_type="sigma_min"``) is left out: ``steps`` is one less. diffusers evaluates the network
      there; DPM-Solver leaves its sample unchanged, UniPC applies its corrector once more.

    Args:
        config: a diffusers scheduler, or its config dict.
        steps: number of sampling steps, 1 <= steps <= num_train_timesteps (omit it when passing custom
            ``timesteps`` / ``sigmas``).
        class_name: use this diffusers class's rules instead of the config's class.
        mu: the dynamic-shift exponent, required when ``use_dynamic_shifting`` is set.
        timesteps: custom timesteps, for the classes whose ``set_timesteps`` takes them (Euler, Heun,
            DPMSolverMultistep, FlowMatchEuler); handled as diffusers handles them.
        sigmas: custom sigmas, for Euler (``steps + 1`` values, the last is where the final step lands),
            UniPC with flow sigmas and FlowMatchEuler (``steps`` values, shifted as diffusers shifts them).

    Returns:
        A :class:`Schedule` with ``sigmas`` ``[S + 1]`` float64 and ``timesteps`` ``[S]``.
    """
    config, cls = _source(config, class_name)
    rules = _CLASSES[cls]
    t_train = _check_n(config.get("num_train_timesteps", 1000), "config['num_train_timesteps']")
    if t_train < 2:
        raise ValueError(f"config['num_train_timesteps'] must be >= 2, got {t_train}")
    kind = _spacing_kind(config, rules, cls)
    custom_t = None if timesteps is None else _custom_values("timesteps", timesteps)
    custom_s = None if sigmas is None else _custom_values("sigmas", sigmas)
    custom_n = _check_custom(cls, config, steps, custom_t, custom_s, kind)
    if custom_n is None:
        n = _check_n(steps, "steps")
        if n > t_train:
            raise ValueError(f"steps must be <= config['num_train_timesteps'] ({t_train}), got {n}")
    else:
        n = custom_n
    if rules.family == "flow":
        return _flow_schedule(config, n, t_train, cls, mu, kind, custom_t, custom_s)

    spacing = _choice(config, "timestep_spacing", rules.spacing, _SPACINGS, cls)
    offset = config.get("steps_offset", 0) or 0
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
        raise ValueError(f"config['steps_offset'] must be an int >= 0, got {offset!r}")
    prediction = _choice(config, "prediction_type", "epsilon", _CONFIG_PREDICTION_TYPES, cls)
    prediction = "flow" if prediction == "flow_prediction" else prediction
    final_type = "zero"
    if rules.final_sigmas_type:
        final_type = _choice(config, "final_sigmas_type", "zero", ("zero", "sigma_min"), cls)

    abar = _alphas_cumprod(config, rules, cls, t_train)
    table_np = (((1 - abar) / abar) ** 0.5).numpy()  # float32 [T], increasing in t
    log_sigmas = torch.from_numpy(np.log(table_np).astype(np.float64))

    def to_t(sigmas: np.ndarray) -> np.ndarray:
        return _log_sigma_to_t(log_sigmas, torch.from_numpy(np.asarray(sigmas, dtype=np.float64))).numpy()

    timestep_type, parametrization, final_sigma, latent_space = "discrete", "ve", 0.0, "ve"
    if rules.family in ("euler", "ddim"):
        integer = rules.family == "ddim"
        latent_space = "vp" if integer else "ve"
        if custom_s is not None:  # Euler: steps + 1 sigmas, the last where the final step lands
            sig32 = custom_s.astype(np.float32)
            sigmas_np, final_sigma = sig32[:-1].astype(np.float64), float(sig32[-1])
            timesteps_np = _sigma_to_t_numpy(sig32[:-1], np.log(table_np))
        else:
            if custom_t is not None:
                timesteps_np = custom_t.astype(np.float32)
            else:
                timesteps_np = _spaced_timesteps(spacing, n, t_train, int(offset), integer)
            sigmas_np = np.interp(timesteps_np, np.arange(t_train), table_np)
            if kind is not None:
                lo, hi = float(sigmas_np[-1]), float(sigmas_np[0])
                if not (cls == "LMSDiscreteScheduler" and kind == "karras"):
                    lo, hi = _config_range(config, lo, hi)
                sigmas_np = _spaced_sigmas(kind, n, lo, hi)
                timesteps_np = to_t(sigmas_np)
                if cls == "KDPM2DiscreteScheduler" and kind == "karras":
                    timesteps_np = timesteps_np.round()
            if final_type == "sigma_min":
                final_sigma = _train_sigma(abar, 0)
        if cls == "EulerDiscreteScheduler":
            interp = config.get("interpolation_type") or "linear"
            if interp != "linear":
                raise ValueError(f"config['interpolation_type'] = {interp!r} is not supported for {cls}; "
                                 "allowed: 'linear'")
            ttype = _choice(config, "timestep_type", "discrete", ("discrete", "continuous"), cls)
            if ttype == "continuous" and prediction == "v_prediction":
                timestep_type = "continuous"
        if integer:
            if config.get("set_alpha_to_one") is not None and not config["set_alpha_to_one"]:
                final_sigma = _train_sigma(abar, 0)  # DDIM's last step stops at alphas_cumprod[0]
            timesteps_t = torch.from_numpy(timesteps_np.astype(np.int64))
        elif timestep_type == "continuous":
            timesteps_t = 0.25 * torch.from_numpy(sigmas_np.astype(np.float32)).log()
        else:
            timesteps_t = torch.from_numpy(np.asarray(timesteps_np).astype(np.float32))
    else:  # DPMSolverMultistep, UniPCMultistep
        latent_space = "vp"
        dpm = cls == "DPMSolverMultistepScheduler"
        flow = rules.flow_sigmas and _flag(config, "use_flow_sigmas")
        lu = dpm and _flag(config, "use_lu_lambdas")
        if lu and kind is not None:
            raise ValueError(f"config['use_lu_lambdas'] cannot be combined with use_{kind}_sigmas for {cls}")
        if flow and (lu or kind in ("exponential", "beta") or (dpm and kind == "karras")):
            other = "use_lu_lambdas" if lu else f"use_{kind}_sigmas"
            raise ValueError(f"config['use_flow_sigmas'] cannot be combined with {other} for {cls}")
        last = t_train
        if dpm:
            lam = config.get("lambda_min_clipped")
            lam = -math.inf if lam is None else float(lam)
            lambda_t = torch.log(abar.sqrt()) - torch.log((1 - abar).sqrt())
            last = t_train - int(torch.searchsorted(torch.flip(lambda_t, [0]), lam))
            if last < 1:
                raise ValueError(f"config['lambda_min_clipped'] = {lam} clips every timestep")
        if custom_t is not None:  # DPM-Solver
            timesteps_np = custom_t.astype(np.int64)
        elif not (flow and custom_s is not None):
            timesteps_np = _multistep_timesteps(spacing, n, t_train, last, int(offset))
        # DPM-Solver rounds Karras / Lu timesteps except for the cosine schedule; UniPC always rounds.
        round_t = not (dpm and config.get("beta_schedule") == "squaredcos_cap_v2")
        if kind is not None:
            lo, hi = _config_range(config, float(table_np[0]), float(table_np[-1]))
            sigmas_np = _spaced_sigmas(kind, n, lo, hi)
            if flow:  # UniPC: Karras spacing mapped to flow sigmas
                sigmas_np = sigmas_np / (sigmas_np + 1)
                timesteps_np = sigmas_np * t_train
            else:
                timesteps_np = to_t(sigmas_np)
                if kind == "karras" and round_t:
                    timesteps_np = timesteps_np.round()
        elif lu:
            lam_hi, lam_lo = float(log_sigmas[-1]), float(log_sigmas[0])
            sigmas_np = np.exp(lam_hi + np.linspace(0, 1, n) * (lam_lo - lam_hi))
            timesteps_np = to_t(sigmas_np)
            if round_t:
                timesteps_np = timesteps_np.round()
        elif flow:
            sigmas_np = _multistep_flow_sigmas(config, n, t_train, dpm, mu, cls, custom_s)
            timesteps_np = sigmas_np * t_train
        else:
            sigmas_np = np.interp(timesteps_np, np.arange(t_train), table_np)
        if final_type == "sigma_min":
            # UniPC ends at its own last sigma on the spaced / flow paths, at the table's smallest otherwise.
            spaced = kind is not None or flow
            final_sigma = float(np.float32(sigmas_np[-1])) if (spaced and not dpm) else _train_sigma(abar, 0)
        if flow:
            parametrization = timestep_type = latent_space = "flow"
        timesteps_t = torch.from_numpy(np.asarray(timesteps_np, dtype=np.float64)).to(torch.int64)
    if mu is not None and parametrization != "flow":
        raise ValueError(f"mu = {mu} was given but {cls} with this config does not use flow sigmas")
    flow = parametrization == "flow"
    return _finish(cls, sigmas_np, timesteps_t, final_sigma, config, prediction=prediction,
                   parametrization=parametrization, alphas_cumprod=None if flow else abar.double(),
                   num_train_timesteps=t_train, timestep_type=timestep_type, latent_space=latent_space,
                   train_sigmas=None if flow else torch.from_numpy(table_np.astype(np.float64)),
                   log_sigmas=None if flow else log_sigmas)


def _finish(cls: str, sigmas_np: np.ndarray, timesteps: torch.Tensor, final_sigma: float, config: Mapping, *,
            prediction: str, latent_space: str, **fields: Any) -> Schedule:
    """Append the final sigma (dropping a zero-length last step), check the order, compute init_noise_sigma."""
    sig = np.ascontiguousarray(sigmas_np, dtype=np.float64)
    if final_sigma > 0 and abs(final_sigma - sig[-1]) <= 1e-6 * sig[-1]:
        if sig.shape[0] == 1:
            raise ValueError(f"the {cls} schedule for this config has one step, of length zero (from sigma "
                             f"{sig[0]:.6g} to the final sigma {final_sigma:.6g}); use more steps")
        timesteps = timesteps[:-1]  # a zero-length final step: the last listed sigma is where it lands
    else:
        sig = np.concatenate([sig, [final_sigma]])
    if not np.all(sig[1:] < sig[:-1]):
        raise ValueError(f"the {cls} schedule is not strictly decreasing: sigmas {sig.tolist()} (check the custom "
                         "timesteps / sigmas)")
    if latent_space == "ve":
        # diffusers' Euler family: sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing, in float32
        top = torch.tensor(sig[0], dtype=torch.float32)
        spacing = config.get("timestep_spacing") or _CLASSES[cls].spacing
        init = float(top if spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5)
    elif latent_space == "vp":
        init = math.sqrt(sig[0] ** 2 + 1)  # unit-variance latents, in the sampler's state
    else:
        init = 1.0
    return Schedule(sigmas=torch.from_numpy(sig), timesteps=timesteps, prediction_type=prediction,
                    final_sigma=float(sig[-1]), class_name=cls, init_noise_sigma=init, latent_space=latent_space,
                    **fields)


def _multistep_flow_sigmas(cfg: Mapping, n: int, t_train: int, dpm: bool, mu: float | None, cls: str,
                           custom: np.ndarray | None = None) -> np.ndarray:
    """DPMSolverMultistep / UniPCMultistep with use_flow_sigmas: n flow sigmas, decreasing."""
    shift = cfg.get("flow_shift")
    shift = _check_float("config['flow_shift']", 1.0 if shift is None else shift, positive=True)
    if dpm:
        if mu is not None:  # DPM-Solver: mu replaces flow_shift by exp(mu)
            if not _flag(cfg, "use_dynamic_shifting"):
                raise ValueError(f"mu = {mu} was given but config['use_dynamic_shifting'] is not True "
                                 f"for {cls}")
            shift = math.exp(_check_float("mu", mu))
        s = 1.0 - np.linspace(1, 1 / t_train, n + 1)
        return np.flip(_shift(s, shift))[:-1].copy()
    mu = _mu(cfg, mu, cls)
    s = np.linspace(1, 1 / t_train, n + 1)[:-1] if custom is None else custom.astype(
        custom.dtype if np.issubdtype(custom.dtype, np.floating) else np.float64)
    s = _time_shift(cfg, mu, s, cls) if mu is not None else _shift(s, shift)
    if cfg.get("shift_terminal"):
        s = _stretch_to_terminal(cfg, s)
    s = np.array(s, copy=True)
    if abs(s[0] - 1) < 1e-6:
        s[0] -= 1e-6
    return s


def _flow_schedule(cfg: Mapping, n: int, t_train: int, cls: str, mu: float | None, kind: str | None,
                   custom_t: np.ndarray | None, custom_s: np.ndarray | None) -> Schedule:
    """FlowMatchEulerDiscreteScheduler."""
    if _flag(cfg, "invert_sigmas"):
        raise ValueError(f"config['invert_sigmas'] = True is not supported for {cls} (sigmas must end in 0)")
    shift = cfg.get("shift")
    shift = _check_float("config['shift']", 1.0 if shift is None else shift, positive=True)
    mu = _mu(cfg, mu, cls)
    terminal = cfg.get("shift_terminal")
    t32 = None if custom_t is None else custom_t.astype(np.float32)
    if custom_s is None and t32 is None and mu is None and not terminal and kind is None:
        sigmas = flow_matching(n, shift, num_train_timesteps=t_train)[:-1].numpy()
    else:
        if custom_s is not None:  # diffusers shifts custom sigmas too, in float32
            s = custom_s.astype(np.float32)
        elif t32 is not None:
            s = t32 / t_train
        else:
            lo, hi = _flow_train_range(None if mu is not None else shift, t_train)
            s = _flow_linspace(n, lo, hi, t_train)
        sigmas = _time_shift(cfg, mu, s, cls) if mu is not None else _shift(s, shift)
        if terminal:
            sigmas = _stretch_to_terminal(cfg, sigmas)
        if kind is not None:
            lo, hi = _config_range(cfg, float(sigmas[-1]), float(sigmas[0]))
            sigmas = _spaced_sigmas(kind, n, lo, hi)
    timesteps = torch.from_numpy(t32) if t32 is not None else \
        torch.from_numpy(np.asarray(sigmas, dtype=np.float32)) * t_train
    return _finish(cls, np.asarray(sigmas, dtype=np.float64), timesteps, 0.0, cfg, prediction="flow",
                   latent_space="flow", parametrization="flow", alphas_cumprod=None, num_train_timesteps=t_train,
                   timestep_type="flow")
