"""Benchmarks and regression gates: ``diffusion-fast bench ops | e2e | all | merge | compare | show``.

* :mod:`.peaks` measures the card's copy bandwidth and matmul rate at the start of each run;
* :mod:`.ops` times every backend of each op (and ``auto``) beside the torch baselines, host-issued and inside a
  CUDA graph, checked against the float64 oracle, with written-out byte/FLOP models (one ``OpSpec`` per op);
* :mod:`.e2e` times whole sampling calls of diffusers' own pipelines beside ours and the integration's;
* :mod:`.cases` is the skeleton both suites share; :mod:`.timing` the timers;
* :mod:`.results` defines the JSON results document (schema in docs/benchmarking.md); :mod:`.summary` its table;
* :mod:`.compare` and :mod:`.plot` compare two results files, each case against its measured noise.

Importing this package imports neither the model code nor Triton; the suites import what they run.
"""

from .cli import main

__all__ = ["main"]
