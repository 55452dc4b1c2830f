"""The diffusers-compatible Scheduler against diffusers' own scheduler classes.

Three levels, each compared with the stock class implementing the same method:

* step by step, with a synthetic network (fast; every pair and the config options that change the path),
  txt2img and img2img, the whole trajectory and the generator's state afterwards;
* inside the tiny random pipelines (SD1.5, SDXL, Flux, SD3, PixArt-Sigma), txt2img and img2img;
* through ``diffusion_fast.sample(**scheduler.sampling_args())`` with a wrapper feeding
  ``scheduler.model_timestep(sigma)`` to the pipeline's own network (the fused loop's contract).

Tolerance: float32 whole trajectories, 1e-5 relative (max abs difference over max abs of diffusers' latents).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import diffusers  # a test dependency: without it these tests fail rather than skip
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import diffusion_fast as df
from diffusion_fast.integrations.diffusers import Scheduler
from diffusion_fast.integrations.diffusers import configs as C
from diffusion_fast.integrations.diffusers.scheduler import METHODS

diffusers.utils.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning", "ignore::FutureWarning")

RTOL = 1e-5
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
      "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False, "timestep_spacing": "leading"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds hand-off latency on a busy machine
    yield
    torch.set_num_threads(threads)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ----------------------------------------------------------------------------------------------------
# step by step, synthetic network
# ----------------------------------------------------------------------------------------------------

SHAPE = (2, 4, 5, 3)


def net(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth, timestep-dependent stand-in for a network (any prediction type reads it as its kind)."""
    tt = t.double() if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=torch.float64)
    w = torch.linspace(-1, 1, x.shape[1], dtype=torch.float64).view(1, -1, 1, 1)
    return (torch.tanh(0.7 * x.double() + 0.3 * w) * 0.9 + 0.05 * torch.cos(tt / 97.0) + 0.1 * x.double()).float()


def trajectory(sched, steps: int | None, *, begin: int | None = None, eta: float | None = None, seed: int = 0,
               t_free: bool = False, **set_kw):
    """Drive ``sched`` as a pipeline does; returns (latents after each step, pred_original_samples, generator)."""
    if steps is None:
        sched.set_timesteps(**set_kw)
    else:
        sched.set_timesteps(steps, **set_kw)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100))
    timesteps = sched.timesteps
    if begin is None:
        x = z * getattr(sched, "init_noise_sigma", 1.0)  # FlowMatchEuler has none: unit noise
    else:
        timesteps = timesteps[begin * sched.order:]
        if hasattr(type(sched), "set_begin_index"):  # DDIMScheduler has none: it finds the index by value
            sched.set_begin_index(begin * sched.order)
        x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)) * 0.5
        t0 = timesteps[:1].repeat(SHAPE[0])
        x = sched.add_noise(x0, z, t0) if hasattr(type(sched), "add_noise") else sched.scale_noise(x0, t0, z)
    xs, x0s = [x], []
    for t in timesteps:
        inp = sched.scale_model_input(x, t) if hasattr(type(sched), "scale_model_input") else x
        out = net(inp, 0.0 if t_free else t)
        kw = {} if eta is None else {"eta": eta}
        if "generator" in type(sched).step.__code__.co_varnames:
            kw["generator"] = gen
        res = sched.step(out, t, x, **kw)
        x = res.prev_sample
        xs.append(x)
        x0s.append(getattr(res, "pred_original_sample", None))
    return xs, x0s, gen


def assert_same_trajectory(ours, ref, what: str, rtol: float = RTOL) -> float:
    (xs, x0s, g), (rxs, rx0s, rg) = ours, ref
    assert len(xs) == len(rxs), f"{what}: {len(xs) - 1} steps, diffusers {len(rxs) - 1}"
    err = max(rel(a, b) for a, b in zip(xs, rxs))
    assert err <= rtol, f"{what}: latents differ by {err:.3g} relative"
    for a, b in zip(x0s, rx0s):
        if a is not None and b is not None:
            assert rel(a, b) <= rtol, f"{what}: pred_original_sample differs by {rel(a, b):.3g}"
    assert torch.equal(g.get_state(), rg.get_state()), f"{what}: a different number of noise draws"
    return err


# (diffusers class, config options): Scheduler.from_config(stock) picks the sampler implementing its method.
STEP_PAIRS = [
    ("EulerDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("EulerDiscreteScheduler", {"use_exponential_sigmas": True, "timestep_spacing": "trailing"}),
    ("EulerDiscreteScheduler", {"use_beta_sigmas": True}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "linspace", "final_sigmas_type": "sigma_min"}),
    ("EulerDiscreteScheduler", {"prediction_type": "sample"}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("EulerAncestralDiscreteScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("HeunDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    ("KDPM2DiscreteScheduler", {}),
    ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    ("LMSDiscreteScheduler", {}),
    ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    ("DDIMScheduler", {}),
    ("DDIMScheduler", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    ("DDIMScheduler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                       "prediction_type": "v_prediction"}),
    ("DDIMScheduler", {"set_alpha_to_one": True, "steps_offset": 0}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}),
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"euler_at_final": True, "final_sigmas_type": "sigma_min"}),
    ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True}),
    ("DPMSolverMultistepScheduler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                                     "prediction_type": "v_prediction"}),
    ("DPMSolverMultistepScheduler", {"solver_type": "heun"}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "solver_type": "heun"}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "solver_type": "heun", "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {}),
    ("UniPCMultistepScheduler", {"solver_order": 3}),
    ("UniPCMultistepScheduler", {"solver_type": "bh1"}),
    ("UniPCMultistepScheduler", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"}),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0,
                                     "prediction_type": "flow_prediction"}),
]


def _ids(v):
    return v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()) or "defaults"


@pytest.mark.parametrize("cls,kw", STEP_PAIRS, ids=_ids)
def test_steps_match_the_stock_class(cls, kw):
    cfg = {**SD, **kw}
    stock = getattr(diffusers, cls).from_config(cfg)  # set_timesteps starts each run afresh: one instance will do
    ours = Scheduler.from_config(stock)
    assert METHODS[ours.sampler].cls == cls and ours.config.schedule_class == cls
    for steps, begin in [(5, None), (16, None), (9, 3)]:
        ref = trajectory(stock, steps, begin=begin)
        assert_same_trajectory(trajectory(ours, steps, begin=begin), ref, f"{cls} {kw} steps={steps} begin={begin}")
        stock.set_timesteps(steps)
        ours.set_timesteps(steps)
        # the same timesteps (KDPM2's midpoints: diffusers maps them in float32, to within an ulp of t)
        assert ours.timesteps.dtype == stock.timesteps.dtype or cls == "KDPM2DiscreteScheduler"
        np.testing.assert_allclose(ours.timesteps.double().numpy(), stock.timesteps.double().numpy(),
                                   rtol=0, atol=1e-4 if cls == "KDPM2DiscreteScheduler" else 0)
        assert ours.order == stock.order and len(ours) == len(stock)
        assert float(ours.init_noise_sigma) == float(stock.init_noise_sigma)


@pytest.mark.parametrize("cls,kw", [
    ("EulerDiscreteScheduler", {"timesteps": [999, 800, 640.5, 250, 10]}),
    ("EulerDiscreteScheduler", {"sigmas": [14.0, 5.0, 1.25, 0.3, 0.0]}),
    ("EulerDiscreteScheduler", {"sigmas": [10.0, 2.0, 0.5, 0.05]}),
    ("HeunDiscreteScheduler", {"timesteps": [999, 700, 400, 100]}),
    ("DPMSolverMultistepScheduler", {"timesteps": [999, 750, 500, 250, 50]}),
], ids=lambda v: v if isinstance(v, str) else next(iter(v)))
def test_custom_timesteps_and_sigmas_as_the_stock_class(cls, kw):
    stock = getattr(diffusers, cls).from_config(SD)
    ours = Scheduler.from_config(stock)
    ref = trajectory(stock, None, **kw)
    assert_same_trajectory(trajectory(ours, None, **kw), ref, f"{cls} {kw}")
    np.testing.assert_array_equal(ours.timesteps.numpy(), stock.timesteps.numpy())
    args = ours.sampling_args()  # sample() over the same custom schedule
    assert args["sigmas"][-1].item() == pytest.approx(float(stock.sigmas[-1]), rel=1e-7)


def test_euler_with_zero_terminal_snr_is_within_the_stock_rounding():
    # Zero terminal SNR starts Euler's state at sigma 4096: float32 rounding of that state (ulp 2.4e-4 x |z|)
    # dominates both implementations. Both are compared with a float64 transcription of diffusers' update.
    cfg = {**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
    stock = diffusers.EulerDiscreteScheduler.from_config(cfg)
    ours = Scheduler.from_config(stock)
    ref, got = trajectory(stock, 10)[0][-1], trajectory(ours, 10)[0][-1]
    sig = stock.sigmas.double()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100)).double() * sig[0]
    for i, t in enumerate(stock.timesteps):
        s = sig[i]
        v = net((x / (s * s + 1).sqrt()).float(), t).double()
        d = x / (s * s + 1) - s / (s * s + 1).sqrt() * v
        x = x + (x - d) / s * (sig[i + 1] - s)
    err_stock, err_ours = rel(ref, x), rel(got, x)
    assert err_ours <= 2 * err_stock + 1e-6, (err_ours, err_stock)


def test_ddim_eta_is_the_step_argument_as_in_ddim():
    stock = diffusers.DDIMScheduler.from_config(SD)
    ours = Scheduler.from_config(stock)
    for begin in (None, 3):
        ref = trajectory(diffusers.DDIMScheduler.from_config(SD), 10, eta=0.7, begin=begin)
        assert_same_trajectory(trajectory(ours, 10, eta=0.7, begin=begin), ref, f"DDIM eta=0.7 begin={begin}")
    with pytest.raises(ValueError, match="eta is a per-step argument only for the 'ddim' sampler"):
        trajectory(Scheduler.from_config(diffusers.EulerAncestralDiscreteScheduler.from_config(SD)), 4, eta=0.3)
    # pipelines pass eta=0.0 to every scheduler whose step takes eta: ignored for the other samplers
    assert_same_trajectory(trajectory(Scheduler.from_config(diffusers.EulerAncestralDiscreteScheduler.from_config(SD)),
                                      6, eta=0.0),
                           trajectory(diffusers.EulerAncestralDiscreteScheduler.from_config(SD), 6), "eta=0.0")


def test_flow_matching_euler_matches_with_shift_dynamic_shift_and_custom_sigmas():
    cases = [({"shift": 3.0}, {}), ({"shift": 3.0, "use_karras_sigmas": True}, {}),
             ({"shift": 3.0, "use_exponential_sigmas": True}, {}),
             ({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}, {"mu": 0.77}),
             ({"use_dynamic_shifting": True}, {"mu": 0.9, "sigmas": np.linspace(1.0, 1 / 9, 9)}),
             ({"shift": 3.0, "shift_terminal": 0.05}, {})]
    for cfg, kw in cases:
        for begin in (None, 2):
            steps = None if "sigmas" in kw else 9
            stock = diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg)
            ours = Scheduler.from_config(stock)
            assert ours.sampler == "euler" and ours.config.schedule_class == "FlowMatchEulerDiscreteScheduler"
            ref = trajectory(stock, steps, begin=begin, **kw)
            assert_same_trajectory(trajectory(ours, steps, begin=begin, **kw), ref, f"flow {cfg} {kw} {begin}")


FLOW_CROSS = [  # our samplers in the flow parametrization against diffusers' flow-sigma classes
    ("unipc", "UniPCMultistepScheduler", {}),
    ("unipc", "UniPCMultistepScheduler", {"solver_order": 3}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {}),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
]


@pytest.mark.parametrize("sampler,cls,kw", FLOW_CROSS, ids=lambda v: v if isinstance(v, str) else None)
def test_other_samplers_run_in_the_flow_parametrization(sampler, cls, kw):
    # The same flow sigmas in both (diffusers' flow-sigma schedule, passed to a FlowMatch config with shift 1,
    # which leaves custom sigmas as they are): the step-by-step latents must agree. The network ignores t here:
    # these classes truncate their flow timesteps to integers, FlowMatchEuler's rules keep them.
    stock = getattr(diffusers, cls).from_config({"use_flow_sigmas": True, "flow_shift": 3.0,
                                                 "prediction_type": "flow_prediction", **kw})
    stock.set_timesteps(9)
    sigmas = stock.sigmas[:-1].double().numpy()
    opts = {"order": 3} if kw.get("solver_order") == 3 else {}
    ours = Scheduler.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0}, sampler=sampler,
                                 **opts)
    ref = trajectory(getattr(diffusers, cls).from_config(stock.config), 9, t_free=True)
    got = trajectory(ours, None, sigmas=sigmas, t_free=True)
    assert_same_trajectory(got, (ref[0], [None] * len(ref[1]), ref[2]), f"{sampler} flow")


def test_heun_in_flow_matches_flow_match_heun():
    cfg = {"shift": 3.0}
    stock = diffusers.FlowMatchHeunDiscreteScheduler.from_config(cfg)
    ours = Scheduler.from_config(stock)
    assert ours.sampler == "heun" and ours.order == 2
    ref = trajectory(diffusers.FlowMatchHeunDiscreteScheduler.from_config(cfg), 7)
    assert_same_trajectory(trajectory(ours, 7), ref, "flow heun")
    ours = Scheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg), sampler="dpm_2")
    xs = trajectory(ours, 7)[0]  # no diffusers counterpart: it runs, and ends near the flow-Euler result
    assert torch.isfinite(xs[-1]).all() and len(xs) == 2 * 7


class _CorrectedSDE3(diffusers.DPMSolverMultistepScheduler):
    """diffusers' third-order SDE-DPM-Solver++ with the sign of the 0.5 in its D2 weight as in k-diffusion."""

    def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **kw):
        s = self.sigmas
        i = self.step_index
        (a_t, s_t), (a0, s0), (a1, s1), (a2, s2) = (self._sigma_to_alpha_sigma_t(s[j])
                                                    for j in (i + 1, i, i - 1, i - 2))
        lt, l0, l1, l2 = (torch.log(a) - torch.log(sg) for a, sg in ((a_t, s_t), (a0, s0), (a1, s1), (a2, s2)))
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h_0, h_1 = lt - l0, l0 - l1, l1 - l2
        r0, r1 = h_0 / h, h_1 / h
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        e = torch.exp(-2.0 * h)
        return ((s_t / s0 * torch.exp(-h)) * sample + (a_t * (1.0 - e)) * m0
                + (a_t * ((1.0 - e) / (-2.0 * h) + 1.0)) * d1
                + (a_t * ((1.0 - e - 2.0 * h) / (2.0 * h) ** 2 + 0.5)) * d2
                + s_t * torch.sqrt(1.0 - e) * noise)


def test_dpmpp_3m_sde_differs_from_diffusers_only_by_its_d2_sign():
    cfg = {**SD, "algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun"}
    with pytest.warns(UserWarning, match="opposite sign on the 0.5"):
        ours = Scheduler.from_config(diffusers.DPMSolverMultistepScheduler.from_config(cfg))
    assert ours.sampler == "dpmpp_3m_sde" and ours.config.sampler_options["eta"] == 1.0
    for steps in (8, 20):
        got = trajectory(ours, steps)
        fixed = trajectory(_CorrectedSDE3.from_config(cfg), steps)
        assert_same_trajectory(got, fixed, f"3M SDE vs corrected diffusers, {steps} steps")
        stock = trajectory(diffusers.DPMSolverMultistepScheduler.from_config(cfg), steps)
        first_two = max(rel(a, b) for a, b in zip(got[0][:3], stock[0][:3]))
        assert first_two <= RTOL  # first- and second-order start-up steps agree
        assert rel(got[0][-1], stock[0][-1]) > 1e-3  # then diffusers' D2 weight takes them apart


# ----------------------------------------------------------------------------------------------------
# the scheduler API
# ----------------------------------------------------------------------------------------------------


def test_config_round_trips_through_save_pretrained_and_from_config(tmp_path):
    stock = diffusers.UniPCMultistepScheduler.from_config({**SD, "solver_order": 3, "use_karras_sigmas": True})
    ours = Scheduler.from_config(stock)
    assert ours.config.sampler == "unipc" and ours.config.sampler_options == {"order": 3, "variant": "bh2"}
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "Scheduler" and saved["schedule_class"] == "UniPCMultistepScheduler"
    loaded = Scheduler.from_pretrained(tmp_path)
    again = Scheduler.from_config(ours.config)
    for other in (loaded, again):
        assert {k: v for k, v in other.config.items() if not k.startswith("_")} == \
               {k: v for k, v in ours.config.items() if not k.startswith("_")}
        assert_same_trajectory(trajectory(other, 7), trajectory(ours, 7), "round trip")
    unused = Scheduler.from_config(ours.config, return_unused_kwargs=True)
    assert isinstance(unused, tuple) and unused[1] == {}
    # switching the sampler of a saved scheduler takes the new sampler's class rules
    dpm = Scheduler.from_config(loaded.config, sampler="dpmpp_2m")
    assert dpm.config.schedule_class == "DPMSolverMultistepScheduler" and dpm.config.use_karras_sigmas
    # and back to a stock class, as diffusers users switch schedulers
    back = diffusers.UniPCMultistepScheduler.from_config(ours.config)
    assert_same_trajectory(trajectory(ours, 7), trajectory(back, 7), "back to UniPC")


def test_pipelines_read_the_source_config_keys():
    flux = diffusers.FlowMatchEulerDiscreteScheduler.from_config(C.scheduler_config("flux"))
    ours = Scheduler.from_config(flux)
    for key in ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "use_dynamic_shifting",
                "shift", "num_train_timesteps"):
        assert ours.config[key] == flux.config[key] and getattr(ours.config, key) == flux.config[key]
    assert not ours.config.get("use_flow_sigmas", False)


def test_sampler_switch_converts_the_config_as_diffusers_from_config():
    pndm = diffusers.PNDMScheduler.from_config(C.scheduler_config("sd15"))
    for sampler, method in METHODS.items():
        if sampler == "dpmpp_3m_sde":
            continue
        ours = Scheduler.from_config(pndm, sampler=sampler)
        stock_cls = getattr(diffusers, method.cls)
        extra = {"clip_sample": False} if method.cls == "DDIMScheduler" else {}
        stock = stock_cls.from_config({**pndm.config, **extra}) if extra else stock_cls.from_config(pndm.config)
        if sampler == "dpmpp_2m_sde":
            stock = stock_cls.from_config(pndm.config, algorithm_type="sde-dpmsolver++")
        for k, v in stock.config.items():
            if not k.startswith("_"):
                assert ours.config[k] == v, (sampler, k, ours.config[k], v)
        assert_same_trajectory(trajectory(ours, 6), trajectory(stock, 6), f"PNDM config -> {sampler}")


def test_step_runs_one_fused_launch_without_host_sync(monkeypatch):
    import diffusion_fast.integrations.diffusers.scheduler as mod

    calls = []
    real = mod.sampler_step

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(mod, "sampler_step", spy)
    for cls, kw in [("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
                    ("HeunDiscreteScheduler", {}), ("UniPCMultistepScheduler", {}), ("LMSDiscreteScheduler", {})]:
        ours = Scheduler.from_config(getattr(diffusers, cls).from_config({**SD, **kw}))
        ours.set_timesteps(6)
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        x = z * ours.init_noise_sigma
        g = torch.Generator().manual_seed(1)
        calls.clear()
        with _FailOnHostSync():  # timesteps from ours.timesteps are located by address, not by value
            for t in ours.timesteps:
                out = net(ours.scale_model_input(x, t), t)
                x = ours.step(out, t, x, generator=g).prev_sample
            ours.model_timestep(torch.full((3,), 2.5))
        assert len(calls) == len(ours.timesteps), cls
    # img2img: add_noise and the loop with a begin index
    ours = Scheduler.from_config(diffusers.EulerDiscreteScheduler.from_config(SD))
    ours.set_timesteps(6)
    ours.set_begin_index(2)
    with _FailOnHostSync():
        x = ours.add_noise(torch.ones(SHAPE), torch.randn(SHAPE), ours.timesteps[2:3].repeat(SHAPE[0]))
        for t in ours.timesteps[2:]:
            x = ours.step(net(ours.scale_model_input(x, t), t), t, x).prev_sample


_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "allclose"}


class _FailOnHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _SYNC_OPS:
            raise AssertionError(f"host synchronisation: aten.{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


@pytest.mark.gpu
@pytest.mark.parametrize("cls,kw", [("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
                                    ("HeunDiscreteScheduler", {}), ("EulerDiscreteScheduler", {})])
def test_cuda_steps_never_synchronise(cls, kw):
    ours = Scheduler.from_config(getattr(diffusers, cls).from_config({**SD, **kw}))
    dev = torch.device("cuda")
    ours.set_timesteps(8, device=dev)  # uploads the tables; img2img would upload again at set_begin_index
    ours.set_begin_index(2 * ours.order)
    x = torch.randn(SHAPE, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    sig = torch.full((2,), 3.0, device=dev)
    ours.model_timestep(sig)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in ours.timesteps[2 * ours.order:]:
            x = ours.step(torch.tanh(ours.scale_model_input(x, t)), t, x, generator=g).prev_sample
            ours.model_timestep(sig)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x).all()


def test_timesteps_passed_by_value_find_their_index_as_diffusers():
    stock = diffusers.HeunDiscreteScheduler.from_config(SD)
    ours = Scheduler.from_config(stock)
    for s in (stock, ours):
        s.set_timesteps(6)
    for j in range(len(ours.timesteps)):
        t = ours.timesteps[j].clone()  # not a view: looked up by value, second match first (diffusers' rule)
        assert ours.index_for_timestep(t) == stock.index_for_timestep(stock.timesteps[j].clone())
        assert ours.index_for_timestep(ours.timesteps[j]) == stock.index_for_timestep(stock.timesteps[j])
    with pytest.raises(ValueError, match="is not one of scheduler.timesteps"):
        ours.index_for_timestep(torch.tensor(123.456))


def test_model_timestep_gives_the_stock_timesteps_at_the_evaluation_sigmas():
    for cls, kw in [("KDPM2DiscreteScheduler", {}), ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
                    ("HeunDiscreteScheduler", {}), ("DDIMScheduler", {})]:
        ours = Scheduler.from_config(getattr(diffusers, cls).from_config({**SD, **kw}))
        ours.set_timesteps(8)
        plan = df.samplers.build_plan(ours.sampler, ours.sampling_args()["sigmas"], prediction="epsilon")
        sig = torch.as_tensor(plan.sigma_eval, dtype=torch.float32)  # what sample() hands the model
        t = ours.model_timestep(sig.reshape(-1, 1).expand(-1, 2))
        assert t.dtype == ours.timesteps.dtype and t.shape == (len(sig), 2)
        assert torch.equal(t[:, 0], ours.timesteps) and torch.equal(t[:, 1], ours.timesteps)
        off = ours.model_timestep(torch.tensor([3.3]))
        near = ours.schedule.sigma_to_timestep(torch.tensor([3.3]))
        assert abs(off.double().item() - near.item()) <= 0.5


def test_latents_conventions():
    for cls, space in [("EulerDiscreteScheduler", "ve"), ("DDIMScheduler", "vp"), ("UniPCMultistepScheduler", "vp")]:
        ours = Scheduler.from_config(getattr(diffusers, cls).from_config(SD))
        ours.set_timesteps(10)
        assert ours.schedule.latent_space == space
        lat = torch.randn(SHAPE)
        s0 = ours.schedule.sigmas[0].item()
        k = math.sqrt(s0 * s0 + 1) if space == "vp" else 1.0
        torch.testing.assert_close(ours.latents_to_state(lat), lat * k, rtol=0, atol=0)
        s_end = ours.schedule.final_sigma  # SD's DDIM config ends at alphas_cumprod[0] (set_alpha_to_one=False)
        assert (s_end > 0) == (cls == "DDIMScheduler")
        k_end = math.sqrt(s_end * s_end + 1) if space == "vp" else 1.0
        torch.testing.assert_close(ours.state_to_latents(lat), lat / k_end, rtol=0, atol=0)
        ours.set_begin_index(4)
        s4 = ours.schedule.sigmas[4].item()
        k = math.sqrt(s4 * s4 + 1) if space == "vp" else 1.0
        torch.testing.assert_close(ours.latents_to_state(lat), lat * k, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------

BAD_FROM_CONFIG = [
    (lambda: Scheduler.from_config(diffusers.PNDMScheduler.from_config(SD)), ValueError,
     ["PNDMScheduler has no matching sampler", "pass sampler="]),
    (lambda: Scheduler.from_config(diffusers.DDPMScheduler.from_config(SD)), ValueError,
     ["DDPMScheduler has no matching sampler"]),
    (lambda: Scheduler.from_config(dict(diffusers.EulerDiscreteScheduler.from_config(SD).config)), ValueError,
     ["a config without '_class_name'", "pass the scheduler object itself", "sampler="]),
    (lambda: Scheduler.from_config(SD, sampler="plms"), ValueError, ["sampler must be one of", "'plms'"]),
    (lambda: Scheduler.from_config({**SD, "_class_name": "EulerDiscreteScheduler"}, sampler="euler", eta=0.5),
     ValueError, ["option 'eta' does not apply to sampler 'euler'"]),
    (lambda: Scheduler.from_config(diffusers.EulerDiscreteScheduler.from_config(C.scheduler_config("sdxl")),
                                   sampler="ddim"), ValueError,
     ["config['clip_sample'] = True is not supported", "pass the config with clip_sample=False"]),
    (lambda: Scheduler.from_config({**SD, "_class_name": "DDIMScheduler", "thresholding": True}), ValueError,
     ["config['thresholding'] = True"]),
    (lambda: Scheduler.from_config({**SD, "_class_name": "DPMSolverMultistepScheduler",
                                    "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}), ValueError,
     ["algorithm_type='dpmsolver'", "noise-prediction DPM-Solver has no sampler", "sampler="]),
    (lambda: Scheduler.from_config({**SD, "_class_name": "DPMSolverMultistepScheduler", "solver_order": 1}),
     ValueError, ["solver_order=1", "no sampler here takes first-order"]),
    (lambda: Scheduler.from_config({**SD, "_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}),
     ValueError, ["solver_order=3", "midpoint", "sampler='dpmpp_3m_sde'"]),
    (lambda: Scheduler.from_config({**SD, "_class_name": "DPMSolverMultistepScheduler",
                                    "variance_type": "learned_range"}), ValueError, ["config['variance_type']"]),
    (lambda: Scheduler.from_config({**SD, "_class_name": "UniPCMultistepScheduler", "disable_corrector": [0]}),
     ValueError, ["config['disable_corrector'] = [0]"]),
    (lambda: Scheduler.from_config({**SD, "_class_name": "UniPCMultistepScheduler", "lower_order_final": False}),
     ValueError, ["config['lower_order_final'] = False"]),
    (lambda: Scheduler.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "stochastic_sampling": True}),
     ValueError, ["config['stochastic_sampling'] = True"]),
    (lambda: Scheduler.from_config({**SD, "_class_name": "EulerDiscreteScheduler", "beta_schedule": "cosine"}),
     ValueError, ["config['beta_schedule'] = 'cosine'"]),
    (lambda: Scheduler.from_config([1, 2]), TypeError, ["config must be a diffusers scheduler or a config dict"]),
    (lambda: Scheduler.from_config({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True,
                                    "prediction_type": "flow_prediction"}, sampler="euler"), ValueError,
     ["config['prediction_type'] = 'flow_prediction' (a flow velocity) needs flow sigmas"]),
    (lambda: Scheduler.from_config({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True}), ValueError,
     ["config['use_flow_sigmas'] = True needs prediction_type='flow_prediction'"]),
]


@pytest.mark.parametrize("call,exc,parts", BAD_FROM_CONFIG)
def test_bad_configs_are_refused_with_what_to_pass(call, exc, parts):
    with pytest.raises(exc) as info:
        call()
    for part in parts:
        assert part in str(info.value), f"{part!r} not in {str(info.value)!r}"


def _euler():
    return Scheduler.from_config(diffusers.EulerDiscreteScheduler.from_config(SD))


def _stepped(sampler_cls, kw, steps=6, begin=None):
    s = Scheduler.from_config(getattr(diffusers, sampler_cls).from_config({**SD, **kw}))
    s.set_timesteps(steps)
    if begin is not None:
        s.set_begin_index(begin * s.order)
    return s


BAD_CALLS = [
    (lambda: _euler().step(torch.zeros(SHAPE), 1.0, torch.zeros(SHAPE)), ValueError, ["call set_timesteps first"]),
    (lambda: _euler().sampling_args(), ValueError, ["call set_timesteps first"]),
    (lambda: _stepped("HeunDiscreteScheduler", {}).set_begin_index(3), ValueError,
     ["multiple of order=2", "got 3"]),
    (lambda: _stepped("DDIMScheduler", {}).set_timesteps(timesteps=[900, 500]), ValueError,
     ["timesteps= is not accepted for DDIMScheduler"]),
    (lambda: _stepped("EulerDiscreteScheduler", {}).scale_noise(torch.zeros(SHAPE), torch.tensor([1.0]),
                                                               torch.zeros(SHAPE)), ValueError,
     ["scale_noise is the flow-matching forward process", "use add_noise"]),
    (lambda: _stepped("EulerDiscreteScheduler", {}).step(torch.zeros(SHAPE), torch.tensor(999.0), torch.zeros(SHAPE),
                                                        s_churn=0.5), ValueError,
     ["step(s_churn=0.5) is not supported"]),
    (lambda: _stepped("EulerDiscreteScheduler", {}).step(torch.zeros(SHAPE), torch.tensor(999.0), torch.zeros(SHAPE),
                                                        nope=1), TypeError, ["unexpected keyword argument 'nope'"]),
    (lambda: _stepped("EulerDiscreteScheduler", {}).step(torch.zeros(2, 3), torch.tensor(999.0), torch.zeros(SHAPE)),
     ValueError, ["model_output (2, 3) and sample"]),
    (lambda: _stepped("DDIMScheduler", {"timestep_spacing": "trailing"}, steps=30).sampling_args(), ValueError,
     ["DDIMScheduler steps from t to t - T // steps", "use step()"]),
    (lambda: _stepped("LMSDiscreteScheduler", {}, begin=2).sampling_args(), ValueError,
     ["LMSDiscreteScheduler keeps its full-schedule coefficients", "use step()"]),
    (lambda: _stepped("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}).sampling_args(), ValueError,
     ["lowers its order on the last steps", "final_sigmas_type='zero'"]),
    (lambda: _stepped("UniPCMultistepScheduler", {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True})
     .sampling_args(), ValueError, ["corrector on the zero-length final step"]),
    (lambda: _stepped("DDIMScheduler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                                        "prediction_type": "v_prediction"}, steps=10).sampling_args(), ValueError,
     ["alphas_cumprod = 0", "use step()"]),
    (lambda: _stepped("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, steps=61), ValueError,
     ["num_inference_steps = 61 with 'trailing' spacing", "62 timesteps"]),
    (lambda: _stepped("EulerDiscreteScheduler", {}).model_timestep(3.0), TypeError,
     ["sigma must be a floating-point torch.Tensor"]),
]


@pytest.mark.parametrize("call,exc,parts", BAD_CALLS)
def test_bad_calls_are_refused_with_what_to_do(call, exc, parts):
    with pytest.raises(exc) as info:
        call()
    for part in parts:
        assert part in str(info.value), f"{part!r} not in {str(info.value)!r}"


def test_stepping_past_the_schedule_is_refused():
    s = _stepped("EulerDiscreteScheduler", {}, steps=3)
    x = torch.randn(SHAPE)
    for t in s.timesteps:
        x = s.step(net(x, t), t, x).prev_sample
    with pytest.raises(ValueError, match="past the 3 steps of the schedule"):
        s.step(net(x, t), t, x)


def test_importing_diffusion_fast_imports_no_diffusers():
    code = ("import sys, diffusion_fast, diffusion_fast.integrations.diffusers as d; "
            "print([m for m in ('diffusers', 'transformers') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# ----------------------------------------------------------------------------------------------------
# inside the pipelines
# ----------------------------------------------------------------------------------------------------

STEPS = 6
IMAGE = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def sd15():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        txt = C.pipeline("sd15")
        img = C.pipeline("sd15-img2img", text_encoders=False)
    img.text_encoder, img.tokenizer = txt.text_encoder, txt.tokenizer  # same seed: same weights elsewhere
    return {"txt": txt, "img": img}


def _sd_call(pipe, sched, i2i: bool, steps: int = STEPS, **extra):
    pipe.scheduler = sched
    kw = dict(prompt="a red cat", num_inference_steps=steps, output_type="latent", guidance_scale=GUIDANCE,
              generator=torch.Generator().manual_seed(0), **extra)
    kw.update(image=IMAGE, strength=0.6) if i2i else kw.update(height=16, width=16)
    return pipe(**kw).images


def _sd_fused(pipe, sched, i2i: bool, eta: float | None = None, steps: int = STEPS):
    """The fused loop's contract: the pipeline's own pieces around diffusion_fast.sample(**sampling_args)."""
    pipe.scheduler = sched
    dev, gen = torch.device("cpu"), torch.Generator().manual_seed(0)
    cond, uncond = pipe.encode_prompt("a red cat", dev, 1, True, None)
    sched.set_timesteps(steps, device=dev)
    if i2i:
        timesteps, _ = pipe.get_timesteps(steps, 0.6, dev)
        image = pipe.image_processor.preprocess(IMAGE)
        latents = pipe.prepare_latents(image, timesteps[:1].repeat(1), 1, 1, cond.dtype, dev, gen)
    else:
        latents = pipe.prepare_latents(1, 4, 16, 16, cond.dtype, dev, gen, None)

    def model(x, sigma, ctx):
        return pipe.unet(x, sched.model_timestep(sigma), encoder_hidden_states=ctx, return_dict=False)[0]

    args = sched.sampling_args()
    if eta is not None:
        args["eta"] = eta
    out = df.sample(model, sched.latents_to_state(latents), cond=cond, uncond=uncond, guidance_scale=GUIDANCE,
                    generator=gen, **args)
    return sched.state_to_latents(out)


@pytest.mark.parametrize("cfg,sampler", [
    ({"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading", "steps_offset": 1}, "euler"),
    ({"_class_name": "DDIMScheduler", "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}, "ddim"),
])
def test_readme_sampling_example_walks_the_diffusers_trajectory(sd15, cfg, sampler):
    """The README's example 3 (from_diffusers_config + sample with a diffusers UNet), against the stock pipeline:
    it starts from init_noise_sigma (not sigmas[0]) and ends where diffusers ends (DDIM's final alpha)."""
    from diffusion_fast.schedules import from_diffusers_config

    cfg = {**cfg, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    pipe = sd15["txt"]
    pipe.scheduler = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    ref = pipe(prompt="a red cat", num_inference_steps=STEPS, output_type="latent", guidance_scale=7.5,
               generator=torch.Generator().manual_seed(0), height=16, width=16).images
    text_emb, empty_emb = pipe.encode_prompt("a red cat", "cpu", 1, True, None)
    unet = pipe.unet

    sched = from_diffusers_config(cfg, steps=STEPS)
    x = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    eps = lambda x, s, c: unet(x, sched.sigma_to_timestep(s), encoder_hidden_states=c).sample  # noqa: E731
    out = df.sample(eps, x, sched.sigmas, sampler, prediction=sched.prediction_type, guidance_scale=7.5,
                    cond=text_emb, uncond=empty_emb)

    if sched.latent_space == "vp":  # DDIM holds unit-variance latents: the state over sqrt(sigma^2 + 1)
        out = out / math.sqrt(sched.final_sigma**2 + 1)
    assert sched.final_sigma > 0 if sampler == "ddim" else sched.final_sigma == 0
    assert rel(out, ref) <= RTOL, rel(out, ref)


SD_PAIRS = [(s, m.cls, {}) for s, m in METHODS.items() if s != "dpmpp_3m_sde"] + [
    ("dpmpp_3m_sde", "DPMSolverMultistepScheduler", {"solver_order": 3, "solver_type": "heun"}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("euler", "EulerDiscreteScheduler", {"timestep_spacing": "trailing", "use_karras_sigmas": True}),
]


@pytest.mark.parametrize("i2i", [False, True], ids=["txt2img", "img2img"])
@pytest.mark.parametrize("sampler,cls,kw", SD_PAIRS, ids=lambda v: v if isinstance(v, str) else None)
def test_sd15_pipeline_gives_the_stock_latents(sd15, sampler, cls, kw, i2i):
    pipe = sd15["img" if i2i else "txt"]
    base = diffusers.PNDMScheduler.from_config(C.scheduler_config("sd15"))
    stock = getattr(diffusers, cls).from_config(base.config, **kw)
    if cls == "DPMSolverMultistepScheduler" and sampler == "dpmpp_2m_sde":
        stock = getattr(diffusers, cls).from_config(base.config, algorithm_type="sde-dpmsolver++", **kw)
    extra = {"eta": 0.5} if sampler == "ddim" else {}
    ref = _sd_call(pipe, stock, i2i, **extra)
    ours = Scheduler.from_config(stock)
    assert ours.sampler == sampler
    err = rel(_sd_call(pipe, ours, i2i, **extra), ref)
    assert err <= RTOL, f"{sampler} {kw}: pipeline latents differ by {err:.3g}"
    steps = STEPS
    if sampler == "lms" and i2i:
        with pytest.raises(ValueError, match="LMSDiscreteScheduler keeps its full-schedule coefficients"):
            _sd_fused(pipe, Scheduler.from_config(stock), i2i)
        return
    if sampler == "dpmpp_3m_sde" and not i2i:  # below 15 steps, DPM-Solver's second-last step is second order
        with pytest.raises(ValueError, match="lowers its order on the last steps"):
            _sd_fused(pipe, Scheduler.from_config(stock), i2i)
        steps = 16
        ref = _sd_call(pipe, stock, i2i, steps=steps)
    fused = rel(_sd_fused(pipe, Scheduler.from_config(stock), i2i, eta=extra.get("eta"), steps=steps), ref)
    assert fused <= RTOL, f"{sampler} {kw}: sample(**sampling_args) differs by {fused:.3g}"


def _call(pipe, name, steps=STEPS):
    kw = dict(num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0))
    if name.startswith("sdxl"):
        kw["prompt"] = "a red cat"
    else:
        kw.update(C.conditioning(name))
    if name.endswith("img2img"):
        kw.update(image=IMAGE, strength=0.6)
    else:
        kw.update(height=16, width=16)
    return pipe(**kw).images


@pytest.mark.parametrize("name", ["sdxl", "sdxl-img2img", "flux", "flux-img2img", "sd3", "sd3-img2img",
                                  "pixart-sigma"])
def test_other_pipelines_give_the_stock_latents(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = C.pipeline(name)
    ref = _call(pipe, name)
    pipe.scheduler = Scheduler.from_config(pipe.scheduler)
    err = rel(_call(pipe, name), ref)
    assert err <= RTOL, f"{name}: {err:.3g}"


def test_sd3_fused_loop_contract():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = C.pipeline("sd3")
    cond = C.conditioning("sd3")
    ref = pipe(num_inference_steps=STEPS, output_type="latent", generator=torch.Generator().manual_seed(0),
               height=16, width=16, guidance_scale=GUIDANCE, **cond).images
    sched = Scheduler.from_config(pipe.scheduler)
    pipe.scheduler = sched
    gen = torch.Generator().manual_seed(0)
    latents = pipe.prepare_latents(1, pipe.transformer.config.in_channels, 16, 16, torch.float32, "cpu", gen, None)
    sched.set_timesteps(STEPS)
    pooled = torch.cat([cond["negative_pooled_prompt_embeds"], cond["pooled_prompt_embeds"]])

    def model(x, sigma, ctx):
        return pipe.transformer(hidden_states=x, timestep=sched.model_timestep(sigma), encoder_hidden_states=ctx,
                                pooled_projections=pooled, return_dict=False)[0]

    out = df.sample(model, sched.latents_to_state(latents), cond=cond["prompt_embeds"],
                    uncond=cond["negative_prompt_embeds"], guidance_scale=GUIDANCE, generator=gen,
                    **sched.sampling_args())
    err = rel(sched.state_to_latents(out), ref)
    assert err <= RTOL, err


def test_flux_fused_loop_contract():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = C.pipeline("flux")
    cond = C.conditioning("flux")
    ref = pipe(num_inference_steps=STEPS, output_type="latent", generator=torch.Generator().manual_seed(0),
               height=16, width=16, **cond).images
    sched = Scheduler.from_config(pipe.scheduler)
    pipe.scheduler = sched
    gen = torch.Generator().manual_seed(0)
    c = pipe.transformer.config.in_channels // 4
    latents, image_ids = pipe.prepare_latents(1, c, 16, 16, torch.float32, "cpu", gen, None)
    text_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3)
    mu = diffusers.pipelines.flux.pipeline_flux.calculate_shift(
        latents.shape[1], sched.config.base_image_seq_len, sched.config.max_image_seq_len,
        sched.config.base_shift, sched.config.max_shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    guidance = torch.full([1], 3.5) if pipe.transformer.config.guidance_embeds else None

    def model(x, sigma):
        return pipe.transformer(hidden_states=x, timestep=sched.model_timestep(sigma) / 1000, guidance=guidance,
                                pooled_projections=cond["pooled_prompt_embeds"],
                                encoder_hidden_states=cond["prompt_embeds"], txt_ids=text_ids, img_ids=image_ids,
                                return_dict=False)[0]

    out = df.sample(model, sched.latents_to_state(latents), generator=gen, **sched.sampling_args())
    err = rel(sched.state_to_latents(out), ref)
    assert err <= RTOL, err


if __name__ == "__main__":
    # The table of measured differences: python tests/test_diffusers_scheduler.py
    torch.set_num_threads(1)
    pipes = {"txt": C.pipeline("sd15"), "img": C.pipeline("sd15-img2img")}
    print(f"{'sampler':14s} {'diffusers class (options)':62s} {'mode':8s} {'step()':>9s} {'sample()':>9s}")
    for sampler, cls, kw in SD_PAIRS + [("dpmpp_3m_sde", "DPMSolverMultistepScheduler",
                                         {"algorithm_type": "sde-dpmsolver++", "solver_order": 3,
                                          "solver_type": "heun"})]:
        for i2i in (False, True):
            base = diffusers.PNDMScheduler.from_config(C.scheduler_config("sd15"))
            if sampler == "dpmpp_2m_sde":
                kw = {"algorithm_type": "sde-dpmsolver++", **kw}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                stock = getattr(diffusers, cls).from_config(base.config, **kw)
                extra = {"eta": 0.5} if sampler == "ddim" else {}
                pipe = pipes["img" if i2i else "txt"]
                ref = _sd_call(pipe, stock, i2i, **extra)
                step = rel(_sd_call(pipe, Scheduler.from_config(stock), i2i, **extra), ref)
                try:
                    fused = f"{rel(_sd_fused(pipe, Scheduler.from_config(stock), i2i, extra.get('eta')), ref):9.2e}"
                except ValueError:
                    fused = "  refused"
                if sampler == "dpmpp_3m_sde":
                    ref16 = _sd_call(pipe, stock, i2i, steps=16)
                    fused += f" {rel(_sd_fused(pipe, Scheduler.from_config(stock), i2i, steps=16), ref16):9.2e} (16)"
            print(f"{sampler:14s} {cls + ' ' + str(kw):62s} {'img2img' if i2i else 'txt2img':8s} {step:9.2e} {fused}")
    for name in ["sdxl", "sdxl-img2img", "flux", "flux-img2img", "sd3", "sd3-img2img", "pixart-sigma"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = C.pipeline(name)
            ref = _call(pipe, name)
            pipe.scheduler = Scheduler.from_config(pipe.scheduler)
            err = rel(_call(pipe, name), ref)
        print(f"{pipe.scheduler.sampler:14s} {name + ' pipeline':62s} {'':8s} {err:9.2e}")
