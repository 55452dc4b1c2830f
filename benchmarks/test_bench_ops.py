"""Op benchmarks as a pytest-benchmark suite: the cases of ``diffusion-fast bench ops``, one test per case key.

Each case first runs once on its own copy of the inputs and is checked against the float64 oracle under its
tolerance rule (``kernels/reference/oracle.py``, the same check the CLI records as ``correct``): a fast wrong
kernel fails here instead of being timed. A round then calls the op once on each of several input sets (rotated
so small shapes are not timed from L2) and synchronises; ``extra_info`` carries the byte/FLOP model and the
error, so rates can be derived from the saved JSON. The CLI (``diffusion-fast bench ops``) adds CUDA-event
and graph-replay timing, measured peaks and same-run speedups; this suite is for ``--benchmark-compare`` gates
in a user's CI.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_fast.bench.ops import check_outputs
from diffusion_fast.bench.timing import rotation_count, synchronize


def _clone(t: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in t.items()}


def test_op(benchmark, op_case):
    spec, shape, impl, device, dtype = op_case
    if impl.skip is not None:
        pytest.skip(impl.skip)
    cuda = device.type == "cuda"
    cache = 50 << 20 if cuda else 32 << 20
    n_sets = rotation_count(shape.footprint, cache, max_sets=8 if cuda else 2,
                            max_total_bytes=(2 << 30) if cuda else (64 << 20))
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = [shape.make(device, dtype, gen) for _ in range(n_sets)]
    why = impl.limit(inputs[0]) if impl.limit is not None else None
    if why is not None:
        pytest.skip(why)
    probe = _clone(inputs[0])
    expected = spec.oracle(_clone(probe))
    try:
        result = impl.bind(probe)()
        synchronize(device)
    except Exception as exc:  # e.g. an SDPA backend that does not serve this shape
        pytest.skip(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    verdict = check_outputs(spec, spec.outputs(result, probe), expected)
    assert verdict.ok, f"{impl.name}: {verdict.detail}"
    fns = [impl.bind(t) for t in inputs]

    def one_round():
        for f in fns:
            f()
        synchronize(device)

    benchmark.extra_info.update(op=shape.op, set=shape.set, impl=impl.name, kind=impl.kind,
                                params=shape.params, bytes=shape.bytes, flops=shape.flops,
                                calls_per_round=n_sets, max_abs_err=verdict.max_abs_err,
                                tolerance=verdict.tolerance)
    est = _estimate(one_round)
    rounds = int(min(200, max(5, 0.2 / max(est, 1e-6)))) if cuda else int(min(20, max(3, 0.05 / max(est, 1e-6))))
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=1)
    assert math.isfinite(benchmark.stats.stats.median) and benchmark.stats.stats.median > 0


def _estimate(fn) -> float:
    import time

    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
