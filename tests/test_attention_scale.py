"""attention's ``scale`` has a limit that keeps the float32 scores finite, on every backend that runs here.

``scale=1e300`` used to become inf in float32 and ``scale=1e38`` overflowed the scores of ordinary fp16
inputs: both gave an all-NaN result. The op now refuses ``|scale| > MAX_SCALE``; at the limit, the largest
fp16 inputs still give finite scores (256 * 65504**2 * 2**16 < 3.4e38), so the output is finite.
"""

from __future__ import annotations

import pytest
import torch

from diffusion_fast import ops
from diffusion_fast.ops.attention import MAX_SCALE

BACKENDS = ["torch", "triton"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("scale", [1e300, 1e38, -1e38, MAX_SCALE * 1.0001, float("nan"), float("inf")])
def test_scale_beyond_the_limit_is_refused(scale):
    q = torch.randn(1, 4, 1, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="scale") as ei:
        ops.attention(q, q, q, scale=scale)
    if scale == scale and abs(scale) != float("inf"):
        assert f"{MAX_SCALE:g}" in str(ei.value) and f"{scale:g}" in str(ei.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [MAX_SCALE, -MAX_SCALE])
def test_largest_scale_with_largest_fp16_inputs_is_finite(backend, scale, device):
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 16, 2, 64, generator=g).sign() * 65504).half()
    # Each key row holds one +-65504: every score is exactly +-65504**2 (so the expected result has no rounding)
    k = torch.zeros(2, 24, 2, 64)
    k.scatter_(3, torch.randint(0, 64, (2, 24, 2, 1), generator=g), 1.0)
    k = (k * torch.randn(2, 24, 2, 1, generator=g).sign() * 65504).half()
    v = torch.randn(2, 24, 2, 64, generator=g).half()
    out = ops.attention(q.to(device), k.to(device), v.to(device), scale=scale, backend=backend).cpu()
    assert torch.isfinite(out).all()
    # Scores this far apart make the softmax one-hot, or an even split over tied maxima: the output is the mean of
    # the v rows that reach the maximum score.
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    top = (s == s.amax(-1, keepdim=True)).double()
    want = torch.einsum("bhqk,bkhd->bqhd", top / top.sum(-1, keepdim=True), v.double())
    # float32 weights of 1/m, the sum rounded to fp16
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2.0**-10 * want.abs().max().item())
