"""Triton sampler_step against the reference: every history size / CFG / noise / net_input combination, odd
sizes, slot rules, aliasing, and replays of real sampler tables; compiled kernels on a GPU.

Tolerance: the kernel may contract products into FMAs, so it is not bit-identical to the reference. Its max
error against the float64 oracle (``kernels/reference/oracle.py``) must be at most twice the float32 reference's error,
plus a floor (1e-6 relative for float32 state, half an ulp for a low-precision net_input). Outputs start as NaN.
"""

from __future__ import annotations

import pytest
import torch

from diffusion_fast import ops
from diffusion_fast.kernels.reference import oracle
from diffusion_fast.kernels.triton import sampler_step as tss
from diffusion_fast.ops.registry import BackendUnavailable
from diffusion_fast.ops.rows import coef_width

SHAPE = (2, 4, 5, 7)  # 280 elements: a partial last block under every configuration


def make_case(shape, K, cfg, *, noise, net, mo_dtype=torch.float16, device="cpu", seed=0, slot_vals=None,
              slots_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    x = torch.randn(shape, generator=g) * 3
    mo = torch.randn((2 * B if cfg else B, *shape[1:]), generator=g).to(mo_dtype)
    coef = torch.randn(coef_width(K), generator=g)
    hist = torch.randn((K, *shape), generator=g) if K else None
    z = torch.randn(shape, generator=g) if noise else None
    slots = None
    if K:
        if slot_vals is None:
            perm = torch.randperm(K, generator=g).tolist()
            slot_vals = [perm[0], perm[1] if K > 1 else -1]
        slots = torch.tensor(slot_vals, dtype=slots_dtype)
    net_input = None
    if net is not None:
        net_dtype, net_cfg = net
        net_input = torch.empty((2 * B if net_cfg else B, *shape[1:]), dtype=net_dtype)
    case = dict(x=x, model_output=mo, coef=coef, slots=slots, hist=hist, noise=z, net_input=net_input)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def clone(case):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def run(case, backend, *, alias_out=False):
    c = clone(case)
    if c["net_input"] is not None:
        c["net_input"].fill_(float("nan"))
    out = c["x"] if alias_out else oracle.nan_like(c["x"])
    ret = ops.sampler_step(c["x"], c["model_output"], c["coef"], c["slots"], c["hist"], c["noise"], out=out,
                           net_input=c["net_input"], backend=backend)
    assert ret is out
    return out, c["hist"], c["net_input"]


def run64(case):
    """The float64 oracle on the same inputs: (out, hist, net_input before rounding)."""
    return oracle.sampler_step(case["x"], case["model_output"], case["coef"], case["slots"], case["hist"],
                               case["noise"], case["net_input"])


def assert_within(name, got, want32, want64, dtype=torch.float32):
    if want64 is None:
        assert got is None
        return
    # float32 state: a floor of 1e-6 relative; a low-precision net_input: half an ulp (the oracle's default).
    oracle.assert_close(got, want64, want32, dtype=dtype, floor=1e-6 if dtype == torch.float32 else None,
                        what=name)


def check_against_reference(case, *, alias_out=False):
    got = run(case, "triton", alias_out=alias_out)
    want32 = run(case, "torch", alias_out=alias_out)
    want64 = run64(case)
    net_dtype = case["net_input"].dtype if case["net_input"] is not None else torch.float32
    for name, g, w32, w64, dt in zip(("out", "hist", "net_input"), got, want32, want64,
                                     (torch.float32, torch.float32, net_dtype)):
        assert_within(name, g, w32, w64, dt)
    return got


@pytest.mark.parametrize("net", [None, (torch.bfloat16, False), (torch.float16, True)],
                         ids=["no-net", "net-bf16", "net-fp16-x2"])
@pytest.mark.parametrize("noise", [False, True], ids=["ode", "noise"])
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("K", [0, 1, 3])
def test_matches_reference(K, cfg, noise, net, device):
    check_against_reference(make_case(SHAPE, K, cfg, noise=noise, net=net, device=device, seed=K + 2 * cfg))


def test_eight_slots_bf16_output(device):
    case = make_case((3, 37), 8, True, noise=True, net=(torch.bfloat16, True), mo_dtype=torch.bfloat16,
                     device=device)
    check_against_reference(case)


@pytest.mark.parametrize("slot_vals", [[-1, -1], [2, -1], [-1, 0], [0, 2], [3, 7], [5, 1]],
                         ids=["none", "d-only", "y-only", "both", "out-of-range", "far-out"])
def test_slot_rules(slot_vals, device):
    # -1 and (on a GPU, where only the kernels read them) indices >= K write nothing, exactly like the
    # reference; the other slots keep their values. On the CPU the op refuses an index >= K before any kernel
    # (tests/test_sampler_step_slots.py).
    case = make_case(SHAPE, 3, False, noise=False, net=None, device=device, slot_vals=slot_vals,
                     slots_dtype=torch.int32)
    if device.type == "cpu" and any(v >= 3 for v in slot_vals):
        with pytest.raises(ValueError, match="slots must be -1"):
            run(case, "triton")
        return
    _, hist, _ = check_against_reference(case)
    for k in range(3):
        if k not in slot_vals:
            assert torch.equal(hist[k], case["hist"][k])


def test_out_may_alias_x_and_written_slots_may_be_read(device):
    # Every slot is read (nonzero a_h/b_h) and two of them are overwritten in the same call.
    case = make_case(SHAPE, 2, True, noise=True, net=(torch.float32, False), device=device, slot_vals=[1, 0])
    check_against_reference(case, alias_out=True)


def test_unsupported_layout_gives_the_reason(device):
    case = make_case((2, 6, 8), 0, False, noise=False, net=None, device=device)
    x = case["x"].transpose(1, 2)
    assert "contiguous" in tss.supports(x=x, model_output=case["model_output"].transpose(1, 2), coef=case["coef"],
                                        slots=None, hist=None, noise=None, out=torch.empty_like(x), net_input=None)
    with pytest.raises(BackendUnavailable, match="contiguous"):
        ops.sampler_step(x, case["model_output"].transpose(1, 2), case["coef"], backend="triton")


def test_configs_cover_small_and_large_states():
    assert set(tss.configs()) == {tss.SMALL, tss.LARGE}


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "heun", "dpm_2", "lms", "ddim", "dpmpp_2m",
                                     "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc"])
def test_replays_a_real_sampler_table(sampler, device):
    # Every row of the sampler's own coefficient table (epsilon prediction, CFG 5), with the state and history
    # carried from row to row by the Triton kernel; each row checked against the reference on the same inputs.
    from diffusion_fast.samplers.tables import build_plan
    from diffusion_fast.schedules import karras

    plan = build_plan(sampler, karras(4, 0.1, 10.0).tolist(), prediction="epsilon", guidance_scale=5.0)
    coef = torch.tensor(plan.coef, dtype=torch.float32, device=device)
    slots = torch.tensor(plan.slots, device=device)
    g = torch.Generator().manual_seed(1)
    B, S = 1, (4, 3, 5)
    x = (torch.randn((B, *S), generator=g) * 10).to(device)
    hist = torch.zeros((plan.K, B, *S), device=device) if plan.K else None
    for e in range(plan.evaluations):
        mo = torch.randn((2 * B, *S), generator=g).to(torch.bfloat16).to(device)
        z = torch.randn((B, *S), generator=g).to(device) if plan.noise[e] else None
        case = dict(x=x, model_output=mo, coef=coef[e], slots=slots[e] if plan.K else None, hist=hist, noise=z,
                    net_input=torch.empty((2 * B, *S), dtype=torch.bfloat16, device=device))
        out, hist, _ = check_against_reference(case)
        x = out


# ----------------------------------------------------------------------------------------------- GPU ---
GPU_SHAPES = [(2, 4, 64, 64), (1, 4, 128, 128), (4, 16, 128, 128)]  # SD1.5, SDXL latents, a large state


@pytest.mark.gpu
@pytest.mark.parametrize("mo_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K", [0, 1, 3, 8])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_matches_reference(shape, K, mo_dtype):
    case = make_case(shape, K, True, noise=True, net=(mo_dtype, True), mo_dtype=mo_dtype, device="cuda")
    check_against_reference(case)


@pytest.mark.gpu
def test_gpu_repeated_calls_are_bitwise_equal():
    case = make_case((4, 16, 128, 128), 3, True, noise=True, net=(torch.bfloat16, True), device="cuda")
    first = run(case, "triton")
    for _ in range(10):
        again = run(case, "triton")
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_graph_replay_reads_the_new_row():
    # Capture one step, then copy a different coefficient row and slots into the captured buffers: the replay
    # must compute with the new row (nothing was baked in on the host).
    case = make_case((2, 4, 64, 64), 2, True, noise=True, net=(torch.bfloat16, True), device="cuda", seed=5)
    c = clone(case)
    out = torch.empty_like(c["x"])
    ops.sampler_step(c["x"], c["model_output"], c["coef"], c["slots"], c["hist"], c["noise"], out=out,
                     net_input=c["net_input"], backend="triton")  # compile outside the capture
    c = clone(case)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ops.sampler_step(c["x"], c["model_output"], c["coef"], c["slots"], c["hist"], c["noise"], out=out,
                         net_input=c["net_input"], backend="triton")
    new = make_case((2, 4, 64, 64), 2, True, noise=True, net=(torch.bfloat16, True), device="cuda", seed=6,
                    slot_vals=[0, 1])
    c["coef"].copy_(new["coef"])
    c["slots"].copy_(new["slots"])
    g.replay()
    expect = dict(case, coef=new["coef"], slots=new["slots"])
    want32 = run(expect, "torch")
    want64 = run64(expect)
    assert_within("out", out, want32[0], want64[0])
    assert_within("hist", c["hist"], want32[1], want64[1])


@pytest.mark.gpu
def test_gpu_auto_picks_triton_for_large_calls():
    from diffusion_fast.ops import registry

    # The measured crossover (ops/registry.py): triton from 2**22 elements, cuda below.
    case = make_case((4, 16, 256, 256), 1, False, noise=False, net=None, device="cuda")
    call = dict(case, out=torch.empty_like(case["x"]))
    assert registry.resolve("sampler_step", "auto", case["x"].device, call) is tss.forward
