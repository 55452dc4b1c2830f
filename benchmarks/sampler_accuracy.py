"""Each sampler's measured order and its distance from the reference loop, as one table.

    python benchmarks/sampler_accuracy.py

* order: the slope of log(max trajectory error) against log(steps) for 32..256 steps on Gaussian data, where
  the probability-flow ODE is solved exactly (stochastic samplers with their noise off: eta = 0, s_churn = 0),
  in the VE and the flow parametrization — the number tests/test_samplers.py checks against ``ORDERS``;
* float32 / float64: the largest absolute difference between ``diffusion_fast.sample`` (float32 and float64
  state) and the literal transcription of the reference loop in tests/ (k-diffusion's ``sample_*``, or
  ComfyUI's), same Karras schedule (12 steps, 12 -> 0.03), same noise, start ``x ~ 12 * N(0, 1)``, final
  values of size ~1. deis is compared with ComfyUI's 10,000-point coefficient sums, dpm_adaptive in float32
  with k-diffusion's float64 run (its float32 step sizes differ); the first ten's float64 gap includes their
  transcriptions' float32 noise arithmetic.

Numbers, not time: the result does not depend on the machine's load.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_sampler_references as R  # noqa: E402
import test_samplers as T  # noqa: E402

import diffusion_fast as df  # noqa: E402
from diffusion_fast.samplers.tables import ORDERS, build_plan  # noqa: E402

DETERMINISTIC_OPTS = {"dpm_2_ancestral": {"eta": 0.0}, "dpmpp_2s_ancestral": {"eta": 0.0}, "dpmpp_sde": {"eta": 0.0},
                      "dpmpp_2m_sde": {"eta": 0.0}, "dpmpp_3m_sde": {"eta": 0.0},
                      "res_multistep_ancestral": {"eta": 0.0}}

REFERENCES = {  # sampler -> (reference loop, how it is called: "noise" (noise_sampler), "randn", "plain")
    "euler": (lambda m, x, s, n: R.kd_euler(m, x, s, n.randn, s_churn=24.0), {"s_churn": 24.0}),
    "heun": (lambda m, x, s, n: R.kd_heun(m, x, s, n.randn, s_churn=24.0), {"s_churn": 24.0}),
    "dpm_2": (lambda m, x, s, n: R.kd_dpm_2(m, x, s, n.randn, s_churn=24.0), {"s_churn": 24.0}),
    "dpm_2_ancestral": (R.kd_dpm_2_ancestral, {}),
    "dpmpp_2s_ancestral": (R.kd_dpmpp_2s_ancestral, {}),
    "dpmpp_sde": (R.kd_dpmpp_sde, {}),
    "dpm_fast": (lambda m, x, s, n: R.kd_dpm_fast(m, x, s, n, eta=0.5), {"eta": 0.5}),
    "lcm": (R.comfy_lcm, {}),
    "ddpm": (R.comfy_ddpm, {}),
    "ipndm": (lambda m, x, s, n: R.comfy_ipndm(m, x, s), {}),
    "ipndm_v": (lambda m, x, s, n: R.comfy_ipndm_v(m, x, s), {}),
    "res_multistep": (lambda m, x, s, n: R.comfy_res_multistep(m, x, s, n, eta=0.0), {}),
    "res_multistep_ancestral": (R.comfy_res_multistep, {}),
    "uni_pc": (lambda m, x, s, n: R.comfy_unipc(m, x, s, "bh1"), {}),
    "uni_pc_bh2": (lambda m, x, s, n: R.comfy_unipc(m, x, s, "bh2"), {}),
    "euler_ancestral": (lambda m, x, s, n: T.kd_euler_ancestral(m, x, s.tolist(), n.g), {}),
    "lms": (lambda m, x, s, n: T.kd_lms(m, x, s.tolist(), None), {}),
    "dpmpp_2m": (lambda m, x, s, n: T.kd_dpmpp_2m(m, x, s.tolist(), None), {}),
    "dpmpp_2m_sde": (lambda m, x, s, n: T.kd_dpmpp_2m_sde(m, x, s.tolist(), n.g), {}),
    "dpmpp_3m_sde": (lambda m, x, s, n: T.kd_dpmpp_3m_sde(m, x, s.tolist(), n.g), {}),
    # ComfyUI's own 10,000-point sums for the DEIS weights (ours: exact integrals): the gap is that sum's error
    "deis": (lambda m, x, s, n: R.comfy_deis(m, x, s, R.comfy_deis_coeff_list(s, 3)), {}),
    "dpm_adaptive": (lambda m, x, s, n: R.KDPMSolver(m).dpm_solver_adaptive(
        x, -s[0].log(), -s[-2].log(), noise_sampler=n)[0], {}),
}
# The first ten's transcriptions (tests/test_samplers.py) draw float32 noise from a generator.
FLOAT32_NOISE = ("euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde")


def order(name: str, parametrization: str) -> float | None:
    if name in ("lcm", "ddpm", "dpm_adaptive", "euler_ancestral") or (parametrization == "flow" and name == "dpm_fast"):
        return None
    opts = DETERMINISTIC_OPTS.get(name, {})
    ns = np.array([32, 64, 128, 256])
    errs = np.array([T._max_trajectory_error(name, int(n), parametrization, **opts) for n in ns])
    return float(-np.polyfit(np.log(ns), np.log(errs), 1)[0])


def reference_gap(name: str) -> tuple[float, float] | None:
    if name not in REFERENCES:
        return None
    ref, opts = REFERENCES[name]
    sig, x = R._setup(12)
    gaps = []
    for dtype in (torch.float32, torch.float64):
        nd = torch.float32 if name in FLOAT32_NOISE else dtype
        want = ref(R.den, x.double(), sig, R.Noise(R.SHAPE, dtype=nd))
        got = df.sample(R.den, x.to(dtype), sig, name, noise_sampler=R.Noise(R.SHAPE, dtype=nd), **opts)
        gaps.append((got.double() - want).abs().max().item())
    return gaps[0], gaps[1]


def main() -> int:
    torch.set_num_threads(1)
    print(f"{'sampler':<24} {'ORDERS':>6} {'order ve':>9} {'order flow':>10} {'|f32 - ref|':>12} {'|f64 - ref|':>12}")
    for name in df.SAMPLERS:
        o_ve, o_flow, gap = order(name, "ve"), order(name, "flow"), reference_gap(name)
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        g32, g64 = ("-", "-") if gap is None else (f"{gap[0]:.1e}", f"{gap[1]:.1e}")
        print(f"{name:<24} {ORDERS.get(name, '-')!s:>6} {fmt(o_ve):>9} {fmt(o_flow):>10} {g32:>12} {g64:>12}")
    assert math.isfinite(build_plan("euler", [1.0, 0.0]).coef.sum())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
