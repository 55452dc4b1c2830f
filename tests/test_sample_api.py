"""diffusion_fast.sample: model contracts (denoised and raw kinds), guidance, callbacks, no host syncs."""

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import diffusion_fast as df
from diffusion_fast.schedules import karras

MU, S2 = 0.3, 0.25


def gauss_D(x, sigma):
    s = sigma.view(-1, *[1] * (x.dim() - 1)).double()
    return (MU + S2 / (S2 + s * s) * (x.double() - MU)).float()


def flow_D(x, sigma):
    t = sigma.view(-1, *[1] * (x.dim() - 1)).double()
    a = 1 - t
    return (MU + a * S2 / (a * a * S2 + t * t) * (x.double() - a * MU)).float()


def raw_model(kind, dtype=torch.float32):
    """A network that returns ``kind`` and expects c_in-scaled input, built on the exact denoiser."""

    def model(x_in, sigma):
        assert x_in.dtype == dtype
        s = sigma.view(-1, *[1] * (x_in.dim() - 1)).double()
        if kind == "flow":
            x = x_in.double()
            return ((x - flow_D(x.float(), sigma).double()) / s).to(dtype)
        x = x_in.double() * torch.sqrt(s * s + 1)  # undo c_in
        d = gauss_D(x.float(), sigma).double()
        eps = (x - d) / s
        out = {"epsilon": eps, "sample": d, "v_prediction": (eps - s * d) / torch.sqrt(s * s + 1)}[kind]
        return out.to(dtype)

    return model


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun", "euler_ancestral", "unipc"])
def test_raw_predictions_are_converted_in_the_fused_step(kind, sampler):
    sig = karras(8, 0.05, 10.0)
    x = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0)) * 10
    ref = df.sample(gauss_D, x, sig, sampler, generator=torch.Generator().manual_seed(1))
    out = df.sample(raw_model(kind), x, sig, sampler, prediction=kind, generator=torch.Generator().manual_seed(1))
    # float32 rounding of the conversion, carried along the trajectory: relative to the sample's scale
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_flow_velocity_prediction():
    sig = df.schedules.flow_matching(10, shift=3.0)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    ref = df.sample(flow_D, x, sig, "euler", parametrization="flow")
    out = df.sample(raw_model("flow"), x, sig, "euler", prediction="flow")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_network_input_in_bf16_keeps_state_float32():
    sig = karras(6, 0.05, 10.0)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0)) * 10
    out = df.sample(raw_model("epsilon", torch.bfloat16), x, sig, "dpmpp_2m", prediction="epsilon",
                    net_dtype=torch.bfloat16)
    ref = df.sample(gauss_D, x, sig, "dpmpp_2m")
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1  # bf16 network, float32 state: close, not equal
    assert not torch.equal(out, ref)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun", "dpmpp_2m_sde"])
def test_classifier_free_guidance_batches_both_halves_in_one_call(sampler):
    B, g = 3, 4.5
    cond = torch.randn(B, 1)
    uncond = torch.zeros(B, 1)
    calls = []

    def model(x, sigma, c):
        calls.append((x.shape[0], c.clone()))
        return gauss_D(x, sigma) + 0.1 * c.view(-1, *[1] * (x.dim() - 1))

    sig = karras(6, 0.05, 10.0)
    x = torch.randn(B, 5, generator=torch.Generator().manual_seed(0)) * 10
    out = df.sample(model, x, sig, sampler, guidance_scale=g, cond=cond, uncond=uncond,
                    generator=torch.Generator().manual_seed(2))
    assert all(n == 2 * B for n, _ in calls)
    assert torch.equal(calls[0][1], torch.cat([uncond, cond]))

    def combined(x, sigma):  # what guidance means, computed by hand
        return gauss_D(x, sigma) + g * 0.1 * cond.view(-1, 1)

    ref = df.sample(combined, x, sig, sampler, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_callback_sees_every_step_with_denoised():
    seen = []
    sig = karras(5, 0.05, 10.0)
    x = torch.randn(2, 3) * 10
    out = df.sample(gauss_D, x, sig, "heun", callback=seen.append)
    assert [c["i"] for c in seen] == list(range(5))
    assert seen[-1]["sigma_next"] == 0.0 and torch.equal(seen[-1]["x"], out)
    for c in seen:
        torch.testing.assert_close(c["denoised"].shape, x.shape)
    # euler writes no history of its own; the callback still gets the denoised estimate
    seen.clear()
    df.sample(gauss_D, x, sig, "euler", callback=seen.append)
    torch.testing.assert_close(seen[0]["denoised"], gauss_D(x, torch.full((2,), float(sig[0]))))


def _cfg_model(x, sigma, c):
    return gauss_D(x, sigma)


class NoSync(TorchDispatchMode):
    """Fails on any op that needs a device value on the host (what .item() or a data-dependent branch
    does); works on CPU tensors as well as CUDA ones."""

    FORBIDDEN = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero",
                 "aten::_assert_async")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.FORBIDDEN:
            raise AssertionError(f"host-device sync in the sampling loop: {func._schema.name}")
        return func(*args, **(kwargs or {}))


def test_no_sync_mode_catches_item():
    with pytest.raises(AssertionError, match="host-device sync"):
        with NoSync():
            torch.ones(1).item()


@pytest.mark.parametrize("sampler", [s for s in df.SAMPLERS if s != "dpm_adaptive"])  # the one that reads its error
def test_sampling_loop_never_syncs(sampler):
    sig = karras(6, 0.05, 10.0)
    x = torch.randn(2, 4) * 10
    with NoSync():
        out = df.sample(_cfg_model, x, sig, sampler, generator=torch.Generator().manual_seed(0), guidance_scale=2.0,
                        cond=torch.ones(2, 1), uncond=torch.zeros(2, 1), callback=lambda d: None)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(sampler="dpm_faster"), ValueError, ["sampler", "dpm_faster", "euler"]),
        (dict(sigmas=[1.0]), ValueError, ["sigmas", "2 values"]),
        (dict(sigmas=[1.0, 2.0, 0.0]), ValueError, ["sigmas", "decreasing"]),
        (dict(sigmas=[1.0, float("nan"), 0.0]), ValueError, ["sigmas", "finite"]),
        (dict(prediction="noise"), ValueError, ["prediction", "noise"]),
        (dict(prediction="epsilon", parametrization="flow"), ValueError, ["epsilon", "flow"]),
        (dict(guidance_scale=3.0), ValueError, ["guidance_scale", "cond"]),
        (dict(guidance_scale=float("inf"), cond=torch.ones(2, 1), uncond=torch.ones(2, 1)), ValueError,
         ["guidance_scale"]),
        (dict(cond=torch.ones(3, 1)), ValueError, ["cond", "batch size 2"]),
        (dict(eta=0.5), ValueError, ["eta", "dpmpp_2m"]),
        (dict(sampler="ddim", eta=-1.0), ValueError, ["eta", ">= 0"]),
        (dict(sampler="unipc", order=5), ValueError, ["order", "5"]),
        (dict(net_dtype=torch.float64), TypeError, ["net_dtype"]),
        (dict(x=torch.ones(2, 3, dtype=torch.int64)), TypeError, ["x"]),
        (dict(model=3), TypeError, ["model"]),
        (dict(cuda_graph=True), ValueError, ["cuda_graph", "cpu"]),
        (dict(parametrization="flow", sigmas=[3.0, 1.0, 0.0]), ValueError, ["flow", "[0, 1]"]),
    ],
)
def test_bad_arguments_name_what_is_wrong(kwargs, exc, words):
    args = dict(model=gauss_D, x=torch.randn(2, 3), sigmas=[3.0, 1.0, 0.0], sampler="dpmpp_2m")
    if "cond" in kwargs or "guidance_scale" in kwargs:
        args["model"] = _cfg_model
    args.update(kwargs)
    with pytest.raises(exc) as ei:
        df.sample(args.pop("model"), args.pop("x"), args.pop("sigmas"), args.pop("sampler"), **args)
    for w in words:
        assert w in str(ei.value), (w, str(ei.value))


def test_samplers_listed_and_described():
    from diffusion_fast.samplers import DESCRIPTIONS

    assert len(df.SAMPLERS) == 24
    assert set(DESCRIPTIONS) == set(df.SAMPLERS)
    assert all(DESCRIPTIONS[s] for s in df.SAMPLERS)


def test_sample_on_sigmas_without_final_zero_stops_there():
    sig = torch.logspace(1, math.log10(0.5), 30).tolist()
    x = torch.randn(4, 2) * 10
    out = df.sample(gauss_D, x, sig, "heun")
    exact = MU + (x.double() - MU) * math.sqrt(S2 + 0.25) / math.sqrt(S2 + 100)
    assert (out.double() - exact).abs().max() < 5e-3  # heun, 29 steps: ~1e-3


# ------------------------------------------------------------------ accepted that should not be ---
@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(model=lambda x, s: torch.cat([x, x])), ValueError, ["model", "[4, 3]", "[2, 3]"]),
        (dict(model=lambda x, s: x[:, :2]), ValueError, ["model", "[2, 2]", "[2, 3]"]),
        (dict(model=lambda x, s: x.to(torch.int32)), TypeError, ["model", "int32"]),
        (dict(sigmas=["3", "1", "0"]), TypeError, ["sigmas", "str"]),
        (dict(sigmas=np.array(["3", "1", "0"])), TypeError, ["sigmas"]),
        (dict(sigmas=[3.0, True, 0.0]), TypeError, ["sigmas", "bool"]),
        (dict(generator=5), TypeError, ["generator", "torch.Generator", "int"]),
        (dict(guidance_scale=-5.0, cond=torch.ones(2, 1), uncond=torch.ones(2, 1)), ValueError,
         ["guidance_scale", ">= 0", "-5"]),
        (dict(guidance_scale=1e300, cond=torch.ones(2, 1), uncond=torch.ones(2, 1)), ValueError,
         ["guidance_scale", "float32"]),
        (dict(check_finite="yes"), TypeError, ["check_finite"]),
        (dict(sampler=["euler"]), ValueError, ["sampler", "['euler']"]),
        (dict(sampler="ddim", eta=[1.0]), ValueError, ["eta", "[1.0]"]),
        (dict(sampler="ddim", eta="0.5"), ValueError, ["eta", "'0.5'"]),
    ],
)
def test_inputs_that_used_to_be_accepted(kwargs, exc, words):
    test_bad_arguments_name_what_is_wrong(kwargs, exc, words)


# ------------------------------------------------------------------------- never a silent NaN ---
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_finite_refuses_non_finite_x(bad):
    x = torch.randn(2, 3) * 3
    x[1, 2] = bad
    sig = karras(4, 0.05, 3.0)
    with pytest.raises(ValueError, match="x holds 1 non-finite value"):
        df.sample(gauss_D, x, sig, "euler", check_finite=True)
    assert not torch.isfinite(df.sample(gauss_D, x, sig, "euler")).all()  # unchecked: the caller's choice


def test_check_finite_reports_a_model_that_returns_nan():
    sig = karras(4, 0.05, 3.0)
    x = torch.randn(2, 3) * 3

    def broken(x, s):
        return torch.where(s.view(-1, 1) < 1.0, x * float("nan"), gauss_D(x, s))

    with pytest.raises(FloatingPointError, match="6 of 6 values.*not finite after the last step"):
        df.sample(broken, x, sig, "heun", check_finite=True)


def test_check_finite_is_one_check_after_the_loop():
    """The check reads one device value after the last step; the loop itself stays free of syncs."""
    reads = []

    class Count(NoSync):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in self.FORBIDDEN:
                reads.append((func._schema.name, len(steps)))
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    steps = []
    sig = karras(5, 0.05, 10.0)
    x = torch.randn(2, 4) * 10
    with Count():
        df.sample(gauss_D, x, sig, "dpmpp_2m", check_finite=True, callback=steps.append)
    # one read before the loop (x), one after it (the result); none while steps were being taken
    assert [n for _, n in reads] == [0, 5], reads


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_3m_sde"])
def test_the_loop_does_not_depend_on_the_thread_count(sampler):
    """README: the loop's own arithmetic is elementwise, so with an elementwise model the sample is bit-identical
    whatever torch.get_num_threads() is (a state large enough for torch to split elementwise work by thread)."""
    sig = karras(6, 0.05, 10.0)
    x = torch.randn(4, 4, 64, 64, generator=torch.Generator().manual_seed(0)) * 10
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(df.sample(gauss_D, x, sig, sampler, generator=torch.Generator().manual_seed(1)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
