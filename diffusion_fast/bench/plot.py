"""Draw a comparison as a PNG bar chart with Pillow (a dependency already; no plotting library needed)."""

from __future__ import annotations

import io
import math
import os

from .compare import Comparison

_ROW = 18
_LEFT = 560
_BAR = 520
_TOP = 46
_COLORS = {"slower": (200, 40, 40), "faster": (40, 150, 60), "same": (140, 140, 140)}


def plot_comparison(cmp: Comparison, path: str | os.PathLike) -> None:
    """Write ``path`` (PNG, atomically: a temporary file in the same folder, then a rename)."""
    from .results import write_atomic

    write_atomic(path, render_comparison(cmp))


def render_comparison(cmp: Comparison) -> bytes:
    """The PNG bytes of one bar per shared case, the speedup ``base / new`` on a log axis centred on 1.

    Bars to the right are faster, to the left slower; red bars are regressions beyond their limit.
    """
    from PIL import Image, ImageDraw, ImageFont

    rows = cmp.rows
    width = _LEFT + _BAR + 80
    height = _TOP + _ROW * max(len(rows), 1) + 40
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((10, 8), f"speedup base/new per case (log scale); red: slower than +{cmp.max_regression:.1%}",
           fill="black", font=font)
    logs = [abs(math.log(1.0 / r.ratio)) for r in rows] or [0.0]
    span = max(max(logs), math.log(1.0 + max(cmp.max_regression, 0.01)) * 2, math.log(1.25))
    x0 = _LEFT + _BAR // 2

    def xpos(speedup: float) -> int:
        return int(x0 + (math.log(speedup) / span) * (_BAR // 2))

    for s in (1.0, 1.0 + cmp.max_regression, 1.0 / (1.0 + cmp.max_regression)):
        x = xpos(s)
        d.line([(x, _TOP - 6), (x, height - 34)], fill=(0, 0, 0) if s == 1.0 else (190, 190, 190))
    for i, r in enumerate(rows):
        y = _TOP + i * _ROW
        label = r.key if len(r.key) <= 88 else "..." + r.key[-85:]
        d.text((10, y + 3), label, fill="black", font=font)
        sp = 1.0 / r.ratio
        xa, xb = sorted((x0, xpos(sp)))
        d.rectangle([xa, y + 3, max(xb, xa + 1), y + _ROW - 3], fill=_COLORS[r.status])
        d.text((_LEFT + _BAR + 8, y + 3), f"{sp:.3f}x", fill="black", font=font)
    if not rows:
        d.text((10, _TOP), "no shared cases", fill="black", font=font)
    d.text((x0 - 10, height - 28), "1.0x", fill="black", font=font)
    d.text((_LEFT, height - 28), "slower", fill="black", font=font)
    d.text((_LEFT + _BAR - 40, height - 28), "faster", fill="black", font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
