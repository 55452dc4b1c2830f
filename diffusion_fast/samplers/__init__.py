"""Samplers: coefficient tables (``tables.py``) driven by one shared loop (``loop.py``; ``graph.py`` captures it
in a CUDA graph); ``api.py`` holds :func:`sample`, which checks its arguments and picks eager or graph.

``SAMPLERS`` lists them by their k-diffusion names; ``DESCRIPTIONS`` gives one line each.
"""

from .api import sample
from .tables import DESCRIPTIONS, OPTIONS, PREDICTIONS, SAMPLERS, Plan, build_plan

__all__ = ["SAMPLERS", "DESCRIPTIONS", "OPTIONS", "PREDICTIONS", "Plan", "build_plan", "sample"]
