"""Noise sources: the Brownian tree's defining properties, noise_sampler plumbing (eager, pre-drawn, no host
sync) and the float64 reference state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import diffusion_fast as df
from diffusion_fast.samplers.loop import get_plan, make_draw, run
from diffusion_fast.samplers.noise import BrownianTreeNoiseSampler, seed_from

MU, S2 = 0.3, 0.25


def den(x, sigma):
    s = sigma.reshape(-1, *[1] * (x.dim() - 1)).double()
    return (MU + S2 / (S2 + s * s) * (x.double() - MU)).to(x.dtype)


def tree(seed=3, shape=(4096,), lo=0.03, hi=14.6, **kw):
    return BrownianTreeNoiseSampler(torch.zeros(shape, dtype=torch.float64), lo, hi, seed=seed, **kw)


# ---------------------------------------------------------------------------------------- Brownian tree

def test_a_point_does_not_depend_on_which_other_points_were_asked():
    """The defining property: W at a point is a function of the seed and the point alone, so increments are
    bit-identical whatever was asked before (another step count, another order)."""
    a = tree()
    first = a(2.0, 1.3)
    b = tree()
    for s0, s1 in [(14.6, 11.0), (0.5, 0.03), (7.77, 2.0), (1.3, 0.9), (2.0, 1.9999)]:
        b(s0, s1)
    assert torch.equal(b(2.0, 1.3), first)
    assert torch.equal(tree()(1.3, 2.0), -first)  # the reversed interval is the negated increment


def test_increments_add_up_along_the_path():
    t = tree(depth=40)
    a, b, c = 9.0, 3.3, 0.2
    w_ab = t(a, b) * math.sqrt(a - b)
    w_bc = t(b, c) * math.sqrt(b - c)
    w_ac = t(a, c) * math.sqrt(a - c)
    torch.testing.assert_close(w_ab + w_bc, w_ac, rtol=0, atol=1e-9)


def test_increments_are_standard_normal_with_brownian_covariance():
    """Disjoint increments: independent N(0, 1). Nested ones, [a, b] inside [a, c]: correlation sqrt((a-b)/(a-c))."""
    n = 40_000
    t = tree(seed=11, shape=(n,))
    z1, z2, z3 = t(14.0, 6.0), t(6.0, 1.0), t(1.0, 0.05)
    for z in (z1, z2, z3):
        assert abs(z.mean().item()) < 5 / math.sqrt(n)
        assert abs(z.var().item() - 1) < 6 * math.sqrt(2 / n)
    for u, v in ((z1, z2), (z2, z3), (z1, z3)):
        assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1].item()) < 5 / math.sqrt(n)
    nested = t(14.0, 1.0)
    want = math.sqrt((14.0 - 6.0) / (14.0 - 1.0))
    assert abs(torch.corrcoef(torch.stack([z1, nested]))[0, 1].item() - want) < 5 / math.sqrt(n)


def test_per_item_seeds_make_each_item_independent_of_the_batch():
    batch = BrownianTreeNoiseSampler(torch.zeros(3, 5), 0.1, 10.0, seed=[4, 9, 2])
    z = batch(5.0, 2.0)
    for b, s in enumerate([4, 9, 2]):
        alone = BrownianTreeNoiseSampler(torch.zeros(1, 5), 0.1, 10.0, seed=[s])
        assert torch.equal(alone(5.0, 2.0)[0], z[b])
    assert z.dtype == torch.float32 and z.shape == (3, 5)


def test_same_seed_same_path_other_seed_other_path():
    assert torch.equal(tree(seed=5)(3.0, 1.0), tree(seed=5)(3.0, 1.0))
    assert not torch.equal(tree(seed=5)(3.0, 1.0), tree(seed=6)(3.0, 1.0))


def test_stochastic_sampler_is_stable_when_the_step_count_changes():
    """With the tree the injected noise is one path, so 25 and 50 steps land close together; fresh randn draws
    per step give a different sample for every step count."""
    x = torch.randn(2000, 1, generator=torch.Generator().manual_seed(0)) * 14.6
    runs = {}
    for n in (25, 50):
        sig = df.schedules.karras(n, 0.03, 14.6)
        ns = BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=1)
        runs[("tree", n)] = df.sample(den, x, sig, "dpmpp_2m_sde", noise_sampler=ns)
        runs[("randn", n)] = df.sample(den, x, sig, "dpmpp_2m_sde", generator=torch.Generator().manual_seed(1))
    d_tree = (runs[("tree", 25)] - runs[("tree", 50)]).abs().mean().item()
    d_randn = (runs[("randn", 25)] - runs[("randn", 50)]).abs().mean().item()
    assert d_tree < 0.15 * d_randn, (d_tree, d_randn)


@pytest.mark.parametrize("call,exc,words", [
    (lambda: tree()(20.0, 1.0), ValueError, ["sigma", "outside the tree's interval"]),
    (lambda: BrownianTreeNoiseSampler(torch.zeros(2, 3), 0.1, 1.0, seed=[1, 2, 3]), ValueError,
     ["seed holds 3", "batch size 2"]),
    (lambda: BrownianTreeNoiseSampler(torch.zeros(2, 3), 0.1, 1.0, seed=1.5), TypeError, ["seed must be an int"]),
    (lambda: BrownianTreeNoiseSampler(torch.zeros(2, 3), 0.1, 1.0, depth=80), ValueError, ["depth", "1..62"]),
    (lambda: BrownianTreeNoiseSampler(torch.zeros(2, 3), 1.0, 1.0), ValueError, ["different times"]),
    (lambda: BrownianTreeNoiseSampler(torch.zeros(2, 3, dtype=torch.int64), 0.1, 1.0), TypeError, ["x must be"]),
    (lambda: tree(depth=4)(2.0, 2.001), ValueError, ["same point", "depth"]),
])
def test_bad_tree_arguments_name_what_is_wrong(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_seed_from_follows_the_generator_without_reading_a_device_value():
    g = torch.Generator().manual_seed(3)
    a = seed_from(g)
    b = seed_from(g)  # the generator advanced: another seed
    assert a != b and seed_from(torch.Generator().manual_seed(3)) == a


# ------------------------------------------------------------------------------------ noise_sampler plumbing

class NoSync(TorchDispatchMode):
    FORBIDDEN = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.FORBIDDEN:
            raise AssertionError(f"host-device sync in the sampling loop: {func._schema.name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sampler,opts", [
    ("dpmpp_sde", {}), ("dpmpp_sde", {"noise_sampler": "brownian"}), ("dpmpp_2m_sde", {"noise_sampler": "brownian"}),
    ("euler", {"s_churn": 3.0}), ("heun", {"s_churn": 3.0, "noise_sampler": "brownian"}),
    ("dpm_fast", {"eta": 1.0}), ("lcm", {"s_noise_end": 0.5}),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_new_noise_paths_never_sync(sampler, opts, dtype):
    sig = df.schedules.karras(6, 0.05, 10.0)
    x = (torch.randn(2, 4) * 10).to(dtype)
    with NoSync():
        out = df.sample(lambda x, s, c: den(x, s), x, sig, sampler, generator=torch.Generator().manual_seed(0),
                        guidance_scale=2.0, cond=torch.ones(2, 1), uncond=torch.zeros(2, 1), callback=lambda d: None,
                        **opts)
    assert torch.isfinite(out).all() and out.dtype == dtype


@pytest.mark.parametrize("sampler,opts", [("dpmpp_sde", {}), ("heun", {"s_churn": 5.0}), ("dpm_2_ancestral", {}),
                                          ("lcm", {}), ("dpm_fast", {"eta": 0.5})])
@pytest.mark.parametrize("with_sampler", [False, True])
def test_predrawn_noise_reproduces_the_eager_loop(sampler, opts, with_sampler):
    """What the CUDA graph relies on, for every draw including churn's before the first evaluation: the draws
    made up front by make_draw, in plan order, give the eager loop's result bit for bit."""
    sig = df.schedules.karras(5, 0.05, 10.0).numpy()
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * 10
    tables = get_plan(sampler, sig, "denoised", "ve", None, opts, x.device)
    ns = (lambda: BrownianTreeNoiseSampler(x, 0.01, 20.0, seed=4)) if with_sampler else (lambda: None)
    eager = run(tables, den, x, generator=torch.Generator().manual_seed(3), noise_sampler=ns())
    draw = make_draw(tables.plan, torch.Generator().manual_seed(3), ns(), x)
    noise = torch.stack([draw(k) for k in range(len(tables.plan.draws))])
    assert torch.equal(run(tables, den, x, noise=noise), eager)


def test_noise_sampler_errors_name_it():
    sig = df.schedules.karras(4, 0.05, 10.0)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"noise_sampler\(.*\) must return a tensor of x's shape \(2, 3\)"):
        df.sample(den, x, sig, "euler_ancestral", noise_sampler=lambda s, t: torch.randn(3, 2))
    with pytest.raises(TypeError, match="must return a floating-point tensor"):
        df.sample(den, x, sig, "euler_ancestral", noise_sampler=lambda s, t: 1.0)
    with pytest.raises(ValueError, match="noise_sampler must be a callable"):
        df.sample(den, x, sig, "euler_ancestral", noise_sampler="pink")


def test_deterministic_sampler_never_calls_the_noise_sampler():
    calls = []
    df.sample(den, torch.randn(2, 3) * 10, df.schedules.karras(5, 0.05, 10.0), "dpmpp_2m",
              noise_sampler=lambda s, t: calls.append((s, t)))
    assert calls == []


# -------------------------------------------------------------------------------------------------- float64

@pytest.mark.parametrize("sampler", ["heun", "dpmpp_3m_sde", "unipc", "dpmpp_sde", "deis"])
def test_float64_state_is_the_float64_table(sampler):
    """A float64 x keeps a float64 state: the loop then follows the float64 table to float64 rounding (the float32
    loop only to float32 rounding)."""
    from test_samplers import _gauss64, run_table_float64

    from diffusion_fast.samplers.tables import build_plan

    sig = df.schedules.karras(12, 0.05, 10.0).numpy()
    opts = {"eta": 0.0} if sampler in ("dpmpp_3m_sde", "dpmpp_sde") else {}
    x = torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    ref = run_table_float64(build_plan(sampler, sig, **opts), x.numpy(), lambda v, s: _gauss64(v, s, "ve"))[-1]
    out64 = df.sample(den, x, sig, sampler, **opts)
    out32 = df.sample(den, x.float(), sig, sampler, **opts)
    assert out64.dtype == torch.float64 and out32.dtype == torch.float32
    err64, err32 = np.abs(out64.numpy() - ref).max(), np.abs(out32.double().numpy() - ref).max()
    assert err64 < 1e-12 and 1e-9 < err32 < 1e-5, (err64, err32)


def test_float64_network_input_and_sigma():
    seen = []

    def model(x_in, sigma):
        seen.append((x_in.dtype, sigma.dtype))
        return torch.zeros_like(x_in)

    df.sample(model, torch.randn(2, 3, dtype=torch.float64), [3.0, 1.0, 0.0], "euler", prediction="epsilon")
    assert set(seen) == {(torch.float64, torch.float64)}
    with pytest.raises(TypeError, match="net_dtype"):
        df.sample(model, torch.randn(2, 3), [3.0, 1.0, 0.0], "euler", net_dtype=torch.float64)


def test_sampler_step_float64_on_the_reference_and_fast_backends_decline():
    from diffusion_fast.ops import BackendUnavailable, sampler_step
    from diffusion_fast.ops.rows import coef_width

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, generator=g, dtype=torch.float64)
    mo = torch.randn(6, 7, generator=g, dtype=torch.float64)  # CFG batch
    hist = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    coef = torch.randn(coef_width(2), generator=g, dtype=torch.float64)
    z = torch.randn(3, 7, generator=g, dtype=torch.float64)
    out = torch.full_like(x, float("nan"))
    net = torch.full((6, 7), float("nan"), dtype=torch.float64)
    h0 = hist.clone()
    sampler_step(x, mo, coef, torch.tensor([1, 0]), hist, z, out=out, net_input=net)
    c = coef.tolist()
    raw = mo[:3] + c[0] * (mo[3:] - mo[:3])
    d = c[1] * x + c[2] * raw
    want = c[3] * x + c[4] * d + c[5] * z + c[9] * h0[0] + c[10] * h0[1]
    y = c[6] * x + c[7] * d + c[11] * h0[0] + c[12] * h0[1]
    torch.testing.assert_close(out, want, rtol=1e-15, atol=1e-14)
    torch.testing.assert_close(hist[1], d, rtol=0, atol=0)
    torch.testing.assert_close(hist[0], y, rtol=1e-15, atol=1e-14)
    torch.testing.assert_close(net, torch.cat([c[8] * want, c[8] * want]), rtol=1e-15, atol=1e-14)
    from diffusion_fast.ops import registry

    for backend in ("triton", "cuda"):  # each declines float64 in supports(), once it can run here at all
        usable = registry.status("sampler_step")[backend] is None
        with pytest.raises(BackendUnavailable, match="float64" if usable else "cannot serve this call"):
            sampler_step(x, mo, coef, torch.tensor([1, 0]), hist, z, out=out, net_input=net, backend=backend)
    with pytest.raises(TypeError, match="coef has dtype float32"):
        sampler_step(x, mo, coef.float(), torch.tensor([1, 0]), hist, z, out=out)


@pytest.mark.gpu
@pytest.mark.parametrize("sampler,opts,dtype", [
    ("dpmpp_sde", {}, torch.float32),  # Brownian default, two draws per step
    ("heun", {"s_churn": 4.0}, torch.float32),  # churn: a draw before the first evaluation
    ("euler_ancestral", {"noise_sampler": "brownian"}, torch.float32),
    ("dpmpp_2m_sde", {}, torch.float64),
])
def test_cuda_graph_replays_every_noise_path_bit_for_bit(sampler, opts, dtype):
    sig = df.schedules.karras(6, 0.05, 10.0)
    x = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 10).to("cuda", dtype)
    runs = []
    for graphed in (False, True, True):  # capture, then replay from the cache
        g = torch.Generator("cuda").manual_seed(5)
        runs.append(df.sample(den, x, sig, sampler, generator=g, cuda_graph=graphed, **opts))
    assert runs[0].dtype == dtype
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
