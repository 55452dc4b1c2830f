"""Samplers: coefficient tables (``tables.py``) driven by one shared loop (``loop.py``; ``graph.py`` captures it
in a CUDA graph); ``api.py`` holds :func:`sample`, which checks its arguments and picks eager or graph;
``adaptive.py`` runs dpm_adaptive, the one sampler that is not a table; ``noise.py`` holds the Brownian tree.

``SAMPLERS`` lists them by their k-diffusion / ComfyUI names; ``DESCRIPTIONS`` gives one line each and
:func:`describe` their order, evaluations per step, noise and options.
"""

from .api import sample
from .noise import BrownianTreeNoiseSampler
from .tables import DESCRIPTIONS, OPTIONS, PREDICTIONS, SAMPLERS, Plan, build_plan, describe

__all__ = ["SAMPLERS", "DESCRIPTIONS", "OPTIONS", "PREDICTIONS", "Plan", "build_plan", "describe", "sample",
           "BrownianTreeNoiseSampler"]
