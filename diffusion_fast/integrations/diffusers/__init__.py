"""diffusion_fast inside diffusers pipelines (needs ``pip install "diffusion-fast[diffusers]"``).

* :class:`Scheduler` (``scheduler.py``) — a diffusers ``SchedulerMixin`` + ``ConfigMixin`` backed by
  diffusion_fast's samplers: ``pipe.scheduler = Scheduler.from_config(pipe.scheduler, sampler="dpmpp_2m")``.
* :func:`optimize` / :func:`unoptimize` (``patch.py``) — patch a pipeline in place so its attention and
  GroupNorm+SiLU run through :mod:`diffusion_fast.ops` (with ``fused_loop=True`` also its denoising loop through
  :func:`diffusion_fast.sample`, ``fused.py``), and restore it exactly; :func:`report` /
  :func:`format_report` list each attention module and ResNet block with what runs it (or why stock code does).

Importing :mod:`diffusion_fast` never imports diffusers; this package does, on first use of a name.
"""

from __future__ import annotations

# optimize & co. live in patch.py, not optimize.py: the import system binds a loaded submodule to its parent's
# attribute of the same name, which would shadow the function ``optimize`` with the module.
_EXPORTS = {"Scheduler": "scheduler", "optimize": "patch", "unoptimize": "patch", "report": "patch",
            "format_report": "patch"}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = sorted(_EXPORTS)
