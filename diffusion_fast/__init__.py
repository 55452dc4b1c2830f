"""diffusion_fast: a fast diffusion sampler engine.

``diffusion_fast.sample`` drives the denoising loop (schedules in :mod:`diffusion_fast.schedules`, samplers
in :mod:`diffusion_fast.samplers`); the hot paths are the ops in :mod:`diffusion_fast.ops`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import ops, schedules  # noqa: E402
from .samplers import SAMPLERS, sample  # noqa: E402


def __getattr__(name: str):
    # The pipeline pulls in the model code, optimize/unoptimize pull in diffusers: import them only when asked.
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    if name in ("optimize", "unoptimize"):
        from .integrations import diffusers

        return getattr(diffusers, name)
    raise AttributeError(f"module 'diffusion_fast' has no attribute {name!r}")


__all__ = ["SAMPLERS", "sample", "ops", "schedules", "Pipeline", "optimize", "unoptimize", "__version__"]
