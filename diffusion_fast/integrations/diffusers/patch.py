"""``optimize(pipe)``: run a diffusers pipeline's attention and GroupNorm+SiLU through diffusion_fast's ops.

The pipeline stays a diffusers pipeline: its ``__call__``, components, configs and weights are untouched.
What changes, inside its denoiser (``pipe.unet`` or ``pipe.transformer``):

* every attention module whose processor is a stock one listed in :data:`processors.PROCESSORS` gets the
  matching ``Fast*Processor`` through diffusers' ``set_processor`` — unless the op cannot serve its heads;
  then it keeps its processor and :func:`report` says why;
* every ``ResnetBlock2D`` with plain GroupNorms, SiLU and the default time-embedding add becomes a
  :class:`processors.FusedResnetBlock2D` (a class swap: same parameters, no copies).

Options: ``sampler=`` swaps in :class:`~.scheduler.Scheduler` ``.from_config(pipe.scheduler, sampler=...)``;
``fused_loop=True`` (and ``cuda_graph=True``) replaces the denoising loop of this pipeline object by
:func:`diffusion_fast.sample` (:mod:`.fused`: a class swap of the instance, nothing else changes).

:func:`unoptimize` puts back the very processor objects, classes and scheduler that were there. :func:`report` lists
each attention module and ResNet block with what runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

from ...ops import status as op_status
from ...ops.registry import BACKENDS
from . import fused as F
from . import processors as P
from .scheduler import Scheduler

# Pipeline class name -> the attribute holding its denoiser.
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "unet",
    "StableDiffusionImg2ImgPipeline": "unet",
    "StableDiffusionXLPipeline": "unet",
    "StableDiffusionXLImg2ImgPipeline": "unet",
    "FluxPipeline": "transformer",
    "FluxImg2ImgPipeline": "transformer",
    "StableDiffusion3Pipeline": "transformer",
    "StableDiffusion3Img2ImgPipeline": "transformer",
    "PixArtSigmaPipeline": "transformer",
}

_STATE = "_diffusion_fast"  # attribute of an optimized pipeline holding its _State
DIFFUSION_FAST = "diffusion_fast"


@dataclass(frozen=True)
class ModuleReport:
    """What runs one attention module or ResNet block of an optimized pipeline.

    Attributes:
        name: the module's path from the pipeline, e.g. ``"unet.mid_block.attentions.0.transformer_blocks.0.attn2"``.
        kind: ``"attention"`` or ``"resnet"``.
        original: the stock processor class (attention) or block class (resnet) it had.
        runs: ``"diffusion_fast"`` when our op serves it, else the stock class name that still serves it.
        reason: why it keeps the stock code (None when ``runs == "diffusion_fast"``).
        calls: calls served by ``ops.attention`` so far (attention only).
        fallbacks: ``{reason: count}`` of calls the stock processor served because the op cannot take them
            (e.g. PixArt's cross-attention, which is called with an attention mask).
    """

    name: str
    kind: str
    original: str
    runs: str
    reason: Optional[str] = None
    calls: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        """One line for a listing: ``name  kind  original -> runs [reason] [fallback counts]``."""
        text = f"{self.name}  {self.kind}  {self.original} -> {self.runs}"
        if self.reason:
            text += f"  ({self.reason})"
        for reason, n in self.fallbacks.items():
            text += f"  (but {n} call{'s' if n != 1 else ''} ran {self.original}: {reason})"
        return text


@dataclass
class _State:
    options: dict[str, Any]
    model_attr: str
    attention: list[tuple[str, torch.nn.Module, Any, Any]] = field(default_factory=list)  # name, module, old, new
    resnets: list[tuple[str, torch.nn.Module, type]] = field(default_factory=list)  # name, module, old class
    kept: list[ModuleReport] = field(default_factory=list)
    scheduler: Optional[tuple[Any, Any]] = None  # (the pipeline's scheduler, the one optimize put there)
    pipeline_class: Optional[type] = None  # the class the pipeline had before the fused loop's class swap


def _pipeline_kind(pipe) -> str:
    for cls in type(pipe).__mro__:
        if cls.__name__ in SUPPORTED_PIPELINES and cls.__module__.startswith("diffusers."):
            return cls.__name__
    raise TypeError(f"optimize does not support {type(pipe).__name__}; supported pipelines: "
                    f"{', '.join(SUPPORTED_PIPELINES)}")


def _check_options(backend: object, sampler: object, sampler_options: object, fused_loop: object,
                   cuda_graph: object) -> None:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend != "auto":
        for op in ("attention", "group_norm"):
            reason = op_status(op)[backend]
            if reason is not None:
                raise ValueError(f"backend={backend!r} cannot run {op} here: {reason}")
    for name, value in (("fused_loop", fused_loop), ("cuda_graph", cuda_graph)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if sampler is not None and not isinstance(sampler, str):
        raise TypeError(f"sampler must be None or a sampler name, got {type(sampler).__name__}")
    if sampler_options is not None:
        if not isinstance(sampler_options, dict):
            raise TypeError(f"sampler_options must be a dict of the sampler's options, got "
                            f"{type(sampler_options).__name__}")
        if sampler is None:
            raise ValueError("sampler_options needs sampler=, the sampler they configure")
    if cuda_graph and not fused_loop:
        raise ValueError("cuda_graph=True needs fused_loop=True: the graph captures the fused loop's whole trajectory")


def _is_attention(m: torch.nn.Module) -> bool:
    return isinstance(m, (Attention, AttentionModuleMixin))


def _patch(model: torch.nn.Module, model_attr: str, state: _State, backend: str) -> None:
    """Decide every module first, then patch: a refusal leaves the model as it was."""
    attention, resnets = [], []
    for local, m in model.named_modules():
        name = f"{model_attr}.{local}" if local else model_attr
        if _is_attention(m):
            if isinstance(m.processor, P.FastProcessor):
                raise ValueError(f"{name} already runs {type(m.processor).__name__}: this {model_attr} is "
                                 "optimized through another pipeline that shares it; unoptimize that one first")
            reason = P.attention_reason(m)
            if reason is None:
                attention.append((name, m))
            else:
                state.kept.append(ModuleReport(name, "attention", type(m.processor).__name__,
                                               type(m.processor).__name__, reason))
        elif isinstance(m, ResnetBlock2D):
            if isinstance(m, P.FusedResnetBlock2D):
                raise ValueError(f"{name} is already a FusedResnetBlock2D: this {model_attr} is optimized through "
                                 "another pipeline that shares it; unoptimize that one first")
            reason = P.resnet_reason(m)
            if reason is None:
                resnets.append((name, m))
            else:
                state.kept.append(ModuleReport(name, "resnet", type(m).__name__, type(m).__name__, reason))
    for name, m in attention:
        old = m.processor
        new = P.PROCESSORS[type(old)](old, backend)
        m.set_processor(new)
        state.attention.append((name, m, old, new))
    for name, m in resnets:
        state.resnets.append((name, m, type(m)))
        m.__class__ = P.FusedResnetBlock2D
        m.diffusion_fast_backend = backend


def optimize(pipe, *, sampler: Optional[str] = None, backend: str = "auto", fused_loop: bool = False,
             cuda_graph: bool = False, sampler_options: Optional[dict] = None):
    """Patch ``pipe`` in place so its denoiser's attention and GroupNorm+SiLU run diffusion_fast's ops.

    ``pipe(...)`` keeps its whole signature and gives the stock pipeline's output (float32: to rounding).

    Args:
        pipe: a diffusers pipeline of a type in :data:`SUPPORTED_PIPELINES` (SD1.x/2.x, SDXL, their img2img,
            Flux and Flux img2img, SD3 and SD3 img2img, PixArt-Sigma), or a subclass of one.
        sampler: None keeps the pipeline's scheduler; a sampler name (``"dpmpp_2m"``, ``"euler"``, ... see
            :data:`.scheduler.METHODS`) sets ``pipe.scheduler = Scheduler.from_config(pipe.scheduler,
            sampler=sampler, **sampler_options)`` (the same noise schedule, that sampler's method).
        backend: the ops' backend: ``"auto"`` (the fastest that serves each call), ``"torch"``, ``"triton"``
            or ``"cuda"``. A backend that cannot run here is refused now, with its reason.
        fused_loop: replace the pipeline's denoising loop by :func:`diffusion_fast.sample` (CFG, conversion and
            update in one fused step per network evaluation, no host synchronisation); everything else stays the
            pipeline's own. See :mod:`.fused` for how, and for the call options it refuses.
        cuda_graph: with ``fused_loop``, capture the whole trajectory (network calls and steps) in one CUDA graph
            on the first call and replay it on the next calls with the same shapes and options.
        sampler_options: the sampler's options (``eta``, ``s_noise``, ``order``, ...), with ``sampler``.

    Returns:
        ``pipe`` itself. Calling ``optimize`` again with the same options does nothing; with other options it
        raises (call :func:`unoptimize` first).

    Raises:
        TypeError: ``pipe`` is not a supported pipeline (the message lists them), or an option has the wrong type;
            ``fused_loop`` on a subclass that overrides ``__call__``.
        ValueError: a bad or unavailable ``backend``; a sampler or sampler option the Scheduler refuses;
            ``cuda_graph`` without ``fused_loop``; ``fused_loop`` with a scheduler that has no matching sampler
            (e.g. SD1.5's PNDMScheduler: pass ``sampler=``) or with a diffusers whose ``__call__`` differs from
            the one the fused loop follows; a second call with other options; a denoiser already optimized
            through another pipeline object that shares it.
    """
    kind = _pipeline_kind(pipe)
    _check_options(backend, sampler, sampler_options, fused_loop, cuda_graph)
    options = dict(sampler=sampler, sampler_options=sampler_options, backend=backend, fused_loop=fused_loop,
                   cuda_graph=cuda_graph)
    state = getattr(pipe, _STATE, None)
    if state is not None:
        if state.options == options:
            return pipe
        given = ", ".join(f"{k}={v!r}" for k, v in options.items() if state.options[k] != v)
        had = ", ".join(f"{k}={state.options[k]!r}" for k, v in options.items() if state.options[k] != v)
        raise ValueError(f"pipe is already optimized with {had}; call unoptimize(pipe) before optimizing with {given}")
    model_attr = SUPPORTED_PIPELINES[kind]
    model = getattr(pipe, model_attr, None)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"pipe.{model_attr} must be a diffusers model to optimize {kind}, got {type(model).__name__}")
    # Everything that can be refused is refused before anything is patched.
    scheduler = None
    if sampler is not None:
        scheduler = Scheduler.from_config(pipe.scheduler, sampler=sampler, **(sampler_options or {}))
    if fused_loop:
        F.check_pipeline(pipe)
        F.loop_scheduler(scheduler if scheduler is not None else pipe.scheduler)
    state = _State(options=options, model_attr=model_attr)
    _patch(model, model_attr, state, backend)
    if scheduler is not None:
        state.scheduler = (pipe.scheduler, scheduler)
        pipe.scheduler = scheduler
    if fused_loop:
        state.pipeline_class = F.install(pipe, cuda_graph=cuda_graph, backend=backend)
    setattr(pipe, _STATE, state)
    return pipe


def unoptimize(pipe):
    """Undo :func:`optimize`: the original processor objects, block classes, scheduler object and pipeline class
    go back where they were.

    A module whose processor was changed by other code after ``optimize`` keeps that newer processor; a
    scheduler replaced after ``optimize`` stays. Returns ``pipe``. Raises ValueError when ``pipe`` is not optimized.
    """
    state = getattr(pipe, _STATE, None)
    if state is None:
        raise ValueError(f"{type(pipe).__name__} is not optimized by diffusion_fast; nothing to undo")
    if state.pipeline_class is not None:
        F.uninstall(pipe, state.pipeline_class)
    if state.scheduler is not None and pipe.scheduler is state.scheduler[1]:
        pipe.scheduler = state.scheduler[0]
    for _, m, old, new in state.attention:
        if m.processor is new:
            m.set_processor(old)
    for _, m, cls in state.resnets:
        if type(m) is P.FusedResnetBlock2D:
            m.__class__ = cls
            m.__dict__.pop("diffusion_fast_backend", None)
    delattr(pipe, _STATE)
    return pipe


def is_optimized(pipe) -> bool:
    """True when :func:`optimize` has patched ``pipe`` (and :func:`unoptimize` has not undone it)."""
    return getattr(pipe, _STATE, None) is not None


def report(pipe) -> list[ModuleReport]:
    """Every attention module and ResNet block of an optimized pipeline's denoiser, in module order, with what
    runs it and, for the ones that keep stock code, why.

    Raises ValueError when ``pipe`` is not optimized.
    """
    state = getattr(pipe, _STATE, None)
    if state is None:
        raise ValueError(f"{type(pipe).__name__} is not optimized by diffusion_fast; call optimize(pipe) first")
    rows = list(state.kept)
    for name, m, old, new in state.attention:
        if m.processor is new:
            rows.append(ModuleReport(name, "attention", type(old).__name__, DIFFUSION_FAST, None, new.calls,
                                     dict(new.fallbacks)))
        else:
            current = type(m.processor).__name__
            rows.append(ModuleReport(name, "attention", type(old).__name__, current,
                                     f"its processor was replaced by {current} after optimize"))
    for name, m, cls in state.resnets:
        runs, reason = (DIFFUSION_FAST, None) if type(m) is P.FusedResnetBlock2D else \
            (type(m).__name__, "its class was changed after optimize")
        rows.append(ModuleReport(name, "resnet", cls.__name__, runs, reason))
    order = {name: i for i, (name, _) in enumerate(
        (f"{state.model_attr}.{n}" if n else state.model_attr, m)
        for n, m in getattr(pipe, state.model_attr).named_modules())}
    return sorted(rows, key=lambda r: order.get(r.name, len(order)))


def format_report(pipe) -> str:
    """:func:`report` as text: a summary line per kind, then one line per module that keeps stock code."""
    rows = report(pipe)
    lines = []
    for kind in ("attention", "resnet"):
        mine = [r for r in rows if r.kind == kind]
        if not mine:
            continue
        ours = sum(r.runs == DIFFUSION_FAST for r in mine)
        fell = sum(sum(r.fallbacks.values()) for r in mine)
        calls = sum(r.calls for r in mine)
        text = f"{kind}: {ours}/{len(mine)} modules run diffusion_fast"
        if kind == "attention":
            text += f"; {calls} calls on diffusion_fast, {fell} on the stock processor so far"
        lines.append(text)
    lines += ["  " + r.line() for r in rows if r.runs != DIFFUSION_FAST or r.fallbacks]
    return "\n".join(lines)
