"""Integrations with the libraries users already run. Each imports its library only when used.

* :mod:`.diffusers` — ``optimize(pipe)`` / ``unoptimize(pipe)`` and a diffusers-compatible ``Scheduler``
  (needs ``pip install "diffusion-fast[diffusers]"``).
"""
