"""Timers: CUDA events on a GPU, ``time.perf_counter`` on CPU, inputs rotated across samples; and GPU time
inside a captured CUDA graph (:func:`measure_graph`).

One *sample* is the mean time of ``m`` consecutive calls that cycle through the input sets; the reported
figures are the median and the 20th/80th percentiles over samples. Cycling through several input sets whose
total size exceeds the last-level cache keeps small shapes from being timed with their inputs already in
L2. Calls are issued back to back (no synchronisation between them), so a launch-bound op is timed at the
rate the host can issue it, which is what a sampling loop sees.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Figures of one timed case, all in milliseconds per call."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    calls_per_sample: int
    input_sets: int

    def as_dict(self) -> dict:
        return {
            "median_ms": self.median_ms,
            "p20_ms": self.p20_ms,
            "p80_ms": self.p80_ms,
            "samples": self.samples,
            "calls_per_sample": self.calls_per_sample,
            "input_sets": self.input_sets,
        }


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile ``q`` in [0, 1] of a non-empty sequence (numpy's default method)."""
    if not values:
        raise ValueError("quantile of an empty sequence")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Marks on the device timeline (CUDA events) or on the host clock, read as milliseconds."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def elapsed_ms(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b)
        return (b - a) * 1e3


def measure(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    *,
    budget_ms: float = 100.0,
    min_samples: int = 5,
    max_samples: int = 200,
    sample_ms: float | None = None,
) -> Timing:
    """Time ``fns`` (one zero-argument callable per input set, all doing the same work).

    Args:
        fns: callables, one per input set; calls cycle through them.
        device: where the work runs; CUDA uses events, anything else the host clock.
        budget_ms: approximate total timed duration (after warm-up).
        min_samples, max_samples: bounds on the number of samples.
        sample_ms: target duration of one sample (default 1 ms on CUDA, 2 ms on CPU); a sample holds at
            least one call per input set.

    Returns:
        :class:`Timing` in milliseconds per call.
    """
    if not fns:
        raise ValueError("fns must hold at least one callable")
    if min_samples < 1 or max_samples < min_samples:
        raise ValueError(f"need 1 <= min_samples <= max_samples, got {min_samples}, {max_samples}")
    n = len(fns)
    clock = _Clock(device)
    if sample_ms is None:
        sample_ms = 1.0 if clock.cuda else 2.0

    def run(m: int, start: int = 0) -> None:
        for j in range(m):
            fns[(start + j) % n]()

    # Warm-up: every input set once (compilation, autotuning, allocator), then a rough per-call estimate.
    run(n)
    synchronize(device)
    a = clock.mark()
    run(n)
    b = clock.mark()
    synchronize(device)
    per_call = max(clock.elapsed_ms(a, b) / n, 1e-4)
    m = max(n, math.ceil(sample_ms / per_call))
    m = n * math.ceil(m / n)  # whole rounds over the input sets
    samples = int(min(max_samples, max(min_samples, budget_ms // (m * per_call))))

    marks = [clock.mark()]
    for i in range(samples):
        run(m, i * m)
        marks.append(clock.mark())
    synchronize(device)
    times = [clock.elapsed_ms(marks[i], marks[i + 1]) / m for i in range(samples)]
    return Timing(
        median_ms=quantile(times, 0.5),
        p20_ms=quantile(times, 0.2),
        p80_ms=quantile(times, 0.8),
        samples=samples,
        calls_per_sample=m,
        input_sets=n,
    )


def measure_graph(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    *,
    budget_ms: float = 50.0,
    min_samples: int = 5,
    max_samples: int = 100,
    sample_ms: float = 1.0,
    max_graph_bytes: int = 1 << 30,
    set_bytes: int = 0,
) -> Timing:
    """GPU time per call of ``fns`` replayed inside a CUDA graph: what a call costs in a captured trajectory,
    where the host issues nothing and back-to-back launches have no gaps.

    The calls (one round = each input set once) are warmed up on a side stream, captured ``m`` rounds deep into
    one graph, and the graph is replayed ``samples`` times between CUDA events; one sample is one replay
    divided by its calls. ``m`` makes a replay last about ``sample_ms``, bounded so the graph's private pool
    (each captured call's outputs) stays under ``max_graph_bytes`` given ``set_bytes`` per round.

    Raises whatever capture raises (e.g. a call that synchronises); the caller records it.
    """
    if device.type != "cuda":
        raise ValueError(f"measure_graph needs a CUDA device, got {device}")
    if not fns:
        raise ValueError("fns must hold at least one callable")
    n = len(fns)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)

    def capture(rounds: int) -> torch.cuda.CUDAGraph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(rounds):
                for f in fns:
                    f()
        return g

    def replay_ms(g: torch.cuda.CUDAGraph) -> float:
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)

    g = capture(1)
    g.replay()
    per_round = max(replay_ms(g), 1e-4)
    rounds = max(1, min(64, math.ceil(sample_ms / per_round)))
    if set_bytes > 0:
        rounds = max(1, min(rounds, max_graph_bytes // max(1, n * set_bytes)))
    if rounds > 1:
        del g
        g = capture(rounds)
        g.replay()
        torch.cuda.synchronize(device)
    calls = rounds * n
    samples = int(min(max_samples, max(min_samples, budget_ms // max(per_round * rounds, 1e-3))))
    times = [replay_ms(g) / calls for _ in range(samples)]
    del g
    return Timing(
        median_ms=quantile(times, 0.5),
        p20_ms=quantile(times, 0.2),
        p80_ms=quantile(times, 0.8),
        samples=samples,
        calls_per_sample=calls,
        input_sets=n,
    )


def rotation_count(set_bytes: int, cache_bytes: int, *, max_sets: int = 16, max_total_bytes: int) -> int:
    """How many input sets to rotate through: enough to exceed 3x the cache, bounded by memory."""
    if set_bytes <= 0:
        return 1
    want = math.ceil(3 * cache_bytes / set_bytes)
    fit = max(1, max_total_bytes // set_bytes)
    return int(max(1, min(want, max_sets, fit)))
