"""Samplers as coefficient tables.

Each sampler is a function of the schedule only: given the sigmas (and, for a flow-matching model, the
alphas ``1 - sigma``) it returns, in float64, one row per network evaluation saying how the fused
:func:`diffusion_fast.ops.sampler_step` combines the state ``x`` (where the network was evaluated), this
evaluation's denoised estimate ``D``, the history slots and the noise. The layout of a row is documented in
:mod:`diffusion_fast.ops.sampler_step`.

The model's state follows ``x = alpha * x0 + sigma * noise``: ``alpha = 1`` for the k-diffusion (variance
exploding) parametrization, ``alpha = 1 - sigma`` for rectified flow. Samplers that integrate the
probability-flow ODE in sigma (``euler``, ``heun``, ``dpm_2``, ``lms``) need no alpha: the ODE
``dx/dsigma = (x - D) / sigma`` holds in both parametrizations. The exponential integrators (``ddim``,
``euler_ancestral``, the DPM-Solver++ family, ``unipc``) are written with the half-log-SNR
``lambda = log(alpha / sigma)``; with ``alpha = 1`` every one of them reduces to k-diffusion's formula.

Coefficient arithmetic handles ``sigma = 0`` (``lambda = +inf``, the final denoising step) and
``alpha = 0`` (``lambda = -inf``, the pure-noise start of a flow schedule) through IEEE infinities, so no
sampler needs a special case beyond what k-diffusion itself has.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from ..ops.rows import AD, AH, AX, AZ, BD, BH, BX, CIN, G, P, Q, coef_width

PREDICTIONS = ("denoised", "epsilon", "v_prediction", "sample", "flow")
PARAMETRIZATIONS = ("ve", "flow")


@dataclass
class _Row:
    """One network evaluation: ``x_new = a . inputs``, ``y = b . inputs``; keys "x", "d", "z", slot ints.

    ``zi`` is the ``(sigma, sigma_next)`` pair a k-diffusion ``noise_sampler`` is called with for this row's
    noise draw (k-diffusion's own arguments at that point of its loop)."""

    sigma: float
    step: int
    ends_step: bool
    a: dict = field(default_factory=dict)
    b: dict = field(default_factory=dict)
    slot_d: int = -1
    slot_y: int = -1
    zi: tuple[float, float] | None = None


@dataclass
class _Table:
    """What a builder returns beyond its rows: history slots, a noise draw added before the first
    evaluation (Karras churn of step 0) and the grid the rows walk when it is not the given schedule."""

    rows: list
    K: int
    pre_noise: float = 0.0
    pre_zi: tuple[float, float] | None = None
    grid: list | None = None


@dataclass(frozen=True)
class Plan:
    """A sampler's coefficient table for one schedule, with everything the loop needs on the host.

    Attributes:
        sampler: sampler name.
        K: number of history slots.
        coef: ``[E, 9 + 2K]`` float64 rows (E = network evaluations), guidance and conversion filled in.
        slots: ``[E, 2]`` int64 ``(slot for D, slot for y)``; -1 = no write.
        sigma_eval: ``[E]`` sigma at which the network is evaluated.
        noise: ``[E]`` bool, whether the row draws noise.
        step: ``[E]`` schedule step the row belongs to.
        ends_step: ``[E]`` bool, whether the row completes its step (the callback fires there).
        sigmas: the schedule the rows walk, ``[N + 1]`` (the given one, except for ``dpm_fast``, whose grid is
            uniform in log sigma, and ``uni_pc*``, whose final 0 becomes 0.001 as in ComfyUI).
        c_in0: input scale of the first network evaluation.
        noise_sigmas: ``[E, 2]`` the ``(sigma, sigma_next)`` handed to a ``noise_sampler`` for each noisy row
            (NaN elsewhere).
        pre_noise: coefficient of a noise draw added to ``x`` before the first evaluation (0: none).
        pre_noise_sigmas: its ``(sigma, sigma_hat)`` pair for a ``noise_sampler``.
    """

    sampler: str
    K: int
    coef: np.ndarray
    slots: np.ndarray
    sigma_eval: np.ndarray
    noise: np.ndarray
    step: np.ndarray
    ends_step: np.ndarray
    sigmas: np.ndarray
    c_in0: float
    noise_sigmas: np.ndarray | None = None
    pre_noise: float = 0.0
    pre_noise_sigmas: tuple[float, float] = (math.nan, math.nan)

    @property
    def evaluations(self) -> int:
        return int(self.coef.shape[0])

    @property
    def draws(self) -> list[tuple[int, float, float]]:
        """Every noise draw in the order the loop makes it: ``(row, sigma, sigma_next)``, row -1 = before
        the first evaluation."""
        out = [(-1, *self.pre_noise_sigmas)] if self.pre_noise else []
        ns = self.noise_sigmas
        for e in np.flatnonzero(self.noise):
            out.append((int(e), float(ns[e, 0]), float(ns[e, 1])) if ns is not None else (int(e), math.nan, math.nan))
        return out


# ----------------------------------------------------------------------------------------------- helpers

def _lam(sigma: float, alpha: float) -> float:
    """Half-log-SNR log(alpha / sigma), +inf at sigma = 0 and -inf at alpha = 0."""
    if sigma == 0.0:
        return math.inf
    if alpha == 0.0:
        return -math.inf
    return math.log(alpha) - math.log(sigma)


def _expm1_neg(h: float) -> float:
    """expm1(-h), exact at h = +inf (-1)."""
    return -1.0 if h == math.inf else math.expm1(-h)


def _exp_neg(h: float) -> float:
    return 0.0 if h == math.inf else math.exp(-h)


def _scale(eta: float, h: float) -> float:
    """eta * h with 0 * inf = 0 (eta = 0 turns the SDE solvers into ODE solvers even on an infinite step)."""
    return 0.0 if eta == 0.0 else eta * h


def _add(dst: dict, src: dict, scale: float = 1.0) -> dict:
    for k, v in src.items():
        dst[k] = dst.get(k, 0.0) + scale * v
    return dst


def _ancestral(lam: float, lam_n: float, eta: float) -> tuple[float, float]:
    """k-diffusion's get_ancestral_step in lambda form: (sigma_down, sigma_up) / sigma_next, in x/alpha."""
    e = _exp_neg(lam_n - lam)  # sigma_hat_next / sigma_hat
    up = min(1.0, eta * math.sqrt(max(0.0, 1.0 - e * e)))
    down = math.sqrt(max(0.0, 1.0 - up * up))
    return down, up


# ---------------------------------------------------------------------------------------------- samplers
# Each builder takes sigmas s[0..N] and alphas a[0..N] (float64 lists) and returns (rows, K).

def _churn(s, a, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. (2022) churn, k-diffusion's rule: per step, sigma_hat = sigma * (1 + gamma) with
    gamma = min(s_churn / N, sqrt(2) - 1) where s_tmin <= sigma <= s_tmax, and the noise amplitude
    s_noise * sqrt(sigma_hat^2 - sigma^2) that lifts the state from sigma to sigma_hat."""
    for name, v in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise", s_noise)):
        if not math.isfinite(float(v)) or float(v) < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    if math.isnan(float(s_tmax)) or float(s_tmax) < 0:
        raise ValueError(f"s_tmax must be a number >= 0 (inf allowed), got {s_tmax}")
    n = len(s) - 1
    if s_churn > 0 and any(v != 1.0 for v in a):
        raise ValueError("s_churn is defined for parametrization='ve' (it raises sigma above the schedule, "
                         "which a flow state x = (1 - sigma) * x0 + sigma * noise cannot hold); use s_churn=0")
    hats, amps = [], []
    for i in range(n):
        gamma = min(s_churn / n, 2 ** 0.5 - 1) if s_churn > 0 and s_tmin <= s[i] <= s_tmax else 0.0
        hat = s[i] * (gamma + 1)
        hats.append(hat)
        amps.append(s_noise * math.sqrt(hat * hat - s[i] * s[i]) if gamma > 0 else 0.0)
    return hats, amps


def _with_churn(rows, K, s, hats, amps):
    """Attach each step's churn noise to the last row of the step before it (step 0: before the loop)."""
    pre, pre_zi = 0.0, None
    last = {r.step: r for r in rows if r.ends_step}
    for i, amp in enumerate(amps):
        if amp == 0.0:
            continue
        if i == 0:
            pre, pre_zi = amp, (s[0], hats[0])
        else:
            last[i - 1].a["z"] = amp
            last[i - 1].zi = (s[i], hats[i])
    return _Table(rows, K, pre, pre_zi)


_CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}


def _euler(s, a, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, **_):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2; churn optional)."""
    hats, amps = _churn(s, a, s_churn, s_tmin, s_tmax, s_noise)
    rows = []
    for i in range(len(s) - 1):
        r = s[i + 1] / hats[i]
        rows.append(_Row(hats[i], i, True, a={"x": r, "d": 1.0 - r}))
    return _with_churn(rows, 0, s, hats, amps)


def _ddim_eta(s, a, eta, s_noise):
    rows = []
    for i in range(len(s) - 1):
        lam, lam_n = _lam(s[i], a[i]), _lam(s[i + 1], a[i + 1])
        down, up = _ancestral(lam, lam_n, eta)
        e = _exp_neg(lam_n - lam)
        row = _Row(s[i], i, True, a={"x": s[i + 1] / s[i] * down, "d": a[i + 1] * (1.0 - e * down)})
        if up > 0.0 and s[i + 1] > 0.0:
            row.a["z"] = s[i + 1] * up * s_noise
            row.zi = (s[i], s[i + 1])
        rows.append(row)
    return rows, 0


def _euler_ancestral(s, a, eta=1.0, s_noise=1.0, **_):
    """Ancestral sampling with Euler steps (k-diffusion sample_euler_ancestral)."""
    return _ddim_eta(s, a, eta, s_noise)


def _ddim(s, a, eta=0.0, s_noise=1.0, **_):
    """DDIM (Song et al. 2021); eta=0 is deterministic (the first-order exponential integrator)."""
    return _ddim_eta(s, a, eta, s_noise)


def _heun(s, a, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, **_):
    """Heun's second-order method (Karras et al. 2022, Algorithm 2; churn optional); Euler on the step to 0."""
    hats, amps = _churn(s, a, s_churn, s_tmin, s_tmax, s_noise)
    rows = []
    for i in range(len(s) - 1):
        sc, sn = hats[i], s[i + 1]
        if sn == 0.0:
            rows.append(_Row(sc, i, True, a={"x": 0.0, "d": 1.0}))
            continue
        dt = sn - sc
        # Stage 1 at x_i: predictor x_p = x + dt*d1; keep x_i (slot 0) and D1 (slot 1).
        rows.append(_Row(sc, i, False, a={"x": sn / sc, "d": 1.0 - sn / sc}, b={"x": 1.0}, slot_d=1, slot_y=0))
        # Stage 2 at x_p: x_{i+1} = x_i + dt/2 * ((x_i - D1)/sc + (x_p - D2)/sn).
        rows.append(_Row(sn, i, True, a={0: 1.0 + dt / (2 * sc), 1: -dt / (2 * sc),
                                         "x": dt / (2 * sn), "d": -dt / (2 * sn)}))
    return _with_churn(rows, 2, s, hats, amps)


def _dpm_2(s, a, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, **_):
    """DPM-Solver-2 in sigma (Lu et al. 2022; k-diffusion sample_dpm_2): midpoint in log sigma; churn optional."""
    hats, amps = _churn(s, a, s_churn, s_tmin, s_tmax, s_noise)
    rows = []
    for i in range(len(s) - 1):
        sc, sn = hats[i], s[i + 1]
        if sn == 0.0:
            rows.append(_Row(sc, i, True, a={"x": 0.0, "d": 1.0}))
            continue
        sm = math.exp(0.5 * (math.log(sc) + math.log(sn)))
        rows.append(_Row(sc, i, False, a={"x": sm / sc, "d": 1.0 - sm / sc}, b={"x": 1.0}, slot_y=0))
        dt = sn - sc
        rows.append(_Row(sm, i, True, a={0: 1.0, "x": dt / sm, "d": -dt / sm}))
    return _with_churn(rows, 1, s, hats, amps)


def _lms_coeff(t: list[float], i: int, j: int, order: int) -> float:
    """Integral over [t_i, t_{i+1}] of the Lagrange basis polynomial of node t_{i-j} on t_i..t_{i-order+1}."""
    nodes = [t[i - k] for k in range(order) if k != j]
    poly = np.polynomial.polynomial.polyfromroots(nodes) if nodes else np.array([1.0])
    denom = np.prod([t[i - j] - x for x in nodes]) if nodes else 1.0
    integ = np.polynomial.polynomial.polyint(poly / denom)
    return float(np.polynomial.polynomial.polyval(t[i + 1], integ) - np.polynomial.polynomial.polyval(t[i], integ))


def _lms(s, a, order=4, **_):
    """Linear multistep (Adams-Bashforth in sigma) of order up to 4 (k-diffusion sample_lms)."""
    K = max(1, order - 1)
    rows = []
    n = len(s) - 1
    for i in range(n):
        cur = min(i + 1, order)
        c = [_lms_coeff(s, i, j, cur) for j in range(cur)]
        # d_i = (x - D)/s_i enters directly; d_{i-j} (j >= 1) come from the ring.
        row = _Row(s[i], i, True, a={"x": 1.0 + c[0] / s[i], "d": -c[0] / s[i]})
        for j in range(1, cur):
            row.a[(i - j) % K] = c[j]
        if i < n - 1:
            row.b = {"x": 1.0 / s[i], "d": -1.0 / s[i]}
            row.slot_y = i % K
        rows.append(row)
    return rows, K


def _dpmpp_2m(s, a, **_):
    """DPM-Solver++(2M) (Lu et al. 2022); first order on the first and the final step."""
    rows = []
    lam = [_lam(x, y) for x, y in zip(s, a)]
    for i in range(len(s) - 1):
        h = lam[i + 1] - lam[i]
        phi = -a[i + 1] * _expm1_neg(h)
        row = _Row(s[i], i, True, a={"x": s[i + 1] / s[i], "d": phi}, slot_d=0)
        if i > 0 and s[i + 1] != 0.0:
            r = (lam[i] - lam[i - 1]) / h
            row.a["d"] = phi * (1.0 + 1.0 / (2.0 * r))
            row.a[0] = -phi / (2.0 * r)
        rows.append(row)
    return rows, 1


def _dpmpp_2m_sde(s, a, eta=1.0, s_noise=1.0, solver_type="midpoint", **_):
    """DPM-Solver++(2M) SDE (k-diffusion sample_dpmpp_2m_sde); eta=0 gives the ODE solver."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    rows = []
    lam = [_lam(x, y) for x, y in zip(s, a)]
    h_last = None
    for i in range(len(s) - 1):
        if s[i + 1] == 0.0:
            rows.append(_Row(s[i], i, True, a={"x": 0.0, "d": 1.0}, slot_d=0))
            continue
        h = lam[i + 1] - lam[i]
        eh = _scale(eta, h)
        phi = -a[i + 1] * _expm1_neg(h + eh)
        row = _Row(s[i], i, True, a={"x": s[i + 1] / s[i] * _exp_neg(eh), "d": phi}, slot_d=0)
        if h_last is not None:
            inv_r = h / h_last if h_last != math.inf else 0.0
            if solver_type == "midpoint":
                k = 0.5 * phi * inv_r
            else:
                k = a[i + 1] * (-_expm1_neg(h + eh) / (-h - eh) + 1.0) * inv_r if h != math.inf else 0.0
            row.a["d"] += k
            row.a[0] = -k
        if eta > 0.0:
            row.a["z"] = s[i + 1] * math.sqrt(-_expm1_neg(2.0 * eh)) * s_noise
            row.zi = (s[i], s[i + 1])
        rows.append(row)
        h_last = h
    return rows, 1


def _dpmpp_3m_sde(s, a, eta=1.0, s_noise=1.0, **_):
    """DPM-Solver++(3M) SDE (k-diffusion sample_dpmpp_3m_sde); eta=0 gives the third-order ODE solver."""
    rows = []
    lam = [_lam(x, y) for x, y in zip(s, a)]
    h_1 = h_2 = None
    for i in range(len(s) - 1):
        slot, slot1, slot2 = i % 2, (i - 1) % 2, (i - 2) % 2  # D_i, D_{i-1}, D_{i-2}
        if s[i + 1] == 0.0:
            rows.append(_Row(s[i], i, True, a={"x": 0.0, "d": 1.0}, slot_d=slot))
            h_1, h_2 = None, h_1
            continue
        h = lam[i + 1] - lam[i]
        h_eta = h * (eta + 1.0)
        an = a[i + 1]
        row = _Row(s[i], i, True, a={"x": s[i + 1] / s[i] * _exp_neg(_scale(eta, h)), "d": -an * _expm1_neg(h_eta)},
                   slot_d=slot)
        phi_2 = (_expm1_neg(h_eta) / h_eta + 1.0) if h_eta != math.inf else 1.0
        if h_2 is not None and h_1 is not None:
            inv_r0 = h / h_1 if h_1 != math.inf else 0.0
            inv_r1 = h / h_2 if h_2 != math.inf else 0.0
            r0 = 1.0 / inv_r0 if inv_r0 else math.inf
            r1 = 1.0 / inv_r1 if inv_r1 else math.inf
            d1_0 = {"d": inv_r0, slot1: -inv_r0}
            d1_1 = {slot1: inv_r1, slot2: -inv_r1}
            w = r0 / (r0 + r1) if r0 != math.inf else 1.0
            inv_sum = 0.0 if math.inf in (r0, r1) else 1.0 / (r0 + r1)
            d1 = _add(_add({}, d1_0, 1.0 + w), d1_1, -w)
            d2 = _add(_add({}, d1_0, inv_sum), d1_1, -inv_sum)
            phi_3 = phi_2 / h_eta - 0.5 if h_eta != math.inf else -0.5
            _add(row.a, d1, an * phi_2)
            _add(row.a, d2, -an * phi_3)
        elif h_1 is not None:
            inv_r = h / h_1 if h_1 != math.inf else 0.0
            _add(row.a, {"d": inv_r, slot1: -inv_r}, an * phi_2)
        if eta > 0.0:
            row.a["z"] = s[i + 1] * math.sqrt(-_expm1_neg(2.0 * _scale(eta, h))) * s_noise
            row.zi = (s[i], s[i + 1])
        rows.append(row)
        h_1, h_2 = h, h_1
    return rows, 2


def _unipc_update(lam_t, lam_s0, sig_t, sig_s0, alpha_t, x_form, m0_form, hist_forms, order, corrector,
                  model_t_form=None, variant="bh2"):
    """One UniP (predictor) or UniC (corrector) update of UniPC (Zhao et al. 2023), data prediction.

    ``hist_forms`` are ``(lambda_si, D_si form)`` for the older model outputs, newest first. Returns the
    linear form of the result. Mirrors diffusers' multistep_uni_p_bh_update / multistep_uni_c_bh_update.
    """
    h = lam_t - lam_s0
    rks, d1s = [], []
    for lam_si, form in hist_forms[: order - 1]:
        rk = (lam_si - lam_s0) / h
        rks.append(rk)
        d1s.append(_add(_add({}, form, 1.0 / rk), m0_form, -1.0 / rk))
    rks.append(1.0)
    hh = -h
    h_phi_1 = _expm1_neg(h)
    h_phi_k = h_phi_1 / hh - 1.0
    fact = 1
    b_h = hh if variant == "bh1" else h_phi_1
    R, b = [], []
    for k in range(1, order + 1):
        R.append([rk ** (k - 1) for rk in rks])
        b.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    out = _add(_add({}, x_form, sig_t / sig_s0), m0_form, -alpha_t * h_phi_1)
    if not corrector:
        if d1s:
            rhos = [0.5] if order == 2 else list(np.linalg.solve(np.array(R)[:-1, :-1], np.array(b)[:-1]))
            for rho, d1 in zip(rhos, d1s):
                _add(out, d1, -alpha_t * b_h * rho)
        return out
    rhos = [0.5] if order == 1 else list(np.linalg.solve(np.array(R), np.array(b)))
    for rho, d1 in zip(rhos[:-1], d1s):
        _add(out, d1, -alpha_t * b_h * rho)
    d1_t = _add(_add({}, model_t_form), m0_form, -1.0)
    return _add(out, d1_t, -alpha_t * b_h * rhos[-1])


def _unipc(s, a, order=2, variant="bh2", **_):
    """UniPC (Zhao et al. 2023), bh2, data prediction, lower order on the final steps (diffusers' defaults)."""
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3 for unipc, got {order}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    n = len(s) - 1
    lam = [_lam(x, y) for x, y in zip(s, a)]
    K = 1 + order  # slot 0: last corrected state; slots 1..order: ring of past D
    dslot = lambda j: 1 + j % order  # noqa: E731
    rows = []
    prev_order = None
    lower = 0
    for i in range(n):
        # Past outputs usable at this step (finite lambda: a flow schedule starts at lambda = -inf).
        def older(start, count):
            out = []
            for j in range(start, start - count, -1):
                if j < 0 or not math.isfinite(lam[j]):
                    break
                out.append((lam[j], {dslot(j): 1.0}))
            return out

        if i > 0 and (math.isfinite(lam[i - 1]) or variant == "bh2"):
            hist = older(i - 2, prev_order - 1)
            c_order = min(prev_order, len(hist) + 1) if math.isfinite(lam[i - 1]) else 1
            xc = _unipc_update(lam[i], lam[i - 1], s[i], s[i - 1], a[i], {0: 1.0}, {dslot(i - 1): 1.0},
                               hist, c_order, True, {"d": 1.0}, variant)
        elif i > 0:  # bh1 after the infinite first step of a flow schedule: B(h) = h is infinite, no corrector
            xc = {"x": 1.0}
        else:
            xc = {"x": 1.0}
        this_order = min(order, n - i, lower + 1)
        if s[i + 1] == 0.0 or not math.isfinite(lam[i]):
            this_order = 1
        hist = older(i - 1, this_order - 1)
        p_order = min(this_order, len(hist) + 1)
        x_next = _unipc_update(lam[i + 1], lam[i], s[i + 1], s[i], a[i + 1], xc, {"d": 1.0}, hist, p_order,
                               False, None, variant)
        rows.append(_Row(s[i], i, True, a=x_next, b=xc, slot_d=dslot(i), slot_y=0))
        prev_order = this_order
        lower = min(lower + 1, order)
    return rows, K


def _point(lam: float, flow: bool) -> tuple[float, float]:
    """(sigma, alpha) at half-log-SNR ``lam``: VE sigma = exp(-lam); flow sigma = 1 / (1 + exp(lam))."""
    if lam == math.inf:
        return 0.0, 1.0
    if lam == -math.inf:
        return (1.0, 0.0) if flow else (math.inf, 1.0)
    if flow:
        sig = 1.0 / (1.0 + math.exp(lam)) if lam < 700 else math.exp(-lam)
        return sig, 1.0 - sig
    return math.exp(-lam), 1.0


def _ancestral_row(s, a, i, eta, s_noise):
    """One first-order ancestral (DDIM-eta) step, the form every ancestral sampler takes where its
    second stage is undefined: at a flow schedule's pure-noise start (lambda = -inf, sigma = 1)."""
    lam, lam_n = _lam(s[i], a[i]), _lam(s[i + 1], a[i + 1])
    down, up = _ancestral(lam, lam_n, eta)
    e = _exp_neg(lam_n - lam)
    row = _Row(s[i], i, True, a={"x": s[i + 1] / s[i] * down, "d": a[i + 1] * (1.0 - e * down)})
    if up > 0.0 and s[i + 1] > 0.0 and s_noise > 0.0:
        row.a["z"], row.zi = s[i + 1] * up * s_noise, (s[i], s[i + 1])
    return row


def _log_down(lam_n: float, down: float) -> float:
    """Half-log-SNR of sigma_down = down * sigma_next (in x / alpha)."""
    return math.inf if down == 0.0 or lam_n == math.inf else lam_n - math.log(down)


def _dpm_2_ancestral(s, a, eta=1.0, s_noise=1.0, parametrization="ve", **_):
    """Ancestral sampling with DPM-Solver-2 steps (k-diffusion sample_dpm_2_ancestral)."""
    flow = parametrization == "flow"
    rows = []
    for i in range(len(s) - 1):
        lam, lam_n = _lam(s[i], a[i]), _lam(s[i + 1], a[i + 1])
        if lam == -math.inf:
            rows.append(_ancestral_row(s, a, i, eta, s_noise))
            continue
        down, up = _ancestral(lam, lam_n, eta)
        if s[i + 1] == 0.0 or down == 0.0:  # sigma_down = 0: Euler to D (k-diffusion adds no noise here)
            rows.append(_Row(s[i], i, True, a={"x": 0.0, "d": a[i + 1]}))
            continue
        lam_d = _log_down(lam_n, down)
        lam_m = 0.5 * (lam + lam_d)  # midpoint in log sigma (of x / alpha)
        sm, am = _point(lam_m, flow)
        e_m = _exp_neg(lam_m - lam)
        rows.append(_Row(s[i], i, False, a={"x": sm / s[i], "d": am * (1.0 - e_m)}, b={"x": 1.0}, slot_y=0))
        # x_next = alpha_n * (x_i / alpha_i + (x_m / alpha_m - D_m) * (sd - s) / sm) in x / alpha units.
        c = a[i + 1] * (math.exp(-lam_d) - math.exp(-lam)) / math.exp(-lam_m)
        row = _Row(sm, i, True, a={0: a[i + 1] / a[i], "x": c / am, "d": -c})
        if up > 0.0 and s_noise > 0.0:
            row.a["z"], row.zi = s[i + 1] * up * s_noise, (s[i], s[i + 1])
        rows.append(row)
    return rows, 1


def _dpmpp_2s_ancestral(s, a, eta=1.0, s_noise=1.0, parametrization="ve", **_):
    """Ancestral sampling with DPM-Solver++(2S) steps (k-diffusion sample_dpmpp_2s_ancestral)."""
    flow = parametrization == "flow"
    rows = []
    for i in range(len(s) - 1):
        lam, lam_n = _lam(s[i], a[i]), _lam(s[i + 1], a[i + 1])
        if lam == -math.inf:
            rows.append(_ancestral_row(s, a, i, eta, s_noise))
            continue
        down, up = _ancestral(lam, lam_n, eta)
        if s[i + 1] == 0.0 or down == 0.0:  # sigma_down = 0: Euler to D
            row = _Row(s[i], i, True, a={"x": 0.0, "d": a[i + 1]})
        else:
            h = _log_down(lam_n, down) - lam
            ss, as_ = _point(lam + 0.5 * h, flow)
            rows.append(_Row(s[i], i, False, a={"x": ss / s[i], "d": -as_ * _expm1_neg(0.5 * h)}, b={"x": 1.0},
                             slot_y=0))
            row = _Row(ss, i, True, a={0: s[i + 1] * down / s[i], "d": -a[i + 1] * _expm1_neg(h)})
        if s[i + 1] > 0.0 and up > 0.0 and s_noise > 0.0:
            row.a["z"], row.zi = s[i + 1] * up * s_noise, (s[i], s[i + 1])
        rows.append(row)
    return rows, 1


def _dpmpp_sde(s, a, eta=1.0, s_noise=1.0, r=0.5, parametrization="ve", **_):
    """DPM-Solver++ (stochastic), two evaluations per step (k-diffusion sample_dpmpp_sde)."""
    if not 0.0 < float(r) <= 1.0:
        raise ValueError(f"r must be in (0, 1] for dpmpp_sde, got {r}")
    flow = parametrization == "flow"
    fac = 1.0 / (2.0 * r)
    rows = []
    for i in range(len(s) - 1):
        lam_s, lam_t = _lam(s[i], a[i]), _lam(s[i + 1], a[i + 1])
        if s[i + 1] == 0.0:
            rows.append(_Row(s[i], i, True, a={"x": 0.0, "d": 1.0}))
            continue
        if lam_s == -math.inf:
            rows.append(_ancestral_row(s, a, i, eta, s_noise))
            continue
        h = lam_t - lam_s
        lam_s1 = lam_s + r * h
        s1, a1 = _point(lam_s1, flow)
        # Step 1: ancestral DPM-Solver++(1) to lambda_s1.
        down, up = _ancestral(lam_s, lam_s1, eta)
        h_ = _log_down(lam_s1, down) - lam_s
        row = _Row(s[i], i, False, a={"x": a1 * _exp_neg(h_) / a[i], "d": -a1 * _expm1_neg(h_)}, b={"x": 1.0},
                   slot_d=1, slot_y=0)
        if up > 0.0 and s_noise > 0.0:
            row.a["z"], row.zi = s1 * up * s_noise, (s[i], s1)
        rows.append(row)
        # Step 2: from lambda_s to lambda_t with D_d = (1 - fac) D + fac D_2.
        down, up = _ancestral(lam_s, lam_t, eta)
        h_ = _log_down(lam_t, down) - lam_s
        c = -a[i + 1] * _expm1_neg(h_)
        row = _Row(s1, i, True, a={0: a[i + 1] * _exp_neg(h_) / a[i], 1: c * (1.0 - fac), "d": c * fac})
        if up > 0.0 and s_noise > 0.0:
            row.a["z"], row.zi = s[i + 1] * up * s_noise, (s[i], s[i + 1])
        rows.append(row)
    return rows, 2


def _lcm(s, a, s_noise=1.0, s_noise_end=None, **_):
    """Latent consistency sampling (Luo et al. 2023; ComfyUI sample_lcm): x = D, then noise to the next sigma."""
    end = s_noise if s_noise_end is None else s_noise_end
    if not math.isfinite(float(end)) or float(end) < 0:
        raise ValueError(f"s_noise_end must be a finite number >= 0, got {s_noise_end}")
    n = len(s) - 1
    rows = []
    for i in range(n):
        row = _Row(s[i], i, True, a={"x": 0.0, "d": a[i + 1]})
        amp = s_noise + (end - s_noise) * (i / (n - 1) if n > 1 else 0.0)
        if s[i + 1] > 0.0 and amp > 0.0:
            row.a["z"], row.zi = s[i + 1] * amp, (s[i], s[i + 1])
        rows.append(row)
    return rows, 0


def _ddpm(s, a, **_):
    """DDPM ancestral sampling (Ho et al. 2020; ComfyUI sample_ddpm), written in the VE state."""
    rows = []
    for i in range(len(s) - 1):
        sg, sp = s[i], s[i + 1]
        ac, acp = 1.0 / (sg * sg + 1.0), 1.0 / (sp * sp + 1.0)
        alpha = ac / acp
        k = math.sqrt(1.0 / alpha)
        c_eps = (1.0 - alpha) / math.sqrt(1.0 - ac)
        out = math.sqrt(1.0 + sp * sp) if sp != 0.0 else 1.0  # back from the VP state
        row = _Row(sg, i, True, a={"x": out * k * (1.0 / math.sqrt(1.0 + sg * sg) - c_eps / sg),
                                   "d": out * k * c_eps / sg})
        if sp > 0.0:
            row.a["z"] = out * math.sqrt((1.0 - alpha) * (1.0 - acp) / (1.0 - ac))
            row.zi = (sg, sp)
        rows.append(row)
    return rows, 0


def _res_multistep(s, a, eta=0.0, s_noise=1.0, **_):
    """RES second-order multistep exponential integrator (Zhang et al. 2023; ComfyUI res_multistep)."""
    lam = [_lam(x, y) for x, y in zip(s, a)]
    rows = []
    old_lam_d = None
    for i in range(len(s) - 1):
        down, up = _ancestral(lam[i], lam[i + 1], eta)
        lam_d = _log_down(lam[i + 1], down)
        if s[i + 1] == 0.0 or down == 0.0 or old_lam_d is None or lam[i] == -math.inf:
            e = _exp_neg(lam[i + 1] - lam[i])  # Euler to sigma_down
            row = _Row(s[i], i, True, a={"x": s[i + 1] * down / s[i], "d": a[i + 1] * (1.0 - e * down)}, slot_d=0)
        else:
            h = lam_d - lam[i]
            c2 = (lam[i - 1] - old_lam_d) / h
            phi1 = _expm1_neg(h) / -h
            phi2 = (phi1 - 1.0) / -h
            b2 = phi2 / c2 if math.isfinite(c2) and c2 != 0.0 else 0.0
            b1 = phi1 - b2
            row = _Row(s[i], i, True, a={"x": s[i + 1] * down / s[i], "d": a[i + 1] * h * b1, 0: a[i + 1] * h * b2},
                       slot_d=0)
        if s[i + 1] > 0.0 and up > 0.0 and s_noise > 0.0:
            row.a["z"], row.zi = s[i + 1] * up * s_noise, (s[i], s[i + 1])
        rows.append(row)
        old_lam_d = lam_d
    return rows, 1


def _res_multistep_ancestral(s, a, eta=1.0, s_noise=1.0, **_):
    """RES multistep with ancestral noise (ComfyUI res_multistep_ancestral)."""
    return _res_multistep(s, a, eta=eta, s_noise=s_noise)


def _check_order(name: str, order, allowed) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order not in allowed:
        raise ValueError(f"order must be one of {', '.join(map(str, allowed))} for {name}, got {order!r}")
    return int(order)


def _multistep_on_d(s, order, coeffs, ring: int):
    """Rows of an explicit multistep method on d = (x - D) / sigma (the probability-flow ODE in sigma):
    ``x_next = x + sum_j C_j d_{i-j}`` with ``coeffs(i, cur) -> [C_0 .. C_{cur-1}]``; Euler (x = D) on the step to
    sigma = 0; ``ring`` history slots hold the last d's."""
    rows = []
    n = len(s) - 1
    for i in range(n):
        sc, sn = s[i], s[i + 1]
        cur = 1 if sn == 0.0 else min(order, i + 1)
        c = [sn - sc] if cur == 1 else coeffs(i, cur)
        row = _Row(sc, i, True, a={"x": 1.0 + c[0] / sc, "d": -c[0] / sc})
        for j in range(1, cur):
            row.a[(i - j) % ring] = c[j]
        if ring and i < n - 1:
            row.b, row.slot_y = {"x": 1.0 / sc, "d": -1.0 / sc}, i % ring
        rows.append(row)
    return rows, ring


_IPNDM = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def _ipndm(s, a, order=4, **_):
    """Improved PNDM (Zhang & Chen 2023; ComfyUI sample_ipndm): Adams-Bashforth with fixed coefficients."""
    order = _check_order("ipndm", order, (1, 2, 3, 4))
    return _multistep_on_d(s, order, lambda i, cur: [(s[i + 1] - s[i]) * c for c in _IPNDM[cur]], order - 1)


def _ipndm_v_coeffs(t, i, cur):
    """ComfyUI sample_ipndm_v's variable-step Adams-Bashforth coefficients (times the step)."""
    h_n = t[i + 1] - t[i]
    if cur == 2:
        h1 = t[i] - t[i - 1]
        c = [(2 + h_n / h1) / 2, -(h_n / h1) / 2]
    elif cur == 3:
        h1, h2 = t[i] - t[i - 1], t[i - 1] - t[i - 2]
        temp = (1 - h_n / (3 * (h_n + h1)) * (h_n * (h_n + h1)) / (h1 * (h1 + h2))) / 2
        c = [(2 + h_n / h1) / 2 + temp, -(h_n / h1) / 2 - (1 + h1 / h2) * temp, temp * h1 / h2]
    else:
        h1, h2, h3 = t[i] - t[i - 1], t[i - 1] - t[i - 2], t[i - 2] - t[i - 3]
        temp1 = (1 - h_n / (3 * (h_n + h1)) * (h_n * (h_n + h1)) / (h1 * (h1 + h2))) / 2
        temp2 = ((1 - h_n / (3 * (h_n + h1))) / 2 + (1 - h_n / (2 * (h_n + h1))) * h_n / (6 * (h_n + h1 + h2))) \
            * (h_n * (h_n + h1) * (h_n + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
        q = h1 * (h1 + h2) / (h2 * (h2 + h3))
        c = [(2 + h_n / h1) / 2 + temp1 + temp2,
             -(h_n / h1) / 2 - (1 + h1 / h2) * temp1 - (1 + h1 / h2 + q) * temp2,
             temp1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * temp2,
             -temp2 * q * h1 / h2]
    return [h_n * v for v in c]


def _ipndm_v(s, a, order=4, **_):
    """Improved PNDM with variable-step coefficients (ComfyUI sample_ipndm_v)."""
    order = _check_order("ipndm_v", order, (1, 2, 3, 4))
    return _multistep_on_d(s, order, lambda i, cur: _ipndm_v_coeffs(s, i, cur), order - 1)


# DEIS "tab" (Zhang & Chen 2023, as ComfyUI's sample_deis computes it): the multistep coefficients integrate
# the Lagrange polynomial through past d's in the VP time tau of an EDM-range VP SDE, over sigma.
_DEIS_EPS, _DEIS_SMIN, _DEIS_SMAX = 1e-3, 0.002, 80.0
_DEIS_BD = 2 * (math.log(_DEIS_SMIN ** 2 + 1) / _DEIS_EPS - math.log(_DEIS_SMAX ** 2 + 1)) / (_DEIS_EPS - 1)
_DEIS_BMIN = math.log(_DEIS_SMAX ** 2 + 1) - 0.5 * _DEIS_BD


def _deis_tau(sigma):
    """EDM sigma -> VP time tau (ComfyUI deis.edm2t)."""
    return (np.sqrt(_DEIS_BMIN ** 2 + 2 * _DEIS_BD * np.log1p(np.square(sigma))) - _DEIS_BMIN) / _DEIS_BD


_GL_X, _GL_W = np.polynomial.legendre.leggauss(24)


def _lagrange_integrals(lo: float, hi: float, nodes: list[float], u) -> list[float]:
    """``[integral over sigma in [lo, hi] (signed, hi -> lo reversed) of l_j(u(sigma))]`` for the Lagrange basis
    l_j on ``nodes`` in the variable u. Integrated in v = log sigma (the integrand is then smooth and
    non-oscillating for any 0 < lo, hi) with 4 panels of 24-point Gauss-Legendre: ~1e-15 relative."""
    v0, v1 = math.log(lo), math.log(hi)
    out = [0.0] * len(nodes)
    edges = np.linspace(v0, v1, 5)
    for p in range(4):
        half = 0.5 * (edges[p + 1] - edges[p])
        v = edges[p] + half * (_GL_X + 1.0)
        sig = np.exp(v)
        uu = u(sig)
        for j, nj in enumerate(nodes):
            ell = np.ones_like(uu)
            for k, nk in enumerate(nodes):
                if k != j:
                    ell *= (uu - nk) / (nj - nk)
            out[j] += float(half * np.sum(_GL_W * ell * sig))
    return out


def _deis(s, a, order=3, mode="tab", parametrization="ve", **_):
    """DEIS multistep (Zhang & Chen 2023): ComfyUI's tAB-DEIS in sigma, or diffusers' log-rho form."""
    if mode not in ("tab", "logrho"):
        raise ValueError(f"mode must be 'tab' (ComfyUI) or 'logrho' (diffusers' DEISMultistepScheduler), got {mode!r}")
    if mode == "tab":
        order = _check_order("deis", order, (1, 2, 3, 4))

        def coeffs(i, cur):
            return _lagrange_integrals(s[i], s[i + 1], [float(_deis_tau(s[i - k])) for k in range(cur)], _deis_tau)

        return _multistep_on_d(s, order, coeffs, order - 1)
    # log-rho: the same ODE in x / alpha and rho = sigma / alpha, the interpolation variable log rho; the order
    # rises by one per step and, under 15 steps, falls to 1 on the last step and to 2 on the one before
    # (diffusers' lower_order_final).
    order = _check_order("deis", order, (1, 2, 3))
    n = len(s) - 1
    rho = [x / y if y > 0.0 else math.inf for x, y in zip(s, a)]
    K = order - 1
    rows = []
    for i in range(n):
        cur = min(order, i + 1)
        if n < 15 and i == n - 1:
            cur = 1
        elif n < 15 and i == n - 2:
            cur = min(cur, 2)
        if s[i + 1] == 0.0:
            cur = 1
        while cur > 1 and not math.isfinite(rho[i - cur + 1]):  # no d stored at a flow schedule's sigma = 1
            cur -= 1
        c = [rho[i + 1] - rho[i]] if cur == 1 else _lagrange_integrals(
            rho[i], rho[i + 1], [math.log(rho[i - k]) for k in range(cur)], np.log)
        # x_next = a_n * (x / a_i + sum_j C_j d_j), d_j = (x_j / a_j - D_j) / rho_j
        an = a[i + 1]
        if math.isfinite(rho[i]):
            row = _Row(s[i], i, True, a={"x": an / a[i] + an * c[0] / s[i], "d": -an * c[0] / rho[i]})
        else:  # pure-noise start of a flow schedule: D is the first-order step's whole answer
            row = _Row(s[i], i, True, a={"x": s[i + 1], "d": an})
        for j in range(1, cur):
            row.a[(i - j) % K] = an * c[j]
        if K and i < n - 1 and math.isfinite(rho[i]):
            row.b, row.slot_y = {"x": 1.0 / s[i], "d": -1.0 / rho[i]}, i % K
        rows.append(row)
    return rows, K


def _uni_pc_comfy(s, a, order=3, variant="bh1", parametrization="ve"):
    # ComfyUI's sample_unipc: a final sigma of 0 becomes 0.001 (bh1's B(h) = h is infinite at 0), order
    # min(3, N - 1), lower order on the first and last steps, the corrector after every evaluation.
    order = _check_order("uni_pc", order, (1, 2, 3))
    s2 = list(s)
    if s2[-1] == 0.0:
        if s2[-2] <= 1e-3:
            raise ValueError(f"uni_pc replaces the final sigma 0 by 0.001 (as ComfyUI does); the schedule's "
                             f"last nonzero sigma {s2[-2]} must be > 0.001")
        s2[-1] = 1e-3
    a2 = [1.0 - v for v in s2] if parametrization == "flow" else [1.0] * len(s2)
    rows, K = _unipc(s2, a2, order=max(1, min(order, len(s2) - 2)), variant=variant)
    return _Table(rows, K, grid=s2)


def _uni_pc(s, a, order=3, parametrization="ve", **_):
    """UniPC bh1, ComfyUI's uni_pc: order 3, the final sigma 0 taken as 0.001."""
    return _uni_pc_comfy(s, a, order, "bh1", parametrization)


def _uni_pc_bh2(s, a, order=3, parametrization="ve", **_):
    """UniPC bh2, ComfyUI's uni_pc_bh2: order 3, the final sigma 0 taken as 0.001."""
    return _uni_pc_comfy(s, a, order, "bh2", parametrization)


def _dpm_solver_step(t: float, t_next: float, order: int, step: int, low: bool = False) -> list:
    """The rows of one singlestep DPM-Solver-1/2/3 step (Lu et al. 2022, noise-prediction form, as k-diffusion's
    ``dpm_solver_{1,2,3}_step``) from ``t`` to ``t_next`` in ``t = -log sigma``, VE state. With eps = (x - D) / sigma,
    each stage is linear in the step's x (slot 0), its D (slot 1, eps_0 = (S0 - S1) / sigma_t) and the current
    row's x and D. ``low`` (orders 2 and 3): a row's y (slot 2) is the embedded lower-order solution that
    dpm_adaptive compares with — DPM-Solver-1 for order 2, DPM-Solver-2 with r1 = 1/3 for order 3."""
    sig = lambda v: math.exp(-v)  # noqa: E731
    h = t_next - t
    st, sn, em = sig(t), sig(t_next), math.expm1(h)

    def comb(A, B, s_eval):  # S0 - A eps_0 - B (eps_here - eps_0), eps_here = (x - D) / s_eval of this row
        return {0: 1.0 + (B - A) / st, 1: -(B - A) / st, "x": -B / s_eval, "d": B / s_eval}

    if order == 1:
        c = sn * em / st
        return [_Row(st, step, True, a={"x": 1.0 - c, "d": c})]
    r1 = 0.5 if order == 2 else 1.0 / 3.0
    s1 = sig(t + r1 * h)
    c1 = s1 * math.expm1(r1 * h) / st
    rows = [_Row(st, step, False, a={"x": 1.0 - c1, "d": c1}, b={"x": 1.0}, slot_d=1, slot_y=0)]
    if order == 2:
        rows.append(_Row(s1, step, True, a=comb(sn * em, sn * em / (2 * r1), s1)))
        if low:
            rows[-1].b, rows[-1].slot_y = {0: 1.0 - sn * em / st, 1: sn * em / st}, 2
        return rows
    r2 = 2.0 / 3.0
    s2 = sig(t + r2 * h)
    rows.append(_Row(s1, step, False, a=comb(s2 * math.expm1(r2 * h),
                                           s2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1.0), s1)))
    if low:
        rows[-1].b, rows[-1].slot_y = comb(sn * em, sn * em / (2 * r1), s1), 2
    rows.append(_Row(s2, step, True, a=comb(sn * em, (sn / r2) * (em / h - 1.0), s2)))
    return rows


def _dpm_fast(s, a, eta=0.0, s_noise=1.0, **_):
    """DPM-Solver-Fast (Lu et al. 2022; k-diffusion sample_dpm_fast): singlestep orders 3, 2, 1 on a grid
    uniform in log sigma from sigmas[0] to the last nonzero sigma, one network evaluation per step given."""
    nfe = len(s) - 1
    lo = s[-1] if s[-1] > 0.0 else s[-2]
    if lo >= s[0]:
        raise ValueError("dpm_fast runs from sigmas[0] to the last nonzero sigma; the schedule needs two nonzero "
                         f"sigmas, got {s}")
    t_start, t_end = -math.log(s[0]), -math.log(lo)
    m = nfe // 3 + 1
    ts = np.linspace(t_start, t_end, m + 1).tolist()
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    rows = []
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_next_, su = t_next, 0.0
        if eta:  # ancestral: solve to sigma_down (not below sigma_min), then noise back up to sigma_next
            down, _up = _ancestral(t, t_next, eta)
            t_next_ = min(t_end, _log_down(t_next, down))
            su = math.sqrt(max(0.0, math.exp(-2 * t_next) - math.exp(-2 * t_next_)))
        step_rows = _dpm_solver_step(t, t_next_, order, i)
        if su > 0.0 and s_noise > 0.0:
            step_rows[-1].a["z"], step_rows[-1].zi = su * s_noise, (math.exp(-t), math.exp(-t_next))
        rows += step_rows
    return _Table(rows, 2, grid=[math.exp(-t) for t in ts])


_BUILDERS: dict[str, Callable] = {
    "euler": _euler,
    "euler_ancestral": _euler_ancestral,
    "heun": _heun,
    "dpm_2": _dpm_2,
    "dpm_2_ancestral": _dpm_2_ancestral,
    "lms": _lms,
    "dpm_fast": _dpm_fast,
    "dpmpp_2s_ancestral": _dpmpp_2s_ancestral,
    "dpmpp_sde": _dpmpp_sde,
    "dpmpp_2m": _dpmpp_2m,
    "dpmpp_2m_sde": _dpmpp_2m_sde,
    "dpmpp_3m_sde": _dpmpp_3m_sde,
    "ddim": _ddim,
    "ddpm": _ddpm,
    "lcm": _lcm,
    "ipndm": _ipndm,
    "ipndm_v": _ipndm_v,
    "deis": _deis,
    "res_multistep": _res_multistep,
    "res_multistep_ancestral": _res_multistep_ancestral,
    "unipc": _unipc,
    "uni_pc": _uni_pc,
    "uni_pc_bh2": _uni_pc_bh2,
}

# The one sampler that is not a table: its step sizes come from an error estimate, a value of the sample.
# It runs in its own eager loop (samplers/adaptive.py) on the same fused step.
ADAPTIVE = ("dpm_adaptive",)

SAMPLERS = tuple(_BUILDERS) + ADAPTIVE

_ANCESTRAL = {"eta": 1.0, "s_noise": 1.0}

# Options each sampler accepts (beyond the schedule), with defaults.
OPTIONS: dict[str, dict[str, object]] = {
    "euler": dict(_CHURN),
    "euler_ancestral": dict(_ANCESTRAL),
    "heun": dict(_CHURN),
    "dpm_2": dict(_CHURN),
    "dpm_2_ancestral": dict(_ANCESTRAL),
    "lms": {"order": 4},
    "dpm_fast": {"eta": 0.0, "s_noise": 1.0},
    "dpmpp_2s_ancestral": dict(_ANCESTRAL),
    "dpmpp_sde": {"eta": 1.0, "s_noise": 1.0, "r": 0.5},
    "dpmpp_2m": {},
    "dpmpp_2m_sde": {"eta": 1.0, "s_noise": 1.0, "solver_type": "midpoint"},
    "dpmpp_3m_sde": dict(_ANCESTRAL),
    "ddim": {"eta": 0.0, "s_noise": 1.0},
    "ddpm": {},
    "lcm": {"s_noise": 1.0, "s_noise_end": None},
    "ipndm": {"order": 4},
    "ipndm_v": {"order": 4},
    "deis": {"order": 3, "mode": "tab"},
    "res_multistep": {"eta": 0.0, "s_noise": 1.0},
    "res_multistep_ancestral": dict(_ANCESTRAL),
    "unipc": {"order": 2, "variant": "bh2"},
    "uni_pc": {"order": 3},
    "uni_pc_bh2": {"order": 3},
    "dpm_adaptive": {"order": 3, "rtol": 0.05, "atol": 0.0078, "h_init": 0.05, "pcoeff": 0.0, "icoeff": 1.0,
                     "dcoeff": 0.0, "accept_safety": 0.81, "eta": 0.0, "s_noise": 1.0},
}

# Samplers defined for the VE state only (x = x0 + sigma * noise).
VE_ONLY = ("ddpm", "dpm_fast", "dpm_adaptive")

# Samplers whose noise must come from one Brownian path by default (k-diffusion's and ComfyUI's default for
# them): dpmpp_sde's two draws per step are increments over overlapping intervals, (sigma, sigma_mid) and
# (sigma, sigma_next); independent draws there lose about 10% of the sample's spread.
BROWNIAN_DEFAULT = ("dpmpp_sde",)


def _doc(name: str) -> str:
    if name == "dpm_adaptive":
        return ("DPM-Solver-12/23 with adaptive step size (k-diffusion sample_dpm_adaptive), from sigmas[0] to the "
                "last nonzero sigma; reads its error estimate once per attempted step.")
    return " ".join((_BUILDERS[name].__doc__ or "").strip().split("\n\n")[0].split())


DESCRIPTIONS = {name: _doc(name) for name in SAMPLERS}

# Global order of accuracy on the probability-flow ODE (deterministic samplers; stochastic ones with eta=0 or
# s_churn=0), as measured by tests/test_samplers.py on a geometric grid. The multistep methods (lms, deis,
# ipndm, dpmpp_3m_sde, unipc, uni_pc) are of higher order per step, but like k-diffusion's, ComfyUI's and
# diffusers' versions they start with a first-order step, whose O(h^2) local error caps the global order at
# 2; ipndm's fixed Adams-Bashforth weights assume equal steps, which also caps it at 2 on a graded grid.
# dpm_fast ends with a first- or second-order step (N mod 3), so it is third order only when N = 2 mod 3.
# euler_ancestral and ddpm have no noiseless form: theirs is the weak order of the first-order ancestral step
# (their spread's error falls with the step count, tested). No order for lcm (exact with a consistency model,
# not an ODE / SDE solver) or dpm_adaptive (its accuracy is set by rtol / atol, not a step count).
# benchmarks/sampler_accuracy.py prints the measured slopes.
ORDERS = {"euler": 1, "ddim": 1, "euler_ancestral": 1, "heun": 2, "dpm_2": 2, "dpm_2_ancestral": 2, "lms": 2,
          "dpm_fast": 2, "dpmpp_2s_ancestral": 2, "dpmpp_sde": 2, "dpmpp_2m": 2, "dpmpp_2m_sde": 2,
          "dpmpp_3m_sde": 2, "ddpm": 1, "ipndm": 2, "ipndm_v": 2, "deis": 2, "res_multistep": 2,
          "res_multistep_ancestral": 2, "unipc": 2, "uni_pc": 2, "uni_pc_bh2": 2}

# Network evaluations per step of the schedule, as the CLI lists them ("1 to 0": one on the step to sigma 0).
EVALUATIONS = {"heun": "2 (1 to 0)", "dpm_2": "2 (1 to 0)", "dpm_2_ancestral": "2 (1 to 0)",
               "dpmpp_2s_ancestral": "2 (1 to 0)", "dpmpp_sde": "2 (1 to 0)", "dpm_fast": "1 (in 3-stage steps)",
               "dpm_adaptive": "3 per try (adaptive)"}

# Whether the sampler draws noise: always, or with which option.
STOCHASTIC = {"euler": "with s_churn > 0", "heun": "with s_churn > 0", "dpm_2": "with s_churn > 0",
              "euler_ancestral": "yes", "dpm_2_ancestral": "yes", "dpmpp_2s_ancestral": "yes", "dpmpp_sde": "yes",
              "dpmpp_2m_sde": "yes", "dpmpp_3m_sde": "yes", "ddpm": "yes", "lcm": "yes",
              "res_multistep_ancestral": "yes", "ddim": "with eta > 0", "dpm_fast": "with eta > 0",
              "res_multistep": "with eta > 0", "dpm_adaptive": "with eta > 0"}


def describe(name: str) -> dict[str, object]:
    """One sampler's summary: ``{"order", "evaluations", "stochastic", "description", "options"}``."""
    if name not in OPTIONS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {name!r}")
    return {"order": ORDERS.get(name), "evaluations": EVALUATIONS.get(name, "1"),
            "stochastic": STOCHASTIC.get(name, "no"), "description": DESCRIPTIONS[name],
            "options": dict(OPTIONS[name])}


# ------------------------------------------------------------------------------------------- conversion

def conversion(prediction: str, parametrization: str, sigma: float) -> tuple[float, float, float]:
    """(p, q, c_in) with ``D = p*x + q*raw`` and the network input ``c_in * x`` at ``sigma``."""
    if prediction == "denoised":
        return 0.0, 1.0, 1.0
    if prediction == "sample":
        return 0.0, 1.0, (1.0 / math.sqrt(sigma * sigma + 1.0) if parametrization == "ve" else 1.0)
    if prediction == "epsilon":
        return 1.0, -sigma, 1.0 / math.sqrt(sigma * sigma + 1.0)
    if prediction == "v_prediction":
        c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)
        return c_in * c_in, -sigma * c_in, c_in
    if prediction == "flow":
        return 1.0, -sigma, 1.0
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def fill_row(c: np.ndarray, row: _Row, K: int, prediction: str, parametrization: str, g: float,
             next_sigma: float) -> None:
    """Write one row into ``c`` (``[9 + 2K]``, zeros): guidance, the raw-output conversion at the row's sigma,
    the next network input's scale, and the row's update and history coefficients."""
    c[G] = g
    c[P], c[Q], _ = conversion(prediction, parametrization, row.sigma)
    c[CIN] = conversion(prediction, parametrization, next_sigma)[2]
    for key, val in row.a.items():
        col = {"x": AX, "d": AD, "z": AZ}.get(key)
        c[AH + int(key) if col is None else col] += val
    for key, val in row.b.items():
        col = {"x": BX, "d": BD}.get(key)
        c[BH(K) + int(key) if col is None else col] += val


def check_options(sampler: str, options: dict) -> dict:
    """The sampler's options with defaults filled in; ValueError for an option it does not take or a bad value."""
    if not isinstance(sampler, str) or sampler not in OPTIONS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    allowed = OPTIONS[sampler]
    for k in options:
        if k not in allowed:
            raise ValueError(f"option {k!r} does not apply to sampler {sampler!r}; "
                             f"it takes {sorted(allowed) or 'none'}")
    opts = {**allowed, **{k: v for k, v in options.items() if v is not None}}
    for k in ("eta", "s_noise"):
        v = opts.get(k, 0.0)
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{k} must be a finite number >= 0, got {v!r}")
    if "order" in opts and sampler == "lms" and opts["order"] not in (1, 2, 3, 4):
        raise ValueError(f"order must be 1 to 4 for lms, got {opts['order']}")
    return opts


def build_plan(
    sampler: str,
    sigmas,
    *,
    prediction: str = "denoised",
    parametrization: str = "ve",
    guidance_scale: float | None = None,
    **options,
) -> Plan:
    """Build the float64 coefficient table of ``sampler`` for the schedule ``sigmas`` (``[N + 1]``)."""
    if sampler in ADAPTIVE:
        raise ValueError(f"{sampler} chooses its steps from an error estimate while it runs; it has no fixed "
                         "table (diffusion_fast.sample runs it in its own loop)")
    opts = check_options(sampler, options)
    s = [float(v) for v in np.asarray(sigmas, dtype=np.float64).reshape(-1)]
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
    if sampler in VE_ONLY and parametrization != "ve":
        raise ValueError(f"sampler {sampler!r} is defined for parametrization='ve' only, got {parametrization!r}")
    a = [1.0] * len(s) if parametrization == "ve" else [1.0 - v for v in s]
    built = _BUILDERS[sampler](s, a, parametrization=parametrization, **opts)
    table = built if isinstance(built, _Table) else _Table(*built)
    rows, K = table.rows, table.K
    g = 1.0 if guidance_scale is None else float(guidance_scale)
    E = len(rows)
    width = coef_width(K)
    coef = np.zeros((E, width), dtype=np.float64)
    slots = np.full((E, 2), -1, dtype=np.int64)
    noise_sigmas = np.full((E, 2), np.nan, dtype=np.float64)
    for e, row in enumerate(rows):
        c = coef[e]
        fill_row(c, row, K, prediction, parametrization, g, rows[e + 1].sigma if e + 1 < E else 0.0)
        slots[e] = (row.slot_d, row.slot_y)
        if c[AZ] != 0.0:
            noise_sigmas[e] = row.zi
    sig_eval = np.array([r.sigma for r in rows], dtype=np.float64)
    if not np.all(np.isfinite(coef)) or not np.all(np.isfinite(sig_eval)) or not math.isfinite(table.pre_noise):
        bad = np.argwhere(~np.isfinite(coef))
        where = f"evaluation {bad[0][0]}, column {bad[0][1]}" if len(bad) else "an evaluation sigma"
        raise ValueError(f"{sampler}: non-finite coefficient at {where} for sigmas {s}; the schedule is not "
                         "usable with this sampler")
    return Plan(
        sampler=sampler,
        K=K,
        coef=coef,
        slots=slots,
        sigma_eval=sig_eval,
        noise=coef[:, AZ] != 0.0,
        step=np.array([r.step for r in rows], dtype=np.int64),
        ends_step=np.array([r.ends_step for r in rows], dtype=bool),
        sigmas=np.array(s if table.grid is None else table.grid, dtype=np.float64),
        c_in0=conversion(prediction, parametrization, rows[0].sigma)[2],
        noise_sigmas=noise_sigmas,
        pre_noise=float(table.pre_noise),
        pre_noise_sigmas=tuple(table.pre_zi) if table.pre_zi else (math.nan, math.nan),
    )


def with_denoised_slot(plan: Plan) -> Plan:
    """A plan in which every row writes D somewhere (adds one slot if needed), for callbacks."""
    if np.all(plan.slots[:, 0] >= 0):
        return plan
    K = plan.K + 1
    coef = np.zeros((plan.evaluations, coef_width(K)), dtype=np.float64)
    coef[:, :AH] = plan.coef[:, :AH]
    coef[:, AH:AH + plan.K] = plan.coef[:, AH:AH + plan.K]
    coef[:, BH(K):BH(K) + plan.K] = plan.coef[:, BH(plan.K):BH(plan.K) + plan.K]
    slots = plan.slots.copy()
    slots[slots[:, 0] < 0, 0] = plan.K
    return replace(plan, K=K, coef=coef, slots=slots)
