"""Noise schedules: the sigmas a sampler walks down, and the timesteps a discrete-time network expects.

Every schedule here is a float64 CPU tensor of ``n + 1`` sigmas, decreasing to a final 0, in the
k-diffusion convention: for the discrete DDPM family ``x = x0 + sigma * noise`` with
``sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod)`` (parametrization ``"ve"``); for rectified-flow models
``x = (1 - sigma) * x0 + sigma * noise`` with sigma in [0, 1] (parametrization ``"flow"``).

* :mod:`.formulas` — closed forms: :func:`karras`, :func:`exponential`, :func:`polyexponential`,
  :func:`flow_matching`; ComfyUI's table schedulers :func:`normal`, :func:`sgm_uniform`, :func:`simple`,
  :func:`ddim_uniform`, :func:`beta` over a model's training sigmas (:func:`discrete_sigmas`,
  :func:`edm_sigmas`); :func:`align_your_steps` (the published tables in :mod:`.ays`); and :func:`get` (name
  lookup for the CLI, names in :data:`SCHEDULES`).
* :mod:`.diffusers_config` — :func:`from_diffusers_config`: a :class:`Schedule` (sigmas, timesteps, starting
  noise, prediction type, the training ``alphas_cumprod`` and a device-side ``sigma_to_timestep``) equal to what
  diffusers' scheduler computes for the same scheduler (or ``scheduler_config.json``) and step count.
"""

from .diffusers_config import PREDICTION_TYPES, SCHEDULER_CLASSES, Schedule, from_diffusers_config
from .formulas import (
    SCHEDULES,
    align_your_steps,
    beta,
    ddim_uniform,
    discrete_sigmas,
    edm_sigmas,
    exponential,
    flow_matching,
    get,
    karras,
    normal,
    polyexponential,
    sgm_uniform,
    simple,
)

__all__ = ["SCHEDULES", "SCHEDULER_CLASSES", "PREDICTION_TYPES", "Schedule", "karras", "exponential",
           "polyexponential", "flow_matching", "normal", "sgm_uniform", "simple", "ddim_uniform", "beta",
           "align_your_steps", "discrete_sigmas", "edm_sigmas", "get", "from_diffusers_config"]
