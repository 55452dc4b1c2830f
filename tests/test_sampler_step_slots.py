"""sampler_step's slots and buffers mean the same on every backend.

Slot values: -1 writes nothing, 0..K-1 writes that slot. Any other value is an error that the op reports
when it can read the slots without a device synchronisation (CPU tensors: every backend that runs here);
on a GPU the kernels read them, and every backend then writes nothing for a value outside [0, K) — 64-bit
values included (a backend that truncated 2**32 + 1 to 32 bits wrote hist[1]). Buffers that the op writes
(out, hist, net_input) may not overlap anything else it reads or writes, except ``out is x``.
"""

from __future__ import annotations

import pytest
import torch

from diffusion_fast import ops
from diffusion_fast.ops.rows import coef_width

CPU_BACKENDS = ["torch", "triton"]
K = 3


def case(device="cpu", slots=(0, 1), dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 7, generator=g)
    c = dict(x=x, model_output=torch.randn(4, 5, 7, generator=g), coef=torch.randn(coef_width(K), generator=g),
              slots=torch.tensor(slots, dtype=dtype), hist=torch.randn(K, 2, 5, 7, generator=g),
              noise=torch.randn(2, 5, 7, generator=g))
    return {k: v.to(device) for k, v in c.items()}


def step(c, backend, **kw):
    return ops.sampler_step(c["x"], c["model_output"], c["coef"], c["slots"], c["hist"], c["noise"],
                            backend=backend, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("slots", [(5, 7), (-5, -1), (0, 3), (-2, 0)])
def test_out_of_range_slots_are_refused_on_cpu(backend, dtype, slots):
    c = case(slots=slots, dtype=dtype)
    before = c["hist"].clone()
    with pytest.raises(ValueError, match=rf"slots must be -1 \(no write\) or 0\.\.{K - 1}.*got \[{slots[0]}, "):
        step(c, backend)
    assert torch.equal(c["hist"], before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_slot_beyond_32_bits_is_refused_not_truncated(backend):
    c = case(slots=(2**32 + 1, -1))
    before = c["hist"].clone()
    with pytest.raises(ValueError, match=str(2**32 + 1)):
        step(c, backend)
    assert torch.equal(c["hist"], before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("slots", [(-1, -1), (0, -1), (-1, 2), (2, 0)])
def test_valid_slots_agree_across_backends(backend, slots):
    ref = case(slots=slots)
    got = case(slots=slots)
    step(ref, "torch", out=ref["x"])
    step(got, backend, out=got["x"])
    scale = ref["hist"].abs().max().item()
    torch.testing.assert_close(got["hist"], ref["hist"], rtol=0, atol=1e-6 * scale)
    untouched = case(slots=slots)["hist"]
    for k in range(K):
        if k not in slots:
            assert torch.equal(got["hist"][k], untouched[k])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("target", ["hist[0]", "hist[2]", "model_output", "noise", "net_input", "part of x"])
def test_out_overlapping_another_buffer_is_refused(backend, target):
    c = case()
    base = torch.randn(71)
    c["x"] = base[:70].view(2, 5, 7)
    net = torch.empty(4, 5, 7)
    out = {"hist[0]": c["hist"][0], "hist[2]": c["hist"][2], "model_output": c["model_output"][:2],
           "noise": c["noise"], "net_input": net[2:], "part of x": base[1:].view(2, 5, 7)}[target]
    with pytest.raises(ValueError, match="out .*overlaps"):
        step(c, backend, out=out, net_input=net)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_net_input_overlapping_state_or_history_is_refused(backend):
    c = case()
    with pytest.raises(ValueError, match="(net_input overlaps hist|hist overlaps net_input)"):
        step(c, backend, net_input=c["hist"][:2].reshape(4, 5, 7))
    big = torch.randn(K, 2, 5, 7)
    with pytest.raises(ValueError, match="hist .*overlaps .*x"):
        step(dict(c, x=big[0], hist=big), backend)  # hist[0] is x


@pytest.mark.parametrize("slots", [(5, 7), (-5, -1), (2**32 + 1, -1), (-1, 2**32), (2**40 + 2, 2**63 - 1)])
def test_kernels_write_nothing_for_slots_outside_the_history(slots):
    """What the GPU path relies on, checked here on the backends' own entry points (below the op's check):
    the reference and the Triton kernel (interpreted) write no slot for a value outside [0, K)."""
    from diffusion_fast.kernels.reference import sampler_step as ref
    from diffusion_fast.kernels.triton import sampler_step as tri

    for mod in (ref, tri):
        for dtype in (torch.int32, torch.int64):
            if dtype == torch.int32 and any(abs(v) >= 2**31 for v in slots):
                continue
            c = case(slots=slots, dtype=dtype)
            before = c["hist"].clone()
            out = torch.full_like(c["x"], float("nan"))
            mod.forward(c["x"], c["model_output"], c["coef"], c["slots"], c["hist"], c["noise"], out, None)
            assert torch.equal(c["hist"], before), (mod.__name__, dtype)
            assert torch.isfinite(out).all()


def test_out_may_be_x_and_disjoint_views_of_one_buffer_are_fine():
    c = case()
    buf = torch.randn(3, 2, 5, 7)
    step(c, "torch", out=c["x"])  # in place
    step(c, "torch", out=buf[0], net_input=buf[1:].reshape(4, 5, 7))  # one allocation, disjoint parts


# ------------------------------------------------------------------------------------------- GPU ---
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("slots", [(5, 7), (-5, -1), (2**31 - 1, 3), (-(2**31), 1)])
def test_gpu_out_of_range_slots_write_nothing_on_every_backend(dtype, slots):
    results = {}
    for backend in ("torch", "triton", "cuda"):
        c = case("cuda", slots=slots, dtype=dtype)
        before = c["hist"].clone()
        out = step(c, backend)
        assert torch.isfinite(out).all()
        assert torch.equal(c["hist"], before), backend
        results[backend] = out
    scale = results["torch"].abs().max().item()
    torch.testing.assert_close(results["triton"], results["torch"], rtol=0, atol=1e-5 * scale)  # FMA contraction
    torch.testing.assert_close(results["cuda"], results["torch"], rtol=0, atol=0)  # same rounding order


@pytest.mark.gpu
def test_gpu_slot_beyond_32_bits_writes_nothing_on_every_backend():
    for backend in ("torch", "triton", "cuda"):
        for slots in ((2**32 + 1, -1), (-1, 2**32), (2**40 + 2, 2**63 - 1), (-(2**32) + 1, -1)):
            c = case("cuda", slots=slots)
            before = c["hist"].clone()
            step(c, backend)
            assert torch.equal(c["hist"], before), (backend, slots)
