"""diffusion_fast: a fast diffusion sampler engine.

``diffusion_fast.sample`` drives the denoising loop (schedules in :mod:`diffusion_fast.schedules`, samplers
in :mod:`diffusion_fast.samplers`); the hot paths are the ops in :mod:`diffusion_fast.ops`.

Every public name is imported on first use, so ``import diffusion_fast`` imports neither torch nor anything
else heavy: the command line starts at once and handles Ctrl-C from its first line on.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> (module, attribute or None for the module itself)
_LAZY = {
    "ops": (".ops", None),
    "schedules": (".schedules", None),
    "SAMPLERS": (".samplers", "SAMPLERS"),
    "sample": (".samplers", "sample"),
    "Pipeline": (".pipeline", "Pipeline"),  # the model code
    "optimize": (".integrations.diffusers", "optimize"),  # diffusers
    "unoptimize": (".integrations.diffusers", "unoptimize"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'diffusion_fast' has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module, __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["SAMPLERS", "sample", "ops", "schedules", "Pipeline", "optimize", "unoptimize", "__version__"]
