"""CUDA sampler_step against the reference backend, for every history size, CFG and dtype combination.

The kernel rounds every product and sum in the reference's float32 order (no FMA contraction), so it must
reproduce the reference bit for bit: out, the written history slots and the next network input.
Outputs (out, net_input) start as NaN. Also: the 16-byte and the scalar path, int32/int64 slots, -1 and
out-of-range slots, out aliasing x, determinism, and CUDA graph replay with a new coefficient row.
"""

from __future__ import annotations

import pytest
import torch

from diffusion_fast import ops
from diffusion_fast.kernels.cuda import sampler_step as cuda_step
from diffusion_fast.kernels.reference import oracle
from diffusion_fast.ops.rows import coef_width

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# n % 4 == 0 (16-byte path) and n = 3*5*7 (scalar path)
SHAPES = [(2, 4, 16, 16), (3, 5, 7)]


def make_case(shape, K, cfg, mo_dtype, *, noise_dtype, net, slots_dtype=torch.int64, slot_vals=None, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    B = shape[0]
    x = torch.randn(shape, generator=g, device="cuda") * 4
    mo = torch.randn((2 * B if cfg else B, *shape[1:]), generator=g, device="cuda").to(mo_dtype)
    coef = torch.randn(coef_width(K), generator=g, device="cuda")
    hist = torch.randn((K, *shape), generator=g, device="cuda") if K else None
    noise = torch.randn(shape, generator=g, device="cuda").to(noise_dtype) if noise_dtype else None
    slots = None
    if K:
        if slot_vals is None:
            perm = torch.randperm(K, generator=g, device="cuda").tolist()
            slot_vals = [perm[0], perm[1] if K > 1 else -1]
        slots = torch.tensor(slot_vals, dtype=slots_dtype, device="cuda")
    net_input = None
    if net is not None:
        net_dtype, net_cfg = net
        net_input = torch.empty((2 * B if net_cfg else B, *shape[1:]), dtype=net_dtype, device="cuda")
    return dict(x=x, model_output=mo, coef=coef, slots=slots, hist=hist, noise=noise, net_input=net_input)


def run_both(case, *, alias_out=False):
    """(cuda results, reference results): out, hist, net_input, each from its own copy of the inputs."""
    results = []
    for backend in ("cuda", "torch"):
        c = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
        if c["net_input"] is not None:
            c["net_input"].fill_(float("nan"))
        out = c["x"] if alias_out else oracle.nan_like(c["x"])
        ret = ops.sampler_step(c["x"], c["model_output"], c["coef"], c["slots"], c["hist"], c["noise"],
                               out=out, net_input=c["net_input"], backend=backend)
        assert ret is out
        results.append((out, c["hist"], c["net_input"]))
    return results


def assert_bitwise(got, want, what):
    if got is None:
        assert want is None
        return
    assert not torch.isnan(got).any(), f"{what}: NaN (an element was never written)"
    if not torch.equal(got, want):
        diff = (got.double() - want.double()).abs()
        n = int((diff > 0).sum())
        raise AssertionError(f"{what}: {n} of {got.numel()} elements differ from the reference, max |diff| "
                             f"{diff.max().item():.3g}")


def check(case, what, **kw):
    (out, hist, net), (rout, rhist, rnet) = run_both(case, **kw)
    assert_bitwise(out, rout, f"{what}: out")
    assert_bitwise(hist, rhist, f"{what}: hist")
    assert_bitwise(net, rnet, f"{what}: net_input")


NOISE = [None, torch.float32, torch.bfloat16]
NETS = [None, (torch.float16, True), (torch.bfloat16, False), (torch.float32, True)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mo_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("K", [0, 1, 2, 3, 5, 8])
def test_sampler_step_cuda_matches_reference_bitwise(shape, mo_dtype, cfg, K):
    i = K * 7 + cfg * 3 + DTYPES.index(mo_dtype) + len(shape)
    case = make_case(shape, K, cfg, mo_dtype, noise_dtype=NOISE[i % 3], net=NETS[i % 4], seed=i)
    assert cuda_step.supports(**case, out=case["x"]) is None
    check(case, f"K={K} cfg={cfg} {mo_dtype} noise={NOISE[i % 3]} net={NETS[i % 4]}")


@pytest.mark.parametrize("slots_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("slot_vals", [[2, 0], [-1, 1], [1, -1], [-1, -1], [3, 3], [4, 2], [0, 7]],
                         ids=lambda s: f"{s[0]},{s[1]}")
def test_sampler_step_cuda_slot_rules(slots_dtype, slot_vals):
    # K = 4: -1 means no write; equal slots: D wins; 4 and 7 are out of range: no write.
    case = make_case((2, 3, 8, 8), 4, True, torch.float16, noise_dtype=torch.float32,
                     net=(torch.float16, True), slots_dtype=slots_dtype, slot_vals=slot_vals, seed=5)
    check(case, f"slots={slot_vals} {slots_dtype}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sampler_step_cuda_out_may_alias_x(shape):
    case = make_case(shape, 3, True, torch.bfloat16, noise_dtype=torch.float32, net=(torch.bfloat16, True),
                     seed=9)
    check(case, "out is x", alias_out=True)


def test_sampler_step_cuda_unaligned_views_take_the_scalar_path():
    case = make_case((2, 4, 8, 8), 2, True, torch.float16, noise_dtype=None, net=(torch.float16, False), seed=4)
    n = case["x"].numel()
    buf = torch.randn(n + 1, device="cuda")
    buf[1:].copy_(case["x"].flatten())
    case["x"] = buf[1:].view(case["x"].shape)  # contiguous, 4 bytes past 16-byte alignment
    assert case["x"].data_ptr() % 16 != 0
    check(case, "unaligned x")


def test_sampler_step_cuda_strided_coef_row_and_slots():
    case = make_case((2, 4, 8, 8), 2, False, torch.float32, noise_dtype=torch.float32, net=None, seed=6)
    table = torch.randn(coef_width(2), 3, device="cuda")
    table[:, 1] = case["coef"]
    case["coef"] = table[:, 1]  # a column: stride 3
    slots = torch.tensor([[1, 9], [0, 9]], dtype=torch.int32, device="cuda")
    case["slots"] = slots[:, 0]  # stride 2
    assert case["coef"].stride() == (3,) and case["slots"].stride() == (2,)
    check(case, "strided coef/slots")


def test_sampler_step_cuda_declines_non_contiguous():
    case = make_case((2, 4, 8, 8), 0, False, torch.float32, noise_dtype=None, net=None)
    x = case["x"].transpose(2, 3)
    assert "x must be contiguous" in cuda_step.supports(**{**case, "x": x}, out=x)


def test_sampler_step_cuda_is_bitwise_deterministic():
    case = make_case((2, 4, 64, 64), 3, True, torch.bfloat16, noise_dtype=torch.float32,
                     net=(torch.bfloat16, True), seed=2)
    first = run_both(case)[0]
    for _ in range(5):
        again = run_both(case)[0]
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_sampler_step_cuda_graph_replays_with_a_new_coefficient_row():
    K = 2
    case = make_case((2, 4, 16, 16), K, True, torch.float16, noise_dtype=torch.float32,
                     net=(torch.float16, True), seed=8)
    x, mo, hist, noise, net = case["x"], case["model_output"], case["hist"], case["noise"], case["net_input"]
    coef, slots = case["coef"].clone(), case["slots"].clone()
    out = torch.empty_like(x)
    hist0 = hist.clone()
    ops.sampler_step(x, mo, coef, slots, hist, noise, out=out, net_input=net, backend="cuda")  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.sampler_step(x, mo, coef, slots, hist, noise, out=out, net_input=net, backend="cuda")
    table = torch.randn(3, coef_width(K), device="cuda")
    slot_rows = torch.tensor([[0, 1], [1, -1], [-1, 0]], dtype=torch.int64, device="cuda")
    for e in range(3):
        coef.copy_(table[e])
        slots.copy_(slot_rows[e])
        hist.copy_(hist0)
        graph.replay()
        ref_out, ref_hist, ref_net = torch.empty_like(x), hist0.clone(), torch.empty_like(net)
        ops.sampler_step(x, mo, table[e], slot_rows[e], ref_hist, noise, out=ref_out, net_input=ref_net,
                         backend="torch")
        torch.cuda.synchronize()
        assert_bitwise(out, ref_out, f"row {e}: out")
        assert_bitwise(hist, ref_hist, f"row {e}: hist")
        assert_bitwise(net, ref_net, f"row {e}: net_input")
