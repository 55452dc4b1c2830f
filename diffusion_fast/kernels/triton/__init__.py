"""Triton backend of the ops: ``group_norm``, ``attention`` and ``sampler_step``.

Each ``<op>.py`` holds its private ``@triton.jit`` kernels, the host function that plans tiles and launches,
and the registry trio ``available()`` / ``supports(**call)`` / ``forward(**call)``. ``_common`` decides
whether Triton can run here at all (a CUDA device, or ``TRITON_INTERPRET=1`` for CPU tensors);
``_autotune`` picks launch configurations per shape bucket. ``benchmarks/triton_aot.py`` (outside the
package) compiles every configuration for sm_80 / sm_90 without a GPU and reads back its resources.
"""
