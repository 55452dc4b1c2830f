"""CUDA GroupNorm(+SiLU, + per-channel pre-add) against a float64 formulation.

Every dtype and both layouts, odd shapes (scalar and 16-byte vector paths), ranks 3 to 5, the split grid
(two launches) and the fused grid (one launch), NaN-poisoned outputs, bitwise determinism, a non-default
stream and CUDA graph replay. Tolerance (``kernels/reference/oracle.py``): at most twice the
reference backend's own error against the float64 oracle (its float32 math plus one rounding to the storage
dtype), plus 1e-5 of the output's magnitude.
"""

from __future__ import annotations

import pytest
import torch

from diffusion_fast import ops
from diffusion_fast.kernels.cuda import _ext
from diffusion_fast.kernels.cuda import group_norm as cuda_gn
from diffusion_fast.kernels.reference import oracle

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, C, *spatial, G): SD1.5's first GroupNorm; odd HW (NCHW scalar path); C=30 (channels_last scalar path);
# rank 3 and rank 5; C=1280 (channels_last with 160 vector columns); one group of all channels.
SHAPES = [(1, 320, 64, 64, 32), (2, 64, 9, 7, 8), (1, 30, 8, 8, 5), (3, 12, 5, 4), (2, 16, 3, 4, 5, 4),
          (1, 1280, 8, 8, 32), (2, 24, 6, 6, 1)]


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if not channels_last:
        return x.contiguous()
    perm = (0, *range(2, x.dim()), 1)
    inv = [perm.index(i) for i in range(x.dim())]
    return x.permute(perm).contiguous().permute(inv)


def assert_matches(out, ref_out, ref64, x, what):
    assert out.shape == x.shape and out.dtype == x.dtype and out.stride() == x.stride(), what
    oracle.assert_close(out, ref64, ref_out, floor=1e-5, what=what)


@pytest.fixture
def poison(monkeypatch):
    """Outputs start as NaN, so an element the kernel never writes fails the comparison."""
    monkeypatch.setattr(cuda_gn, "_empty_output", oracle.poisoned(cuda_gn._empty_output))


def make(shape, dtype, channels_last, *, seed, affine=True, with_add=True, param_dtype=None):
    *xs, G = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    N, C = xs[0], xs[1]
    # An offset and a scale per channel: the statistics must not rely on zero-mean, unit-scale data.
    x = (torch.randn(xs, generator=g, device="cuda") * 2 + 3).to(dtype)
    x = to_layout(x, channels_last)
    pd = param_dtype or dtype
    w = (torch.randn(C, generator=g, device="cuda") * 0.5 + 1).to(pd) if affine else None
    b = torch.randn(C, generator=g, device="cuda").to(pd) if affine else None
    add = torch.randn(N, C, generator=g, device="cuda").to(dtype) if with_add else None
    return x, G, w, b, add


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("variant", ["silu+add+affine", "plain"])
def test_group_norm_cuda_matches_float64(dtype, shape, channels_last, variant, poison):
    full = variant != "plain"
    x, G, w, b, add = make(shape, dtype, channels_last, seed=sum(shape) * 10 + len(variant),
                           affine=full, with_add=full)
    act = "silu" if full else None
    assert cuda_gn.supports(x, G, w, b, 1e-5, act, add) is None
    out = ops.group_norm(x, G, w, b, 1e-5, act, add=add, backend="cuda")
    ref = ops.group_norm(x, G, w, b, 1e-5, act, add=add, backend="torch")
    assert_matches(out, ref, oracle.group_norm(x, G, w, b, 1e-5, act, add), x, f"{shape} {dtype} cl={channels_last}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("sm_count", [1, 100000], ids=["fused", "split"])
def test_group_norm_cuda_split_and_fused_grids(channels_last, sm_count, monkeypatch, poison):
    monkeypatch.setattr(_ext, "sm_count", lambda t: sm_count)
    x, G, w, b, add = make((2, 64, 33, 40, 8), torch.bfloat16, channels_last, seed=7)
    N, C, HW = 2, 64, 33 * 40
    splits = _ext.ext().group_norm_splits(N, C, HW, G, channels_last, 8, sm_count)
    assert (splits == 1) == (sm_count == 1), splits
    out = ops.group_norm(x, G, w, b, 1e-5, "silu", add=add, backend="cuda")
    ref = ops.group_norm(x, G, w, b, 1e-5, "silu", add=add, backend="torch")
    assert_matches(out, ref, oracle.group_norm(x, G, w, b, 1e-5, "silu", add), x, f"splits={splits}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_group_norm_cuda_float32_params_and_other_dtype_add(dtype, poison):
    x, G, w, b, _ = make((2, 40, 12, 12, 8), dtype, True, seed=3, param_dtype=torch.float32)
    add = torch.randn(2, 40, device="cuda", dtype=torch.float32)
    out = ops.group_norm(x, G, w, b, 1e-6, "silu", add=add, backend="cuda")
    ref = ops.group_norm(x, G, w, b, 1e-6, "silu", add=add, backend="torch")
    assert_matches(out, ref, oracle.group_norm(x, G, w, b, 1e-6, "silu", add), x, "fp32 params")


def test_group_norm_cuda_strided_params_and_unaligned_x(poison):
    # weight/bias/add read through strides; x one element past an aligned address (scalar path).
    C = 48
    w = torch.randn(2 * C, device="cuda")[::2]  # stride 2
    b = torch.randn(C, 2, device="cuda")[:, 1]  # stride 2
    add = torch.randn(C, 3, device="cuda").t()[0:3:2]  # [2, C] with strides (2, 3)
    assert w.stride() == (2,) and b.stride() == (2,) and add.stride() == (2, 3)
    buf = torch.randn(2 * C * 10 * 10 + 1, device="cuda", dtype=torch.float16)
    x = buf[1:].view(2, C, 10, 10)
    assert x.data_ptr() % 16 != 0
    assert _ext.ext().group_norm_vec(x.data_ptr(), 0, 1, C, 100, False) == 1
    out = ops.group_norm(x, 6, w, b, 1e-5, None, add=add, backend="cuda")
    ref = ops.group_norm(x, 6, w, b, 1e-5, None, add=add, backend="torch")
    assert_matches(out, ref, oracle.group_norm(x, 6, w, b, 1e-5, None, add), x, "strided/unaligned")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_norm_cuda_large_offsets_keep_precision(channels_last):
    # mean 1000, std 0.01. A float32 mean is only known to a few ulp(1000) = 6.1e-5, i.e. 6e-3 of a std: a
    # merge-based (Chan/Welford) kernel stays within a few of those; E[x^2] - E[x]^2 in float32 loses every
    # digit (ulp(1e6) = 0.0625 against a variance of 1e-4) and gives errors of order 1 or NaN.
    x = to_layout(torch.randn(1, 64, 32, 32, device="cuda") * 1e-2 + 1000, channels_last)
    out = ops.group_norm(x, 8, backend="cuda")
    err = (out.double() - oracle.group_norm(x, 8)).abs().max().item()
    tol = 16 * torch.finfo(torch.float32).eps * 1000 / 1e-2  # 16 ulp of the mean, in units of the std
    assert not torch.isnan(out).any() and err <= tol, f"max error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_norm_cuda_is_bitwise_deterministic(channels_last):
    x, G, w, b, add = make((1, 320, 64, 64, 32), torch.bfloat16, channels_last, seed=11)
    first = ops.group_norm(x, G, w, b, 1e-5, "silu", add=add, backend="cuda")
    for _ in range(10):
        assert torch.equal(ops.group_norm(x, G, w, b, 1e-5, "silu", add=add, backend="cuda"), first)


def test_group_norm_cuda_declines_what_it_cannot_take():
    x = torch.randn(1, 4096, 2, 2, device="cuda")  # channels_last fp32 C=4096: 1024 vector columns
    x_cl = to_layout(x, True)
    reason = cuda_gn.supports(x_cl, 32)
    assert reason is not None and "C=4096" in reason
    with pytest.raises(ops.BackendUnavailable, match="C=4096"):
        ops.group_norm(x_cl, 32, backend="cuda")
    strided = torch.randn(2, 8, 6, 10, device="cuda")[..., ::2]
    assert "contiguous or channels_last" in cuda_gn.supports(strided, 4)
    # auto falls back to a backend that serves it.
    assert_matches(ops.group_norm(x_cl, 32), ops.group_norm(x_cl, 32, backend="torch"), oracle.group_norm(x_cl, 32),
                   x_cl, "auto fallback")


def test_group_norm_cuda_on_a_side_stream_and_in_a_cuda_graph():
    x, G, w, b, add = make((2, 128, 16, 16, 32), torch.float16, True, seed=5)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out_s = ops.group_norm(x, G, w, b, 1e-5, "silu", add=add, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(out_s, ops.group_norm(x, G, w, b, 1e-5, "silu", add=add, backend="cuda"))

    static_x = x.clone()
    ops.group_norm(static_x, G, w, b, 1e-5, "silu", add=add, backend="cuda")  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ops.group_norm(static_x, G, w, b, 1e-5, "silu", add=add, backend="cuda")
    new_x = to_layout(torch.randn(x.shape, device="cuda") * 3 - 1, True).half()
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, ops.group_norm(new_x, G, w, b, 1e-5, "silu", add=add, backend="cuda"))
