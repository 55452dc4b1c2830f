"""Samplers: coefficient tables (``tables.py``) driven by one shared loop (``loop.py``).

``SAMPLERS`` lists them by their k-diffusion names; ``DESCRIPTIONS`` gives one line each.
"""

from .loop import sample
from .tables import DESCRIPTIONS, OPTIONS, PREDICTIONS, SAMPLERS, Plan, build_plan

__all__ = ["SAMPLERS", "DESCRIPTIONS", "OPTIONS", "PREDICTIONS", "Plan", "build_plan", "sample"]
