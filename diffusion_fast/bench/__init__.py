"""Benchmarks and regression gates: ``diffusion-fast bench ops | e2e | all | compare | show``.

* :mod:`.peaks` measures the card's copy bandwidth and matmul rate at the start of each run;
* :mod:`.ops` times every backend of each op beside the torch baselines, with written-out byte/FLOP models;
* :mod:`.e2e` times whole sampling runs (eager, fast backends, fast + CUDA graph);
* :mod:`.results` defines the JSON results document (schema in docs/benchmarking.md);
* :mod:`.compare` and :mod:`.plot` compare two results files.

Importing this package imports neither the model code nor Triton; the suites import what they run.
"""

from .cli import main

__all__ = ["main"]
