"""diffusion_fast inside diffusers pipelines (needs ``pip install "diffusion-fast[diffusers]"``).

* :class:`Scheduler` (``scheduler.py``) — a diffusers ``SchedulerMixin`` + ``ConfigMixin`` backed by
  diffusion_fast's samplers: ``pipe.scheduler = Scheduler.from_config(pipe.scheduler, sampler="dpmpp_2m")``.
* :func:`optimize` / :func:`unoptimize` (``optimize.py``) — patch a pipeline in place so its attention and
  GroupNorm+SiLU run through :mod:`diffusion_fast.ops`, and restore it exactly.

Importing :mod:`diffusion_fast` never imports diffusers; this package does, on first use of a name.
"""

from __future__ import annotations

_EXPORTS = {"Scheduler": "scheduler", "optimize": "optimize", "unoptimize": "optimize"}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = sorted(_EXPORTS)
