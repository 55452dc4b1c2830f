"""The shared sampling loop: one network call and one fused ``sampler_step`` per table row.

:func:`run` is the loop itself, with its arguments already checked by :func:`diffusion_fast.sample`
(:mod:`.api`); :mod:`.graph` runs the same function under CUDA-graph capture."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch

from ..ops import sampler_step
from .tables import Plan, build_plan, with_denoised_slot

_PLAN_CACHE: OrderedDict = OrderedDict()
_PLAN_CACHE_SIZE = 32


class DeviceTables:
    """A plan's tables on the device, in the state's dtype (float32, or float64 for a float64 state):
    coefficients, int64 slots, sigmas."""

    def __init__(self, plan: Plan, device: torch.device, dtype: torch.dtype = torch.float32):
        self.plan = plan
        self.dtype = dtype
        self.coef = torch.as_tensor(plan.coef, dtype=dtype).to(device)
        self.slots = torch.as_tensor(plan.slots, dtype=torch.int64).to(device)
        self.sigma = torch.as_tensor(plan.sigma_eval, dtype=dtype).to(device)


def get_plan(sampler: str, sigmas: np.ndarray, prediction: str, parametrization: str,
             guidance_scale: Optional[float], options: dict, device: torch.device,
             need_denoised: bool = False, dtype: torch.dtype = torch.float32) -> DeviceTables:
    """Build (or fetch from a small cache) the device tables for this sampler and schedule."""
    key = (sampler, sigmas.tobytes(), prediction, parametrization, guidance_scale,
           tuple(sorted(options.items())), str(device), need_denoised, dtype)
    try:
        hit = _PLAN_CACHE.get(key)
    except TypeError:  # an unhashable argument: build_plan says what is wrong with it
        hit = key = None
    if hit is not None:
        _PLAN_CACHE.move_to_end(key)
        return hit
    plan = build_plan(sampler, sigmas, prediction=prediction, parametrization=parametrization,
                      guidance_scale=guidance_scale, **options)
    if need_denoised:
        plan = with_denoised_slot(plan)
    tables = DeviceTables(plan, device, dtype)
    if key is None:
        return tables
    _PLAN_CACHE[key] = tables
    if len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
        _PLAN_CACHE.popitem(last=False)
    return tables


def check_model_output(out, net_in: torch.Tensor) -> None:
    """The model's output has its input's shape (``[B, ...]``, or ``[2B, ...]`` with guidance) and a float dtype on
    its device; checked on the first call (shapes only, no device value is read)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model must return a torch.Tensor, got {type(out).__name__}")
    if out.shape != net_in.shape:
        raise ValueError(f"model returned shape {list(out.shape)} for an input of shape {list(net_in.shape)}; it must "
                         "return one value per input value"
                         + (" (without guidance_scale the batch is not doubled)" if out.dim() and net_in.dim()
                            and out.shape[0] == 2 * net_in.shape[0] else ""))
    if not out.is_floating_point():
        raise TypeError(f"model returned dtype {out.dtype}; it must return floating-point values")
    if out.device != net_in.device:
        raise ValueError(f"model returned a tensor on {out.device} for an input on {net_in.device}")


def draw_noise(shape, generator: Optional[Union[torch.Generator, Sequence[torch.Generator]]], device: torch.device,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The one way sampler noise is drawn: ``[*shape]`` standard normal from ``generator`` (the state's dtype).

    ``generator`` is one generator for the whole tensor, or a list of ``shape[0]`` generators: row ``b`` is then
    ``torch.randn(shape[1:])`` from ``generator[b]`` alone (diffusers' list-of-generators convention), so a row's
    noise is the same whatever other rows share the batch."""
    if isinstance(generator, (list, tuple)):
        row = tuple(shape[1:])
        return torch.stack([torch.randn(row, generator=g, device=device, dtype=dtype) for g in generator])
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def call_noise_sampler(noise_sampler, sigma: float, sigma_next: float, like: torch.Tensor) -> torch.Tensor:
    """One draw from a user's ``noise_sampler(sigma, sigma_next)``, checked against the state ``like``."""
    z = noise_sampler(sigma, sigma_next)
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise TypeError(f"noise_sampler({sigma}, {sigma_next}) must return a floating-point tensor, "
                        f"got {type(z).__name__}" + (f" of dtype {z.dtype}" if isinstance(z, torch.Tensor) else ""))
    if tuple(z.shape) != tuple(like.shape) or z.device != like.device:
        raise ValueError(f"noise_sampler({sigma}, {sigma_next}) must return a tensor of x's shape "
                         f"{tuple(like.shape)} on {like.device}, got {tuple(z.shape)} on {z.device}")
    return z


def make_draw(plan: Plan, generator, noise_sampler, like: torch.Tensor):
    """``draw(k) -> tensor``: the k-th noise draw of the plan (``plan.draws[k]``), from ``noise_sampler`` when
    given, else :func:`draw_noise` from ``generator``; draws must be requested in order."""
    draws = plan.draws
    if noise_sampler is None:
        return lambda k: draw_noise(like.shape, generator, like.device, like.dtype)
    return lambda k: call_noise_sampler(noise_sampler, draws[k][1], draws[k][2], like)


def run(tables: DeviceTables, model, x, *, generator=None, callback=None, progress=False, guidance_scale=None,
        cond=None, uncond=None, net_dtype=torch.float32, backend="auto", noise=None, model_kwargs=None,
        noise_sampler=None) -> torch.Tensor:
    """The loop itself (arguments already checked). No host-device synchronisation happens in here.

    ``noise``, when given, is ``[n_noise, *x.shape]`` holding the draws the loop would make (``plan.draws``, in
    order: from ``noise_sampler(sigma, sigma_next)`` when given, else from ``generator``); the CUDA-graph
    path pre-draws them outside the graph. The state is float64 when ``x`` is (the tables' dtype), else
    float32. ``model_kwargs`` go to every model call as keyword arguments.
    """
    plan = tables.plan
    B = x.shape[0]
    cfg = guidance_scale is not None
    nb = 2 * B if cfg else B
    state = x.detach().to(tables.dtype, copy=True).contiguous()
    hist = torch.zeros((plan.K, *x.shape), dtype=tables.dtype, device=x.device) if plan.K else None
    n_draws = len(plan.draws)
    if noise is not None and noise.shape[0] != n_draws:
        raise ValueError(f"noise holds {noise.shape[0]} draws; the plan makes {n_draws}")
    draw = (lambda k: noise[k]) if noise is not None else make_draw(plan, generator, noise_sampler, state)
    drawn = 0
    if plan.pre_noise:  # Karras churn of the first step: lift x from sigmas[0] to sigma_hat before evaluating
        state.add_(draw(0).to(tables.dtype), alpha=plan.pre_noise)
        drawn = 1
    ctx = torch.cat([uncond, cond]) if cfg else cond
    bufs = [torch.empty((nb, *x.shape[1:]), dtype=net_dtype, device=x.device) for _ in range(2)]
    v = (state * plan.c_in0).to(net_dtype)
    bufs[0][:B] = v
    if cfg:
        bufs[0][B:] = v
    rows = range(plan.evaluations)
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, total=plan.evaluations, desc=plan.sampler, leave=False)
    kw = model_kwargs or {}
    for e in rows:
        sigma = tables.sigma[e].expand(nb)
        net_in = bufs[e % 2]
        out = model(net_in, sigma, **kw) if ctx is None else model(net_in, sigma, ctx, **kw)
        if e == 0:
            check_model_output(out, net_in)
        z = None
        if plan.noise[e]:
            z = draw(drawn)
            drawn += 1
        sampler_step(state, out, tables.coef[e], tables.slots[e] if plan.K else None, hist, z, out=state,
                     net_input=bufs[(e + 1) % 2], backend=backend)
        if callback is not None and plan.ends_step[e]:
            i = int(plan.step[e])
            callback({"x": state.clone(), "i": i, "sigma": float(plan.sigmas[i]),
                      "sigma_next": float(plan.sigmas[i + 1]), "denoised": hist[int(plan.slots[e, 0])].clone()})
    return state
