"""The fused denoising loop: ``optimize(pipe, fused_loop=True[, cuda_graph=True])``.

A pipeline optimized this way still runs its own ``__call__`` from the first line to the last: argument checks,
``encode_prompt``, latent preparation (img2img's ``get_timesteps`` / strength / ``add_noise`` or ``scale_noise``),
SDXL's added time ids, Flux's packing, image ids, guidance and ``mu``, VAE decoding, output types and
``return_dict``. Only its denoising loop is replaced, from inside, by one :func:`diffusion_fast.sample` call:

* For the duration of the call, ``pipe.scheduler`` is a :class:`~.scheduler.Scheduler` built from the
  pipeline's scheduler (``Scheduler.from_config(pipe.scheduler)``: the same timesteps, starting latents and
  ``add_noise``, to float32 rounding), and the denoiser's ``forward`` is intercepted on the instance.
* In the first iteration of the stock loop the denoiser call is recorded, not run: its arguments are exactly
  what the loop would give the network at every step (the prompt embeddings, SDXL's ``added_cond_kwargs``,
  Flux's ids and guidance, PixArt's attention mask, ...).
* The scheduler's ``step`` then receives the current latents and runs the whole trajectory: the schedule from
  ``sampling_args()``, the network called with the recorded arguments and ``model_timestep(sigma)``, CFG,
  raw -> denoised conversion and the update in one fused ``sampler_step`` per evaluation, no host
  synchronisation, and with ``cuda_graph=True`` the whole trajectory (network calls and steps) captured once
  and replayed. It returns the final latents; the pipeline's own ``interrupt`` flag makes the loop skip its
  remaining iterations (PixArt's loop has none: they cost a few small tensor operations each).

What each pipeline's loop does between the denoiser call and ``step`` (CFG, PixArt's learned-sigma split, Flux's
timestep scaling and true CFG) is written out below in :data:`FAMILIES`, following the loops of diffusers 0.42.1
line by line. :data:`PARAMETERS` lists every parameter of the nine ``__call__`` signatures of 0.42.1 with what
the fused loop does with it; a diffusers whose signature differs is refused (``check_pipeline``), as are the
per-step options the fused loop cannot honour, each by name. What a newer diffusers could break: a loop that no
longer calls the denoiser before ``step`` in its first iteration, that transforms the timestep differently, or
that adds per-step work — each shows as a failing comparison in tests/test_diffusers_fused.py, and a loop whose
first iteration does not look as expected raises a RuntimeError instead of computing something else.
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from ...samplers import build_plan, sample
from .scheduler import METHODS, Scheduler, SchedulerStepOutput

ATTR = "_diffusion_fast_loop"  # attribute of a pipeline with a fused loop, holding its FusedLoop
DIFFUSERS_VERSION = "0.42.1"  # the version whose __call__ and loops this module follows


# --------------------------------------------------------------------------------------------------------
# The pipelines
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """How one family of pipelines calls its denoiser inside the stock loop (diffusers 0.42.1).

    Attributes:
        name: "unet" (SD 1.x/2.x, SDXL and their img2img), "flux", "sd3", "pixart".
        model_attr: the pipeline attribute holding the denoiser.
        latent: the denoiser's argument receiving the (scaled, CFG-doubled) latents.
        context: the argument holding the text embeddings, split into the CFG halves.
        timestep_divisor: Flux gives its transformer ``t.to(latents.dtype) / 1000``; 1 for the others, which
            give the scheduler's timestep as it is.
        true_cfg: Flux's "true CFG": a second, unconditional denoiser call instead of a doubled batch.
        unbatched: arguments without a batch dimension (Flux's text and image position ids).
        callback_tensors: ``callback_on_step_end_tensor_inputs`` names the fused loop can hand a callback ->
            the path of the very tensor in the recorded denoiser call (the loop's own local of that name).
    """

    name: str
    model_attr: str
    latent: str
    context: str = "encoder_hidden_states"
    timestep_divisor: int = 1
    true_cfg: bool = False
    unbatched: tuple[str, ...] = ()
    callback_tensors: dict = field(default_factory=dict)


FAMILIES = {
    "unet": Family("unet", "unet", "sample", callback_tensors={
        "prompt_embeds": ("encoder_hidden_states",), "add_text_embeds": ("added_cond_kwargs", "text_embeds"),
        "add_time_ids": ("added_cond_kwargs", "time_ids")}),
    "flux": Family("flux", "transformer", "hidden_states", timestep_divisor=1000, true_cfg=True,
                   unbatched=("txt_ids", "img_ids"), callback_tensors={"prompt_embeds": ("encoder_hidden_states",)}),
    "sd3": Family("sd3", "transformer", "hidden_states", callback_tensors={
        "prompt_embeds": ("encoder_hidden_states",), "pooled_prompt_embeds": ("pooled_projections",)}),
    "pixart": Family("pixart", "transformer", "hidden_states"),
}

PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "unet", "StableDiffusionImg2ImgPipeline": "unet",
    "StableDiffusionXLPipeline": "unet", "StableDiffusionXLImg2ImgPipeline": "unet",
    "FluxPipeline": "flux", "FluxImg2ImgPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3", "StableDiffusion3Img2ImgPipeline": "sd3",
    "PixArtSigmaPipeline": "pixart",
}

_PASS = "passed to the pipeline's own code"
_IP = ("IP-Adapter inputs are not supported with fused_loop=True (their image embeddings go through the attention "
       "processors per step)")


def _refuse_unless(default: Any, why: str) -> tuple[str, Any, str]:
    return ("refused", default, why)


# Every parameter of the nine __call__ signatures of diffusers 0.42.1, with what the fused loop does with it:
# "pass" (the pipeline's own code before / after the loop handles it), "handled" (the fused loop implements its
# per-step meaning: see _FusedCall), or ("refused", default, why): any other value raises a ValueError naming it.
PARAMETERS: dict[str, Any] = {
    **{name: "pass" for name in (
        "prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3", "height",
        "width", "image", "strength", "num_inference_steps", "timesteps", "sigmas", "guidance_scale",
        "num_images_per_prompt", "generator", "latents", "prompt_embeds", "negative_prompt_embeds",
        "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "prompt_attention_mask",
        "negative_prompt_attention_mask", "output_type", "return_dict", "cross_attention_kwargs",
        "joint_attention_kwargs", "clip_skip", "original_size", "crops_coords_top_left", "target_size",
        "negative_original_size", "negative_crops_coords_top_left", "negative_target_size", "aesthetic_score",
        "negative_aesthetic_score", "max_sequence_length", "mu", "clean_caption", "use_resolution_binning",
        "true_cfg_scale", "skip_layer_guidance_scale", "skip_layer_guidance_stop", "skip_layer_guidance_start")},
    **{name: "handled" for name in (
        "eta", "callback_on_step_end", "callback_on_step_end_tensor_inputs", "callback", "callback_steps", "kwargs")},
    "ip_adapter_image": _refuse_unless(None, _IP),
    "ip_adapter_image_embeds": _refuse_unless(None, _IP),
    "negative_ip_adapter_image": _refuse_unless(None, _IP),
    "negative_ip_adapter_image_embeds": _refuse_unless(None, _IP),
    "guidance_rescale": _refuse_unless(0.0, "guidance rescale needs the standard deviation of each CFG half per step; "
                                            "the fused step combines the halves linearly"),
    "denoising_end": _refuse_unless(None, "it ends the loop part-way (for a refiner); the fused loop runs the "
                                          "scheduler's whole trajectory"),
    "denoising_start": _refuse_unless(None, "it starts the loop part-way (after a base model); the fused loop runs "
                                            "the scheduler's whole trajectory"),
    "skip_guidance_layers": _refuse_unless(None, "skip-layer guidance adds a third denoiser call on some steps"),
}

# The parameters of each supported __call__ in diffusers 0.42.1 (tests check them against the installed version).
SIGNATURES: dict[str, tuple[str, ...]] = {
    "StableDiffusionPipeline": (
        "prompt", "height", "width", "num_inference_steps", "timesteps", "sigmas", "guidance_scale",
        "negative_prompt", "num_images_per_prompt", "eta", "generator", "latents", "prompt_embeds",
        "negative_prompt_embeds", "ip_adapter_image", "ip_adapter_image_embeds", "output_type", "return_dict",
        "cross_attention_kwargs", "guidance_rescale", "clip_skip", "callback_on_step_end",
        "callback_on_step_end_tensor_inputs", "kwargs"),
    "StableDiffusionImg2ImgPipeline": (
        "prompt", "image", "strength", "num_inference_steps", "timesteps", "sigmas", "guidance_scale",
        "negative_prompt", "num_images_per_prompt", "eta", "generator", "prompt_embeds", "negative_prompt_embeds",
        "ip_adapter_image", "ip_adapter_image_embeds", "output_type", "return_dict", "cross_attention_kwargs",
        "clip_skip", "callback_on_step_end", "callback_on_step_end_tensor_inputs", "kwargs"),
    "StableDiffusionXLPipeline": (
        "prompt", "prompt_2", "height", "width", "num_inference_steps", "timesteps", "sigmas", "denoising_end",
        "guidance_scale", "negative_prompt", "negative_prompt_2", "num_images_per_prompt", "eta", "generator",
        "latents", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
        "ip_adapter_image", "ip_adapter_image_embeds", "output_type", "return_dict", "cross_attention_kwargs",
        "guidance_rescale", "original_size", "crops_coords_top_left", "target_size", "negative_original_size",
        "negative_crops_coords_top_left", "negative_target_size", "clip_skip", "callback_on_step_end",
        "callback_on_step_end_tensor_inputs", "kwargs"),
    "StableDiffusionXLImg2ImgPipeline": (
        "prompt", "prompt_2", "image", "strength", "num_inference_steps", "timesteps", "sigmas", "denoising_start",
        "denoising_end", "guidance_scale", "negative_prompt", "negative_prompt_2", "num_images_per_prompt", "eta",
        "generator", "latents", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds", "ip_adapter_image", "ip_adapter_image_embeds", "output_type", "return_dict",
        "cross_attention_kwargs", "guidance_rescale", "original_size", "crops_coords_top_left", "target_size",
        "negative_original_size", "negative_crops_coords_top_left", "negative_target_size", "aesthetic_score",
        "negative_aesthetic_score", "clip_skip", "callback_on_step_end", "callback_on_step_end_tensor_inputs",
        "kwargs"),
    "FluxPipeline": (
        "prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "true_cfg_scale", "height", "width",
        "num_inference_steps", "sigmas", "guidance_scale", "num_images_per_prompt", "generator", "latents",
        "prompt_embeds", "pooled_prompt_embeds", "ip_adapter_image", "ip_adapter_image_embeds",
        "negative_ip_adapter_image", "negative_ip_adapter_image_embeds", "negative_prompt_embeds",
        "negative_pooled_prompt_embeds", "output_type", "return_dict", "joint_attention_kwargs",
        "callback_on_step_end", "callback_on_step_end_tensor_inputs", "max_sequence_length"),
    "FluxImg2ImgPipeline": (
        "prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "true_cfg_scale", "image", "height", "width",
        "strength", "num_inference_steps", "sigmas", "guidance_scale", "num_images_per_prompt", "generator",
        "latents", "prompt_embeds", "pooled_prompt_embeds", "ip_adapter_image", "ip_adapter_image_embeds",
        "negative_ip_adapter_image", "negative_ip_adapter_image_embeds", "negative_prompt_embeds",
        "negative_pooled_prompt_embeds", "output_type", "return_dict", "joint_attention_kwargs",
        "callback_on_step_end", "callback_on_step_end_tensor_inputs", "max_sequence_length"),
    "StableDiffusion3Pipeline": (
        "prompt", "prompt_2", "prompt_3", "height", "width", "num_inference_steps", "sigmas", "guidance_scale",
        "negative_prompt", "negative_prompt_2", "negative_prompt_3", "num_images_per_prompt", "generator", "latents",
        "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
        "ip_adapter_image", "ip_adapter_image_embeds", "output_type", "return_dict", "joint_attention_kwargs",
        "clip_skip", "callback_on_step_end", "callback_on_step_end_tensor_inputs", "max_sequence_length",
        "skip_guidance_layers", "skip_layer_guidance_scale", "skip_layer_guidance_stop", "skip_layer_guidance_start",
        "mu"),
    "StableDiffusion3Img2ImgPipeline": (
        "prompt", "prompt_2", "prompt_3", "height", "width", "image", "strength", "num_inference_steps", "sigmas",
        "guidance_scale", "negative_prompt", "negative_prompt_2", "negative_prompt_3", "num_images_per_prompt",
        "generator", "latents", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds", "output_type", "ip_adapter_image", "ip_adapter_image_embeds", "return_dict",
        "joint_attention_kwargs", "clip_skip", "callback_on_step_end", "callback_on_step_end_tensor_inputs",
        "max_sequence_length", "mu"),
    "PixArtSigmaPipeline": (
        "prompt", "negative_prompt", "num_inference_steps", "timesteps", "sigmas", "guidance_scale",
        "num_images_per_prompt", "height", "width", "eta", "generator", "latents", "prompt_embeds",
        "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask", "output_type",
        "return_dict", "callback", "callback_steps", "clean_caption", "use_resolution_binning",
        "max_sequence_length", "kwargs"),
}


def _base_class(pipe) -> type:
    """The diffusers pipeline class (of :data:`PIPELINE_FAMILIES`) whose ``__call__`` ``pipe`` runs."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in PIPELINE_FAMILIES and cls.__module__.startswith("diffusers."):
            return cls
    raise TypeError(f"fused_loop=True does not support {type(pipe).__name__}; supported pipelines: "
                    f"{', '.join(PIPELINE_FAMILIES)}")


def check_pipeline(pipe) -> type:
    """Refuse, with the reason, a pipeline whose ``__call__`` the fused loop does not know. Returns its class.

    Raises:
        TypeError: not a supported pipeline; a subclass that overrides ``__call__``.
        ValueError: the installed diffusers' ``__call__`` takes other parameters than those of diffusers 0.42.1
            that :data:`PARAMETERS` handles.
    """
    base = _base_class(pipe)
    cls = type(pipe)
    if getattr(cls, ATTR + "_base", None) is None and inspect.getattr_static(cls, "__call__") is not \
            inspect.getattr_static(base, "__call__"):
        raise TypeError(f"fused_loop=True replaces the denoising loop of {base.__name__}.__call__; "
                        f"{cls.__name__} overrides __call__, so its loop is unknown: use fused_loop=False")
    have = [p for p in inspect.signature(base.__call__).parameters if p != "self"]
    known = SIGNATURES[base.__name__]
    if tuple(have) != known:
        added = [p for p in have if p not in known]
        lost = [p for p in known if p not in have]
        raise ValueError(f"fused_loop=True follows {base.__name__}.__call__ of diffusers {DIFFUSERS_VERSION}; the "
                         f"installed diffusers' takes other parameters (new: {added or 'none'}, gone: "
                         f"{lost or 'none'}, or a new order): use fused_loop=False")
    return base


# --------------------------------------------------------------------------------------------------------
# Recorded denoiser calls
# --------------------------------------------------------------------------------------------------------

_T_SIGMA, _T_VALUE = "df_sigma_table", "df_timestep_table"  # model_kwargs: the sigma -> timestep table


@dataclass(frozen=True)
class _Slot:
    """A tensor argument of a recorded call, by name in ``model_kwargs``."""

    name: str


def _split(obj: Any, path: tuple, tensors: dict, paths: dict) -> Any:
    """``obj`` with every tensor replaced by a :class:`_Slot` (the tensors go to ``tensors``, named in order)."""
    if isinstance(obj, torch.Tensor):
        name = f"df_arg{len(tensors)}"
        tensors[name] = obj
        paths[path] = name
        return _Slot(name)
    if isinstance(obj, dict):
        return {k: _split(v, path + (k,), tensors, paths) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split(v, path + (i,), tensors, paths) for i, v in enumerate(obj))
    return obj


def _fill(skeleton: Any, tensors: dict) -> Any:
    if isinstance(skeleton, _Slot):
        return tensors[skeleton.name]
    if isinstance(skeleton, dict):
        return {k: _fill(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(_fill(v, tensors) for v in skeleton)
    return skeleton


def _freeze(obj: Any) -> Any:
    """A hashable image of a skeleton (raises TypeError for an unhashable constant)."""
    if isinstance(obj, dict):
        return ("dict", tuple((k, _freeze(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(_freeze(v) for v in obj))
    hash(obj)
    return obj


@dataclass(frozen=True)
class _Spec:
    """Everything a model wrapper bakes in: the family, the recorded call's constants, PixArt's learned sigma."""

    family: Family
    skeleton: Any  # the recorded keyword arguments with _Slot for each tensor
    learned_sigma: bool


def _denoise(model: torch.nn.Module, spec: _Spec, x: torch.Tensor, sigma: torch.Tensor,
             ctx: Optional[torch.Tensor] = None, **tensors: torch.Tensor) -> torch.Tensor:
    """One network evaluation as the stock loop makes it: ``model(**recorded call)`` with the latents ``x``, the
    timestep of ``sigma`` and the CFG-batched text embeddings ``ctx``. Device operations only (no host sync)."""
    fam = spec.family
    t_sigma, t_value = tensors.pop(_T_SIGMA), tensors.pop(_T_VALUE)
    # The evaluation sigmas are the table's own float32 values: the nearest entry is the exact one.
    t = t_value[(sigma[:1, None] - t_sigma).abs().argmin(-1)].expand(x.shape[0])
    if fam.timestep_divisor != 1:  # pipeline_flux.py: timestep = t.expand(B).to(latents.dtype); ... timestep / 1000
        t = t.to(x.dtype) / fam.timestep_divisor
    kwargs = _fill(spec.skeleton, tensors)
    kwargs[fam.latent] = x
    kwargs["timestep"] = t
    if ctx is not None:
        kwargs[fam.context] = ctx
    out = model(**kwargs, return_dict=False)[0]
    if spec.learned_sigma:  # pipeline_pixart_sigma.py: noise_pred = noise_pred.chunk(2, dim=1)[0]
        out = out.chunk(2, dim=1)[0].contiguous()
    return out


class _Interrupted(Exception):
    """Raised from the callback to end the trajectory early (``pipe._interrupt`` set by the user's callback)."""

    def __init__(self, latents: torch.Tensor):
        super().__init__("interrupted")
        self.latents = latents


class _LoopScheduler(Scheduler):
    """The scheduler a pipeline sees during a fused call: :class:`Scheduler` whose ``step`` (the same signature,
    which pipelines inspect for ``eta`` and ``generator``) hands the loop's first step to the fused call."""

    _fused_call: Optional[_FusedCall] = None

    def step(self, model_output, timestep, sample, eta=None, generator=None, variance_noise=None,
             return_dict: bool = True, **kwargs):
        call = self._fused_call
        if call is None:
            return super().step(model_output, timestep, sample, eta=eta, generator=generator,
                                variance_noise=variance_noise, return_dict=return_dict, **kwargs)
        latents = call.step(model_output, timestep, sample, eta, generator, variance_noise, kwargs)
        return SchedulerStepOutput(prev_sample=latents) if return_dict else (latents,)


# --------------------------------------------------------------------------------------------------------
# Per-pipeline state and the call
# --------------------------------------------------------------------------------------------------------


class FusedLoop:
    """What a pipeline with a fused loop keeps between calls: its options, the scheduler built from
    ``pipe.scheduler`` (rebuilt when that changes) and the model wrappers (stable objects, so that a captured
    CUDA graph is found again by the next call)."""

    MAX_WRAPPERS = 8

    def __init__(self, base: type, family: Family, cuda_graph: bool, backend: str):
        self.base = base
        self.family = family
        self.cuda_graph = cuda_graph
        self.backend = backend
        self._source: Any = None
        self._source_config: Any = None
        self._scheduler: Optional[_LoopScheduler] = None
        self._wrappers: OrderedDict = OrderedDict()

    def scheduler_for(self, source) -> _LoopScheduler:
        """``Scheduler.from_config(source)`` (cached while ``source`` and its config stay the same)."""
        config = dict(getattr(source, "config", {}) or {})
        if self._scheduler is None or source is not self._source or config != self._source_config:
            self._scheduler = loop_scheduler(source)
            self._source, self._source_config = source, config
        return self._scheduler

    def wrapper(self, model: torch.nn.Module, spec: _Spec) -> Callable[..., torch.Tensor]:
        """The model wrapper for ``sample``: the same object for the same model and recorded constants."""
        try:
            key = (id(model), spec.family.name, spec.learned_sigma, _freeze(spec.skeleton))
        except TypeError:
            if self.cuda_graph:
                raise ValueError("with cuda_graph=True every argument the pipeline gives its denoiser must be a tensor "
                                 "or a hashable constant (it becomes part of the captured graph's key); got "
                                 f"{spec.skeleton!r}") from None
            return functools.partial(_denoise, model, spec)
        fn = self._wrappers.get(key)
        if fn is None:
            fn = self._wrappers[key] = functools.partial(_denoise, model, spec)
            while len(self._wrappers) > self.MAX_WRAPPERS:
                self._wrappers.popitem(last=False)
        self._wrappers.move_to_end(key)
        return fn


def loop_scheduler(source) -> _LoopScheduler:
    """The scheduler a fused call runs: ``Scheduler.from_config(source)``, with a clear error for a scheduler
    that has no matching sampler (e.g. SD1.5's PNDMScheduler) or a config the fused step cannot reproduce."""
    try:
        return _LoopScheduler.from_config(source)
    except ValueError as exc:
        raise ValueError(f"fused_loop=True runs pipe.scheduler ({type(source).__name__}) as diffusion_fast's "
                         f"Scheduler, which refuses it: {exc} (optimize(pipe, fused_loop=True, sampler=...) swaps "
                         "in a scheduler with that sampler)") from None


def install(pipe, *, cuda_graph: bool, backend: str) -> type:
    """Give ``pipe`` (this object only) a fused ``__call__`` by a class swap; returns the class it had. The caller
    has checked the pipeline (:func:`check_pipeline`) and its scheduler (:func:`loop_scheduler`)."""
    base = _base_class(pipe)
    old = type(pipe)
    setattr(pipe, ATTR, FusedLoop(base, FAMILIES[PIPELINE_FAMILIES[base.__name__]], cuda_graph, backend))
    pipe.__class__ = fused_class(old)
    return old


def uninstall(pipe, cls: type) -> None:
    """Undo :func:`install`: the class ``pipe`` had, and no fused-loop state."""
    if getattr(type(pipe), ATTR + "_base", None) is not None:
        pipe.__class__ = cls
    pipe.__dict__.pop(ATTR, None)


_CLASSES: dict[type, type] = {}


def fused_class(cls: type) -> type:
    """A subclass of ``cls`` (same name) whose ``__call__`` runs the fused loop around ``cls.__call__``."""
    fused = _CLASSES.get(cls)
    if fused is None:
        stock = cls.__call__

        @functools.wraps(stock)
        def __call__(self, *args, **kwargs):
            return _FusedCall(self, stock, args, kwargs).run()

        fused = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": __name__,
                                            "__qualname__": cls.__qualname__, ATTR + "_base": cls})
        _CLASSES[cls] = fused
    return fused


class _FusedCall:
    """One call of a pipeline with a fused loop (see the module docstring)."""

    def __init__(self, pipe, stock: Callable, args: tuple, kwargs: dict):
        self.pipe = pipe
        self.loop: FusedLoop = getattr(pipe, ATTR)
        self.family = self.loop.family
        self.stock = stock
        sig = inspect.signature(stock)
        self.bound = sig.bind(pipe, *args, **kwargs)
        self.bound.apply_defaults()
        self.args = self.bound.arguments
        self.calls: list[tuple[tuple, dict]] = []
        self.final: Optional[torch.Tensor] = None
        self.passthrough = False
        self.interrupted = False

    # ----------------------------------------------------------------------------------------- checks

    def _check_arguments(self, sched: Scheduler) -> None:
        a = self.args
        extra = dict(a.get("kwargs") or {})
        for name, value in a.items():
            if name in ("self", "kwargs"):
                continue
            rule = PARAMETERS[name]
            if isinstance(rule, tuple) and not _is_default(value, rule[1]):
                raise ValueError(f"{name}={_short(value)} is not supported with fused_loop=True: {rule[2]}; use "
                                 "optimize(pipe) without fused_loop (or leave it at its default, "
                                 f"{rule[1]!r})")
        # the legacy per-step callback: a parameter of PixArt, a deprecated **kwargs entry of SD / SDXL
        self.legacy = a.get("callback", extra.get("callback"))
        self.legacy_steps = a.get("callback_steps", extra.get("callback_steps"))
        cb = a.get("callback_on_step_end")
        if isinstance(cb, (PipelineCallback, MultiPipelineCallbacks)):
            raise ValueError(f"callback_on_step_end={type(cb).__name__}(...) is not supported with fused_loop=True: "
                             "PipelineCallback objects change the conditioning part-way, and the fused loop runs the "
                             "whole trajectory with the conditioning it starts with; use optimize(pipe) without "
                             "fused_loop")
        self.callback = cb
        if cb is not None or self.legacy is not None:
            which = "callback_on_step_end" if cb is not None else "callback"
            if self.loop.cuda_graph:
                raise ValueError(f"{which} is not supported with cuda_graph=True: the graph replays the whole "
                                 "trajectory at once, with no host code between steps; use "
                                 "optimize(pipe, fused_loop=True) without cuda_graph for per-step callbacks")
            if sched.order != 1:
                raise ValueError(f"{which} is not supported with fused_loop=True and the {sched.sampler!r} sampler: "
                                 "it evaluates the network twice per step, and diffusers' loop calls back after "
                                 "each evaluation, with intermediate latents the fused loop never forms; use a "
                                 "one-evaluation sampler, or optimize(pipe) without fused_loop")
        # names the pipeline does not list at all are left to its own check_inputs (and its error)
        listed = getattr(self.pipe, "_callback_tensor_inputs", [])
        names = [n for n in (a.get("callback_on_step_end_tensor_inputs") or []) if n != "latents" and n in listed] \
            if cb else []
        for n in names:
            if n not in self.family.callback_tensors:
                have = ", ".join(["latents", *(k for k in self.family.callback_tensors if k in listed)])
                raise ValueError(f"callback_on_step_end_tensor_inputs names {n!r}, which the fused loop cannot hand "
                                 f"a callback (it can: {have}); use optimize(pipe) without fused_loop")
        self.callback_names = names
        model = getattr(self.pipe, self.family.model_attr)
        if getattr(model, "is_cache_enabled", False):
            raise ValueError(f"pipe.{self.family.model_attr} has a cache enabled (enable_cache): its per-step "
                             "state is not supported with fused_loop=True; disable_cache() first, or use "
                             "optimize(pipe) without fused_loop")

    # ------------------------------------------------------------------------------------------- run

    def run(self):
        pipe, fam = self.pipe, self.family
        check_pipeline(pipe)
        sched = self.loop.scheduler_for(pipe.scheduler)
        self._check_arguments(sched)
        self.sched = sched
        a = self.args
        # the stock call runs without the per-step callbacks, which the trajectory calls instead
        a["callback_on_step_end"] = None
        if "callback" in a:
            a["callback"] = None
        if a.get("kwargs"):
            a["kwargs"] = {k: v for k, v in a["kwargs"].items() if k not in ("callback", "callback_steps")}
        model = getattr(pipe, fam.model_attr)
        had_forward = "forward" in model.__dict__
        old_forward = model.__dict__.get("forward")
        real_forward = old_forward if had_forward else type(model).forward.__get__(model)

        @functools.wraps(type(model).forward)
        def forward(*args, **kwargs):
            if self.passthrough:
                return real_forward(*args, **kwargs)
            return self._record(model, args, kwargs)

        source = pipe.__dict__.get("scheduler")
        bar = pipe.__dict__.get("_progress_bar_config")
        self.progress = not (bar or {}).get("disable", False) and not self.loop.cuda_graph
        interrupt_before = pipe.__dict__.get("_interrupt", _MISSING)
        sched._fused_call = self
        pipe.__dict__["scheduler"] = sched
        pipe._progress_bar_config = {**(bar or {}), "disable": True}
        model.__dict__["forward"] = forward
        try:
            return self.stock(*self.bound.args, **self.bound.kwargs)
        finally:
            if had_forward:
                model.__dict__["forward"] = old_forward
            else:
                model.__dict__.pop("forward", None)
            pipe.__dict__["scheduler"] = source
            if bar is None:
                pipe.__dict__.pop("_progress_bar_config", None)
            else:
                pipe._progress_bar_config = bar
            sched._fused_call = None
            if hasattr(type(pipe), "interrupt"):
                pipe._interrupt = self.interrupted  # what the stock loop leaves: True only if a callback set it
            elif interrupt_before is _MISSING:
                pipe.__dict__.pop("_interrupt", None)
            else:
                pipe._interrupt = interrupt_before

    def _record(self, model, args: tuple, kwargs: dict):
        """The denoiser call of the loop's first iteration: kept, not run. Later iterations (a loop without an
        interrupt check) get the same stand-in output, which the fused step ignores."""
        if self.final is None:
            self.calls.append((args, kwargs))
        if kwargs.get("return_dict", True):
            raise RuntimeError(self._unknown_loop("the denoiser was called with return_dict=True"))
        sig = inspect.signature(type(model).forward)
        bound = sig.bind(model, *args, **kwargs)
        lat = bound.arguments.get(self.family.latent)
        if not isinstance(lat, torch.Tensor):
            raise RuntimeError(self._unknown_loop(f"the denoiser got no tensor {self.family.latent!r}"))
        shape = list(lat.shape)
        out_channels = getattr(model, "out_channels", None) or getattr(model.config, "out_channels", None)
        if lat.dim() == 4 and out_channels:
            shape[1] = out_channels
        return (lat.new_zeros(shape, dtype=model.dtype),)

    def _unknown_loop(self, what: str) -> str:
        return (f"the fused loop does not recognise the denoising loop of {self.loop.base.__name__} (it follows "
                f"diffusers {DIFFUSERS_VERSION}): {what}; use optimize(pipe) without fused_loop")

    # ------------------------------------------------------------------------------------------- step

    def step(self, model_output, timestep, sample_, eta, generator, variance_noise, kwargs) -> torch.Tensor:
        """``scheduler.step`` of the loop's first iteration: the whole trajectory. Later calls (a loop without an
        interrupt check) get the final latents again."""
        if self.final is None:
            if variance_noise is not None:
                raise RuntimeError(self._unknown_loop("step() got variance_noise"))
            self.final = self._trajectory(model_output, timestep, sample_, eta, generator, kwargs)
        self.pipe._interrupt = True  # the stock loop skips its remaining iterations
        return self.final

    def _trajectory(self, model_output, timestep, latents, eta, generator, kwargs) -> torch.Tensor:
        sched, fam, loop = self.sched, self.family, self.loop
        model = getattr(self.pipe, fam.model_attr)
        sched._check_step_kwargs(eta, kwargs)
        begin = sched.begin_index or 0
        if sched.index_for_timestep(timestep) != begin:
            raise RuntimeError(self._unknown_loop(f"its first step is not at the scheduler's begin index {begin}"))
        expected = 2 if fam.true_cfg and len(self.calls) == 2 else 1
        if len(self.calls) != expected:
            raise RuntimeError(self._unknown_loop(f"{len(self.calls)} denoiser calls before the first step"))
        if loop.cuda_graph and latents.device.type != "cuda":
            raise ValueError(f"optimize(pipe, cuda_graph=True): the pipeline runs on {latents.device}; CUDA graphs "
                             "need a CUDA device (pipe.to('cuda')), or optimize without cuda_graph")
        try:
            args = sched.sampling_args()
        except ValueError as exc:
            raise ValueError(f"fused_loop=True cannot run this schedule: {exc} (step() means optimize(pipe) without "
                             "fused_loop)") from None
        sampler, sigmas = args.pop("sampler"), args.pop("sigmas")
        prediction, parametrization = args.pop("prediction"), args.pop("parametrization")
        if sampler == "ddim" and eta is not None:  # the pipeline's eta, as DDIMScheduler.step takes it
            args["eta"] = float(eta)
        B = latents.shape[0]
        cond, uncond, guidance, tensors, skeleton, paths = self._conditioning(model, B)
        plan = build_plan(sampler, sigmas, prediction=prediction, parametrization=parametrization, **args)
        t_sigma = torch.as_tensor(plan.sigma_eval, dtype=torch.float32).to(latents.device)
        tensors[_T_SIGMA], tensors[_T_VALUE] = t_sigma, sched.model_timestep(t_sigma)
        learned = fam.name == "pixart" and model.config.out_channels // 2 == latents.shape[1]
        wrapper = loop.wrapper(model, _Spec(fam, skeleton, learned))
        noise_sampler = None
        if plan.noise.any():  # drawn as the scheduler's step draws it: randn_tensor, per-item generators, dtype
            dtype = torch.float32 if METHODS[sampler].noise == "float32" else model_output.dtype
            device, shape = latents.device, tuple(latents.shape)

            def noise_sampler(sigma, sigma_next):  # k-diffusion's contract; one call per noisy evaluation
                return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

        callback = None
        if self.callback is not None or self.legacy is not None:
            callback = self._make_callback(paths, tensors, latents.dtype)
        self.passthrough = True
        try:
            out = sample(wrapper, sched.latents_to_state(latents.to(torch.float32)), sigmas, sampler,
                         prediction=prediction, parametrization=parametrization, guidance_scale=guidance,
                         cond=cond, uncond=uncond, net_dtype=latents.dtype, backend=loop.backend,
                         cuda_graph=loop.cuda_graph, callback=callback, progress=self.progress,
                         model_kwargs=tensors, noise_sampler=noise_sampler, **args)
            result = sched.state_to_latents(out)
        except _Interrupted as stop:
            result = stop.latents
        finally:
            self.passthrough = False
        return result.to(model_output.dtype)

    def _conditioning(self, model, B: int):
        """cond / uncond / guidance scale, the other tensors of the recorded denoiser call(s) (``model_kwargs``) and
        the skeleton of those calls (their constants, with a slot per tensor)."""
        fam = self.family
        flat, latent = [], None
        for args, kwargs in self.calls:
            bound = inspect.signature(type(model).forward).bind(model, *args, **kwargs)
            kw = {}
            for name, value in bound.arguments.items():
                param = bound.signature.parameters[name]
                if name == "self":
                    continue
                if param.kind is param.VAR_KEYWORD:
                    kw.update(value)
                elif param.kind is param.VAR_POSITIONAL:
                    if value:
                        raise RuntimeError(self._unknown_loop("the denoiser got extra positional arguments"))
                else:
                    kw[name] = value
            latent = kw.pop(fam.latent) if latent is None else latent
            for name in (fam.latent, "timestep", "return_dict"):
                kw.pop(name, None)
            if not isinstance(kw.get(fam.context), torch.Tensor):
                raise RuntimeError(self._unknown_loop(f"the denoiser got no tensor {fam.context!r}"))
            flat.append(kw)
        if len(flat) == 2:  # Flux's true CFG: [cond call, uncond call] -> one [uncond; cond] batch
            c, u = flat
            if set(c) != set(u):
                raise RuntimeError(self._unknown_loop("its two denoiser calls take different arguments"))
            kw = {}
            for name in c:
                cv, uv = c[name], u[name]
                if name == fam.context:
                    continue
                if isinstance(cv, torch.Tensor) != isinstance(uv, torch.Tensor):
                    raise RuntimeError(self._unknown_loop(f"{name!r} differs in kind between its two calls"))
                if not isinstance(cv, torch.Tensor):
                    if cv is not uv and cv != uv:
                        raise RuntimeError(self._unknown_loop(f"{name!r} differs between its two calls"))
                    kw[name] = cv
                elif name in fam.unbatched:  # one read of a device value, before the loop
                    if cv is not uv and not (cv.shape == uv.shape and torch.equal(cv, uv)):
                        raise RuntimeError(self._unknown_loop(f"{name!r} differs between its two calls"))
                    kw[name] = cv
                else:
                    kw[name] = torch.cat([uv, cv])
            cond, uncond = c[fam.context], u[fam.context]
            guidance = float(self.args["true_cfg_scale"])
            self.context = cond
        else:
            kw = flat[0]
            ctx = self.context = kw.pop(fam.context)
            if latent.shape[0] == 2 * B:  # the CFG batch [uncond; cond]
                cond, uncond = ctx[B:], ctx[:B]
                guidance = float(self.args["guidance_scale"])
            elif latent.shape[0] == B:
                cond, uncond, guidance = ctx, None, None
            else:
                raise RuntimeError(self._unknown_loop(f"the denoiser got a batch of {latent.shape[0]} for {B} "
                                                      "latents"))
        tensors, paths = {}, {}
        skeleton = _split(kw, (), tensors, paths)
        return cond, uncond, guidance, tensors, skeleton, paths

    # --------------------------------------------------------------------------------------- callbacks

    def _make_callback(self, paths: dict, tensors: dict, dtype: torch.dtype) -> Callable[[dict], None]:
        """``sample``'s callback calling the pipeline's: ``callback_on_step_end(pipe, i, t, {"latents": ...})``
        and/or the legacy ``callback(i, t, latents)``, with the latents in the pipeline's convention."""
        pipe, sched = self.pipe, self.sched
        vp = sched.schedule.latent_space == "vp"
        begin = sched.begin_index or 0
        interruptible = hasattr(type(pipe), "interrupt")  # PixArt's loop has no interrupt check
        handed = {}
        for name in self.callback_names:
            path = self.family.callback_tensors[name]
            handed[name] = self.context if path == (self.family.context,) else tensors[paths[path]]

        def callback(d: dict) -> None:
            i = d["i"]
            x = d["x"]
            lat = x / (d["sigma_next"] ** 2 + 1) ** 0.5 if vp else x
            lat = lat.to(dtype)
            t = sched.timesteps[begin + i]
            if self.callback is not None:
                given = {"latents": lat, **handed}
                versions = {k: v._version for k, v in given.items()}
                out = self.callback(pipe, i, t, dict(given))
                if not isinstance(out, dict):
                    raise TypeError(f"callback_on_step_end must return a dict (diffusers pops 'latents' from it), got "
                                    f"{type(out).__name__}")
                for k, v in out.items():
                    if k in given and v is given[k]:
                        continue
                    if k in given or k in ("latents", *self.family.callback_tensors, "negative_prompt_embeds",
                                           "negative_pooled_prompt_embeds"):
                        raise ValueError(f"callback_on_step_end changed {k!r} at step {i}: with fused_loop=True the "
                                         "callback may read the tensors it is given but not replace or modify them "
                                         "(the trajectory runs on); use optimize(pipe) without fused_loop")
                for k, v in given.items():
                    if v._version != versions[k]:
                        raise ValueError(f"callback_on_step_end modified {k!r} in place at step {i}: with "
                                         "fused_loop=True the callback may read the tensors it is given but not "
                                         "modify them; use optimize(pipe) without fused_loop")
            if self.legacy is not None and i % self.legacy_steps == 0:
                self.legacy(i, t, lat)
            if interruptible and getattr(pipe, "_interrupt", False):  # as the stock loop's `if self.interrupt`
                self.interrupted = True
                raise _Interrupted(lat)

        return callback


_MISSING = object()


def _is_default(value: Any, default: Any) -> bool:
    if value is default:
        return True
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return False
    try:
        return bool(value == default)
    except Exception:  # noqa: BLE001 - an object whose == does not give a bool is not the default
        return False


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)}>"
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        inner = ", ".join(_short(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
