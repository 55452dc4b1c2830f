"""``diffusion_fast.sample``: check the arguments once, then run the loop eagerly or as one CUDA graph."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch

from ..ops._checks import same_device
from ..ops.rows import G
from .loop import get_plan, run
from .tables import ADAPTIVE, BROWNIAN_DEFAULT, PARAMETRIZATIONS, PREDICTIONS, VE_ONLY, check_options

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_guidance_scale(value: object, name: str = "guidance_scale") -> float:
    """The one check of a guidance scale: a finite number ``>= 0`` (0 is the unconditional model, 1 the
    conditional one, more pushes further from the unconditional). Returns it as a float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _sigmas_to_host(sigmas) -> np.ndarray:
    if isinstance(sigmas, torch.Tensor):
        if sigmas.dtype == torch.bool or sigmas.is_complex() or not (sigmas.is_floating_point()
                                                                      or sigmas.dtype in _INT_DTYPES):
            raise TypeError(f"sigmas must hold real numbers, got a tensor of dtype {sigmas.dtype}")
        # One copy before the loop starts; the loop itself never reads device values.
        sigmas = sigmas.detach().to("cpu", torch.float64).numpy()
    elif isinstance(sigmas, np.ndarray):
        if sigmas.dtype.kind not in "fiu":
            raise TypeError(f"sigmas must hold real numbers, got an array of dtype {sigmas.dtype}")
    else:
        try:
            items = list(sigmas)
        except TypeError:
            raise TypeError(f"sigmas must be a 1-D tensor or sequence of floats, got {type(sigmas).__name__}") \
                from None
        for v in items:
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise TypeError(f"sigmas must be numbers, got {v!r} ({type(v).__name__})")
        sigmas = items
    try:
        s = np.asarray(sigmas, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"sigmas must be a 1-D tensor or sequence of floats: {exc}") from None
    if s.ndim != 1 or s.shape[0] < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 values (N steps need N+1), got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError(f"sigmas must be finite and >= 0, got {s.tolist()}")
    if np.any(s[1:] >= s[:-1]):
        raise ValueError(f"sigmas must be strictly decreasing, got {s.tolist()}")
    return s


def check_generator(generator, batch: int, device: torch.device) -> None:
    """``generator``: None, one ``torch.Generator`` on ``device``, or a list of ``batch`` of them (one per row of
    the ``[batch, ...]`` state; see :func:`.loop.draw_noise`)."""
    if generator is None:
        return
    many = isinstance(generator, (list, tuple))
    gens = list(generator) if many else [generator]
    if many and len(gens) != batch:
        raise ValueError(f"generator is a list of {len(gens)} generators but the batch has {batch} rows; pass one "
                         "generator per row (or a single generator)")
    for i, g in enumerate(gens):
        name = f"generator[{i}]" if many else "generator"
        if not isinstance(g, torch.Generator):
            raise TypeError(f"{name} must be a torch.Generator, got {type(g).__name__}")
        if not same_device(g.device, device):
            raise ValueError(f"{name} is on {g.device} but x is on {device}")


def _check_args(model, x, sampler, prediction, parametrization, guidance_scale, cond, uncond, net_dtype):
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, sigma[, cond]), got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor [B, ...], got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty [B, ...] tensor, got shape {tuple(x.shape)}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if parametrization is None:
        parametrization = "flow" if prediction == "flow" else "ve"
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
    if prediction == "flow" and parametrization != "flow":
        raise ValueError("prediction='flow' (velocity) needs parametrization='flow'")
    if prediction in ("epsilon", "v_prediction") and parametrization != "ve":
        raise ValueError(f"prediction={prediction!r} is defined for parametrization='ve', got {parametrization!r}")
    if guidance_scale is not None:
        check_guidance_scale(guidance_scale)
        if cond is None or uncond is None:
            raise ValueError("guidance_scale needs both cond and uncond (batched as [uncond; cond] per call)")
    elif uncond is not None:
        raise ValueError("uncond is only used with guidance_scale; pass guidance_scale or drop uncond")
    for name, c in (("cond", cond), ("uncond", uncond)):
        if c is not None:
            if not isinstance(c, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(c).__name__}")
            if c.shape[0] != x.shape[0]:
                raise ValueError(f"{name} must have batch size {x.shape[0]} (x's), got shape {tuple(c.shape)}")
            if c.device != x.device:
                raise ValueError(f"{name} is on {c.device} but x is on {x.device}")
    if cond is not None and uncond is not None and cond.shape != uncond.shape:
        raise ValueError(f"cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} must have the same shape")
    if net_dtype is not None and net_dtype not in (torch.float32, torch.float16, torch.bfloat16) and not (
            net_dtype == torch.float64 and x.dtype == torch.float64):
        raise TypeError(f"net_dtype must be float32, float16 or bfloat16 (float64 with a float64 x), got {net_dtype}")
    return parametrization


def sample(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas,
    sampler: str = "dpmpp_2m",
    *,
    generator: Optional[Union[torch.Generator, Sequence[torch.Generator]]] = None,
    callback: Optional[Callable[[dict[str, Any]], None]] = None,
    progress: bool = False,
    guidance_scale: Optional[float] = None,
    cond: Optional[torch.Tensor] = None,
    uncond: Optional[torch.Tensor] = None,
    prediction: str = "denoised",
    parametrization: Optional[str] = None,
    net_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
    cuda_graph: bool = False,
    check_finite: bool = False,
    model_kwargs: Optional[Mapping[str, torch.Tensor]] = None,
    noise_sampler: Union[Callable[[float, float], torch.Tensor], str, None] = None,
    **options,
) -> torch.Tensor:
    """Run ``sampler`` over the schedule ``sigmas`` starting from ``x`` and return the sample.

    Args:
        model: the network. Called as ``model(x_in, sigma)``, or ``model(x_in, sigma, cond)`` when ``cond``
            is given. ``sigma`` is a float32 tensor ``[batch of x_in]``. With ``guidance_scale``, each call
            evaluates both halves of classifier-free guidance at once: ``x_in`` has batch ``2B`` and
            ``cond`` is ``torch.cat([uncond, cond])`` (unconditional half first).
            With ``prediction="denoised"`` (k-diffusion's denoiser contract) the model receives the state
            itself and returns the denoised estimate. With a raw kind (``"epsilon"``, ``"v_prediction"``,
            ``"sample"``, ``"flow"``) it receives ``c_in(sigma) * x`` in ``net_dtype`` (``c_in = 1 /
            sqrt(sigma^2 + 1)`` for the VE parametrization, 1 for flow) and returns its raw output, which
            the fused step converts to the denoised estimate.
        x: ``[B, ...]`` starting noise already multiplied by ``sigmas[0]`` (flow: pure noise at sigma 1). A
            float64 ``x`` keeps a float64 state, tables and output (a reference run; the fused step then runs
            on the reference backend), any other float dtype a float32 state.
        sigmas: ``[N + 1]`` strictly decreasing, usually ending in 0 (see :mod:`diffusion_fast.schedules`).
        sampler: one of :data:`diffusion_fast.SAMPLERS`.
        generator: a ``torch.Generator`` on x's device, the source of the ancestral / SDE noise, or a list of ``B``
            generators: row ``b``'s noise is then drawn from ``generator[b]`` alone, so each row's noise does not
            depend on the batch it shares (diffusers' list-of-generators convention). The same generator seeds,
            device, backend and torch build give a bit-identical output; the loop's own arithmetic is elementwise
            and does not depend on the CPU thread count, but a model's may (torch's CPU convolutions and matrix
            products split their sums by ``torch.get_num_threads()``).
        callback: called after each step with ``{"x", "i", "sigma", "sigma_next", "denoised"}``.
        progress: show a progress bar.
        guidance_scale: classifier-free guidance scale ``g`` (finite, ``>= 0``): ``raw = u + g * (c - u)``.
        cond, uncond: conditioning tensors ``[B, ...]`` handed to the model (see above).
        prediction: what the model returns: ``"denoised"``, ``"epsilon"``, ``"v_prediction"``, ``"sample"``
            or ``"flow"`` (velocity ``noise - x0``).
        parametrization: ``"ve"`` (``x = x0 + sigma*noise``, default) or ``"flow"``
            (``x = (1 - sigma)*x0 + sigma*noise``; default when ``prediction="flow"``).
        net_dtype: dtype of the network input (default float32; float64 for a float64 ``x``).
        backend: backend of the fused step (``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"``).
        cuda_graph: capture the whole trajectory in a CUDA graph and replay it (CUDA tensors only).
        check_finite: check that ``x`` is finite before the loop and the sample after it: ValueError for a
            non-finite ``x``, FloatingPointError for a non-finite sample (the model returned NaN or inf, or a
            very large guidance scale overflowed float32). Costs two reads of a device value, one before and one
            after the loop — none inside it — so it is off by default: ``sample`` itself never synchronises
            with the device, and a caller that keeps the result on the GPU (a decoder, a CUDA graph, a
            benchmark) would lose that. :class:`diffusion_fast.Pipeline` always checks.
        model_kwargs: tensors handed to every model call as keyword arguments (``model(x_in, sigma[, cond],
            **model_kwargs)``), e.g. pooled text embeddings or position ids, of any shape, on x's device. They
            are passed as given (with guidance, tensors with a batch dimension must already be ``[2B, ...]``,
            unconditional half first). With ``cuda_graph=True`` they are inputs of the graph like ``x``, ``cond``
            and ``uncond``: copied into its static buffers before each replay.
        noise_sampler: where the stochastic samplers' noise comes from, k-diffusion's contract: a callable
            ``noise_sampler(sigma, sigma_next) -> [B, ...]`` standard normal tensor (called with two Python
            floats, the noise levels k-diffusion passes at that point of its loop; churn: ``(sigma,
            sigma_hat)``), or ``"brownian"``: a :class:`~diffusion_fast.samplers.noise.BrownianTreeNoiseSampler`
            over the schedule's range seeded from ``generator``'s state (no device read), so the injected noise
            does not change with the step count. Default: ``"brownian"`` for ``dpmpp_sde`` (as in k-diffusion:
            its two draws per step overlap), fresh ``randn`` draws from ``generator`` otherwise. With
            ``cuda_graph=True`` it is called before each replay, for every draw in order. A callable is not
            combined with ``generator`` (it draws the noise itself).
        **options: sampler options (``diffusion-fast samplers`` lists them): ``eta`` and ``s_noise``
            (ancestral/SDE samplers, ddim, res_multistep, dpm_fast), ``s_churn``, ``s_tmin``, ``s_tmax``,
            ``s_noise`` (Karras churn of euler, heun, dpm_2), ``order`` (lms, deis, ipndm, unipc, uni_pc),
            ``mode`` (deis), ``r`` (dpmpp_sde), ``s_noise_end`` (lcm), ``solver_type`` (dpmpp_2m_sde),
            ``variant`` (unipc), and dpm_adaptive's ``rtol``, ``atol``, ``h_init``, ``pcoeff``, ``icoeff``,
            ``dcoeff``, ``accept_safety``.

    Returns:
        ``[B, ...]`` sample: float64 for a float64 ``x``, else float32.

    Raises:
        ValueError / TypeError: a bad argument, named, before the first step (the sampler name and its
            options are checked by :func:`diffusion_fast.samplers.build_plan`); a model output of the wrong
            shape or dtype, at the first call. FloatingPointError: see ``check_finite``.
    """
    parametrization = _check_args(model, x, sampler, prediction, parametrization, guidance_scale, cond, uncond,
                                  net_dtype)
    model_kwargs = _check_model_kwargs(model_kwargs, x)
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be True or False, got {check_finite!r}")
    s = _sigmas_to_host(sigmas)  # sampler options are checked by build_plan
    if parametrization == "flow" and s[0] > 1.0:
        raise ValueError(f"flow sigmas must lie in [0, 1], got sigmas[0]={s[0]}")
    check_generator(generator, x.shape[0], x.device)
    if noise_sampler is not None and not callable(noise_sampler) and noise_sampler != "brownian":
        raise ValueError(f"noise_sampler must be a callable noise_sampler(sigma, sigma_next) -> tensor or "
                         f"'brownian', got {noise_sampler!r}")
    if callable(noise_sampler) and generator is not None:
        raise ValueError("pass generator or a noise_sampler callable, not both: the callable draws the noise itself")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    net_dtype = net_dtype or dtype
    if sampler in ADAPTIVE:
        if cuda_graph:
            raise ValueError(f"cuda_graph=True cannot capture {sampler}: it decides each step size on the host "
                             "from an error estimate (one device read per step)")
        if sampler in VE_ONLY and parametrization != "ve":
            raise ValueError(f"sampler {sampler!r} is defined for parametrization='ve' only, got {parametrization!r}")
        if check_finite:
            _check_finite_input(x)
        from .adaptive import run_adaptive  # the one loop that reads a device value per step

        out = run_adaptive(model, x, s, check_options(sampler, options), generator=generator, callback=callback,
                           guidance_scale=guidance_scale, cond=cond, uncond=uncond, prediction=prediction,
                           net_dtype=net_dtype, backend=backend, noise_sampler=noise_sampler, dtype=dtype)
        if check_finite:
            _check_finite_output(out)
        return out
    tables = get_plan(sampler, s, prediction, parametrization, guidance_scale, options, x.device,
                      need_denoised=callback is not None, dtype=dtype)
    if dtype == torch.float32:
        _check_float32_table(tables.plan.coef, guidance_scale)
    if noise_sampler is None and sampler in BROWNIAN_DEFAULT and tables.plan.draws:
        noise_sampler = "brownian"
    if noise_sampler == "brownian":
        from .noise import brownian_for_plan

        noise_sampler = brownian_for_plan(torch.empty(x.shape, dtype=dtype, device=x.device), tables.plan.draws,
                                          generator)
    if cuda_graph:
        if x.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs CUDA tensors; x is on {x.device}")
        if callback is not None:
            raise ValueError("cuda_graph=True replays the whole trajectory at once; it takes no callback")
    if check_finite:
        _check_finite_input(x)
    if cuda_graph:
        from .graph import run_graphed  # imported on use: graph capture is CUDA-only

        out = run_graphed(tables, model, x, generator=generator, guidance_scale=guidance_scale, cond=cond,
                          uncond=uncond, net_dtype=net_dtype, backend=backend, model_kwargs=model_kwargs,
                          noise_sampler=noise_sampler)
    else:
        out = run(tables, model, x, generator=generator, callback=callback, progress=progress,
                  guidance_scale=guidance_scale, cond=cond, uncond=uncond, net_dtype=net_dtype,
                  backend=backend, model_kwargs=model_kwargs, noise_sampler=noise_sampler)
    if check_finite:
        _check_finite_output(out)
    return out


def _check_model_kwargs(model_kwargs, x: torch.Tensor) -> dict[str, torch.Tensor]:
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a mapping of names to tensors, got {type(model_kwargs).__name__}")
    for k, v in model_kwargs.items():
        if not isinstance(k, str) or not k.isidentifier():
            raise TypeError(f"model_kwargs keys must be keyword names, got {k!r}")
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"model_kwargs[{k!r}] must be a torch.Tensor, got {type(v).__name__}")
        if v.device != x.device:
            raise ValueError(f"model_kwargs[{k!r}] is on {v.device} but x is on {x.device}")
    return dict(model_kwargs)


def _check_float32_table(coef: np.ndarray, guidance_scale: Optional[float]) -> None:
    """The float64 table is uploaded as float32: every coefficient must stay finite there (host values)."""
    with np.errstate(over="ignore"):
        bad = ~np.isfinite(coef.astype(np.float32))
    if bad.any():
        e, col = (int(v) for v in np.argwhere(bad)[0])
        if col == G and guidance_scale is not None:
            raise ValueError(f"guidance_scale={guidance_scale!r} does not fit in float32 (at most "
                             f"{float(np.finfo(np.float32).max):.4g})")
        raise ValueError(f"coefficient {col} of evaluation {e} is {coef[e, col]!r}, beyond float32's range: the "
                         "schedule's sigmas are too extreme for this sampler")


def _check_finite_input(x: torch.Tensor) -> None:
    finite = torch.isfinite(x)
    if not bool(finite.all()):  # one read of a device value, before the loop
        raise ValueError(f"x holds {int((~finite).sum())} non-finite value(s) (NaN or inf) of {x.numel()}; "
                         "sampling would only carry them on")


def _check_finite_output(out: torch.Tensor) -> None:
    finite = torch.isfinite(out)
    if not bool(finite.all()):  # one read of a device value, after the loop
        raise FloatingPointError(f"{int((~finite).sum())} of {out.numel()} values of the sample are not finite after "
                                 "the last step (NaN or inf): the model returned non-finite values, or a very large "
                                 "guidance scale (or model output) overflowed float32")

