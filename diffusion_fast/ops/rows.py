"""The layout of one sampler-step coefficient row: the contract between the sampler tables and the kernels.

A sampler's table (:mod:`diffusion_fast.samplers.tables`) holds one row per network evaluation; the fused
:func:`diffusion_fast.ops.sampler_step` reads one row per call (formula in that module). For ``K`` history
slots a row has ``9 + 2K`` float32 values:

    G  P  Q  AX  AD  AZ  BX  BD  CIN  AH[0..K)  BH[0..K)

Its twin is the ``enum`` at the top of ``csrc/sampler_step.cu``; ``tests/test_rows.py`` checks that the two
agree. This module imports nothing from the package, so tables, every backend and the op can all use it.
"""

from __future__ import annotations

G, P, Q, AX, AD, AZ, BX, BD, CIN = range(9)
AH = 9  # first of the K history coefficients of x_new
MAX_HIST = 8  # the kernels unroll over at most this many slots


def BH(K: int) -> int:  # noqa: N802 - mirrors the constant names
    """First of the K history coefficients of y."""
    return AH + K


def coef_width(K: int) -> int:
    """Width of a row for K history slots."""
    return AH + 2 * K
