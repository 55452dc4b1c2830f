"""Schedules: closed forms against k-diffusion's formulas, diffusers configs against diffusers itself.

Tolerances: diffusers stores sigmas in float32, ours are float64 computed from the same float32 training
tables, so they must agree to float32 rounding (relative 2**-23). Timesteps must be equal.
"""

from __future__ import annotations

import itertools
import math

import diffusers  # a test dependency: without it these tests fail rather than skip
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffusion_fast import samplers as df_samplers
from diffusion_fast import schedules
from diffusion_fast.schedules import SCHEDULER_CLASSES

diffusers.utils.logging.set_verbosity_error()

# diffusers' schedulers pass torch tensors through numpy, which NumPy 2 warns about on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

F32_RTOL = 2.0**-23


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Every tensor here is tiny (<= 1000 elements); a second intra-op thread only adds hand-off latency
    # (milliseconds per op on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


STEPS = (1, 2, 7, 20, 50)
BETAS = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")
KARRAS_CLASSES = ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
                  "LMSDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
PLAIN_CLASSES = ("EulerAncestralDiscreteScheduler", "DDIMScheduler")
INT_TIMESTEP_CLASSES = ("DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def reference(sched, cls: str, steps: int, mu: float | None = None):
    """diffusers' (sigmas, timesteps) for `steps`, reduced to one sigma per step boundary + final value."""
    if mu is None:
        sched.set_timesteps(steps)
    else:
        sched.set_timesteps(steps, mu=mu)
    ts = sched.timesteps
    if cls == "DDIMScheduler":  # no sigmas attribute: the training sigma at each timestep, then its end
        a = torch.cat([sched.alphas_cumprod[ts], sched.final_alpha_cumprod.reshape(1)]).double()
        return ((1 - a) / a) ** 0.5, ts
    sig = sched.sigmas
    if cls == "HeunDiscreteScheduler":  # [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]; timesteps likewise
        return torch.cat([sig[0::2], sig[-1:]]), ts[0::2]
    if cls == "KDPM2DiscreteScheduler":  # [s0, s1, s1, ..., 0, 0, 0]; [t0, t_mid, t1, t_mid, t2, ...]
        return torch.cat([sig[:1], sig[1::2][: len(ts[0::2])]]), ts[0::2]
    return sig, ts


def assert_sigmas_match(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    ref = ref.double()
    assert ours.dtype == torch.float64 and ours.device.type == "cpu", what
    assert ours.shape == ref.shape, f"{what}: {tuple(ours.shape)} sigmas, diffusers has {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    bad = ((ours - ref).abs() > F32_RTOL * ref.abs()) & finite
    if bad.any():
        idx = bad.nonzero().flatten()[:5].tolist()
        rows = ", ".join(f"[{i}] {ours[i].item():.9g} vs {ref[i].item():.9g}" for i in idx)
        raise AssertionError(f"{what}: {int(bad.sum())} sigmas differ beyond float32 rounding: {rows}")


def assert_timesteps_match(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: {tuple(ours.shape)} timesteps, diffusers {tuple(ref.shape)}"
    ref = ref.to(ours.dtype)
    if not torch.equal(ours, ref):
        idx = (ours != ref).nonzero().flatten()[:5].tolist()
        rows = ", ".join(f"[{i}] {ours[i].item()!r} vs {ref[i].item()!r}" for i in idx)
        raise AssertionError(f"{what}: timesteps differ: {rows}")


def assert_schedule_shape(s: schedules.Schedule, steps: int) -> None:
    assert s.sigmas.shape == (steps + 1,) and s.timesteps.shape == (steps,)
    assert s.sigmas[-1].item() == s.final_sigma
    assert bool((s.sigmas[1:] < s.sigmas[:-1]).all()), f"sigmas not strictly decreasing: {s.sigmas}"


def check_against_diffusers(cfg: dict, steps_list=STEPS, mu: float | None = None, sched=None) -> None:
    cls = cfg.get("_class_name", "EulerDiscreteScheduler")
    cfg = {"_class_name": cls, **cfg}
    if sched is None:
        sched = getattr(diffusers, cls).from_config(cfg)
    for steps in steps_list:
        what = f"{cfg} steps={steps}"
        ref_sigmas, ref_ts = reference(sched, cls, steps, mu)
        if len(ref_sigmas) > 1 and ref_sigmas[-1] > 0 and ref_sigmas[-1] == ref_sigmas[-2]:
            # a zero-length final step (Karras sigmas down to sigma_min, then sigma_min): left out
            if steps == 1:
                with pytest.raises(ValueError, match="one step, of length zero"):
                    schedules.from_diffusers_config(cfg, steps, mu=mu)
                continue
            ref_sigmas, ref_ts = ref_sigmas[:-1], ref_ts[:-1]
        ours = schedules.from_diffusers_config(cfg, steps, mu=mu)
        assert_sigmas_match(ours.sigmas, ref_sigmas, what)
        assert_timesteps_match(ours.timesteps, ref_ts, what)
        assert ours.final_sigma == ours.sigmas[-1].item(), what
        assert_schedule_shape(ours, len(ref_ts))
        want_dtype = torch.int64 if cls in INT_TIMESTEP_CLASSES else torch.float32
        assert ours.timesteps.dtype == want_dtype, what
        # diffusers' own dtype is the same, except KDPM2's float64 for Karras / exponential sigmas
        if not (cls == "KDPM2DiscreteScheduler" and ref_ts.dtype == torch.float64):
            assert ref_ts.dtype == want_dtype, what


# ----------------------------------------------------------------------------------------------------
# closed-form schedules
# ----------------------------------------------------------------------------------------------------


def _ramp(i: int, n: int) -> float:
    return 0.0 if n == 1 else i / (n - 1)


RANGES = [(0.0292, 14.6146), (0.002, 80.0), (0.1, 0.11)]


@pytest.mark.parametrize("n", [1, 2, 7, 50])
@pytest.mark.parametrize("sigma_min,sigma_max", RANGES)
@pytest.mark.parametrize("rho", [7.0, 3.0, 1.0])
def test_karras_matches_formula(n, sigma_min, sigma_max, rho):
    got = schedules.karras(n, sigma_min, sigma_max, rho)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    want = [(hi + _ramp(i, n) * (lo - hi)) ** rho for i in range(n)] + [0.0]
    assert got.dtype == torch.float64 and got.device.type == "cpu"
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-13, atol=0)
    assert got[0].item() == pytest.approx(sigma_max, rel=1e-14)
    if n > 1:
        assert got[-2].item() == pytest.approx(sigma_min, rel=1e-13)
        assert bool((got[1:] < got[:-1]).all())


@pytest.mark.parametrize("n", [1, 2, 7, 50])
@pytest.mark.parametrize("sigma_min,sigma_max", RANGES)
def test_exponential_matches_formula(n, sigma_min, sigma_max):
    got = schedules.exponential(n, sigma_min, sigma_max)
    a, b = math.log(sigma_max), math.log(sigma_min)
    want = [math.exp(a + _ramp(i, n) * (b - a)) for i in range(n)] + [0.0]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-13, atol=0)
    if n > 1:
        ratios = got[1:-1] / got[:-2]  # evenly spaced in log sigma
        torch.testing.assert_close(ratios, ratios[:1].expand_as(ratios), rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [1, 2, 7, 50])
@pytest.mark.parametrize("rho", [1.0, 2.0, 0.5])
def test_polyexponential_matches_formula(n, rho):
    got = schedules.polyexponential(n, 0.03, 14.6, rho)
    want = [math.exp((1 - _ramp(i, n)) ** rho * (math.log(14.6) - math.log(0.03)) + math.log(0.03))
            for i in range(n)] + [0.0]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-13, atol=0)
    if rho == 1.0:
        torch.testing.assert_close(got, schedules.exponential(n, 0.03, 14.6), rtol=1e-13, atol=0)


@pytest.mark.parametrize("n", [1, 2, 7, 28, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 1.7, 0.5, 0.15])  # 0.15: diffusers' float32 shifted 1 is 1 + 2 ulp
def test_flow_matching_matches_diffusers_and_formula(n, shift):
    got = schedules.flow_matching(n, shift)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    assert_sigmas_match(got, sched.sigmas, f"flow_matching({n}, {shift})")
    # written out: shift applied to a linspace from 1 down to the once-shifted 1/T. diffusers' ends are
    # float32 (1 can be 1 +- 2 ulp), and the shift's slope at 1 (1 / shift) magnifies that: rtol 2e-5.
    lo = shift * 1e-3 / (1 + (shift - 1) * 1e-3)
    s = [1 + _ramp(i, n) * (lo - 1) for i in range(n)]
    want = [shift * x / (1 + (shift - 1) * x) for x in s] + [0.0]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=2e-5, atol=0)


def test_flow_matching_explicit_range():
    got = schedules.flow_matching(5, 2.0, sigma_min=0.2, sigma_max=0.9)
    s = np.linspace(0.9, 0.2, 5)
    want = np.append(2 * s / (1 + s), 0.0)
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-13, atol=0)


def test_get_dispatches_by_name():
    assert set(schedules.SCHEDULES) == {"karras", "exponential", "polyexponential", "flow", "normal", "sgm_uniform",
                                        "simple", "ddim_uniform", "beta", "ays_sd15", "ays_sdxl", "ays_svd"}
    torch.testing.assert_close(schedules.get("karras", 9, sigma_min=0.1, sigma_max=10.0, rho=5.0),
                               schedules.karras(9, 0.1, 10.0, 5.0), rtol=0, atol=0)
    torch.testing.assert_close(schedules.get("exponential", 9, sigma_min=0.1, sigma_max=10.0),
                               schedules.exponential(9, 0.1, 10.0), rtol=0, atol=0)
    torch.testing.assert_close(schedules.get("polyexponential", 9, sigma_min=0.1, sigma_max=10.0, rho=2.0),
                               schedules.polyexponential(9, 0.1, 10.0, 2.0), rtol=0, atol=0)
    torch.testing.assert_close(schedules.get("flow", 9, shift=3.0), schedules.flow_matching(9, 3.0),
                               rtol=0, atol=0)
    torch.testing.assert_close(schedules.get("ays_sdxl", 9), schedules.align_your_steps(9, "sdxl"), rtol=0, atol=0)
    table = schedules.edm_sigmas(0.5, 2.0)
    for name in schedules.SCHEDULES:
        kw = {"shift": 2.0} if name == "flow" else {} if name.startswith("ays") else {
            "model_sigmas": table} if name in ("normal", "sgm_uniform", "simple", "ddim_uniform", "beta") else {
            "sigma_min": 0.5, "sigma_max": 2.0}
        s = schedules.get(name, 4, **kw)
        assert s.shape == (5,) and s.dtype == torch.float64 and s[-1].item() == 0.0, name
        assert bool((s[1:] < s[:-1]).all()), name


# ComfyUI's schedulers, transcribed (comfy/samplers.py; ModelSamplingDiscrete from comfy/model_sampling.py with
# make_beta_schedule("linear") from comfy/ldm/modules/diffusionmodules/util.py).

class ComfyModelSamplingDiscrete:
    def __init__(self, linear_start=0.00085, linear_end=0.012, timesteps=1000):
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1. - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma.to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=(len(self.sigmas) - 1))
        low_idx = t.floor().long()
        high_idx = t.ceil().long()
        w = t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp().to(timestep.device)


def comfy_simple_scheduler(model_sampling, steps):
    s = model_sampling
    sigs = []
    ss = len(s.sigmas) / steps
    for x in range(steps):
        sigs += [float(s.sigmas[-(1 + int(x * ss))])]
    sigs += [0.0]
    return torch.FloatTensor(sigs)


def comfy_ddim_scheduler(model_sampling, steps):
    s = model_sampling
    sigs = []
    x = 1
    if math.isclose(float(s.sigmas[x]), 0, abs_tol=0.00001):
        steps += 1
        sigs = []
    else:
        sigs = [0.0]
    ss = max(len(s.sigmas) // steps, 1)
    while x < len(s.sigmas):
        sigs += [float(s.sigmas[x])]
        x += ss
    sigs = sigs[::-1]
    return torch.FloatTensor(sigs)


def comfy_normal_scheduler(model_sampling, steps, sgm=False, floor=False):
    s = model_sampling
    start = s.timestep(s.sigma_max)
    end = s.timestep(s.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(s.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = []
    for x in range(len(timesteps)):
        ts = timesteps[x]
        sigs.append(float(s.sigma(ts)))
    if append_zero:
        sigs += [0.0]
    return torch.FloatTensor(sigs)


def comfy_beta_scheduler(model_sampling, steps, alpha=0.6, beta=0.6):
    import scipy.stats

    total_timesteps = (len(model_sampling.sigmas) - 1)
    ts = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(scipy.stats.beta.ppf(ts, alpha, beta) * total_timesteps)
    sigs = []
    last_t = -1
    for t in ts:
        if t != last_t:
            sigs += [float(model_sampling.sigmas[int(t)])]
        last_t = t
    sigs += [0.0]
    return torch.FloatTensor(sigs)


def comfy_loglinear_interp(t_steps, num_steps):
    xs = np.linspace(0, 1, len(t_steps))
    ys = np.log(t_steps[::-1])
    new_xs = np.linspace(0, 1, num_steps)
    new_ys = np.interp(new_xs, xs, ys)
    interped_ys = np.exp(new_ys)[::-1].copy()
    return interped_ys


COMFY_AYS = {"SD1": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
                     0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
             "SDXL": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
                      0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
             "SVD": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002]}


def comfy_ays(model_type, steps):
    sigmas = COMFY_AYS[model_type][:]
    if (steps + 1) != len(sigmas):
        sigmas = comfy_loglinear_interp(sigmas, steps + 1)
    sigmas = sigmas[-(steps + 1):]
    sigmas[-1] = 0
    return torch.FloatTensor(sigmas)


TABLE_STEPS = (1, 2, 3, 7, 10, 20, 33, 50, 999, 1000)


@pytest.mark.parametrize("n", TABLE_STEPS)
def test_comfyui_table_schedulers_match_comfyui(n):
    """Same numbers as ComfyUI for SD's table: the picked levels equal (they are table entries), the
    interpolated ones to float32 rounding (ComfyUI returns float32)."""
    ms = ComfyModelSamplingDiscrete()
    torch.testing.assert_close(schedules.discrete_sigmas(), ms.sigmas.double(), rtol=0, atol=0)
    torch.testing.assert_close(schedules.simple(n), comfy_simple_scheduler(ms, n).double(), rtol=0, atol=0)
    torch.testing.assert_close(schedules.ddim_uniform(n), comfy_ddim_scheduler(ms, n).double(), rtol=0, atol=0)
    torch.testing.assert_close(schedules.beta(n), comfy_beta_scheduler(ms, n).double(), rtol=0, atol=0)
    torch.testing.assert_close(schedules.normal(n), comfy_normal_scheduler(ms, n).double(), rtol=F32_RTOL, atol=0)
    torch.testing.assert_close(schedules.sgm_uniform(n), comfy_normal_scheduler(ms, n, sgm=True).double(),
                               rtol=F32_RTOL, atol=0)


@pytest.mark.parametrize("alpha,b", [(0.6, 0.6), (0.5, 0.7), (2.0, 1.2)])
@pytest.mark.parametrize("n", [4, 25, 60])
def test_beta_scheduler_with_other_shapes(alpha, b, n):
    ms = ComfyModelSamplingDiscrete()
    torch.testing.assert_close(schedules.beta(n, alpha=alpha, beta=b), comfy_beta_scheduler(ms, n, alpha, b).double(),
                               rtol=0, atol=0)


def test_beta_quantile_matches_scipy():
    from scipy.special import betainc
    from scipy.stats import beta as scipy_beta

    from diffusion_fast.schedules.formulas import _beta_ppf, _betainc

    for a, b in [(0.6, 0.6), (0.5, 2.0), (3.0, 0.4), (1.0, 1.0), (7.0, 5.0), (0.2, 0.3)]:
        for x in np.linspace(0.001, 0.999, 37):
            assert _betainc(a, b, float(x)) == pytest.approx(betainc(a, b, x), abs=1e-14)
        for q in np.linspace(0, 1, 41):
            assert _beta_ppf(float(q), a, b) == pytest.approx(scipy_beta.ppf(q, a, b), abs=1e-13)


def test_comfyui_table_schedulers_on_a_continuous_model():
    """For a continuous-sigma model ComfyUI's table is log-uniform; sgm_uniform there is log-uniform spacing from
    sigma_max without the last point (ComfyUI's ModelSamplingContinuousEDM: timestep = log(sigma) / 4)."""
    lo, hi = 0.002, 80.0
    table = schedules.edm_sigmas(lo, hi)
    n = 12
    t = torch.linspace(0.25 * math.log(hi), 0.25 * math.log(lo), n + 1)[:-1]
    want = torch.cat([(t / 0.25).exp(), torch.zeros(1)]).double()
    torch.testing.assert_close(schedules.sgm_uniform(n, table), want, rtol=2e-6, atol=0)
    assert schedules.simple(n, table)[0].item() == pytest.approx(hi, rel=1e-14)
    assert schedules.normal(n, table)[-2].item() == pytest.approx(lo, rel=1e-6)


@pytest.mark.parametrize("model,key", [("sd15", "SD1"), ("sdxl", "SDXL"), ("svd", "SVD")])
@pytest.mark.parametrize("n", [1, 2, 5, 10, 11, 32, 100])
def test_align_your_steps_matches_comfyui(model, key, n):
    got = schedules.align_your_steps(n, model)
    torch.testing.assert_close(got, comfy_ays(key, n).double(), rtol=F32_RTOL, atol=0)
    if n == 10:  # the published levels themselves, the smallest replaced by 0
        torch.testing.assert_close(got[:-1], torch.tensor(COMFY_AYS[key][:-1], dtype=torch.float64), rtol=0, atol=0)
    assert got[0].item() == pytest.approx(COMFY_AYS[key][0], rel=1e-14) and got[-1].item() == 0.0


# ----------------------------------------------------------------------------------------------------
# diffusers configs: the grid
# ----------------------------------------------------------------------------------------------------

GRID = [(cls, beta, spacing, offset, karras)
        for cls in KARRAS_CLASSES + PLAIN_CLASSES
        for beta, spacing, offset in itertools.product(BETAS, SPACINGS, (0, 1))
        for karras in ((False, True) if cls in KARRAS_CLASSES else (False,))]


_REFERENCE_CACHE: dict = {}


def _grid_reference(cfg: dict):
    """One diffusers scheduler per (class, betas), re-pointed at the grid's spacing options.

    The training tables depend only on the beta keys, and set_timesteps reads timestep_spacing,
    steps_offset and use_karras_sigmas from the config each call; constructing KDPM2 (which runs
    set_timesteps(1000) with 2000 sigma->t conversions) for every grid cell would dominate the test time.
    test_reconfigured_reference_equals_a_fresh_one checks the shortcut.
    """
    key = (cfg["_class_name"], cfg["beta_schedule"])
    sched = _REFERENCE_CACHE.get(key)
    if sched is None:
        sched = _REFERENCE_CACHE[key] = getattr(diffusers, key[0]).from_config(cfg)
    options = {k: cfg[k] for k in ("timestep_spacing", "steps_offset", "use_karras_sigmas")
               if k in sched.config}
    sched.register_to_config(**options)
    assert all(sched.config[k] == v for k, v in options.items())
    return sched


def _grid_config(cls, beta, spacing, offset, karras) -> dict:
    return {"_class_name": cls, "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": beta, "timestep_spacing": spacing, "steps_offset": offset,
            "use_karras_sigmas": karras}


@pytest.mark.parametrize("cls,beta,spacing,offset,karras", GRID)
def test_matches_diffusers_grid(cls, beta, spacing, offset, karras):
    cfg = _grid_config(cls, beta, spacing, offset, karras)
    check_against_diffusers(cfg, sched=_grid_reference(cfg))


def test_reconfigured_reference_equals_a_fresh_one():
    for args in [("KDPM2DiscreteScheduler", "linear", "trailing", 1, True),
                 ("EulerDiscreteScheduler", "scaled_linear", "leading", 1, False)]:
        cfg = _grid_config(*args)
        _grid_reference(_grid_config(args[0], args[1], "linspace", 0, not args[4]))  # some other state
        reused, fresh = _grid_reference(cfg), getattr(diffusers, args[0]).from_config(cfg)
        for steps in (7, 20):
            (s1, t1), (s2, t2) = reference(reused, args[0], steps), reference(fresh, args[0], steps)
            assert torch.equal(s1, s2) and torch.equal(t1, t2)


# One config per feature beyond the grid: zero terminal SNR, exponential sigmas, config sigma range,
# final_sigmas_type, continuous timesteps, lambda clipping, Lu lambdas, flow sigmas, trained betas, ...
_SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
_EULER = {"_class_name": "EulerDiscreteScheduler"}
FEATURES = (
    [{"_class_name": c, **_SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
      "prediction_type": "v_prediction"}
     for c in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
               "UniPCMultistepScheduler")]
    + [{"_class_name": c, **_SD, "use_exponential_sigmas": True, "timestep_spacing": sp, "steps_offset": 1}
       for c in KARRAS_CLASSES for sp in SPACINGS]
    + [{"_class_name": c, **_SD, key: True, "sigma_min": 0.1, "sigma_max": 10.0}
       for c in KARRAS_CLASSES for key in ("use_karras_sigmas", "use_exponential_sigmas")]
    + [
        {"_class_name": "EulerDiscreteScheduler", "final_sigmas_type": "sigma_min"},
        {"_class_name": "EulerDiscreteScheduler", "final_sigmas_type": "sigma_min", "use_karras_sigmas": True},
        {"_class_name": "EulerDiscreteScheduler", "timestep_type": "continuous", "prediction_type": "v_prediction"},
        {"_class_name": "EulerDiscreteScheduler", "timestep_type": "continuous", "prediction_type": "v_prediction",
         "use_karras_sigmas": True},
        {"_class_name": "EulerAncestralDiscreteScheduler", "use_karras_sigmas": True},  # ignored, as diffusers
        {"_class_name": "HeunDiscreteScheduler", "beta_schedule": "exp"},
        {"_class_name": "HeunDiscreteScheduler", "beta_schedule": "exp", "use_karras_sigmas": True},
        {"_class_name": "DPMSolverMultistepScheduler", "final_sigmas_type": "sigma_min", "use_karras_sigmas": True},
        {"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "squaredcos_cap_v2",
         "lambda_min_clipped": -5.1},
        {"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "squaredcos_cap_v2",
         "lambda_min_clipped": -5.1, "timestep_spacing": "leading", "steps_offset": 1},
        {"_class_name": "DPMSolverMultistepScheduler", "use_lu_lambdas": True},
        {"_class_name": "DPMSolverMultistepScheduler", "use_lu_lambdas": True, "beta_schedule": "squaredcos_cap_v2"},
        {"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True, "flow_shift": 3.0,
         "prediction_type": "flow_prediction"},
        {"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True, "flow_shift": 3.0,
         "prediction_type": "flow_prediction", "final_sigmas_type": "sigma_min"},
        {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "flow_shift": 5.0,
         "prediction_type": "flow_prediction"},
        {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "prediction_type": "flow_prediction",
         "final_sigmas_type": "sigma_min"},
        {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "use_karras_sigmas": True,
         "prediction_type": "flow_prediction"},
        {"_class_name": "UniPCMultistepScheduler", "final_sigmas_type": "sigma_min", "use_karras_sigmas": True},
        {"_class_name": "UniPCMultistepScheduler", "final_sigmas_type": "sigma_min"},
        {"_class_name": "FlowMatchEulerDiscreteScheduler"},
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0},
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.7},
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_karras_sigmas": True},
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_exponential_sigmas": True},
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 500, "shift": 2.0},
        {"_class_name": "DDIMScheduler", **_SD, "set_alpha_to_one": False, "steps_offset": 1},
        {"_class_name": "DDIMScheduler", **_SD, "timestep_spacing": "linspace"},
    ]
)


FEATURES += [{"_class_name": c, **_SD, "use_beta_sigmas": True} for c in KARRAS_CLASSES] + [
    {"_class_name": "EulerDiscreteScheduler", **_SD, "use_beta_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
    {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_beta_sigmas": True},
]


@pytest.mark.parametrize("cfg", FEATURES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_diffusers_features(cfg):
    check_against_diffusers(cfg)


@pytest.mark.parametrize("cfg,mu", [
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}, 0.8),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True,
      "time_shift_type": "linear"}, 1.3),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True, "shift_terminal": 0.1,
      "use_exponential_sigmas": True}, 1.1),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "shift_terminal": 0.02}, None),
    ({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "use_dynamic_shifting": True}, 0.9),
    ({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "flow_shift": 3.0,
      "shift_terminal": 0.1}, None),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True, "use_dynamic_shifting": True}, 0.7),
])
def test_matches_diffusers_shifted_flow(cfg, mu):
    # shift_terminal is undefined for one step (diffusers divides 0 by 0), so start at 2
    check_against_diffusers(cfg, STEPS[1:], mu=mu)


@pytest.mark.parametrize("cls", SCHEDULER_CLASSES)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_init_noise_sigma_is_the_start_diffusers_takes(cls, spacing):
    flow = cls.startswith("FlowMatch")
    cfg = {"_class_name": cls, **({} if flow else {**_SD, "timestep_spacing": spacing, "steps_offset": 1})}
    sched = getattr(diffusers, cls).from_config(cfg)
    for steps in (1, 9, 30):
        sched.set_timesteps(steps)
        ours = schedules.from_diffusers_config(cfg, steps)
        if flow:  # FlowMatchEuler has no init_noise_sigma: the pipelines start from unit noise
            assert ours.latent_space == "flow" and ours.init_noise_sigma == 1.0
        elif cls in INT_TIMESTEP_CLASSES:  # unit-variance latents z, which are z * sqrt(sigma0^2 + 1) here
            assert ours.latent_space == "vp" and float(sched.init_noise_sigma) == 1.0
            assert ours.init_noise_sigma == math.sqrt(ours.sigmas[0].item() ** 2 + 1)
        else:  # the sampler's state is diffusers' latents: the same float32 number
            assert ours.latent_space == "ve"
            assert ours.init_noise_sigma == float(sched.init_noise_sigma), (cls, spacing, steps)


def _custom_reference(cls: str, cfg: dict, **kw):
    sched = getattr(diffusers, cls).from_config(cfg)
    sched.set_timesteps(**kw)
    return reference_layout(sched, cls)


def reference_layout(sched, cls):
    sig, ts = sched.sigmas, sched.timesteps
    if cls == "HeunDiscreteScheduler":
        return torch.cat([sig[0::2], sig[-1:]]), ts[0::2]
    return sig, ts


CUSTOM = [
    ("EulerDiscreteScheduler", {**_SD}, {"timesteps": [999, 800, 640.5, 250, 10]}),
    ("EulerDiscreteScheduler", {**_SD, "final_sigmas_type": "sigma_min"}, {"timesteps": [999, 500, 10]}),
    ("EulerDiscreteScheduler", {**_SD}, {"sigmas": [14.0, 5.0, 1.25, 0.3, 0.0]}),
    ("EulerDiscreteScheduler", {**_SD}, {"sigmas": [10.0, 2.0, 0.5, 0.05]}),
    ("EulerDiscreteScheduler", {**_SD, "timestep_type": "continuous", "prediction_type": "v_prediction"},
     {"sigmas": [14.0, 5.0, 1.25, 0.3, 0.0]}),
    ("HeunDiscreteScheduler", {**_SD}, {"timesteps": [999, 700, 400, 100]}),
    ("DPMSolverMultistepScheduler", {**_SD}, {"timesteps": [999, 750, 500, 250, 50]}),
    ("DPMSolverMultistepScheduler", {**_SD, "final_sigmas_type": "sigma_min"}, {"timesteps": [901, 601, 301]}),
    ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"},
     {"sigmas": np.linspace(1.0, 0.1, 6)}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, {"sigmas": np.linspace(1.0, 1 / 7, 7)}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, {"timesteps": [1000.0, 800.0, 450.0, 100.0]}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0},
     {"timesteps": [1000.0, 800.0, 450.0, 100.0], "sigmas": [1.0, 0.9, 0.5, 0.2]}),
    ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},
     {"sigmas": np.linspace(1.0, 1 / 9, 9), "mu": 0.83}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0, "use_karras_sigmas": True},
     {"sigmas": np.linspace(1.0, 1 / 9, 9)}),
]


@pytest.mark.parametrize("cls,cfg,kw", CUSTOM, ids=lambda v: v if isinstance(v, str) else None)
def test_custom_timesteps_and_sigmas_match_diffusers(cls, cfg, kw):
    cfg = {"_class_name": cls, **cfg}
    ref_sigmas, ref_ts = _custom_reference(cls, cfg, **kw)
    ours = schedules.from_diffusers_config(cfg, **kw)
    what = f"{cls} {kw}"
    assert_sigmas_match(ours.sigmas, ref_sigmas, what)
    assert_timesteps_match(ours.timesteps, ref_ts, what)  # exactly: custom sigmas map to t in float32, as there


BAD_CUSTOM = [
    ("DDIMScheduler", {}, {"timesteps": [900, 500]}, "timesteps= is not accepted for DDIMScheduler"),
    ("HeunDiscreteScheduler", {}, {"sigmas": [3.0, 1.0, 0.0]}, "sigmas= is not accepted for HeunDiscreteScheduler"),
    ("EulerDiscreteScheduler", {}, {"steps": 4, "timesteps": [900, 500]}, "not both"),
    ("EulerDiscreteScheduler", {}, {"timesteps": [900, 500], "sigmas": [3.0, 1.0, 0.0]}, "only one of"),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, {"timesteps": [900, 500]}, "use_karras_sigmas"),
    ("EulerDiscreteScheduler", {}, {"sigmas": [3.0]}, "steps + 1 values"),
    ("EulerDiscreteScheduler", {}, {"sigmas": [3.0, 4.0, 0.0]}, "not strictly decreasing"),
    ("EulerDiscreteScheduler", {}, {"sigmas": [[3.0, 1.0]]}, "1-D"),
    ("EulerDiscreteScheduler", {}, {"sigmas": [3.0, float("nan"), 0.0]}, "finite"),
    ("UniPCMultistepScheduler", {}, {"sigmas": [0.9, 0.5]}, "use_flow_sigmas"),
    ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True}, {"timesteps": [900, 500]}, "use_lu_lambdas"),
    ("FlowMatchEulerDiscreteScheduler", {}, {"steps": 3, "sigmas": [0.9, 0.5]}, "steps = 3 but 2 custom"),
    ("FlowMatchEulerDiscreteScheduler", {}, {"timesteps": [900.0], "sigmas": [0.9, 0.5]}, "same length"),
    ("EulerDiscreteScheduler", {}, {}, "steps is required"),
]


@pytest.mark.parametrize("cls,cfg,kw,message", BAD_CUSTOM)
def test_bad_custom_schedules_are_refused(cls, cfg, kw, message):
    with pytest.raises((ValueError, TypeError)) as info:
        schedules.from_diffusers_config({"_class_name": cls, **cfg}, **kw)
    assert message in str(info.value)


def test_trained_betas_match_diffusers():
    betas = diffusers.DDPMScheduler(**_SD).betas.tolist()
    for cls in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler"):
        check_against_diffusers({"_class_name": cls, "trained_betas": betas, "use_karras_sigmas": True})
        check_against_diffusers({"_class_name": cls, "trained_betas": betas})


def test_ddim_zero_terminal_snr_has_finite_first_sigma():
    cfg = {"_class_name": "DDIMScheduler", **_SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    # diffusers' DDIM keeps alphas_cumprod[-1] = 0 (sigma = inf); Euler's 2**-24 is used instead
    check_against_diffusers(cfg)
    s = schedules.from_diffusers_config(cfg, 10)
    assert s.timesteps[0].item() == 999
    assert s.sigmas[0].item() == pytest.approx(math.sqrt(2.0**24 - 1), rel=1e-6)


def test_bare_config_without_class_name_is_refused():
    # A live scheduler's .config has no _class_name: silently applying Euler's rules gave DPM-Solver's
    # [941, 894, ...] as [951, 901, ...]. Pass the scheduler itself, or name the class.
    live = diffusers.DPMSolverMultistepScheduler(**_SD, timestep_spacing="leading", steps_offset=1)
    assert "_class_name" not in live.config
    with pytest.raises(ValueError) as info:
        schedules.from_diffusers_config(live.config, 20)
    for part in ("no '_class_name'", "pass the scheduler object itself", "class_name="):
        assert part in str(info.value)
    live.set_timesteps(20)
    assert live.timesteps[:2].tolist() == [941, 894]
    for ours in (schedules.from_diffusers_config(live, 20),
                 schedules.from_diffusers_config(live.config, 20, class_name="DPMSolverMultistepScheduler")):
        assert_timesteps_match(ours.timesteps, live.timesteps, "DPM-Solver leading")
        assert_sigmas_match(ours.sigmas, live.sigmas, "DPM-Solver leading")
        assert ours.class_name == "DPMSolverMultistepScheduler"


@pytest.mark.parametrize("cls", SCHEDULER_CLASSES)
def test_scheduler_objects_are_accepted(cls):
    cfg = {"num_train_timesteps": 1000} if cls.startswith("FlowMatch") else {**_SD, "steps_offset": 1}
    sched = getattr(diffusers, cls).from_config(cfg)
    ref_sigmas, ref_ts = reference(sched, cls, 13)
    ours = schedules.from_diffusers_config(sched, 13)
    assert ours.class_name == cls
    assert_timesteps_match(ours.timesteps, ref_ts, cls)
    assert_sigmas_match(ours.sigmas, ref_sigmas, cls)


SD15_PNDM = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}


@pytest.mark.parametrize("cls", [c for c in SCHEDULER_CLASSES if not c.startswith("FlowMatch")])
def test_pndm_config_maps_to_each_class_as_diffusers_from_config_does(cls):
    # SD1.5 ships a PNDMScheduler config; diffusers users switch with Cls.from_config(pipe.scheduler.config),
    # which drops the keys PNDM filled with its defaults (timestep_spacing "leading", prediction_type).
    with pytest.raises(ValueError) as info:
        schedules.from_diffusers_config(SD15_PNDM, 20)
    for part in ("'PNDMScheduler'", "PLMS", "class_name="):
        assert part in str(info.value)
    pndm = diffusers.PNDMScheduler.from_config(SD15_PNDM)
    assert "timestep_spacing" in pndm.config["_use_default_values"]
    converted = getattr(diffusers, cls).from_config(pndm.config)
    for steps in (7, 20):
        ref_sigmas, ref_ts = reference(converted, cls, steps)
        for source in (pndm, pndm.config, SD15_PNDM):
            ours = schedules.from_diffusers_config(source, steps, class_name=cls)
            assert_timesteps_match(ours.timesteps, ref_ts, f"{cls} from {type(source).__name__}")
            assert_sigmas_match(ours.sigmas, ref_sigmas, f"{cls} from {type(source).__name__}")


def test_keys_filled_with_defaults_do_not_carry_over_to_another_class():
    euler = diffusers.EulerDiscreteScheduler(**_SD)  # timestep_spacing "linspace" by default
    ddim = diffusers.DDIMScheduler.from_config(euler.config)  # DDIM's own default: "leading"
    ours = schedules.from_diffusers_config(euler, 10, class_name="DDIMScheduler")
    ddim.set_timesteps(10)
    assert_timesteps_match(ours.timesteps, ddim.timesteps, "DDIM from an Euler config")
    explicit = diffusers.EulerDiscreteScheduler(**_SD, timestep_spacing="linspace")  # given, so it carries
    ours = schedules.from_diffusers_config(explicit, 10, class_name="DDIMScheduler")
    ddim = diffusers.DDIMScheduler.from_config(explicit.config)
    ddim.set_timesteps(10)
    assert_timesteps_match(ours.timesteps, ddim.timesteps, "DDIM from an explicit linspace config")


def test_trailing_spacing_has_exactly_steps_timesteps():
    # np.arange(1000, 0, -1000/61) has 62 elements; diffusers keeps a 62nd step at timestep -1.
    for cls in ("EulerDiscreteScheduler", "DDIMScheduler", "UniPCMultistepScheduler"):
        sched = getattr(diffusers, cls).from_config({"timestep_spacing": "trailing", **_SD})
        ref_sigmas, ref_ts = reference(sched, cls, 61)
        assert len(ref_ts) == 62 and ref_ts[-1].item() == -1
        ours = schedules.from_diffusers_config({"_class_name": cls, "timestep_spacing": "trailing", **_SD}, 61)
        assert_timesteps_match(ours.timesteps, ref_ts[:61], cls)
        assert_sigmas_match(ours.sigmas, torch.cat([ref_sigmas[:61], ref_sigmas[-1:]]), cls)


def test_lambda_clipping_with_trailing_spacing_can_shorten_the_schedule():
    cfg = {"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "squaredcos_cap_v2",
           "lambda_min_clipped": -5.1, "timestep_spacing": "trailing"}
    check_against_diffusers(cfg)
    sched = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
    ref_sigmas, ref_ts = reference(sched, "DPMSolverMultistepScheduler", 333)
    ours = schedules.from_diffusers_config(cfg, 333)
    assert ours.steps == len(ref_ts) == 332  # as diffusers: the clipped range fits 332 steps of T/333
    assert_timesteps_match(ours.timesteps, ref_ts, "333 steps")
    assert_sigmas_match(ours.sigmas, ref_sigmas, "333 steps")


def test_schedule_fields():
    cfg = {"_class_name": "EulerDiscreteScheduler", **_SD, "prediction_type": "v_prediction"}
    s = schedules.from_diffusers_config(cfg, 25)
    ref = diffusers.EulerDiscreteScheduler.from_config(cfg)
    assert s.prediction_type == "v_prediction" and s.parametrization == "ve"
    assert s.timestep_type == "discrete" and s.class_name == "EulerDiscreteScheduler"
    assert s.num_train_timesteps == 1000 and s.steps == 25
    assert s.alphas_cumprod.dtype == torch.float64
    assert torch.equal(s.alphas_cumprod, ref.alphas_cumprod.double())
    table = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5
    assert s.sigma_min == table[0].item() and s.sigma_max == table[-1].item()
    assert torch.equal(s.train_sigmas, table.double())
    assert schedules.from_diffusers_config({**_EULER, **_SD}, 5).prediction_type == "epsilon"
    ddim = schedules.from_diffusers_config({"_class_name": "DDIMScheduler", **_SD, "steps_offset": 1}, 10)
    assert ddim.timesteps.tolist() == list(range(901, 0, -100))  # DDIM's default spacing is "leading"

    flow = schedules.from_diffusers_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, 28)
    assert flow.parametrization == "flow" and flow.prediction_type == "flow"
    assert flow.alphas_cumprod is None and flow.timestep_type == "flow"
    assert flow.sigmas[0].item() == pytest.approx(1.0) and flow.sigmas[-1].item() == 0.0
    wan = schedules.from_diffusers_config({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True,
                                           "flow_shift": 3.0, "prediction_type": "flow_prediction"}, 30)
    assert wan.parametrization == "flow" and wan.prediction_type == "flow"  # diffusers' "flow_prediction"
    assert set(schedules.PREDICTION_TYPES) <= set(df_samplers.PREDICTIONS)  # names sample() accepts


# ----------------------------------------------------------------------------------------------------
# sigma_to_timestep
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", BETAS)
def test_sigma_to_timestep_matches_diffusers(beta):
    cfg = {**_EULER, "beta_schedule": beta, "beta_start": 0.00085, "beta_end": 0.012}
    ref = diffusers.EulerDiscreteScheduler.from_config(cfg)
    s = schedules.from_diffusers_config(cfg, 10)
    log_table = np.log((((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5).numpy())
    g = torch.Generator().manual_seed(0)
    lo, hi = math.log(s.sigma_min) - 1, math.log(s.sigma_max) + 1  # also beyond both ends
    sigma = torch.empty(497, dtype=torch.float64).uniform_(lo, hi, generator=g).exp()
    sigma = torch.cat([sigma, torch.tensor([0.0, 1e-12, 1e6], dtype=torch.float64)])
    want = torch.tensor([float(ref._sigma_to_t(x, log_table)) for x in sigma.numpy()], dtype=torch.float64)
    got = s.sigma_to_timestep(sigma)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
    assert got[-3].item() == 0.0 and got[-1].item() == 999.0
    # float32 on the device: the same up to float32 rounding of log sigma and of t (ulp(999) = 6.1e-5)
    got32 = s.sigma_to_timestep(sigma.float().reshape(50, 10))
    assert got32.dtype == torch.float32 and got32.shape == (50, 10)
    torch.testing.assert_close(got32.reshape(-1).double(), want, rtol=0, atol=4 * 6.1e-5)


def test_sigma_to_timestep_keeps_shape():
    s = schedules.from_diffusers_config({**_EULER, **_SD}, 10)
    x = s.sigmas[:-1].float().reshape(2, 5)
    t = s.sigma_to_timestep(x)
    assert t.shape == (2, 5) and t.dtype == torch.float32
    torch.testing.assert_close(t.reshape(-1), s.timesteps, rtol=0, atol=0.01)


@pytest.mark.parametrize("beta", BETAS + ("exp",))
def test_sigma_to_timestep_is_exact_on_the_training_table(beta):
    s = schedules.from_diffusers_config({"_class_name": "HeunDiscreteScheduler", "beta_schedule": beta}, 10)
    t = s.sigma_to_timestep(s.train_sigmas)
    # only error: the log table is float32 (diffusers'), so log(sigma) differs from it by ~1e-7 relative
    torch.testing.assert_close(t, torch.arange(1000, dtype=torch.float64), rtol=0, atol=1e-3)


def _round_trip_bound(cfg: dict, s: schedules.Schedule) -> float:
    cls = s.class_name
    spaced = cfg.get("use_karras_sigmas") or cfg.get("use_exponential_sigmas")
    if spaced and cls == "KDPM2DiscreteScheduler" and cfg.get("use_karras_sigmas"):
        return 0.5 + 1e-3  # KDPM2 rounds its Karras timesteps
    if spaced and cls in INT_TIMESTEP_CLASSES:
        return 1.0  # rounded (or, for exponential / cosine-Karras DPM-Solver, truncated) to int64
    if spaced or cls == "FlowMatchEulerDiscreteScheduler":
        return 1e-4  # the timesteps came from this same map, rounded to float32
    if cfg.get("timestep_spacing", "linspace") == "linspace" and cls not in INT_TIMESTEP_CLASSES:
        # fractional timesteps: diffusers interpolates sigma linearly in t, the inverse map interpolates
        # log sigma; the two differ inside a training interval by at most ~0.006 for these schedules
        return 0.01
    return 1e-3  # integer timesteps: exact up to the float32 log table


@pytest.mark.parametrize("cls,beta,spacing,offset,karras", GRID[::3])
def test_sigma_to_timestep_round_trips_on_schedule_sigmas(cls, beta, spacing, offset, karras):
    cfg = {"_class_name": cls, **_SD, "beta_schedule": beta, "timestep_spacing": spacing,
           "steps_offset": offset, "use_karras_sigmas": karras}
    for steps in STEPS:
        s = schedules.from_diffusers_config(cfg, steps)
        t = s.sigma_to_timestep(s.sigmas[:-1])
        err = (t - s.timesteps.double()).abs().max().item()
        assert err <= _round_trip_bound(cfg, s), f"{cfg} steps={steps}: round trip off by {err}"


def test_sigma_to_timestep_flow_and_continuous():
    flow = schedules.from_diffusers_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, 9)
    torch.testing.assert_close(flow.sigma_to_timestep(flow.sigmas[:-1].float()), flow.timesteps, rtol=0, atol=0)
    cont = schedules.from_diffusers_config({**_EULER, "timestep_type": "continuous",
                                            "prediction_type": "v_prediction"}, 9)
    assert cont.timestep_type == "continuous"
    torch.testing.assert_close(cont.sigma_to_timestep(cont.sigmas[:-1].float()), cont.timesteps,
                               rtol=0, atol=1e-6)


_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "allclose"}


class _FailOnHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _SYNC_OPS:
            raise AssertionError(f"host synchronisation: aten.{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


def test_sync_guard_catches_item():
    with pytest.raises(AssertionError, match="host synchronisation"), _FailOnHostSync():
        torch.ones(1).item()


@pytest.mark.parametrize("cfg", [{**_EULER, **_SD},
                                 {**_EULER, "timestep_type": "continuous", "prediction_type": "v_prediction"},
                                 {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}])
def test_sigma_to_timestep_has_no_host_sync(cfg):
    s = schedules.from_diffusers_config(cfg, 12)
    sig = s.sigmas[:-1].float()
    s.sigma_to_timestep(sig[:1])  # first call on a device caches the table there
    with _FailOnHostSync():
        for i in range(s.steps):
            s.sigma_to_timestep(sig[i : i + 1] * torch.ones(3))
        s.sigma_to_timestep(s.sigmas)


@pytest.mark.gpu
def test_sigma_to_timestep_on_cuda_without_sync():
    s = schedules.from_diffusers_config(dict(_EULER, **_SD, use_karras_sigmas=True), 30)
    sig = s.sigmas.float().cuda()
    s.sigma_to_timestep(sig)  # table upload
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        t = s.sigma_to_timestep(sig)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert t.device.type == "cuda"
    torch.testing.assert_close(t.cpu(), s.sigma_to_timestep(s.sigmas.float()), rtol=0, atol=4 * 6.1e-5)


# ----------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------

BAD_CLOSED_FORM = [
    (lambda: schedules.karras(0, 0.1, 10), ValueError, "n must be >= 1"),
    (lambda: schedules.karras(2.5, 0.1, 10), TypeError, "n must be an int"),
    (lambda: schedules.karras(True, 0.1, 10), TypeError, "n must be an int"),
    (lambda: schedules.karras(5, 0.0, 10), ValueError, "sigma_min must be > 0"),
    (lambda: schedules.karras(5, -1.0, 10), ValueError, "sigma_min must be > 0"),
    (lambda: schedules.karras(5, float("nan"), 10), ValueError, "sigma_min must be finite"),
    (lambda: schedules.karras(5, 0.1, float("inf")), ValueError, "sigma_max must be finite"),
    (lambda: schedules.karras(5, 10.0, 0.1), ValueError, "sigma_min must be < sigma_max"),
    (lambda: schedules.karras(5, 1.0, 1.0), ValueError, "sigma_min must be < sigma_max"),
    (lambda: schedules.karras(5, "0.1", 10), TypeError, "sigma_min must be a float"),
    (lambda: schedules.karras(5, 0.1, 10, rho=0.0), ValueError, "rho must be > 0"),
    (lambda: schedules.exponential(0, 0.1, 10), ValueError, "n must be >= 1"),
    (lambda: schedules.exponential(5, 0.1, 0.05), ValueError, "sigma_min must be < sigma_max"),
    (lambda: schedules.polyexponential(5, 0.1, 10, rho=-1.0), ValueError, "rho must be > 0"),
    (lambda: schedules.flow_matching(5, shift=0.0), ValueError, "shift must be > 0"),
    (lambda: schedules.flow_matching(5, shift=float("nan")), ValueError, "shift must be finite"),
    (lambda: schedules.flow_matching(5, sigma_max=1.5), ValueError, "sigma_max must be <= 1"),
    (lambda: schedules.flow_matching(5, sigma_min=0.5, sigma_max=0.2), ValueError, "sigma_min must be < sigma_max"),
    (lambda: schedules.flow_matching(1001), ValueError, "n must be <= num_train_timesteps (1000)"),
    (lambda: schedules.get("cosine", 5), ValueError, "schedule 'cosine' is unknown; choose one of karras"),
    (lambda: schedules.simple(0), ValueError, "n must be >= 1"),
    (lambda: schedules.normal(5, [1.0, 0.5, 2.0]), ValueError, "model_sigmas must be the model's training sigmas"),
    (lambda: schedules.sgm_uniform(5, [0.0, 1.0]), ValueError, "model_sigmas must be"),
    (lambda: schedules.beta(5, alpha=0.0), ValueError, "alpha must be > 0"),
    (lambda: schedules.beta(5, beta=float("inf")), ValueError, "beta must be finite"),
    (lambda: schedules.align_your_steps(5, "sd3"), ValueError, "model must be one of sd15, sdxl, svd"),
    (lambda: schedules.discrete_sigmas(beta_start=0.02, beta_end=0.01), ValueError, "beta_start < beta_end"),
    (lambda: schedules.edm_sigmas(1.0, 0.5), ValueError, "sigma_min must be < sigma_max"),
]


@pytest.mark.parametrize("call,exc,message", BAD_CLOSED_FORM)
def test_bad_closed_form_input_names_the_argument(call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value)


BAD_CONFIG = [
    ({"beta_schedule": "cosine"}, 10, ValueError,
     ["config['beta_schedule'] = 'cosine'", "'linear', 'scaled_linear', 'squaredcos_cap_v2'"]),
    ({"_class_name": "DDIMScheduler", "beta_schedule": "exp"}, 10, ValueError, ["'exp'", "DDIMScheduler"]),
    ({"timestep_spacing": "uniform"}, 10, ValueError,
     ["config['timestep_spacing'] = 'uniform'", "'linspace', 'leading', 'trailing'"]),
    ({"_class_name": "PNDMScheduler"}, 10, ValueError,
     ["'PNDMScheduler'", "_class_name", "'EulerDiscreteScheduler'", "class_name="]),
    ({"prediction_type": "x0"}, 10, ValueError, ["config['prediction_type'] = 'x0'", "'epsilon'"]),
    ({"final_sigmas_type": "one"}, 10, ValueError, ["config['final_sigmas_type'] = 'one'", "'sigma_min'"]),
    ({"timestep_type": "log"}, 10, ValueError, ["config['timestep_type'] = 'log'", "'continuous'"]),
    ({"interpolation_type": "log_linear"}, 10, ValueError, ["config['interpolation_type'] = 'log_linear'"]),
    ({"use_beta_sigmas": True, "use_karras_sigmas": True}, 10, ValueError,
     ["config['use_karras_sigmas']", "config['use_beta_sigmas']", "choose one"]),
    ({"use_karras_sigmas": True, "use_exponential_sigmas": True}, 10, ValueError,
     ["config['use_karras_sigmas']", "config['use_exponential_sigmas']"]),
    ({"trained_betas": [0.01] * 10}, 10, ValueError, ["config['trained_betas']", "1000"]),
    ({"beta_start": float("nan")}, 10, ValueError, ["config['beta_start'] must be finite"]),
    ({"beta_end": 1.5}, 10, ValueError, ["config['beta_end']", "< 1"]),
    ({"steps_offset": -1}, 10, ValueError, ["config['steps_offset']", "-1"]),
    ({"num_train_timesteps": 1}, 1, ValueError, ["config['num_train_timesteps'] must be >= 2"]),
    ({}, 0, ValueError, ["steps must be >= 1, got 0"]),
    ({}, 1001, ValueError, ["steps must be <= config['num_train_timesteps'] (1000), got 1001"]),
    ({"num_train_timesteps": 100}, 101, ValueError, ["steps must be <= config['num_train_timesteps'] (100)"]),
    ({}, 2.0, TypeError, ["steps must be an int"]),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}, 10, ValueError,
     ["mu is required", "use_dynamic_shifting"]),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 0.0}, 10, ValueError,
     ["config['shift'] must be > 0"]),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True}, 10, ValueError,
     ["config['invert_sigmas']"]),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift_terminal": 0.1}, 1, ValueError,
     ["config['shift_terminal'] needs steps >= 2"]),
    ({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "flow_shift": -2.0}, 10, ValueError,
     ["config['flow_shift'] must be > 0"]),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_lu_lambdas": True, "use_karras_sigmas": True}, 10,
     ValueError, ["config['use_lu_lambdas']", "use_karras_sigmas"]),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True, "use_karras_sigmas": True}, 10,
     ValueError, ["config['use_flow_sigmas']", "use_karras_sigmas"]),
    ({"use_karras_sigmas": True, "sigma_min": 0.0}, 10, ValueError, ["config['sigma_min'] must be > 0"]),
    ({"use_karras_sigmas": True, "sigma_min": 200.0}, 10, ValueError, ["sigma_min", "sigma_max", "200.0"]),
]


@pytest.mark.parametrize("cfg,steps,exc,parts", BAD_CONFIG)
def test_bad_config_names_the_key_and_value(cfg, steps, exc, parts):
    with pytest.raises(exc) as info:
        schedules.from_diffusers_config({**_EULER, **cfg}, steps)
    for part in parts:
        assert part in str(info.value), f"{part!r} not in {str(info.value)!r}"


def test_bad_call_arguments():
    with pytest.raises(TypeError, match="config must be a dict"):
        schedules.from_diffusers_config([("beta_schedule", "linear")], 10)
    with pytest.raises(ValueError, match="mu = 0.5 was given"):
        schedules.from_diffusers_config(_EULER, 10, mu=0.5)
    with pytest.raises(ValueError, match="mu = 0.5 was given"):
        schedules.from_diffusers_config({"_class_name": "FlowMatchEulerDiscreteScheduler"}, 10, mu=0.5)
    with pytest.raises(ValueError, match="class_name = 'Nope' is not a supported"):
        schedules.from_diffusers_config(_EULER, 10, class_name="Nope")
    s = schedules.from_diffusers_config(_EULER, 10)
    with pytest.raises(TypeError, match="sigma must be a torch.Tensor"):
        s.sigma_to_timestep(1.0)
    with pytest.raises(TypeError, match="sigma must be a floating-point tensor"):
        s.sigma_to_timestep(torch.tensor([3]))
