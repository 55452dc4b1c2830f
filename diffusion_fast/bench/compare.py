"""Compare two results files case by case: the regression gate, aware of each case's measured noise.

Cases are matched by ``key``. For each shared case the ratio ``new median / base median`` is reported and
judged against that case's own limit::

    limit = max(max_regression, noise_k * noise),    noise = max(noise(base case), noise(new case))
    noise(case) = (p80_ms - p20_ms) / median_ms      (the relative spread the run itself measured)

A ratio above ``1 + limit`` is a regression and makes the gate fail; below ``1 / (1 + limit)`` it is an
improvement. A case whose repeats spread by 12% is not failed for being 8% slower, while a quiet case is held
to the flat threshold. ``noise_k = 0`` gives the plain flat gate. Cases present in one file only are listed,
never failed (a new backend or a removed shape is not a slowdown).
"""

from __future__ import annotations

from dataclasses import dataclass, field

NOISE_K = 2.0


@dataclass(frozen=True)
class Row:
    key: str
    base_ms: float
    new_ms: float
    ratio: float  # new / base: > 1 is slower
    status: str  # "slower" (beyond the limit), "faster" (beyond it), "same"
    limit: float = 0.0  # the allowed slowdown of this case, a fraction
    noise: float = 0.0  # the larger measured relative spread of the two runs


@dataclass
class Comparison:
    rows: list[Row]
    only_base: list[str]
    only_new: list[str]
    max_regression: float
    base_device: str = ""
    new_device: str = ""
    notes: list[str] = field(default_factory=list)
    noise_k: float = NOISE_K

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.status == "slower"]


def parse_threshold(text: str | float) -> float:
    """``"5%"`` or ``"5"`` -> 0.05 (the number is a percentage). Raises ValueError for negative or bad input."""
    raw = str(text).strip()
    body = raw[:-1].strip() if raw.endswith("%") else raw
    try:
        pct = float(body)
    except ValueError:
        raise ValueError(f"--max-regression must be a percentage such as 5% or 2.5, got {raw!r}") from None
    if not pct >= 0 or pct == float("inf"):
        raise ValueError(f"--max-regression must be a finite percentage >= 0, got {raw!r}")
    return pct / 100.0


def noise(case: dict) -> float:
    """The relative spread a run measured for ``case``: ``(p80_ms - p20_ms) / median_ms``."""
    return max(0.0, (case["p80_ms"] - case["p20_ms"]) / case["median_ms"])


def compare(base: dict, new: dict, max_regression: float, noise_k: float = NOISE_K) -> Comparison:
    """Match ``base`` and ``new`` (validated results documents) by case key.

    Args:
        base, new: results documents.
        max_regression: the flat allowed slowdown as a fraction (0.05 = 5%).
        noise_k: a case may also be ``noise_k`` times its measured noise slower before it fails (0: flat only).
    """
    if max_regression < 0:
        raise ValueError(f"max_regression must be >= 0, got {max_regression}")
    if not noise_k >= 0:
        raise ValueError(f"noise_k must be >= 0, got {noise_k}")
    b = {c["key"]: c for c in base["cases"]}
    n = {c["key"]: c for c in new["cases"]}
    rows = []
    for key in b:
        if key not in n:
            continue
        bm, nm = b[key]["median_ms"], n[key]["median_ms"]
        ratio = nm / bm
        nz = max(noise(b[key]), noise(n[key]))
        limit = max(max_regression, noise_k * nz)
        if ratio > 1.0 + limit:
            status = "slower"
        elif ratio < 1.0 / (1.0 + limit):
            status = "faster"
        else:
            status = "same"
        rows.append(Row(key, bm, nm, ratio, status, limit, nz))
    rows.sort(key=lambda r: -r.ratio)
    cmp = Comparison(rows, [k for k in b if k not in n], [k for k in n if k not in b], max_regression,
                     base["env"]["device"]["name"], new["env"]["device"]["name"], noise_k=noise_k)
    if cmp.base_device != cmp.new_device:
        cmp.notes.append(f"base ran on {cmp.base_device!r} and new on {cmp.new_device!r}: the ratios compare "
                         "machines as well as code")
    widened = sum(r.limit > max_regression for r in rows)
    if widened:
        cmp.notes.append(f"{widened} case(s) vary more than the flat threshold between their own repeats: each "
                         f"is judged against {noise_k:g} x its measured noise instead (column 'limit')")
    return cmp


def format_table(cmp: Comparison) -> str:
    """The comparison as a plain-text table, worst ratio first, then one-sided cases and a summary."""
    lines = []
    if cmp.rows:
        kw = max(len("case"), *(len(r.key) for r in cmp.rows))
        lines.append(f"{'case':<{kw}}  {'base ms':>10}  {'new ms':>10}  {'new/base':>8}  {'noise':>6}  {'limit':>6}  "
                     "status")
        for r in cmp.rows:
            mark = {"slower": "SLOWER", "faster": "faster", "same": ""}[r.status]
            lines.append(f"{r.key:<{kw}}  {r.base_ms:>10.4f}  {r.new_ms:>10.4f}  {r.ratio:>8.3f}  {r.noise:>6.1%}  "
                         f"{r.limit:>6.1%}  {mark}")
    for title, keys in (("only in base (not compared)", cmp.only_base), ("only in new (not compared)", cmp.only_new)):
        if keys:
            lines.append(f"{title}:")
            lines.extend(f"  {k}" for k in keys)
    lines.extend(f"note: {n}" for n in cmp.notes)
    n_slow = len(cmp.regressions)
    n_fast = sum(r.status == "faster" for r in cmp.rows)
    verdict = "FAIL" if n_slow else "ok"
    rule = f"+{cmp.max_regression:.1%}" + (f" or {cmp.noise_k:g} x noise" if cmp.noise_k else "")
    lines.append(f"{verdict}: {len(cmp.rows)} shared cases, {n_slow} slower than {rule}, "
                 f"{n_fast} faster, {len(cmp.only_base)} only in base, {len(cmp.only_new)} only in new")
    return "\n".join(lines)
