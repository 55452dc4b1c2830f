"""The skeleton the op and end-to-end suites share: skip records, first-call errors, and same-run ratios.

A *case* is one measured thing (a dict in the results schema, docs/benchmarking.md); what could not run is a
``{"key", "reason"}`` entry under ``skipped``. Both suites build their cases from a table (op specs in
:mod:`.ops`, variants in :mod:`.e2e`) and use the helpers here, so neither branches on what it measures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``"TypeName: first line of the message"``, at most ``limit`` characters (for ``skipped`` reasons)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:limit]


def skip(skipped: list[dict], key: str, reason: str) -> None:
    """Record that ``key`` did not run, and why."""
    skipped.append({"key": key, "reason": reason})


def ratios(cases: list[dict], *, field: str = "median_ms", out: str = "speedup",
           is_baseline: Callable[[dict], bool], best_out: str = "best_baseline",
           vs_out: str = "vs_best_baseline") -> None:
    """Same-run ratios: for each case, ``out[name] = other[field] / case[field]`` for every other case that
    ``is_baseline`` (> 1: this case is faster), and the fastest of them as ``best_out`` / ``vs_out``.

    Cases without ``field`` (None) get no ratios in that field; they are not baselines for it either.
    """
    pool = {c["impl"]: c[field] for c in cases if is_baseline(c) and c.get(field)}
    for c in cases:
        mine = c.get(field)
        if not mine:
            continue
        c[out] = {name: ms / mine for name, ms in pool.items() if name != c["impl"]}
        others = {n: ms for n, ms in pool.items() if n != c["impl"]}
        if others:
            best = min(others, key=others.get)
            c[best_out] = best
            c[vs_out] = others[best] / mine


def spread(values: Iterable[float]) -> float | None:
    """``(max - min) / median`` of repeated measurements (None for fewer than two)."""
    v = sorted(values)
    if len(v) < 2:
        return None
    mid = v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])
    return (v[-1] - v[0]) / mid if mid > 0 else None
