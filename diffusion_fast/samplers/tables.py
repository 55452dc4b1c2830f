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
from dataclasses import dataclass, field

import numpy as np

from ..ops.rows import AD, AH, AX, AZ, BD, BH, BX, CIN, G, P, Q, coef_width

PREDICTIONS = ("denoised", "epsilon", "v_prediction", "sample", "flow")
PARAMETRIZATIONS = ("ve", "flow")


@dataclass
class _Row:
    """One network evaluation: ``x_new = a . inputs``, ``y = b . inputs``; keys "x", "d", "z", slot ints."""

    sigma: float
    step: int
    ends_step: bool
    a: dict = field(default_factory=dict)
    b: dict = field(default_factory=dict)
    slot_d: int = -1
    slot_y: int = -1


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
        sigmas: the schedule, ``[N + 1]``.
        c_in0: input scale of the first network evaluation.
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

    @property
    def evaluations(self) -> int:
        return int(self.coef.shape[0])


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

def _euler(s, a, **_):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    rows = []
    for i in range(len(s) - 1):
        r = s[i + 1] / s[i]
        rows.append(_Row(s[i], i, True, a={"x": r, "d": 1.0 - r}))
    return rows, 0


def _ddim_eta(s, a, eta, s_noise):
    rows = []
    for i in range(len(s) - 1):
        lam, lam_n = _lam(s[i], a[i]), _lam(s[i + 1], a[i + 1])
        down, up = _ancestral(lam, lam_n, eta)
        e = _exp_neg(lam_n - lam)
        row = _Row(s[i], i, True, a={"x": s[i + 1] / s[i] * down, "d": a[i + 1] * (1.0 - e * down)})
        if up > 0.0 and s[i + 1] > 0.0:
            row.a["z"] = s[i + 1] * up * s_noise
        rows.append(row)
    return rows, 0


def _euler_ancestral(s, a, eta=1.0, s_noise=1.0, **_):
    """Ancestral sampling with Euler steps (k-diffusion sample_euler_ancestral)."""
    return _ddim_eta(s, a, eta, s_noise)


def _ddim(s, a, eta=0.0, s_noise=1.0, **_):
    """DDIM (Song et al. 2021); eta=0 is deterministic (the first-order exponential integrator)."""
    return _ddim_eta(s, a, eta, s_noise)


def _heun(s, a, **_):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1); Euler on the step to sigma=0."""
    rows = []
    for i in range(len(s) - 1):
        sc, sn = s[i], s[i + 1]
        if sn == 0.0:
            rows.append(_Row(sc, i, True, a={"x": 0.0, "d": 1.0}))
            continue
        dt = sn - sc
        # Stage 1 at x_i: predictor x_p = x + dt*d1; keep x_i (slot 0) and D1 (slot 1).
        rows.append(_Row(sc, i, False, a={"x": sn / sc, "d": 1.0 - sn / sc}, b={"x": 1.0}, slot_d=1, slot_y=0))
        # Stage 2 at x_p: x_{i+1} = x_i + dt/2 * ((x_i - D1)/sc + (x_p - D2)/sn).
        rows.append(_Row(sn, i, True, a={0: 1.0 + dt / (2 * sc), 1: -dt / (2 * sc),
                                         "x": dt / (2 * sn), "d": -dt / (2 * sn)}))
    return rows, 2


def _dpm_2(s, a, **_):
    """DPM-Solver-2 in sigma (Lu et al. 2022; k-diffusion sample_dpm_2): midpoint in log sigma."""
    rows = []
    for i in range(len(s) - 1):
        sc, sn = s[i], s[i + 1]
        if sn == 0.0:
            rows.append(_Row(sc, i, True, a={"x": 0.0, "d": 1.0}))
            continue
        sm = math.exp(0.5 * (math.log(sc) + math.log(sn)))
        rows.append(_Row(sc, i, False, a={"x": sm / sc, "d": 1.0 - sm / sc}, b={"x": 1.0}, slot_y=0))
        dt = sn - sc
        rows.append(_Row(sm, i, True, a={0: 1.0, "x": dt / sm, "d": -dt / sm}))
    return rows, 1


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

        if i > 0:
            hist = older(i - 2, prev_order - 1)
            c_order = min(prev_order, len(hist) + 1) if math.isfinite(lam[i - 1]) else 1
            xc = _unipc_update(lam[i], lam[i - 1], s[i], s[i - 1], a[i], {0: 1.0}, {dslot(i - 1): 1.0},
                               hist, c_order, True, {"d": 1.0}, variant)
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


_BUILDERS: dict[str, Callable] = {
    "euler": _euler,
    "euler_ancestral": _euler_ancestral,
    "heun": _heun,
    "dpm_2": _dpm_2,
    "lms": _lms,
    "ddim": _ddim,
    "dpmpp_2m": _dpmpp_2m,
    "dpmpp_2m_sde": _dpmpp_2m_sde,
    "dpmpp_3m_sde": _dpmpp_3m_sde,
    "unipc": _unipc,
}

SAMPLERS = tuple(_BUILDERS)

# Options each sampler accepts (beyond the schedule), with defaults.
OPTIONS: dict[str, dict[str, object]] = {
    "euler": {},
    "euler_ancestral": {"eta": 1.0, "s_noise": 1.0},
    "heun": {},
    "dpm_2": {},
    "lms": {"order": 4},
    "ddim": {"eta": 0.0, "s_noise": 1.0},
    "dpmpp_2m": {},
    "dpmpp_2m_sde": {"eta": 1.0, "s_noise": 1.0, "solver_type": "midpoint"},
    "dpmpp_3m_sde": {"eta": 1.0, "s_noise": 1.0},
    "unipc": {"order": 2, "variant": "bh2"},
}

DESCRIPTIONS = {name: (fn.__doc__ or "").strip().splitlines()[0] for name, fn in _BUILDERS.items()}

# Global order of accuracy on the probability-flow ODE (deterministic samplers; SDE solvers with eta=0), as
# measured by tests/test_samplers.py. The multistep methods (lms, dpmpp_3m_sde, unipc) are of higher order
# per step, but like k-diffusion's and diffusers' versions they start with a first-order step, whose O(h^2)
# local error caps the global order at 2.
ORDERS = {"euler": 1, "ddim": 1, "euler_ancestral": 1, "heun": 2, "dpm_2": 2, "lms": 2, "dpmpp_2m": 2,
          "dpmpp_2m_sde": 2, "dpmpp_3m_sde": 2, "unipc": 2}


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
    if not isinstance(sampler, str) or sampler not in _BUILDERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    allowed = OPTIONS[sampler]
    for k in options:
        if k not in allowed:
            raise ValueError(f"option {k!r} does not apply to sampler {sampler!r}; "
                             f"it takes {sorted(allowed) or 'none'}")
    opts = {**allowed, **{k: v for k, v in options.items() if v is not None}}
    for k in ("eta", "s_noise"):
        v = opts.get(k, 0.0)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{k} must be a finite number >= 0, got {v!r}")
    if "order" in opts and sampler == "lms" and opts["order"] not in (1, 2, 3, 4):
        raise ValueError(f"order must be 1 to 4 for lms, got {opts['order']}")
    s = [float(v) for v in np.asarray(sigmas, dtype=np.float64).reshape(-1)]
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
    a = [1.0] * len(s) if parametrization == "ve" else [1.0 - v for v in s]
    rows, K = _BUILDERS[sampler](s, a, **opts)
    g = 1.0 if guidance_scale is None else float(guidance_scale)
    E = len(rows)
    width = coef_width(K)
    coef = np.zeros((E, width), dtype=np.float64)
    slots = np.full((E, 2), -1, dtype=np.int64)
    for e, row in enumerate(rows):
        c = coef[e]
        c[G] = g
        c[P], c[Q], _ = conversion(prediction, parametrization, row.sigma)
        nxt = rows[e + 1].sigma if e + 1 < E else 0.0
        c[CIN] = conversion(prediction, parametrization, nxt)[2]
        for key, val in row.a.items():
            col = {"x": AX, "d": AD, "z": AZ}.get(key)
            c[AH + int(key) if col is None else col] += val
        for key, val in row.b.items():
            col = {"x": BX, "d": BD}.get(key)
            c[BH(K) + int(key) if col is None else col] += val
        slots[e] = (row.slot_d, row.slot_y)
    if not np.all(np.isfinite(coef)):
        bad = np.argwhere(~np.isfinite(coef))[0]
        raise ValueError(f"{sampler}: non-finite coefficient at evaluation {bad[0]}, column {bad[1]} for sigmas "
                         f"{s}; the schedule is not usable with this sampler")
    return Plan(
        sampler=sampler,
        K=K,
        coef=coef,
        slots=slots,
        sigma_eval=np.array([r.sigma for r in rows], dtype=np.float64),
        noise=coef[:, AZ] != 0.0,
        step=np.array([r.step for r in rows], dtype=np.int64),
        ends_step=np.array([r.ends_step for r in rows], dtype=bool),
        sigmas=np.array(s, dtype=np.float64),
        c_in0=conversion(prediction, parametrization, rows[0].sigma)[2],
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
    return Plan(plan.sampler, K, coef, slots, plan.sigma_eval, plan.noise, plan.step, plan.ends_step,
                plan.sigmas, plan.c_in0)
