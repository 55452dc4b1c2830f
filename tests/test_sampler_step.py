"""The fused sampler step (reference backend) against the formula written out in float64."""

import pytest
import torch

from diffusion_fast import ops
from diffusion_fast.ops.rows import AD, AH, AX, AZ, BD, BH, BX, CIN, G, P, Q, coef_width

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def formula64(x, mo, coef, slots, hist, noise):
    """The op's documented formula, element by element semantics, float64."""
    c = coef.double()
    B = x.shape[0]
    mo = mo.double()
    raw = mo[:B] + c[G] * (mo[B:] - mo[:B]) if mo.shape[0] == 2 * B else mo
    d = c[P] * x.double() + c[Q] * raw
    K = 0 if hist is None else hist.shape[0]
    x_new = c[AX] * x.double() + c[AD] * d + (c[AZ] * noise.double() if noise is not None else 0)
    y = c[BX] * x.double() + c[BD] * d
    for k in range(K):
        x_new = x_new + c[AH + k] * hist[k].double()
        y = y + c[BH(K) + k] * hist[k].double()
    new_hist = None if hist is None else hist.double().clone()
    if K:
        if slots[0] >= 0:
            new_hist[slots[0]] = d
        if slots[1] >= 0:
            new_hist[slots[1]] = y
    return x_new, new_hist


def make_case(K, cfg, with_noise, dtype, shape=(2, 3, 5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    x = torch.randn(shape, generator=g) * 4
    mo = torch.randn((2 * B if cfg else B, *shape[1:]), generator=g).to(dtype)
    coef = torch.randn(coef_width(K), generator=g)
    hist = torch.randn((K, *shape), generator=g) if K else None
    noise = torch.randn(shape, generator=g) if with_noise else None
    slots = None
    if K:
        perm = torch.randperm(K, generator=g).tolist() + [-1, -1]
        slots = torch.tensor([perm[0], perm[1] if K > 1 else -1], dtype=torch.int64)
    return x, mo, coef, slots, hist, noise


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [0, 1, 2, 3, 8])
@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("with_noise", [False, True])
def test_reference_matches_formula(dtype, K, cfg, with_noise):
    x, mo, coef, slots, hist, noise = make_case(K, cfg, with_noise, dtype, seed=K * 4 + cfg * 2 + with_noise)
    ref_x, ref_h = formula64(x, mo, coef, None if slots is None else slots.tolist(), hist, noise)
    net = torch.full((mo.shape[0], *x.shape[1:]), float("nan"), dtype=dtype)
    out = torch.full_like(x, float("nan"))
    h = None if hist is None else hist.clone()
    ops.sampler_step(x, mo, coef, slots, h, noise, out=out, net_input=net, backend="torch")
    scale = ref_x.abs().max().item()
    torch.testing.assert_close(out.double(), ref_x, rtol=0, atol=1e-5 * scale)
    if K:
        torch.testing.assert_close(h.double(), ref_h, rtol=0, atol=1e-5 * max(1.0, ref_h.abs().max().item()))
    B = x.shape[0]
    expect = (coef[CIN].double() * ref_x).to(dtype)
    assert not torch.isnan(net).any()
    torch.testing.assert_close(net[:B], expect, rtol=0, atol=2 * (expect.double() - coef[CIN] * ref_x).abs().max()
                               .item() + 1e-5 * scale)
    if cfg:
        assert torch.equal(net[B:], net[:B])


def test_in_place_state_and_slot_read_before_write():
    """out may alias x, and a slot that the row reads may be overwritten by the same call."""
    x, mo, coef, slots, hist, _ = make_case(2, False, False, torch.float32)
    slots = torch.tensor([0, 1])
    ref_x, ref_h = formula64(x, mo, coef, [0, 1], hist, None)
    ops.sampler_step(x, mo, coef, slots, hist, None, out=x, backend="torch")
    scale = max(ref_x.abs().max().item(), ref_h.abs().max().item())  # float32 rounding of the largest term
    torch.testing.assert_close(x.double(), ref_x, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(hist.double(), ref_h, rtol=0, atol=1e-5 * scale)


def test_no_write_slots_leave_history_untouched():
    x, mo, coef, _, hist, _ = make_case(3, True, False, torch.float32)
    before = hist.clone()
    ops.sampler_step(x, mo, coef, torch.tensor([-1, -1]), hist, None, backend="torch")
    assert torch.equal(hist, before)


@pytest.mark.parametrize(
    "change,exc,words",
    [
        (dict(x=torch.randn(2, 3).half()), TypeError, ["x", "float16"]),
        (dict(model_output=torch.randn(3, 3)), ValueError, ["model_output", "2B"]),
        (dict(coef=torch.randn(10)), ValueError, ["coef", "9 + 2K"]),
        (dict(coef=torch.randn(13).double()), TypeError, ["coef", "float64"]),
        (dict(slots=None), ValueError, ["slots", "K=2"]),
        (dict(slots=torch.tensor([0.0, 1.0])), TypeError, ["slots"]),
        (dict(hist=torch.randn(2, 2, 4)), ValueError, ["hist"]),
        (dict(hist=torch.randn(9, 2, 3), coef=torch.randn(27)), ValueError, ["hist", "8"]),
        (dict(noise=torch.randn(2, 4)), ValueError, ["noise"]),
        (dict(out=torch.randn(2, 4)), ValueError, ["out"]),
        (dict(net_input=torch.randn(3, 3)), ValueError, ["net_input"]),
        (dict(noise=torch.randn(2, 3, device="meta")), ValueError, ["noise", "device"]),
    ],
)
def test_bad_input_names_the_argument(change, exc, words):
    args = dict(x=torch.randn(2, 3), model_output=torch.randn(4, 3), coef=torch.randn(13),
                slots=torch.tensor([0, 1]), hist=torch.randn(2, 2, 3), noise=None, out=None, net_input=None)
    args.update(change)
    with pytest.raises(exc) as ei:
        ops.sampler_step(args.pop("x"), args.pop("model_output"), args.pop("coef"), args.pop("slots"),
                         args.pop("hist"), args.pop("noise"), **args)
    for w in words:
        assert w in str(ei.value), (w, str(ei.value))
