"""The reference ("torch") backends against independent formulations, input checks, and the registry."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_fast import ops
from diffusion_fast.kernels.reference import oracle
from diffusion_fast.ops import registry

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close_to_exact(out: torch.Tensor, ref64: torch.Tensor, what: str):
    """float32 math then one rounding to the storage dtype: the yardstick is the exact result rounded to that
    dtype, so the reference may cost at most about twice that rounding (oracle's rule, floor 1e-5)."""
    oracle.assert_close(out, ref64, ref64.to(out.dtype), floor=1e-5, what=what)


# ----------------------------------------------------------------------------------------------- oracle


def test_oracle_group_norm_equals_torch_in_float64():
    g = torch.Generator().manual_seed(0)
    x, w, b, add = torch.randn(2, 12, 5, 3, generator=g), torch.randn(12, generator=g), \
        torch.randn(12, generator=g), torch.randn(2, 12, generator=g)
    want = F.silu(F.group_norm(x.double() + add.double()[:, :, None, None], 3, w.double(), b.double(), 1e-5))
    torch.testing.assert_close(oracle.group_norm(x, 3, w, b, 1e-5, "silu", add), want, rtol=1e-12, atol=1e-12)


def test_oracle_attention_equals_torch_sdpa_in_float64():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 7, 3, 16, generator=g), torch.randn(2, 9, 3, 16, generator=g), \
        torch.randn(2, 9, 3, 16, generator=g)
    want = F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v)), scale=0.3)
    torch.testing.assert_close(oracle.attention(q, k, v, 0.3), want.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_oracle_attention_chunks_over_queries(monkeypatch):
    q, k, v = torch.randn(1, 50, 2, 16), torch.randn(1, 30, 2, 16), torch.randn(1, 30, 2, 16)
    whole, lowp = oracle.attention(q, k, v, 0.25), oracle.attention_lowp(q, k, v, 0.25)
    monkeypatch.setattr(oracle, "_CHUNK_SCORES", 2 * 30 * 7)  # 7 queries per chunk
    torch.testing.assert_close(oracle.attention(q, k, v, 0.25), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(oracle.attention_lowp(q, k, v, 0.25), lowp, rtol=1e-6, atol=1e-6)


def test_oracle_sampler_step_writes_slots_as_documented():
    from diffusion_fast.ops.rows import AD, AX, BD, BX, CIN, G, P, Q, coef_width

    x, mo = torch.full((1, 3), 2.0), torch.cat([torch.full((1, 3), 1.0), torch.full((1, 3), 3.0)])
    coef = torch.zeros(coef_width(2), dtype=torch.float64)
    coef[[G, P, Q, AX, AD, BX, BD, CIN]] = torch.tensor([2.0, 1.0, -1.0, 0.5, 1.0, 1.0, 2.0, 0.25],
                                                        dtype=torch.float64)
    hist = torch.stack([torch.full((1, 3), 7.0), torch.full((1, 3), 9.0)])
    net = torch.empty(2, 3)
    # raw = 1 + 2 (3 - 1) = 5; D = 2 - 5 = -3; x_new = 1 - 3 + 0 = -2; y = 2 - 6 = -4; net = -0.5
    out, h, n = oracle.sampler_step(x, mo, coef, torch.tensor([1, 0]), hist, None, net)
    assert out.dtype == torch.float64 and torch.equal(out, torch.full((1, 3), -2.0, dtype=torch.float64))
    assert torch.equal(h[1], torch.full((1, 3), -3.0, dtype=torch.float64))  # D into slot 1
    assert torch.equal(h[0], torch.full((1, 3), -4.0, dtype=torch.float64))  # y into slot 0
    assert torch.equal(n, torch.full((2, 3), -0.5, dtype=torch.float64))
    _, h, _ = oracle.sampler_step(x, mo, coef, torch.tensor([1, 1]), hist, None)
    assert torch.equal(h[1], torch.full((1, 3), -3.0, dtype=torch.float64)) and torch.equal(h[0], hist[0].double())
    _, h, _ = oracle.sampler_step(x, mo, coef, torch.tensor([-1, 5]), hist, None)
    assert torch.equal(h, hist.double())  # -1 and out-of-range slots write nothing
    assert torch.equal(hist[0], torch.full((1, 3), 7.0))  # the oracle never writes into its arguments


def test_oracle_rule_fails_nan_and_reports_the_first_mismatches():
    exact = torch.linspace(-1, 1, 10, dtype=torch.float64)
    out = exact.float()
    assert oracle.check(out, exact, exact.float()).ok
    out[3] = float("nan")
    c = oracle.check(out, exact, exact.float(), what="x")
    assert not c.ok and c.err == float("inf") and "(3,): got nan" in c.message() and "non-finite" in c.message()
    bad = exact.float() + 0.01
    with pytest.raises(AssertionError, match="max error 0.01"):
        oracle.assert_close(bad, exact, exact.float(), what="shifted")
    # the bound: 2 x the yardstick's error + floor x max(1, max|exact|)
    assert oracle.bound(exact * 4, (exact * 4).half(), torch.float16) == pytest.approx(
        2 * ((exact * 4).half().double() - exact * 4).abs().max().item() + 2.0**-11 * 4)
    assert torch.isnan(oracle.nan_like(torch.ones(2, 3))).all()
    assert torch.isnan(oracle.poisoned(torch.zeros)(4)).all()


# ------------------------------------------------------------------------------------------ group_norm

GN_SHAPES = [(1, 320, 7, 9, 32), (2, 6, 5, 3, 3), (3, 64, 1, 1, 8), (1, 12, 11, 13, 12)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_add", [False, True])
def test_group_norm_reference(dtype, shape, channels_last, activation, with_add):
    N, C, H, W, G = shape
    g = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    x = (torch.randn(N, C, H, W, generator=g) * 3 + 1.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, generator=g).to(dtype)
    b = torch.randn(C, generator=g).to(dtype)
    add = torch.randn(N, C, generator=g).to(dtype) if with_add else None
    out = ops.group_norm(x, G, w, b, 1e-5, activation, add=add, backend="torch")
    ref = oracle.group_norm(x, G, w, b, 1e-5, activation, add)
    assert out.dtype == dtype and out.shape == x.shape
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()
    assert_close_to_exact(out, ref, f"group_norm {shape} {dtype}")


@pytest.mark.parametrize("shape", [(2, 8, 17), (1, 16, 3, 4, 5)])
def test_group_norm_reference_rank_3_and_5(shape):
    x = torch.randn(*shape, dtype=torch.float64).float()
    out = ops.group_norm(x, 4, activation="silu", backend="torch")
    assert_close_to_exact(out, oracle.group_norm(x, 4, activation="silu"), "rank")


def test_group_norm_statistics_are_stable_for_large_offsets():
    """E[x^2] - E[x]^2 in low precision would lose everything here; two-pass float32 does not."""
    x = (torch.randn(1, 4, 32, 32) * 0.01 + 1000.0).to(torch.bfloat16)
    out = ops.group_norm(x, 2, backend="torch")
    assert_close_to_exact(out, oracle.group_norm(x, 2), "offset")


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(x=torch.randn(2, 6, 4, 4), num_groups=4), ValueError, ["num_groups=4", "C=6"]),
        (dict(x=torch.randn(2, 6), num_groups=2), ValueError, ["x", "rank"]),
        (dict(x=torch.randn(2, 6, 4).to(torch.int32), num_groups=2), TypeError, ["x", "int32"]),
        (dict(x=torch.randn(2, 6, 4), num_groups=2, weight=torch.randn(5), bias=torch.randn(5)), ValueError,
         ["weight", "(6,)"]),
        (dict(x=torch.randn(2, 6, 4), num_groups=2, weight=torch.randn(6)), ValueError, ["weight and bias"]),
        (dict(x=torch.randn(2, 6, 4), num_groups=2, eps=-1.0), ValueError, ["eps", "-1.0"]),
        (dict(x=torch.randn(2, 6, 4), num_groups=2, activation="gelu"), ValueError, ["activation", "gelu"]),
        (dict(x=torch.randn(2, 6, 4), num_groups=2, add=torch.randn(2, 5)), ValueError, ["add", "[N, C]"]),
        (dict(x=torch.randn(2, 6, 4), num_groups=2.0), TypeError, ["num_groups"]),
        (dict(x=torch.randn(2, 6, 4), num_groups=2, backend="numpy"), ValueError, ["backend", "numpy"]),
    ],
)
def test_group_norm_bad_input_names_the_argument(kwargs, exc, words):
    with pytest.raises(exc) as ei:
        ops.group_norm(**kwargs)
    for w in words:
        assert w in str(ei.value), (w, str(ei.value))


# ------------------------------------------------------------------------------------------- attention

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Sq,Sk,H,D", [(1, 77, 1000, 2, 40), (2, 33, 77, 3, 80), (1, 5, 1, 1, 8),
                                         (1, 64, 64, 1, 256), (2, 9, 17, 2, 72)])
def test_attention_reference(dtype, B, Sq, Sk, H, D):
    g = torch.Generator().manual_seed(Sq * 1000 + Sk)
    q = torch.randn(B, Sq, H, D, generator=g).to(dtype)
    k = torch.randn(B, Sk, H, D, generator=g).to(dtype)
    v = torch.randn(B, Sk, H, D, generator=g).to(dtype)
    out = ops.attention(q, k, v, backend="torch")
    assert out.shape == (B, Sq, H, D) and out.dtype == dtype and out.is_contiguous()
    assert_close_to_exact(out, oracle.attention(q, k, v, 1 / math.sqrt(D)), f"attention {dtype}")


def test_attention_reference_strided_views_of_fused_qkv():
    qkv = torch.randn(2, 19, 3, 4, 40)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    out = ops.attention(q, k, v, scale=0.3, backend="torch")
    assert_close_to_exact(out, oracle.attention(q, k, v, 0.3), "strided")


def test_attention_reference_chunking_matches_unchunked(monkeypatch):
    from diffusion_fast.kernels.reference import attention as ref_mod

    q, k, v = torch.randn(1, 50, 2, 16), torch.randn(1, 30, 2, 16), torch.randn(1, 30, 2, 16)
    whole = ops.attention(q, k, v, backend="torch")
    monkeypatch.setattr(ref_mod, "_MAX_SCORE_ELEMENTS", 2 * 30 * 7)  # 7 queries per chunk
    torch.testing.assert_close(ops.attention(q, k, v, backend="torch"), whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "q,k,v,exc,words",
    [
        (torch.randn(1, 4, 2, 36), torch.randn(1, 4, 2, 36), torch.randn(1, 4, 2, 36), ValueError, ["D=36", "8"]),
        (torch.randn(1, 4, 2, 264), torch.randn(1, 4, 2, 264), torch.randn(1, 4, 2, 264), ValueError, ["256"]),
        (torch.randn(1, 4, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 6, 2, 8), ValueError, ["k and v"]),
        (torch.randn(1, 4, 2, 8), torch.randn(1, 5, 3, 8), torch.randn(1, 5, 3, 8), ValueError, ["heads"]),
        (torch.randn(4, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8), ValueError, ["q", "rank 4"]),
        (torch.randn(1, 4, 2, 8), torch.randn(1, 5, 2, 8).half(), torch.randn(1, 5, 2, 8).half(), TypeError,
         ["k", "q", "dtype"]),
        (torch.randn(1, 4, 2, 8).double(), torch.randn(1, 5, 2, 8).double(), torch.randn(1, 5, 2, 8).double(),
         TypeError, ["q", "float64"]),
    ],
)
def test_attention_bad_input_names_the_argument(q, k, v, exc, words):
    with pytest.raises(exc) as ei:
        ops.attention(q, k, v)
    for w in words:
        assert w in str(ei.value), (w, str(ei.value))


def test_attention_mixed_devices_rejected():
    meta = torch.empty(1, 5, 2, 8, device="meta")
    with pytest.raises(ValueError, match="same device"):
        ops.attention(torch.randn(1, 4, 2, 8), meta, meta)


# ------------------------------------------------------------------------------------------- registry

def test_auto_on_cpu_uses_reference_and_explicit_unavailable_backend_raises_with_reason():
    x = torch.randn(1, 4, 3, 3)
    assert torch.equal(ops.group_norm(x, 2), ops.group_norm(x, 2, backend="torch"))
    reasons = dict(registry.explain("group_norm", x.device, dict(x=x, num_groups=2, weight=None, bias=None,
                                                                  eps=1e-5, activation=None, add=None)))
    assert reasons["torch"] is None
    if reasons["cuda"] is not None:
        with pytest.raises(registry.BackendUnavailable, match="cuda"):
            ops.group_norm(x, 2, backend="cuda")


def test_registry_env_override_and_unknown_op(monkeypatch):
    monkeypatch.setenv("DIFFUSION_FAST_AUTO_GROUP_NORM", "torch")
    assert registry.auto_order("group_norm", "cuda") == ("torch",)
    with pytest.raises(KeyError, match="unknown op"):
        registry.status("conv")
    with pytest.raises(ValueError, match="order"):
        registry.set_auto_order("group_norm", "cuda", ("fast",))


def test_auto_rules_on_cuda_follow_the_measured_crossovers():
    meta = lambda *s: torch.empty(*s, device="meta")  # noqa: E731 - shapes only
    order = registry.auto_order
    assert order("group_norm", "cuda", {"x": meta(2, 320, 64, 64)})[0] == "cuda"
    assert order("group_norm", "cuda", {"x": meta(8, 512, 128, 128)})[0] == "triton"
    assert order("attention", "cuda", {"q": meta(2, 4096, 8, 40), "k": meta(2, 77, 8, 40)})[0] == "cuda"
    assert order("attention", "cuda", {"q": meta(2, 4096, 8, 40), "k": meta(2, 4096, 8, 40)})[0] == "cuda"
    assert order("attention", "cuda", {"q": meta(2, 4096, 10, 64), "k": meta(2, 4096, 10, 64)})[0] == "triton"
    assert order("sampler_step", "cuda", {"x": meta(1, 4, 64, 64)})[0] == "cuda"
    assert order("sampler_step", "cuda", {"x": meta(4, 16, 1024, 1024)})[0] == "triton"
    assert order("group_norm", "cpu", {"x": meta(2, 320, 64, 64)}) == ("torch",)
