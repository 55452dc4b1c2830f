"""Backend implementations of the ops: ``torch`` (the reference), ``triton`` and ``cuda``.

Each ``kernels/<backend>/<op>.py`` module defines ``available()``, ``supports(**call)`` and
``forward(**call)``; see :mod:`diffusion_fast.ops.registry`.
"""
