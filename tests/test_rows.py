"""The coefficient-row layout has two definitions, Python (ops/rows.py) and C++ (csrc/sampler_step.cu): they agree."""

from __future__ import annotations

import re
from pathlib import Path

from diffusion_fast.ops import rows

CU = Path(__file__).resolve().parents[1] / "csrc" / "sampler_step.cu"


def test_cuda_row_enum_matches_python_layout():
    text = CU.read_text()
    body = re.search(r"enum Row : int \{([^}]*)\}", text).group(1)
    names = [n.strip().split("=")[0].strip() for n in body.split(",")]
    assert names[0] == "kG" and "= 0" in body.split(",")[0]
    python = {"G": rows.G, "P": rows.P, "Q": rows.Q, "AX": rows.AX, "AD": rows.AD, "AZ": rows.AZ, "BX": rows.BX,
              "BD": rows.BD, "CIN": rows.CIN, "AH": rows.AH}
    assert {n[1:]: i for i, n in enumerate(names)} == python
    assert int(re.search(r"constexpr int kMaxHist = (\d+);", text).group(1)) == rows.MAX_HIST


def test_row_width():
    for K in range(rows.MAX_HIST + 1):
        assert rows.coef_width(K) == 9 + 2 * K
        assert rows.BH(K) == rows.AH + K
