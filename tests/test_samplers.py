"""Samplers: against literal transcriptions of k-diffusion's loops, against diffusers' schedulers, and on
Gaussian data, whose denoiser and probability-flow ODE solution are known in closed form."""

import math
import warnings

import numpy as np
import pytest
import torch

import diffusion_fast as df
from diffusion_fast.samplers import tables
from diffusion_fast.samplers.tables import ORDERS, build_plan

MU, S2 = 0.3, 0.25  # data ~ N(MU, S2) per element


def gauss_denoiser(parametrization="ve"):
    """Exact E[x0 | x_sigma] for Gaussian data, in float64, returned as float32."""

    def D(x, sigma):
        t = sigma.view(-1, *[1] * (x.dim() - 1)).double()
        xd = x.double()
        if parametrization == "ve":
            out = MU + S2 / (S2 + t * t) * (xd - MU)
        else:
            a = 1 - t
            out = MU + a * S2 / (a * a * S2 + t * t) * (xd - a * MU)
        return out.float()

    return D


def exact_ode(x, s0, s1, parametrization="ve"):
    """The probability-flow ODE keeps (x - alpha*MU) / std(x_sigma) constant."""
    a0, a1 = (1.0, 1.0) if parametrization == "ve" else (1 - s0, 1 - s1)
    return a1 * MU + (x.double() - a0 * MU) * math.sqrt(a1 * a1 * S2 + s1 * s1) / math.sqrt(a0 * a0 * S2 + s0 * s0)


def grid(parametrization, n):
    if parametrization == "ve":
        return np.geomspace(10.0, 0.05, n + 1)
    return np.linspace(1.0, 0.05, n + 1)


# ------------------------------------------------------------------ literal k-diffusion transcriptions

def _d(x, den, s):
    return (x - den) / s


def kd_euler(model, x, sigmas, gen):
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i])
        x = x + _d(x, den, sigmas[i]) * (sigmas[i + 1] - sigmas[i])
    return x


def kd_euler_ancestral(model, x, sigmas, gen, eta=1.0):
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i])
        s, sn = sigmas[i], sigmas[i + 1]
        su = min(sn, eta * (sn**2 * (s**2 - sn**2) / s**2) ** 0.5)
        sd = (sn**2 - su**2) ** 0.5
        x = x + _d(x, den, s) * (sd - s)
        if sn > 0:
            x = x + torch.randn(x.shape, generator=gen) * su
    return x


def kd_heun(model, x, sigmas, gen):
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        d = _d(x, model(x, s), s)
        dt = sn - s
        if sn == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = _d(x2, model(x2, sn), sn)
            x = x + (d + d2) / 2 * dt
    return x


def kd_dpm_2(model, x, sigmas, gen):
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        d = _d(x, model(x, s), s)
        if sn == 0:
            x = x + d * (sn - s)
        else:
            sm = math.exp((math.log(s) + math.log(sn)) / 2)
            x2 = x + d * (sm - s)
            d2 = _d(x2, model(x2, sm), sm)
            x = x + d2 * (sn - s)
    return x


def kd_lms(model, x, sigmas, gen, order=4):
    from scipy import integrate

    ds = []
    for i in range(len(sigmas) - 1):
        ds.append(_d(x, model(x, sigmas[i]), sigmas[i]))
        ds = ds[-order:]
        cur = min(i + 1, order)

        def coeff(j, i=i, cur=cur):
            def fn(tau):
                p = 1.0
                for k in range(cur):
                    if k != j:
                        p *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
                return p

            return integrate.quad(fn, sigmas[i], sigmas[i + 1], epsrel=1e-10)[0]

        x = x + sum(coeff(j) * d for j, d in enumerate(reversed(ds)))
    return x


def kd_dpmpp_2m(model, x, sigmas, gen):
    old = None
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i])
        t, tn = -math.log(sigmas[i]), (math.inf if sigmas[i + 1] == 0 else -math.log(sigmas[i + 1]))
        h = tn - t
        if old is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * den
        else:
            r = (t + math.log(sigmas[i - 1])) / h
            dd = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * dd
        old = den
    return x


def kd_dpmpp_2m_sde(model, x, sigmas, gen, eta=1.0):
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = den
        else:
            h = math.log(sigmas[i]) - math.log(sigmas[i + 1])
            eh = eta * h
            x = sigmas[i + 1] / sigmas[i] * math.exp(-eh) * x + (-math.expm1(-h - eh)) * den
            if old is not None:
                r = h_last / h
                x = x + 0.5 * (-math.expm1(-h - eh)) * (1 / r) * (den - old)
            if eta:
                x = x + torch.randn(x.shape, generator=gen) * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * eh))
            h_last = h
        old = den
    return x


def kd_dpmpp_3m_sde(model, x, sigmas, gen, eta=1.0):
    d1_, d2_, h_1, h_2 = None, None, None, None
    h = None
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = den
        else:
            h = math.log(sigmas[i]) - math.log(sigmas[i + 1])
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x + (-math.expm1(-h_eta)) * den
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (den - d1_) / r0
                d1_1 = (d1_ - d2_) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (den - d1_) / r
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                x = x + phi_2 * d
            if eta:
                x = x + torch.randn(x.shape, generator=gen) * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * h * eta))
        d1_, d2_ = den, d1_
        h_1, h_2 = h, h_1
    return x


KD = {
    "euler": (kd_euler, {}),
    "euler_ancestral": (kd_euler_ancestral, {}),
    "heun": (kd_heun, {}),
    "dpm_2": (kd_dpm_2, {}),
    "lms": (kd_lms, {}),
    "dpmpp_2m": (kd_dpmpp_2m, {}),
    "dpmpp_2m_sde": (kd_dpmpp_2m_sde, {}),
    "dpmpp_3m_sde": (kd_dpmpp_3m_sde, {}),
}


@pytest.mark.parametrize("name", sorted(KD))
@pytest.mark.parametrize("n", [1, 2, 5, 12])
def test_matches_k_diffusion_loop(name, n):
    """Same schedule, same noise draws (one randn per noisy step from the same generator): same answer."""
    fn, _ = KD[name]
    sig = df.schedules.karras(n, 0.03, 12.0).tolist()
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(n)) * sig[0]
    den = gauss_denoiser()

    def model64(x, s):
        return den(x.float(), torch.tensor([s] * x.shape[0])).double()

    ref = fn(model64, x.double(), sig, torch.Generator().manual_seed(7))
    ours = df.sample(den, x, torch.tensor(sig), name, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


def test_ddim_is_the_eta_family_of_euler():
    sig = df.schedules.karras(9, 0.03, 12.0)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)) * sig[0].item()
    den = gauss_denoiser()
    a = df.sample(den, x, sig, "ddim")
    b = df.sample(den, x, sig, "euler")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    a = df.sample(den, x, sig, "ddim", eta=1.0, generator=torch.Generator().manual_seed(3))
    b = df.sample(den, x, sig, "euler_ancestral", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- diffusers schedulers

def _diffusers_run(cls, kw, n, x_ve0, den):
    sched = cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **kw)
    sched.set_timesteps(n)
    sig = sched.sigmas.double().numpy()
    vp = hasattr(sched, "lambda_t") or cls.__name__.startswith(("UniPC", "DPMSolverMultistep"))
    x = x_ve0.clone() / math.sqrt(1 + sig[0] ** 2) if vp else x_ve0.clone()
    for t in sched.timesteps:
        idx = sched.step_index if sched.step_index is not None else sched.index_for_timestep(t)
        s = float(sig[idx])
        a = 1 / math.sqrt(1 + s * s) if vp else 1.0
        d = den(x / a, torch.full((x.shape[0],), s))
        eps = (x - a * d) / (s * a)
        x = sched.step(eps, t, x).prev_sample
    if vp:  # back to the k-diffusion (VE) state
        x = x * math.sqrt(1 + sig[-1] ** 2)
    return x, sig


@pytest.mark.parametrize(
    "name,cls_name,kw,opts",
    [
        ("unipc", "UniPCMultistepScheduler", {}, {}),
        ("unipc", "UniPCMultistepScheduler", {"solver_order": 3}, {"order": 3}),
        ("unipc", "UniPCMultistepScheduler", {"solver_order": 1}, {"order": 1}),
        ("unipc", "UniPCMultistepScheduler", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
         {"variant": "bh1"}),
        ("dpmpp_2m", "DPMSolverMultistepScheduler", {"final_sigmas_type": "zero", "euler_at_final": False,
                                                     "lower_order_final": False}, {}),
        ("euler", "EulerDiscreteScheduler", {}, {}),
        ("heun", "HeunDiscreteScheduler", {}, {}),
        ("lms", "LMSDiscreteScheduler", {}, {}),
    ],
)
@pytest.mark.parametrize("n", [3, 8, 25])
def test_matches_diffusers_scheduler(name, cls_name, kw, opts, n):
    diffusers = pytest.importorskip("diffusers")
    cls = getattr(diffusers, cls_name)
    den = gauss_denoiser()
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **kw)
        probe.set_timesteps(n)
        x_start = x0 * float(probe.sigmas[0])
        ref, sig = _diffusers_run(cls, kw, n, x_start, den)
    if name == "heun":  # diffusers interleaves the second-stage sigmas
        sig = np.concatenate([sig[:1], sig[1::2]])
    ours = df.sample(den, x_start, torch.tensor(sig), name, **opts)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=2e-6)


# ------------------------------------------------------------------------------ convergence on Gaussians

def run_table_float64(plan, x, denoise):
    """Execute a coefficient table in float64 with numpy (independent of the fp32 op), returning the state
    after every step: the table's mathematics without float32 rounding."""
    from diffusion_fast.ops.rows import AD, AH, AX, BD, BH, BX

    K, hist, x, out = plan.K, np.zeros((plan.K, *x.shape)), x.copy(), []
    for e in range(plan.evaluations):
        c, d = plan.coef[e], denoise(x, plan.sigma_eval[e])
        x_new = c[AX] * x + c[AD] * d + sum(c[AH + k] * hist[k] for k in range(K))
        y = c[BX] * x + c[BD] * d + sum(c[BH(K) + k] * hist[k] for k in range(K))
        slot_d, slot_y = plan.slots[e]
        if slot_d >= 0:
            hist[slot_d] = d
        if slot_y >= 0:
            hist[slot_y] = y
        x = x_new
        if plan.ends_step[e]:
            out.append(x)
    return out


def _max_trajectory_error(name, n, parametrization, **opts):
    """max over steps i of |x_i - exact ODE solution at sigma_i| (robust to end-point error cancellation), on the
    grid the plan walks (dpm_fast's own log-uniform grid; the same geometric one here)."""
    sig = grid(parametrization, n)
    plan = build_plan(name, sig, parametrization=parametrization, **opts)
    x0 = np.random.default_rng(0).standard_normal(16) * sig[0]
    g = plan.sigmas
    traj = run_table_float64(plan, x0, lambda x, s: _gauss64(x, s, parametrization))
    return max(np.abs(x - exact_ode(torch.from_numpy(x0), g[0], g[i + 1], parametrization).numpy()).max()
               for i, x in enumerate(traj))


def _gauss64(x, s, parametrization):
    if parametrization == "ve":
        return MU + S2 / (S2 + s * s) * (x - MU)
    a = 1 - s
    return MU + a * S2 / (a * a * S2 + s * s) * (x - a * MU)


DETERMINISTIC = [
    ("euler", {}), ("ddim", {}), ("heun", {}), ("dpm_2", {}), ("lms", {}), ("dpmpp_2m", {}),
    ("dpmpp_2m_sde", {"eta": 0.0}), ("dpmpp_3m_sde", {"eta": 0.0}), ("unipc", {}), ("unipc", {"order": 3}),
    ("dpm_2_ancestral", {"eta": 0.0}), ("dpmpp_2s_ancestral", {"eta": 0.0}), ("dpmpp_sde", {"eta": 0.0}),
    ("dpmpp_sde", {"eta": 0.0, "r": 0.3}), ("ipndm", {}), ("ipndm", {"order": 2}), ("ipndm_v", {}), ("deis", {}),
    ("deis", {"order": 2}), ("deis", {"order": 4}), ("deis", {"mode": "logrho", "order": 3}), ("res_multistep", {}),
    ("res_multistep_ancestral", {"eta": 0.0}), ("uni_pc", {}), ("uni_pc_bh2", {}), ("dpm_fast", {}),
]


@pytest.mark.parametrize("parametrization", ["ve", "flow"])
@pytest.mark.parametrize("name,opts", DETERMINISTIC)
def test_ode_convergence_order(name, opts, parametrization):
    """The global error against the exact probability-flow solution falls like n^-order (ORDERS)."""
    if parametrization == "flow" and name == "dpm_fast":
        pytest.raises(ValueError, build_plan, name, grid("flow", 8), parametrization="flow")  # VE only, says so
        return
    ns = np.array([32, 64, 128, 256])
    errs = np.array([_max_trajectory_error(name, int(n), parametrization, **opts) for n in ns])
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert errs[0] < 0.05, errs
    assert slope > ORDERS[name] - 0.3, f"{name}: measured order {slope:.2f}, errors {errs}"


def test_ode_error_fp32_op_path_is_at_rounding_level():
    """The float32 loop (the fused op) follows the float64 table to float32 rounding."""
    sig = grid("ve", 20)
    x = torch.randn(16, generator=torch.Generator().manual_seed(0)) * sig[0]
    for name in ("heun", "lms", "unipc", "dpmpp_3m_sde", "deis", "ipndm_v", "dpm_fast", "dpmpp_sde", "uni_pc"):
        opts = {"eta": 0.0} if name in ("dpmpp_3m_sde", "dpmpp_sde") else {}
        ours = df.sample(gauss_denoiser(), x, sig, name, **opts).double()
        plan = build_plan(name, sig, **opts)
        ref = run_table_float64(plan, x.double().numpy(), lambda v, s: _gauss64(v, s, "ve"))[-1]
        assert np.abs(ours.numpy() - ref).max() < 1e-5 * sig[0], name


@pytest.mark.parametrize("parametrization", ["ve", "flow"])
@pytest.mark.parametrize("name,opts,steps,tol", [
    ("euler_ancestral", {}, 240, 0.04), ("ddim", {"eta": 1.0}, 240, 0.04), ("dpmpp_2m_sde", {}, 60, 0.03),
    ("dpmpp_3m_sde", {}, 60, 0.03), ("dpmpp_2m_sde", {"solver_type": "heun"}, 60, 0.03),
    ("dpm_2_ancestral", {}, 60, 0.03), ("dpmpp_2s_ancestral", {}, 60, 0.03), ("dpmpp_sde", {}, 40, 0.03),
    ("ddpm", {}, 240, 0.04),
    ("res_multistep_ancestral", {}, 60, 0.03), ("euler", {"s_churn": 10.0}, 240, 0.04),
    ("heun", {"s_churn": 20.0}, 60, 0.03), ("dpm_fast", {"eta": 1.0}, 90, 0.03)])
def test_stochastic_samples_match_data_distribution(name, opts, steps, tol, parametrization):
    if parametrization == "flow" and (name in ("ddpm", "dpm_fast") or "s_churn" in opts):
        pytest.raises(ValueError, df.sample, gauss_denoiser("flow"), torch.zeros(2, 1), torch.linspace(1.0, 0.0, 5),
                      name, parametrization="flow", **opts)  # VE-only samplers and churn say so
        return
    n_samples = 20000
    sig = df.schedules.karras(steps, 0.01, 20.0) if parametrization == "ve" else torch.linspace(1.0, 0.0, steps + 1)
    x = torch.randn(n_samples, 1, generator=torch.Generator().manual_seed(1)) * float(sig[0])
    out = df.sample(gauss_denoiser(parametrization), x, sig, name, parametrization=parametrization,
                    generator=torch.Generator().manual_seed(2), **opts).double()
    se = math.sqrt(S2 / n_samples)
    assert abs(out.mean().item() - MU) < 5 * se + 0.01, out.mean()
    assert abs(out.std().item() / math.sqrt(S2) - 1) < tol, out.std()


def test_dpmpp_sde_needs_one_brownian_path():
    """dpmpp_sde's two draws per step are increments over overlapping intervals, (sigma, sigma_mid) and
    (sigma, sigma_next): from one Brownian path (its default) it keeps the data's spread, from independent draws
    it loses about a tenth of it — why the tree is its default, as in k-diffusion."""
    sig = df.schedules.karras(40, 0.01, 20.0)
    x = torch.randn(20000, 1, generator=torch.Generator().manual_seed(1)) * float(sig[0])
    g = torch.Generator().manual_seed(2)
    independent = df.sample(gauss_denoiser(), x, sig, "dpmpp_sde",
                            noise_sampler=lambda s, t: torch.randn(x.shape, generator=g)).double()
    assert 0.85 < independent.std().item() / math.sqrt(S2) < 0.95


@pytest.mark.parametrize("name", ["euler_ancestral", "ddpm"])
def test_first_order_ancestral_weak_error_falls_with_steps(name):
    errs = []
    for steps in (15, 60, 240):
        sig = df.schedules.karras(steps, 0.01, 20.0)
        x = torch.randn(20000, 1, generator=torch.Generator().manual_seed(1)) * float(sig[0])
        out = df.sample(gauss_denoiser(), x, sig, name, generator=torch.Generator().manual_seed(2))
        errs.append(abs(out.double().std().item() / math.sqrt(S2) - 1))
    assert errs[0] > errs[1] > errs[2], errs


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_is_exact_with_a_consistency_model(steps):
    """LCM needs a consistency model (the map to the ODE's end point), not a denoiser; for Gaussian data that map
    is closed-form, and multistep consistency sampling then reproduces the data for any step count."""

    def consistency(x, sigma):
        t = sigma.view(-1, *[1] * (x.dim() - 1)).double()
        return (MU + (x.double() - MU) * math.sqrt(S2) / torch.sqrt(S2 + t * t)).float()

    sig = df.schedules.karras(steps, 0.05, 20.0)
    x = torch.randn(40000, 1, generator=torch.Generator().manual_seed(1)) * math.sqrt(float(sig[0]) ** 2 + S2) + MU
    out = df.sample(consistency, x, sig, "lcm", generator=torch.Generator().manual_seed(2)).double()
    assert abs(out.mean().item() - MU) < 5 * math.sqrt(S2 / 40000)
    assert abs(out.std().item() / math.sqrt(S2) - 1) < 0.02


def test_deterministic_samplers_preserve_distribution_too():
    """The ODE maps N(0, s0^2 + S2) noise onto the data: check the std of a deterministic run."""
    sig = df.schedules.karras(40, 0.01, 20.0)
    x = torch.randn(20000, 1, generator=torch.Generator().manual_seed(1)) * math.sqrt(float(sig[0]) ** 2 + S2) + MU
    out = df.sample(gauss_denoiser(), x, sig, "dpmpp_2m").double()
    assert abs(out.std().item() / math.sqrt(S2) - 1) < 0.03


# ------------------------------------------------------------------------------ seeds and reproducibility

STOCHASTIC_OPTS = {"euler": {"s_churn": 5.0}, "heun": {"s_churn": 5.0}, "dpm_2": {"s_churn": 5.0},
                   "ddim": {"eta": 1.0}, "dpm_fast": {"eta": 1.0}, "res_multistep": {"eta": 1.0},
                   "dpm_adaptive": {"eta": 1.0}}


@pytest.mark.parametrize("name", df.SAMPLERS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_same_seed_bit_identical(name, stochastic):
    sig = df.schedules.karras(7, 0.05, 10.0)
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)) * 10
    den = gauss_denoiser()
    opts = STOCHASTIC_OPTS.get(name, {}) if stochastic else {}
    a = df.sample(den, x, sig, name, generator=torch.Generator().manual_seed(5), **opts)
    b = df.sample(den, x, sig, name, generator=torch.Generator().manual_seed(5), **opts)
    assert torch.equal(a, b)
    draws = name == "dpm_adaptive" and stochastic or name != "dpm_adaptive" and bool(build_plan(name, sig.numpy(),
                                                                                                **opts).draws)
    c = df.sample(den, x, sig, name, generator=torch.Generator().manual_seed(6), **opts)
    assert torch.equal(a, c) != draws  # a different seed changes exactly the samplers that draw noise
    assert draws == (stochastic and name in STOCHASTIC_OPTS or tables.STOCHASTIC.get(name) == "yes"), name


def test_input_is_not_modified():
    sig = df.schedules.karras(4, 0.05, 10.0)
    x = torch.randn(2, 3) * 10
    x0 = x.clone()
    df.sample(gauss_denoiser(), x, sig, "heun")
    assert torch.equal(x, x0)
