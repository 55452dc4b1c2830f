"""End-to-end sampling speed on diffusers' own models: the stock pipeline as users run it, beside ours.

One run builds one stock diffusers pipeline with random weights
(:func:`diffusion_fast.integrations.diffusers.configs.pipeline`, ``text_encoders=False``), draws one set of
inputs (prompt embeddings, the initial latents), and times every variant of :data:`VARIANTS` on those same
weights and inputs. Models (:data:`MODELS`): the UNets SD1.5 (512²) and SDXL (1024²) with classifier-free
guidance, every variant on diffusers' ``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M) built from the model's
scheduler config; the transformers Flux (1024², guidance embedding, one evaluation per step) and SD3 (1024²,
classifier-free guidance) on their own ``FlowMatchEulerDiscreteScheduler``, built on the device in seconds
(``init="fast"``) with full width, heads, head dim, joint sequence and rotary embeddings, and optionally fewer
blocks (``blocks``: recorded in the key and in ``params.blocks``). Variants (``family`` in the results):

* ``diffusers_eager`` — the stock pipeline and denoiser (UNet or transformer), default attention (SDPA);
* ``diffusers_graph`` — the stock denoiser replayed as a CUDA graph (capture per input signature, as
  stable-fast does) or ``torch.compile(mode="reduce-overhead")``, whichever is faster (``params.graph_method``;
  the other's time or reason in ``params.candidates``);
* ``diffusers_compile`` — diffusers' speed-up recipe: the UNet in channels_last (a transformer keeps its
  layout), fused QKV projections, ``torch.compile(mode="max-autotune-no-cudagraphs", fullgraph=True)``;
  ``params.compile_mode`` is the mode that actually ran (a cheaper one when the recipe's compile does not finish
  within ``compile_cap_s``), ``params.recipe`` what was done;
* ``ours_eager``, ``ours_fast``, ``ours_fast_graph`` — *our own* UNet (``diffusion_fast.models``) loaded with the
  same weights, sampled by ``diffusion_fast.sample``: plain-torch ops, ``auto`` ops, and the whole trajectory
  as one CUDA graph (SD1.5-layout UNets only; others are recorded as not available); ``ours_fast_cl`` and
  ``ours_fast_graph_cl`` the same with the network in channels_last. The transformer models record all five
  as not available (there is no transformer of our own);
* ``df_kernels`` — ``optimize(pipe)``; ``df_fused`` — ``optimize(pipe, fused_loop=True)`` (the fused loop,
  eager); ``df_fused_graph`` — ``optimize(pipe, fused_loop=True, cuda_graph=True)``;
  ``df_fused_graph_compile`` — the same with the denoiser under ``torch.compile`` (our custom ops inside the
  compiled graph). Each is one entry calling the public integration API; when that API is not
  importable, lacks an option or raises ``NotImplementedError`` for it, the variant is recorded under
  ``skipped`` as ``not available: <reason>``; a case records what ``optimize`` made of the denoiser
  (``params.attention_modules_on_df`` and the calls it served).

Per variant: time per sampling call (median, p20, p80 over ``repeats`` calls, taken round-robin across the
variants so drift hits all alike) and its ``spread`` ((max - min) / median), ms per image, steps per second,
speedups over ``diffusers_eager`` and over the best non-``df_*`` variant, host synchronisations and host
reads of device scalars per step (difference of a 4-step and a 2-step call, halved), device memory the
variant added at its peak, the first call's time and (compiled variants) the compile time, and the final
latents' difference from ``diffusers_eager``'s (``max_abs_diff``, ``rel_l2_diff``); with ``fp32_reference``
also each variant's error against the stock pipeline run in float32 and whether it is within twice
``diffusers_eager``'s own error (the flash-attention rule of ``kernels/reference/oracle.py``, applied to a
whole trajectory).

Variants of a UNet model each get their own deep copy of the UNet (``channels_last`` re-lays out a copy's
weights in place). Variants of a transformer model share the pristine weights (a 12 B-parameter Flux fits on
the card once, not once per variant): each gets its own modules around the same parameter tensors, and the run
fails if a variant changed them in place.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .cases import first_line, ratios, skip, spread
from .ops import dtype_name
from .progress import Progress
from .timing import quantile, synchronize


@dataclass(frozen=True)
class ModelSpec:
    """How the e2e suite runs one model family (a row of :data:`MODEL_SPECS`)."""

    family: str  # configs.pipeline name
    denoiser: str  # the pipeline's attribute holding it: "unet" or "transformer"
    scheduler: str  # the diffusers scheduler class every variant runs
    cfg: bool  # classifier-free guidance (the denoiser sees 2 x batch), else a guidance embedding (Flux)
    guidance_scale: float  # the pipeline's default
    steps: int  # default steps on CUDA
    sampler_label: str  # in the case key
    blocks: tuple[str, ...] = ()  # the transformer config keys counting its blocks (``blocks=`` overrides)
    side: dict[str, int] = field(default_factory=dict)  # picture side per size (default: the UNet's sample size)


MODEL_SPECS: dict[str, ModelSpec] = {
    "sd15": ModelSpec("sd15", "unet", "DPMSolverMultistepScheduler", True, 7.5, 25, "dpmsolver++2m"),
    "sdxl": ModelSpec("sdxl", "unet", "DPMSolverMultistepScheduler", True, 7.5, 25, "dpmsolver++2m"),
    "flux": ModelSpec("flux", "transformer", "FlowMatchEulerDiscreteScheduler", False, 3.5, 28, "flowmatch_euler",
                      ("num_layers", "num_single_layers"), {"full": 1024, "tiny": 32}),
    "sd3": ModelSpec("sd3", "transformer", "FlowMatchEulerDiscreteScheduler", True, 7.0, 28, "flowmatch_euler",
                     ("num_layers",), {"full": 1024, "tiny": 16}),
}
MODELS = tuple(MODEL_SPECS) + tuple(f"{m}-tiny" for m in MODEL_SPECS)
SYNC_STEPS = (2, 4)
RECIPE_COMPILE_MODE = "max-autotune-no-cudagraphs"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
NOT_AVAILABLE = "not available: "


# --------------------------------------------------------------------------------------------- counters


class ScalarReadCounter(TorchDispatchMode):
    """Counts ops that read device values on the host (each one a sync on a GPU)."""

    NAMES = ("_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique",
             "_unique2", "tolist")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in self.NAMES:
            self.count += 1
        elif name in ("_to_copy", "copy_", "to"):
            out = func(*args, **kwargs)
            src = args[1] if name == "copy_" else args[0]
            dst = args[0] if name == "copy_" else out
            if (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.device.type != "cpu"
                    and dst.device.type == "cpu"):
                self.count += 1
            return out
        return func(*args, **kwargs)


class SyncCounter:
    """Counts host synchronisations (CUDA: ``set_sync_debug_mode`` warnings) and host scalar reads
    (``count_reads``: a :class:`ScalarReadCounter`, which torch.compile'd code cannot run under)."""

    def __init__(self, device: torch.device, count_reads: bool = True):
        self.cuda = device.type == "cuda"
        self.syncs: int | None = None
        self.reads: int | None = 0 if count_reads else None

    def __enter__(self):
        self._reads = ScalarReadCounter() if self.reads is not None else contextlib.nullcontext()
        self._warn = warnings.catch_warnings(record=True)
        self._caught = self._warn.__enter__()
        warnings.simplefilter("always")
        if self.cuda:
            self._prev = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        self._reads.__enter__()
        return self

    def __exit__(self, *exc):
        self._reads.__exit__(*exc)
        if self.cuda:
            torch.cuda.set_sync_debug_mode(self._prev)
            self.syncs = sum(1 for w in self._caught if "synchroniz" in str(w.message))
        self._warn.__exit__(*exc)
        if self.reads is not None:
            self.reads = self._reads.count
        return False


# --------------------------------------------------------------------------------------------- context


class Unavailable(Exception):
    """A variant that cannot run here; the message is the recorded reason."""


class _CompileTimeout(BaseException):
    """Raised by the alarm when a compile outlives its cap (a BaseException, so no library swallows it)."""


@contextlib.contextmanager
def _cap(seconds: float | None):
    """Raise :class:`_CompileTimeout` in the main thread after ``seconds`` (None or no SIGALRM: no cap)."""
    usable = (seconds is not None and seconds > 0 and hasattr(signal, "SIGALRM")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def fire(signum, frame):
        raise _CompileTimeout()

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class E2EContext:
    """The pristine pipeline, the shared inputs and the run's settings; variants copy what they change."""

    device: torch.device
    dtype: torch.dtype
    model: str
    family: str  # a key of MODEL_SPECS
    size: str  # "full" or "tiny"
    pipe: Any  # the pristine stock pipeline (never run, never patched)
    scheduler_config: dict
    embeds: dict[str, torch.Tensor]  # prompt_embeds (+ negative_*, pooled_* as the pipeline takes them), [B, ...]
    latents: torch.Tensor  # initial noise in the pipeline's layout ([B, C, h, w]; Flux: packed [B, h*w/4, 4C])
    height: int
    width: int
    batch: int
    guidance_scale: float
    seed: int
    compile_mode: str
    compile_cap_s: float
    compile_backend: str = "inductor"
    graph_methods: tuple[str, ...] = ("cuda_graph", "reduce-overhead")
    blocks: dict[str, int] = field(default_factory=dict)  # the transformer's block counts (empty for UNets)
    _schedules: dict[int, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def spec(self) -> ModelSpec:
        return MODEL_SPECS[self.family]

    @property
    def denoiser(self) -> torch.nn.Module:
        """The pristine pipeline's UNet or transformer."""
        return getattr(self.pipe, self.spec.denoiser)

    @property
    def shares_weights(self) -> bool:
        """Whether variants share the pristine denoiser's parameter tensors (transformers) or copy them (UNets)."""
        return self.spec.denoiser == "transformer"

    def new_scheduler(self):
        import diffusers

        return getattr(diffusers, self.spec.scheduler).from_config(self.scheduler_config)

    def fresh_pipeline(self, *, dtype: torch.dtype | None = None):
        """A pipeline with its own denoiser and VAE modules and a fresh scheduler (variants patch these).

        UNet models: deep copies. Transformer models: copies of the modules around the same parameter and
        buffer tensors (:attr:`shares_weights`). ``dtype``: a float32 (or other) copy of the denoiser instead,
        never shared.
        """
        comps = dict(self.pipe.components)
        den = self.denoiser
        if dtype is not None:
            comps[self.spec.denoiser] = copy.deepcopy(den).to(dtype)
        elif self.shares_weights:
            memo = {id(t): t for t in (*den.parameters(), *den.buffers())}
            comps[self.spec.denoiser] = copy.deepcopy(den, memo)
        else:
            comps[self.spec.denoiser] = copy.deepcopy(den)
        comps["vae"] = copy.deepcopy(self.pipe.vae)
        comps["scheduler"] = self.new_scheduler()
        params = inspect.signature(type(self.pipe)).parameters
        if "requires_safety_checker" in params:
            comps["requires_safety_checker"] = False
        pipe = type(self.pipe)(**{k: v for k, v in comps.items() if k in params})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def weights_fingerprint(self) -> tuple[list[tuple[int, int]], torch.Tensor]:
        """``(data_ptr, version)`` of every parameter and buffer of the pristine denoiser and their float64
        sums (one device tensor): an in-place change to a shared tensor (a write, also through ``.data``, a
        re-layout) changes it. Compare two with :func:`same_fingerprint`."""
        ts = [t for t in (*self.denoiser.parameters(), *self.denoiser.buffers()) if t.is_floating_point()]
        with torch.no_grad():
            sums = torch.stack([t.sum(dtype=torch.float64) for t in ts]) if ts else torch.zeros(0)
        return [(t.data_ptr(), t._version) for t in ts], sums

    def schedule(self, steps: int):
        """The sigmas and timestep map diffusers' DPM-Solver computes for ``steps`` (our samplers' input)."""
        if steps not in self._schedules:
            from ..schedules import from_diffusers_config

            cfg = dict(self.scheduler_config, _class_name="DPMSolverMultistepScheduler")
            self._schedules[steps] = from_diffusers_config(cfg, steps)
        return self._schedules[steps]

    def compile(self, module, mode: str, *, in_place: bool = False):
        """``torch.compile(module, mode=mode, fullgraph=True)`` with this run's backend (in place: ``.compile``)."""
        kw: dict[str, Any] = {"fullgraph": True, "backend": self.compile_backend}
        if self.compile_backend == "inductor":
            kw["mode"] = mode
        if in_place:
            module.compile(**kw)
            return module
        return torch.compile(module, **kw)


def same_fingerprint(a: tuple[list, torch.Tensor], b: tuple[list, torch.Tensor]) -> bool:
    """Whether two :meth:`E2EContext.weights_fingerprint` values are the same."""
    return a[0] == b[0] and torch.equal(a[1], b[1])


Runner = Callable[[int], torch.Tensor]  # steps -> final latents (the pipeline's output_type="latent")


def _pipe_runner(ctx: E2EContext, pipe) -> Runner:
    def run(steps: int) -> torch.Tensor:
        out = pipe(**ctx.embeds, latents=ctx.latents.clone(), num_inference_steps=steps,
                   guidance_scale=ctx.guidance_scale, height=ctx.height, width=ctx.width, output_type="latent",
                   generator=torch.Generator(device=ctx.device).manual_seed(ctx.seed))
        return out.images
    return run


# --------------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One row of :data:`VARIANTS`. ``setup(ctx, mode)`` returns the runner (``mode``: the torch.compile mode
    of a compiled variant, or the method of ``diffusers_graph``), or raises :class:`Unavailable`."""

    name: str
    family: str  # "diffusers" (the baselines users run), "ours" (our own UNet), "df" (our diffusers integration)
    setup: Callable[[E2EContext, str | None], Runner]
    cuda_only: bool = False
    compiled: bool = False
    available: Callable[[E2EContext], str | None] = lambda ctx: None

    @property
    def kind(self) -> str:
        return "baseline" if self.family == "diffusers" else "variant"


def _diffusers_eager(ctx: E2EContext, mode: str | None) -> Runner:
    return _pipe_runner(ctx, ctx.fresh_pipeline())


def _graphed_forward(module: torch.nn.Module, device: torch.device) -> Callable[..., Any]:
    """``module.forward`` replayed as a CUDA graph: one capture per input signature (shapes, dtypes and the
    non-tensor arguments); inputs are copied into the graph's static buffers, outputs copied out of it."""
    from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

    orig = type(module).forward
    graphs: dict[Any, tuple] = {}
    pool = torch.cuda.graph_pool_handle()

    def forward(*args, **kwargs):
        flat, spec = tree_flatten((args, kwargs))
        sig = []
        for t in flat:
            if isinstance(t, torch.Tensor):
                if t.device.type != "cuda":
                    raise Unavailable(f"an input of the denoiser is on {t.device}; a CUDA graph needs device "
                                      "inputs")
                sig.append((tuple(t.shape), t.dtype, t.stride()))
            else:
                sig.append(repr(t))
        key = (str(spec), tuple(sig))
        entry = graphs.get(key)
        if entry is None:
            if len(graphs) >= 4:
                raise Unavailable("the denoiser was called with more than 4 input signatures; one graph each")
            static = [t.clone() if isinstance(t, torch.Tensor) else t for t in flat]
            s_args, s_kwargs = tree_unflatten(static, spec)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                orig(module, *s_args, **s_kwargs)  # warm-up: cuDNN / cuBLAS choices outside the capture
            torch.cuda.current_stream(device).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = orig(module, *s_args, **s_kwargs)
            entry = graphs[key] = (g, static, out)
        g, static, out = entry
        for s, t in zip(static, flat):
            if isinstance(t, torch.Tensor):
                s.copy_(t)
        g.replay()
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)

    return forward


def _diffusers_graph(ctx: E2EContext, method: str | None) -> Runner:
    pipe = ctx.fresh_pipeline()
    attr = ctx.spec.denoiser
    den = getattr(pipe, attr)
    if method == "cuda_graph":
        den.forward = _graphed_forward(den, ctx.device)
    else:
        setattr(pipe, attr, ctx.compile(den, "reduce-overhead"))
    return _pipe_runner(ctx, pipe)


def compile_recipe(ctx: E2EContext) -> str:
    """What ``diffusers_compile`` does before ``torch.compile`` (diffusers' speed-up recipe for the model)."""
    if ctx.spec.denoiser == "unet":
        return "UNet in channels_last, pipe.fuse_qkv_projections(), torch.compile(fullgraph=True)"
    # A transformer has no convolution worth a memory format (Flux none; SD3 one patch embedding).
    return "transformer.fuse_qkv_projections(), torch.compile(fullgraph=True)"


def _diffusers_compile(ctx: E2EContext, mode: str | None) -> Runner:
    pipe = ctx.fresh_pipeline()
    attr = ctx.spec.denoiser
    if attr == "unet":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.fuse_qkv_projections()
    else:
        getattr(pipe, attr).fuse_qkv_projections()  # new fused weights; the shared ones are only read
    setattr(pipe, attr, ctx.compile(getattr(pipe, attr), mode or RECIPE_COMPILE_MODE))
    return _pipe_runner(ctx, pipe)


def _ours_unet(ctx: E2EContext):
    from ..models.unet import UNet2DConditionModel, UNetConfig

    try:
        cfg = UNetConfig.from_diffusers(dict(ctx.pipe.unet.config))
    except ValueError as exc:
        raise Unavailable(f"our UNet does not implement this model: {exc}") from None
    with torch.device(ctx.device):
        net = UNet2DConditionModel(cfg, dtype=ctx.dtype)
    net.load_state_dict(ctx.pipe.unet.state_dict(), strict=True)
    return net.eval().requires_grad_(False)


_OURS = {  # loop backend, op backends, CUDA graph, channels_last
    "ours_eager": ("torch", dict(group_norm="eager", attention="sdpa"), False, False),
    "ours_fast": ("auto", dict(backend="auto"), False, False),
    "ours_fast_graph": ("auto", dict(backend="auto"), True, False),
    "ours_fast_cl": ("auto", dict(backend="auto"), False, True),
    "ours_fast_graph_cl": ("auto", dict(backend="auto"), True, True),
}


def _ours(name: str):
    loop_backend, op_backends, graph, channels_last = _OURS[name]

    def setup(ctx: E2EContext, mode: str | None) -> Runner:
        from .. import sample

        net = _ours_unet(ctx).set_backend(**op_backends)
        if channels_last:
            # Convolutions and GroupNorm run NHWC; the attention blocks' [B, C, H, W] -> [B, HW, C] becomes a
            # view. The network's 4-channel output is made contiguous for the fused sampler step.
            net = net.to(memory_format=torch.channels_last)
        cond = ctx.embeds["prompt_embeds"]
        uncond = ctx.embeds["negative_prompt_embeds"]
        models: dict[int, Callable] = {}  # one model callable per schedule, kept: a CUDA graph is cached by it

        def model_for(sched):
            if channels_last:
                return lambda x, s, c: net(x, sched.sigma_to_timestep(s), c).contiguous()
            return lambda x, s, c: net(x, sched.sigma_to_timestep(s), c)

        def run(steps: int) -> torch.Tensor:
            sched = ctx.schedule(steps)
            if steps not in models:
                models[steps] = model_for(sched)
            model = models[steps]
            # diffusers' latents are the VP state at the first sigma; ours is VE: x = z * sqrt(1 + sigma_0^2).
            x = ctx.latents.float() * math.sqrt(1.0 + float(sched.sigmas[0]) ** 2)
            with torch.no_grad():
                out = sample(model, x, sched.sigmas, "dpmpp_2m", guidance_scale=ctx.guidance_scale, cond=cond,
                             uncond=uncond, prediction=sched.prediction_type, net_dtype=ctx.dtype,
                             backend=loop_backend, cuda_graph=graph,
                             generator=torch.Generator(device=ctx.device).manual_seed(ctx.seed))
            return out
        return run

    return setup


def _ours_available(ctx: E2EContext) -> str | None:
    from ..models.unet import UNetConfig

    if ctx.spec.denoiser != "unet":
        return (f"{NOT_AVAILABLE}our own network is a UNet; {ctx.model} runs {type(ctx.denoiser).__name__} "
                "(ours_* do not apply; df_* run it)")
    try:
        UNetConfig.from_diffusers(dict(ctx.pipe.unet.config))
    except ValueError as exc:
        return f"{NOT_AVAILABLE}our UNet does not implement the {ctx.family} layout ({exc})"
    return None


def _df_api(*options: str) -> tuple[Callable | None, str | None]:
    """``(optimize, None)`` when the integration's API is importable here and takes ``options``, else
    ``(None, reason)``."""
    try:
        from ..integrations.diffusers import optimize
    except Exception as exc:  # the integration is built separately; its absence is a recorded reason
        return None, f"diffusion_fast.integrations.diffusers.optimize is not importable ({first_line(exc)})"
    try:
        params = inspect.signature(optimize).parameters
    except (TypeError, ValueError):
        return optimize, None
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [o for o in options if o not in params and not takes_any]
    if missing:
        return None, f"optimize() takes no {', '.join(missing)} option in this build"
    return optimize, None


def _df(*, compile_denoiser: bool = False, **options: Any):
    def available(ctx: E2EContext) -> str | None:
        _, why = _df_api(*options)
        return None if why is None else NOT_AVAILABLE + why

    def setup(ctx: E2EContext, mode: str | None) -> Runner:
        optimize, why = _df_api(*options)
        if optimize is None:
            raise Unavailable(NOT_AVAILABLE + why)
        pipe = ctx.fresh_pipeline()
        try:
            optimize(pipe, **options)
        except NotImplementedError as exc:  # the API names the option but does not implement it yet
            raise Unavailable(NOT_AVAILABLE + first_line(exc)) from None
        if compile_denoiser:
            ctx.compile(getattr(pipe, ctx.spec.denoiser), mode or RECIPE_COMPILE_MODE, in_place=True)
        run = _pipe_runner(ctx, pipe)
        run.describe = lambda: _df_report(pipe)
        return run

    return available, setup


def _df_report(pipe) -> dict:
    """What ``optimize`` made of the denoiser, from its :func:`report`: modules served by diffusion_fast out of
    all of each kind, and attention calls served so far (under a CUDA graph, only the captured ones)."""
    try:
        from ..integrations.diffusers import report

        rows = report(pipe)
    except Exception as exc:  # diagnostic only
        return {"optimize_report": f"unavailable: {first_line(exc)}"}
    out: dict[str, Any] = {}
    for kind in ("attention", "resnet"):
        mine = [r for r in rows if r.kind == kind]
        if mine:
            out[f"{kind}_modules_on_df"] = f"{sum(r.runs == 'diffusion_fast' for r in mine)}/{len(mine)}"
    att = [r for r in rows if r.kind == "attention"]
    out["attention_calls_on_df"] = sum(r.calls for r in att)
    out["attention_calls_on_stock"] = sum(sum(r.fallbacks.values()) for r in att)
    kept = sorted({r.reason for r in rows if r.reason})
    if kept:
        out["kept_stock_because"] = kept[:5]
    return out


def _variant_df(name: str, *, cuda_only: bool = False, compiled: bool = False, **options: Any) -> Variant:
    available, setup = _df(compile_denoiser=compiled, **options)
    return Variant(name, "df", setup, cuda_only=cuda_only, compiled=compiled, available=available)


VARIANTS: tuple[Variant, ...] = (
    Variant("diffusers_eager", "diffusers", _diffusers_eager),
    Variant("diffusers_graph", "diffusers", _diffusers_graph, cuda_only=True),
    Variant("diffusers_compile", "diffusers", _diffusers_compile, compiled=True),
    Variant("ours_eager", "ours", _ours("ours_eager"), available=_ours_available),
    Variant("ours_fast", "ours", _ours("ours_fast"), available=_ours_available),
    Variant("ours_fast_graph", "ours", _ours("ours_fast_graph"), cuda_only=True, available=_ours_available),
    Variant("ours_fast_cl", "ours", _ours("ours_fast_cl"), available=_ours_available),
    Variant("ours_fast_graph_cl", "ours", _ours("ours_fast_graph_cl"), cuda_only=True, available=_ours_available),
    _variant_df("df_kernels"),
    _variant_df("df_fused", fused_loop=True),
    _variant_df("df_fused_graph", cuda_only=True, fused_loop=True, cuda_graph=True),
    _variant_df("df_fused_graph_compile", cuda_only=True, compiled=True, fused_loop=True, cuda_graph=True),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)


# --------------------------------------------------------------------------------------------- the run


def check_blocks(model: str, blocks: Sequence[int] | None) -> dict[str, int]:
    """The transformer config overrides ``blocks`` stands for (``{}`` for None); ValueError naming the limit.

    ``blocks`` gives one count per entry of the model's :attr:`ModelSpec.blocks` (Flux: double-stream,
    single-stream; SD3: joint blocks), each from 1 up to the published architecture's count.
    """
    if model not in MODELS:
        raise ValueError(f"model: unknown model {model!r}; expected names from {MODELS}")
    if blocks is None:
        return {}
    family = model.partition("-")[0]
    spec = MODEL_SPECS[family]
    if not spec.blocks:
        raise ValueError(f"blocks: {model} is a UNet; block counts apply to the transformer models "
                         f"({', '.join(m for m, s in MODEL_SPECS.items() if s.blocks)})")
    blocks = list(blocks)
    if len(blocks) != len(spec.blocks):
        raise ValueError(f"blocks: {model} takes {len(spec.blocks)} count(s) ({', '.join(spec.blocks)}), "
                         f"got {len(blocks)}: {blocks}")
    from ..integrations.diffusers import configs

    full = configs.transformer_config(family, "full")
    out = {}
    for key, n in zip(spec.blocks, blocks):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= full[key]:
            raise ValueError(f"blocks: {key} must be an integer from 1 to {full[key]} (the published "
                             f"architecture's count), got {n!r}")
        out[key] = n
    return out


def build_context(model: str, device: torch.device, dtype: torch.dtype, *, batch: int = 1,
                  guidance_scale: float | None = None, seed: int = 0, compile_mode: str = RECIPE_COMPILE_MODE,
                  compile_cap_s: float = 0.0, compile_backend: str = "inductor",
                  graph_methods: Sequence[str] = ("cuda_graph", "reduce-overhead"),
                  blocks: Sequence[int] | None = None) -> E2EContext:
    """Build the pristine pipeline of ``model`` (one of :data:`MODELS`) and the shared inputs.

    ``guidance_scale``: None for the model's default (:attr:`ModelSpec.guidance_scale`). ``blocks``: the
    transformer's block counts (:func:`check_blocks`; None: the config's own). Transformers are built with
    ``init="fast"`` (parameters drawn on ``device`` from a seeded generator, N(0, 1/fan_in)); UNets with their
    modules' own init rule.
    """
    overrides = check_blocks(model, blocks)
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode: unknown torch.compile mode {compile_mode!r}; expected {COMPILE_MODES}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    from diffusers.utils import logging as dlog

    from ..integrations.diffusers import configs

    dlog.set_verbosity_error()
    family, _, tiny = model.partition("-")
    size = "tiny" if tiny else "full"
    spec = MODEL_SPECS[family]
    if guidance_scale is None:
        guidance_scale = spec.guidance_scale
    transformer = spec.denoiser == "transformer"
    # Built directly on the device (parameter init on a GPU takes a moment; on a CPU, a full SDXL takes minutes);
    # a transformer's parameters are built on the meta device, then drawn on the device in the run's dtype.
    with torch.device(device):
        pipe = configs.pipeline(family, size=size, dtype=dtype, device=device, seed=seed, text_encoders=False,
                                init="fast" if transformer else "module", overrides=overrides or None)
    pipe.set_progress_bar_config(disable=True)
    import diffusers

    sched_cfg = dict(getattr(diffusers, spec.scheduler).from_config(pipe.scheduler.config).config)
    den = getattr(pipe, spec.denoiser)
    dcfg = den.config
    g = torch.Generator().manual_seed(seed + 1)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if transformer:
        embeds = configs.conditioning(family, size, batch=batch, seed=seed + 1, dtype=dtype, device=device)
        side = spec.side[size]
        latent = side // pipe.vae_scale_factor
        if family == "flux":  # packed 2x2 patches: [B, (h/2)(w/2), 4C]
            latents = r(batch, (latent // 2) ** 2, dcfg.in_channels)
        else:
            latents = r(batch, dcfg.in_channels, latent, latent)
    else:
        embeds = {"prompt_embeds": r(batch, 77, dcfg.cross_attention_dim),
                  "negative_prompt_embeds": r(batch, 77, dcfg.cross_attention_dim)}
        if family == "sdxl":
            pooled = dcfg.projection_class_embeddings_input_dim - 6 * dcfg.addition_time_embed_dim
            embeds["pooled_prompt_embeds"] = r(batch, pooled)
            embeds["negative_pooled_prompt_embeds"] = r(batch, pooled)
        latent = dcfg.sample_size
        latents = r(batch, dcfg.in_channels, latent, latent)
        side = latent * pipe.vae_scale_factor
    counts = {k: int(dcfg[k]) for k in spec.blocks}
    return E2EContext(device, dtype, model, family, size, pipe, sched_cfg, embeds, latents, side, side, batch,
                      guidance_scale, seed, compile_mode, compile_cap_s, compile_backend, tuple(graph_methods),
                      counts)


@dataclass
class _Live:
    variant: Variant
    runner: Runner
    method: str | None  # compile mode or graph method that ran
    first_call_s: float
    peak_bytes: int | None
    output: torch.Tensor
    params: dict
    warm_s: float = 0.0  # the last warm-up call: an estimate of one timed call
    times: list[float] = field(default_factory=list)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _attempt(ctx: E2EContext, v: Variant, method: str | None, steps: int, cap: float | None) -> _Live:
    """Set up one variant and run its warm-up calls (compilation, capture) under the compile cap."""
    cuda = ctx.cuda
    if cuda:
        torch.cuda.synchronize(ctx.device)
        before = torch.cuda.memory_allocated(ctx.device)
        torch.cuda.reset_peak_memory_stats(ctx.device)
    t0 = time.perf_counter()
    with _cap(cap):
        runner = v.setup(ctx, method)
        out = runner(steps)
        synchronize(ctx.device)
        first = time.perf_counter() - t0
        warm = 2 if (v.compiled or method == "reduce-overhead") else 1
        for _ in range(warm):  # reduce-overhead records its CUDA graphs on the calls after the compile
            t1 = time.perf_counter()
            runner(steps)
            synchronize(ctx.device)
        warm_s = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated(ctx.device) - before if cuda else None
    describe = getattr(runner, "describe", None)
    return _Live(v, runner, method, first, peak, out.detach().float().clone(), describe() if describe else {},
                 warm_s)


def _methods(ctx: E2EContext, v: Variant) -> list[tuple[str | None, float | None, str | None]]:
    """``(method, cap, reason not to try)`` for each way to set ``v`` up, in order."""
    if v.name == "diffusers_graph":
        out = []
        for m in ctx.graph_methods:
            if m == "reduce-overhead" and ctx.compile_cap_s <= 0:
                out.append((m, None, "torch.compile not run: compile cap 0 s (this run's time budget)"))
            else:
                out.append((m, ctx.compile_cap_s if m == "reduce-overhead" else None, None))
        return out
    if not v.compiled:
        return [(None, None, None)]
    if ctx.compile_cap_s <= 0:
        return [(ctx.compile_mode, None, "torch.compile not run: compile cap 0 s (this run's time budget)")]
    ladder = [ctx.compile_mode] + (["default"] if ctx.compile_mode != "default" else [])
    return [(m, ctx.compile_cap_s, None) for m in ladder]


def run_e2e(
    device: torch.device,
    dtype: torch.dtype,
    *,
    model: str = "sd15",
    steps: int | None = None,
    repeats: int = 3,
    variants: Sequence[str] = VARIANT_NAMES,
    batch: int = 1,
    guidance_scale: float | None = None,
    seed: int = 0,
    compile_mode: str = RECIPE_COMPILE_MODE,
    compile_cap_s: float = 0.0,
    compile_backend: str = "inductor",
    graph_methods: Sequence[str] = ("cuda_graph", "reduce-overhead"),
    fp32_reference: bool = False,
    blocks: Sequence[int] | None = None,
    progress: Progress | None = None,
    context: E2EContext | None = None,
    deadline: float | None = None,
) -> tuple[list[dict], list[dict]]:
    """Benchmark full sampling calls of every variant on one model, same weights and inputs.

    Args:
        device, dtype: where and in which dtype the pipelines run.
        model: one of :data:`MODELS` (``sd15`` at 512², ``sdxl``, ``flux`` and ``sd3`` at 1024²; ``-tiny`` for
            CPU tests).
        steps: sampling steps per call (>= 4; None: the model's default, 25 for the UNets, 28 for Flux / SD3).
        repeats: timed calls per variant (taken in rounds across the variants).
        variants: names from :data:`VARIANT_NAMES`.
        batch: images per call (with classifier-free guidance the denoiser sees twice that; Flux's guidance
            embedding needs one evaluation per image).
        guidance_scale, seed: the pipelines' guidance scale (None: the model's default); the seed of the
            weights and inputs.
        compile_mode: the torch.compile mode compiled variants try first (the recipe's by default); when it
            does not finish within ``compile_cap_s`` the variant falls back to ``"default"`` and records it.
        compile_cap_s: seconds one compile may take (0: compiled variants are recorded as not run).
        compile_backend: ``torch.compile`` backend (``"inductor"``; tests use ``"eager"``).
        graph_methods: what ``diffusers_graph`` tries (``"cuda_graph"``, ``"reduce-overhead"``).
        fp32_reference: also run the stock pipeline in float32 (untimed) and judge every output against it.
        blocks: a transformer's block counts (:func:`check_blocks`), None for its config's own (ignored with
            ``context``, which was built with its own).
        progress: progress display or None.
        context: a prepared :func:`build_context` (default: built here).
        deadline: a ``time.perf_counter()`` value the run must end by: a variant whose setup would leave too
            little time for the rounds and counts of those already set up, rounds and counts that would not
            fit, are recorded as not run (the results are still written, rather than the whole run killed).

    Returns:
        ``(cases, skipped)`` in the results schema.
    """
    for name in variants:
        if name not in VARIANT_NAMES:
            raise ValueError(f"variants: unknown variant {name!r}; expected names from {VARIANT_NAMES}")
    for m in graph_methods:
        if m not in ("cuda_graph", "reduce-overhead"):
            raise ValueError(f"graph_methods: unknown method {m!r}; expected cuda_graph, reduce-overhead")
    if steps is None:
        steps = MODEL_SPECS[(model if context is None else context.model).partition("-")[0]].steps
    if steps < max(SYNC_STEPS):
        raise ValueError(f"steps must be >= {max(SYNC_STEPS)}, got {steps}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not compile_cap_s >= 0:
        raise ValueError(f"compile_cap_s must be >= 0, got {compile_cap_s}")
    ctx = context or build_context(model, device, dtype, batch=batch, guidance_scale=guidance_scale, seed=seed,
                                   compile_mode=compile_mode, compile_cap_s=compile_cap_s,
                                   compile_backend=compile_backend, graph_methods=graph_methods, blocks=blocks)
    prefix = f"e2e/{ctx.model}/{case_label(ctx, steps)}/{dtype_name(dtype)}/"
    params = _run_params(ctx, steps, repeats)
    skipped: list[dict] = []
    live: list[_Live] = []
    table = [v for v in VARIANTS if v.name in variants]
    if progress is not None:
        progress.add(len(table) + 1)

    out_of_time = "not run: this run's time limit (--time-limit) was reached"

    def time_left_for_setup() -> float:
        """Seconds a further setup may take: the deadline less the rounds, counts and a reference still to run
        for the variants set up so far (each ~ its warm-up call), and a few calls for the next one."""
        if deadline is None:
            return math.inf
        unit = max((e.warm_s for e in live), default=0.0)
        tail = (repeats + 1) * sum(e.warm_s for e in live) + (2 if fp32_reference else 0) * unit + 3 * unit
        return deadline - time.perf_counter() - tail - 5.0

    # 1. Set up each variant: build, warm up (compile, capture) under the cap, record memory and output.
    pristine = ctx.weights_fingerprint() if ctx.shares_weights else None
    for v in table:
        key = prefix + v.name
        if progress is not None:
            progress.step(key)
        if time_left_for_setup() < 1.0:
            skip(skipped, key, out_of_time)
            continue
        why = v.available(ctx)  # first: a variant that does not apply to the model says so on any device
        if why is not None:
            skip(skipped, key, why)
            continue
        if v.cuda_only and not ctx.cuda:
            skip(skipped, key, "needs a CUDA device (CUDA graphs)")
            continue
        attempts: dict[str, Any] = {}
        got: list[_Live] = []
        for method, cap, reason in _methods(ctx, v):
            label_m = method or "eager"
            if reason is not None:
                attempts[label_m] = reason
                continue
            if cap is not None and deadline is not None:
                cap = max(1.0, min(cap, time_left_for_setup()))
            try:
                entry = _attempt(ctx, v, method, steps, cap)
            except _CompileTimeout:
                attempts[label_m] = f"compile did not finish within the {cap:.0f} s cap"
                torch._dynamo.reset()
                _free(ctx.device)
                continue
            except Unavailable as exc:
                attempts = {"": str(exc)}  # the reason itself, not one method's outcome
                break
            except Exception as exc:  # a variant that fails here is recorded with its reason
                attempts[label_m] = first_line(exc)
                _free(ctx.device)
                continue
            finally:
                if pristine is not None and not same_fingerprint(ctx.weights_fingerprint(), pristine):
                    raise RuntimeError(f"e2e variant {v.name} changed the shared weights of the {ctx.model} "
                                       "transformer in place; every later variant would run other weights")
            got.append(entry)
            if v.compiled:  # the first mode that compiles in time is the one measured
                break
        if not got:
            reasons = "; ".join(f"{m}: {r}" if m else r for m, r in attempts.items()) or "no method ran"
            skip(skipped, key, reasons if reasons.startswith(NOT_AVAILABLE) else f"did not run: {reasons}")
            continue
        for entry in got:
            if attempts:
                entry.params["attempts"] = dict(attempts)
        live.extend(got)

    # 2. Time: rounds across every live variant, so drift over the run hits all of them alike.
    if progress is not None:
        progress.step(prefix + "timing")
    for r in range(repeats):
        round_s = sum((e.times[-1] if e.times else e.first_call_s * 1e3) for e in live) * 1e-3
        if r > 0 and deadline is not None and time.perf_counter() + 1.2 * round_s > deadline:
            break  # the rounds so far are the measurement; how many ran is in each case's samples
        for entry in live:
            synchronize(ctx.device)
            t0 = time.perf_counter()
            entry.runner(steps)
            synchronize(ctx.device)
            entry.times.append((time.perf_counter() - t0) * 1e3)

    # 3. Host syncs and scalar reads per step: a 4-step minus a 2-step call (each after one untimed call of
    # that length, so new captures and plan tables stay outside the count), halved.
    counts: dict[int, dict[int, SyncCounter]] = {}
    for i, entry in enumerate(live):
        counts[i] = {}
        compiled = entry.variant.compiled or entry.method == "reduce-overhead"
        if deadline is not None and time.perf_counter() + 1e-3 * quantile(entry.times, 0.5) > deadline:
            entry.params["sync_count_error"] = out_of_time
            continue
        try:
            for n in SYNC_STEPS:
                entry.runner(n)
                synchronize(ctx.device)
                with SyncCounter(ctx.device, count_reads=not compiled) as sc:
                    entry.runner(n)
                    synchronize(ctx.device)
                counts[i][n] = sc
        except Exception as exc:  # counting is diagnostic: keep the timing, say why the count is missing
            entry.params["sync_count_error"] = first_line(exc)

    reference = _fp32_output(ctx, steps) if fp32_reference else None
    cases = [_case(ctx, e, counts.get(i, {}), prefix, params, steps) for i, e in enumerate(live)]
    _compare_outputs(cases, live, reference)
    _pick_graph_method(cases, ctx.graph_methods)
    ratios(cases, is_baseline=lambda c: c["family"] != "df")
    eager = next((c for c in cases if c["impl"] == "diffusers_eager"), None)
    for c in cases:
        if eager is not None and c is not eager:
            c["vs_diffusers_eager"] = eager["median_ms"] / c["median_ms"]
            if c.get("peak_mem_bytes") and eager.get("peak_mem_bytes"):
                c["mem_vs_baseline"] = c["peak_mem_bytes"] / eager["peak_mem_bytes"]
    if ctx.cuda:
        from ..samplers import graph

        graph.clear_cache()
    live.clear()  # the variants' pipelines, graphs and compiled code go before the memory is released
    _free(ctx.device)
    return cases, skipped


def case_label(ctx: E2EContext, steps: int) -> str:
    """The run's part of the case keys, e.g. ``b1-cfg-512x512-dpmsolver++2m-25steps`` (UNets) or
    ``b1-guidance-1024x1024-flowmatch_euler-28steps-blocks4+8`` (transformers: their block counts, so a
    Flux-shaped model with fewer blocks is never compared with the full one)."""
    spec = ctx.spec
    label = (f"b{ctx.batch}-{'cfg' if spec.cfg else 'guidance'}-{ctx.height}x{ctx.width}-{spec.sampler_label}-"
             f"{steps}steps")
    if ctx.blocks:
        label += "-blocks" + "+".join(str(n) for n in ctx.blocks.values())
    return label


def _run_params(ctx: E2EContext, steps: int, repeats: int) -> dict:
    """The ``params`` every case of the run shares."""
    spec = ctx.spec
    den = ctx.denoiser
    p = {"model": ctx.model, "pipeline": type(ctx.pipe).__name__, "denoiser": f"diffusers {type(den).__name__}",
         "weights": f"random ({ctx.size} config, seed {ctx.seed}, "
                    f"{'N(0, 1/fan_in) drawn on the device' if ctx.shares_weights else 'module init'})",
         "batch": ctx.batch, "cfg_batch": (2 if spec.cfg else 1) * ctx.batch,
         "guidance": "classifier-free" if spec.cfg else "guidance embedding", "height": ctx.height,
         "width": ctx.width, "latent": list(ctx.latents.shape), "steps": steps, "scheduler": spec.scheduler,
         "guidance_scale": ctx.guidance_scale, "repeats": repeats, "output_type": "latent",
         "parameters": sum(t.numel() for t in den.parameters())}
    if spec.denoiser == "unet":
        p["unet"] = "diffusers UNet2DConditionModel"
    if ctx.blocks:
        from ..integrations.diffusers import configs

        full = configs.transformer_config(ctx.family, "full")
        p["blocks"] = dict(ctx.blocks)
        p["blocks_published"] = {k: full[k] for k in ctx.blocks}
        p["full_depth"] = ctx.size == "full" and p["blocks"] == p["blocks_published"]
        cfg = den.config
        p["heads"], p["head_dim"] = cfg.num_attention_heads, cfg.attention_head_dim
        p["text_tokens"] = int(ctx.embeds["prompt_embeds"].shape[1])
        patch = cfg.patch_size if ctx.family == "sd3" else 2  # Flux packs 2x2 latent patches
        p["image_tokens"] = (ctx.height // ctx.pipe.vae_scale_factor // patch) ** 2
        p["weights_shared_by_variants"] = True
    return p


def _case(ctx: E2EContext, e: _Live, counts: dict[int, SyncCounter], prefix: str, params: dict,
          steps: int) -> dict:
    times = e.times
    med = quantile(times, 0.5)
    lo, hi = SYNC_STEPS
    p = dict(params, **e.params, times_ms=[round(t, 3) for t in times], first_call_s=round(e.first_call_s, 3))
    v = e.variant
    if v.name == "diffusers_graph":
        p["graph_method"] = e.method
    elif v.compiled:
        p["compile_mode"] = e.method
        p["compile_mode_requested"] = ctx.compile_mode
        p["compile_backend"] = ctx.compile_backend
    if v.name == "diffusers_compile":
        p["recipe"] = compile_recipe(ctx)
    case = {
        "key": prefix + v.name + (f"@{e.method}" if v.name == "diffusers_graph" else ""),
        "suite": "e2e", "op": "e2e", "set": ctx.model, "impl": v.name, "kind": v.kind, "family": v.family,
        "dtype": dtype_name(ctx.dtype), "params": p, "median_ms": med, "p20_ms": quantile(times, 0.2),
        "p80_ms": quantile(times, 0.8), "samples": len(times), "spread": spread(times),
        "steps_per_s": steps / (med * 1e-3), "ms_per_image": med / ctx.batch, "peak_mem_bytes": e.peak_bytes,
    }
    if v.compiled or e.method == "reduce-overhead":
        case["compile_s"] = max(0.0, e.first_call_s - med * 1e-3)
    if lo in counts and hi in counts:
        if counts[hi].reads is not None:
            case["scalar_reads_per_step"] = (counts[hi].reads - counts[lo].reads) / (hi - lo)
            p["scalar_reads_per_call"] = counts[hi].reads
        else:
            p["scalar_reads"] = "not counted: torch.compile'd code does not run under a TorchDispatchMode"
        # A one-off sync in the shorter call (first use of a library path) can make the difference negative;
        # per step is then 0, and both raw counts stay in params.
        if ctx.cuda:
            case["host_syncs_per_step"] = max(0.0, (counts[hi].syncs - counts[lo].syncs) / (hi - lo))
            p["host_syncs_per_call"] = counts[hi].syncs
            p["host_syncs_per_call_short"] = counts[lo].syncs
    p["output_finite"] = bool(torch.isfinite(e.output).all())
    return case


def _pick_graph_method(cases: list[dict], tried: Sequence[str]) -> None:
    """Keep the faster ``diffusers_graph`` candidate as the case; the other's time (or why it has none) goes
    into its params."""
    graph = [c for c in cases if c["impl"] == "diffusers_graph"]
    if not graph:
        return
    best = min(graph, key=lambda c: c["median_ms"])
    best["params"]["candidates"] = dict(best["params"].get("attempts", {}))
    for m in ("cuda_graph", "reduce-overhead"):
        if m not in tried:
            best["params"]["candidates"][m] = "not measured in this run (--graph-methods)"
    for c in graph:
        best["params"]["candidates"][c["params"]["graph_method"]] = f"{c['median_ms']:.3f} ms"
        if c is not best:
            cases.remove(c)
    best["key"] = best["key"].split("@")[0]


def _fp32_output(ctx: E2EContext, steps: int) -> torch.Tensor | None:
    """The stock pipeline in float32 on the same weights and inputs (the trajectory's float64-free yardstick)."""
    try:
        pipe = ctx.fresh_pipeline(dtype=torch.float32)
        embeds = {k: t.float() for k, t in ctx.embeds.items()}
        out = pipe(**embeds, latents=ctx.latents.float(), num_inference_steps=steps,
                   guidance_scale=ctx.guidance_scale, height=ctx.height, width=ctx.width, output_type="latent")
        return out.images.float()
    except Exception:  # the reference is optional: no judgement rather than a failed run
        return None
    finally:
        _free(ctx.device)


def _compare_outputs(cases: list[dict], live: list[_Live], reference: torch.Tensor | None) -> None:
    eager = next((e.output for e in live if e.variant.name == "diffusers_eager"), None)
    eager_err = None
    if reference is not None and eager is not None:
        eager_err = float((eager - reference).abs().max())
    for c, e in zip(cases, live):
        if eager is not None:
            d = e.output - eager
            c["params"]["max_abs_diff"] = float(d.abs().max())
            c["params"]["rel_l2_diff"] = float(d.norm() / eager.norm().clamp_min(1e-30))
        if reference is not None:
            err = float((e.output - reference).abs().max())
            c["params"]["max_abs_err_vs_fp32"] = err
            if eager_err is not None:
                floor = 2.0**-8 * max(1.0, float(reference.abs().max()))
                c["params"]["fp32_bound"] = 2 * eager_err + floor
                c["params"]["within_tolerance"] = err <= 2 * eager_err + floor
