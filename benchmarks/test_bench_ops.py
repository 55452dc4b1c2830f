"""Op benchmarks as a pytest-benchmark suite: the cases of ``diffusion-fast bench ops``, one test per case key.

A round calls the op once on each of several input sets (rotated so small shapes are not timed from L2) and
then synchronises; ``extra_info`` carries the byte/FLOP model, so rates can be derived from the saved JSON.
The CLI (``diffusion-fast bench ops``) adds CUDA-event timing, measured peaks and same-run speedups; this
suite is for ``--benchmark-compare`` gates in a user's CI.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_fast.bench.timing import rotation_count, synchronize


def test_op(benchmark, op_case):
    shape, impl, device, dtype = op_case
    if impl.skip is not None:
        pytest.skip(impl.skip)
    cuda = device.type == "cuda"
    cache = 50 << 20 if cuda else 32 << 20
    n_sets = rotation_count(shape.footprint, cache, max_sets=8 if cuda else 2,
                            max_total_bytes=(2 << 30) if cuda else (64 << 20))
    gen = torch.Generator().manual_seed(0)
    inputs = [shape.make(device, dtype, gen) for _ in range(n_sets)]
    why = impl.limit(inputs[0]) if impl.limit is not None else None
    if why is not None:
        pytest.skip(why)
    fns = [impl.bind(t) for t in inputs]
    try:
        fns[0]()
        synchronize(device)
    except Exception as exc:  # e.g. an SDPA backend that does not serve this shape
        pytest.skip(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")

    def one_round():
        for f in fns:
            f()
        synchronize(device)

    benchmark.extra_info.update(op=shape.op, set=shape.set, impl=impl.name, kind=impl.kind,
                                params=shape.params, bytes=shape.bytes, flops=shape.flops,
                                calls_per_round=n_sets)
    est = _estimate(one_round)
    rounds = int(min(200, max(5, 0.2 / max(est, 1e-6)))) if cuda else int(min(20, max(3, 0.05 / max(est, 1e-6))))
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=1)
    assert math.isfinite(benchmark.stats.stats.median) and benchmark.stats.stats.median > 0


def _estimate(fn) -> float:
    import time

    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
