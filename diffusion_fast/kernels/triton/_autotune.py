"""A small autotuner: per shape bucket, time each candidate launch configuration once and keep the fastest.

Triton's own ``@triton.autotune`` would benchmark inside a CUDA graph capture if the first call of a shape
happened there (benchmarking synchronises, which a capture forbids). This one never times anything while
the stream is capturing, under the interpreter, or when ``DIFFUSION_FAST_AUTOTUNE=0``: it then uses the
cached choice for the key if there is one, else the default (the first candidate), and caches nothing, so a
later eager call can still tune that key.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

from ._common import INTERPRET, is_capturing

C = TypeVar("C")


def enabled() -> bool:
    return not INTERPRET and os.environ.get("DIFFUSION_FAST_AUTOTUNE", "1") != "0"


class Autotuner(Generic[C]):
    """Chooses one of ``candidates`` per key by timing ``launch(candidate)`` with ``triton.testing.do_bench``."""

    def __init__(self, name: str, *, warmup_ms: int = 5, rep_ms: int = 20) -> None:
        self.name = name
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.cache: dict[Hashable, C] = {}
        self.timings: dict[Hashable, list[tuple[C, float]]] = {}

    def choose(self, key: Hashable, candidates: Sequence[C], launch: Callable[[C], object]) -> C:
        if not candidates:
            raise ValueError(f"{self.name}: no candidate configuration for key {key!r}")
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        if len(candidates) == 1 or not enabled() or is_capturing():
            return candidates[0]
        import triton.testing

        results: list[tuple[C, float]] = []
        for cfg in candidates:
            try:
                r = triton.testing.do_bench(lambda cfg=cfg: launch(cfg), warmup=self.warmup_ms, rep=self.rep_ms,
                                            quantiles=[0.5])
            except Exception:  # a configuration that does not compile or launch here is simply not chosen
                continue
            results.append((cfg, float(r[0] if isinstance(r, (list, tuple)) else r)))
        if not results:
            return candidates[0]
        best = min(results, key=lambda cr: cr[1])[0]
        self.cache[key] = best
        self.timings[key] = results
        return best
