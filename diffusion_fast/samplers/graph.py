"""CUDA-graph capture of a whole sampling trajectory (``sample(..., cuda_graph=True)``).

At Stable Diffusion 1.5 sizes a denoising step is a few hundred short kernels; launching them costs as much as
running them. Because the loop never reads a device value on the host (coefficient tables live on the device
and are indexed with Python integers), the whole trajectory — every network evaluation and every
``sampler_step`` — can be recorded once into a ``torch.cuda.CUDAGraph`` and replayed as one launch.

:func:`run_graphed` is what ``sample`` calls. It runs the loop's own body (:func:`.loop.run`) under capture,
so the graphed and the eager trajectory are the same code. The per-call tensors (``x``, ``cond``, ``uncond``)
are copied into static buffers before each replay; the result is copied out of the graph's static output.

Noise: the eager loop draws each noise tensor with ``torch.randn(state.shape, generator=generator,
device=..., dtype=state.dtype)`` — or calls the user's ``noise_sampler(sigma, sigma_next)`` — at the
evaluations the plan marks (``plan.draws``). A graph must not draw from a user's generator while capturing,
and replaying captured draws would not advance it, so the draws are made before each replay, eagerly, with
exactly those calls in that order (:func:`.loop.make_draw`), into a static ``[n_noise, *x.shape]`` buffer,
which the loop body reads instead of drawing (``loop.run(..., noise=...)``). The replayed result therefore
equals the uncaptured run bit for bit on the same device, and the generator ends in the same state.

Graphs are cached (LRU, :data:`MAX_CACHED_GRAPHS`) under a key made of the plan's tables (by value), the
guidance scale, network dtype and fast-path backend, the model's identity, parameter addresses and per-module
op backends (of the model, or of the modules a bound method, ``functools.partial`` or closure passed as the
model refers to), and the shapes, dtypes, strides and devices of the inputs: any change re-captures. Warm-up runs
on a side stream before capture, so Triton autotuning and cuBLAS/cuDNN initialisation happen outside it.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..ops._checks import same_device
from .loop import draw_noise, make_draw, run

MAX_CACHED_GRAPHS = 4


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # static input buffers
    noise: torch.Tensor | None  # static [n_noise, *noise_shape] buffer
    output: torch.Tensor  # static output, in the graph's memory pool
    model_ref: Callable[[], Any]  # weak reference to the model the graph was captured with
    trajectory: Callable[..., torch.Tensor]  # keeps alive every tensor the recorded kernels read


class GraphCache:
    """A small LRU cache of captured trajectories; an entry whose model was freed is never returned."""

    def __init__(self, capacity: int = MAX_CACHED_GRAPHS):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, model: object) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.model_ref() is not model:  # the model was freed and its id reused
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry

    def put(self, key: Hashable, entry: Any) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                _, old = self._entries.popitem(last=False)
                _release(old)

    def clear(self) -> None:
        with self._lock:
            for entry in self._entries.values():
                _release(entry)
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _release(entry: Any) -> None:
    g = getattr(entry, "graph", None)
    if g is not None and hasattr(g, "reset"):
        g.reset()


_CACHE = GraphCache()


def cache() -> GraphCache:
    """The process-wide cache :func:`run_graphed` and :func:`graphed_call` use by default."""
    return _CACHE


def clear_cache() -> None:
    """Drop every captured graph (frees their memory pools). Needed after changing a model's backends."""
    _CACHE.clear()


def _tensor_sig(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device))


def _model_ref(model: object) -> Callable[[], Any]:
    try:
        return weakref.ref(model)
    except TypeError:  # not weak-referenceable: hold it (the cache is bounded)
        return lambda: model


def _modules_of(model: object) -> list[torch.nn.Module]:
    """The modules behind ``model``: itself, or those a bound method, partial or closure refers to."""
    if isinstance(model, torch.nn.Module):
        return [model]
    found = []
    owner = getattr(model, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        found.append(owner)
    for v in (getattr(model, "func", None), *getattr(model, "args", ()), *(getattr(model, "keywords", None)
                                                                          or {}).values()):
        if isinstance(v, torch.nn.Module):
            found.append(v)
    for cell in getattr(model, "__closure__", None) or ():
        try:
            v = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(v, torch.nn.Module):
            found.append(v)
    return found


def _model_sig(model: object) -> tuple:
    # The graph reads parameters at the addresses they had at capture: a model whose tensors were replaced
    # (not updated in place) needs a new capture. Modules that pick an op backend at run time
    # (``model.set_backend``) record it as ``.backend``; a change of backend needs one too.
    sig: list = [id(model)]
    for mod in _modules_of(model):
        ptrs = tuple(p.data_ptr() for p in mod.parameters()) + tuple(b.data_ptr() for b in mod.buffers())
        backends = tuple(b for m in mod.modules() if isinstance(b := getattr(m, "backend", None), str))
        sig += [id(mod), mod.training, hash(ptrs), hash(backends)]
    return tuple(sig)


def graph_key(key: Hashable, model: object, inputs: Sequence[torch.Tensor], n_noise: int,
              noise_shape: Sequence[int] | None) -> tuple:
    """The full cache key: the caller's key, the model, the inputs' geometry and the noise geometry."""
    return (key, _model_sig(model), tuple(_tensor_sig(t) for t in inputs), int(n_noise),
            None if noise_shape is None else tuple(int(s) for s in noise_shape))


def _check(inputs: Sequence[torch.Tensor], n_noise: int, noise_shape, generator) -> torch.device:
    if isinstance(n_noise, bool) or not isinstance(n_noise, int) or n_noise < 0:
        raise ValueError(f"n_noise must be an int >= 0, got {n_noise!r}")
    if n_noise > 0 and noise_shape is None:
        raise ValueError(f"noise_shape is required when n_noise={n_noise} > 0")
    if len(inputs) == 0:
        raise ValueError("inputs must hold at least one tensor (the starting x)")
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"inputs[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the sampling tensors on a CUDA device; inputs[{i}] "
                             f"(shape {tuple(t.shape)}) is on {t.device}")
    device = inputs[0].device
    for i, t in enumerate(inputs):
        if t.device != device:
            raise ValueError(f"inputs[{i}] is on {t.device} but inputs[0] is on {device}; "
                             "a graph runs on one device")
    for g in generator if isinstance(generator, (list, tuple)) else [generator]:  # one, or one per row
        if g is not None and not same_device(g.device, device):
            raise ValueError(f"generator is on {g.device} but the sampling tensors are on {device}; "
                             "the noise must be drawn on the device the graph runs on")
    if torch.cuda.is_current_stream_capturing():
        raise ValueError("a CUDA graph cannot be captured or replayed while another one is being captured")
    return device


def graphed_call(
    key: Hashable,
    model: object,
    inputs: Sequence[torch.Tensor],
    trajectory: Callable[[tuple[torch.Tensor, ...], torch.Tensor | None], torch.Tensor],
    *,
    n_noise: int = 0,
    noise_shape: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    warmup: int = 1,
    graph_cache: GraphCache | None = None,
    draw: Callable[[int], torch.Tensor] | None = None,
    noise_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Run ``trajectory`` as a captured CUDA graph (capturing it first when the key is new).

    The generic mechanism under :func:`run_graphed`: every call copies ``inputs`` into the static buffers,
    draws ``n_noise`` tensors with :func:`draw_noise` into the static noise buffer, replays, and returns a
    copy of the static output.

    Args:
        key: hashable description of everything the trajectory's work depends on besides ``inputs``' values
            and the model (sampler, sigmas, guidance scale, prediction type, network dtype, backend, ...).
        model: the network the trajectory calls; its identity and parameter addresses join the key.
        inputs: per-call tensors the trajectory reads, all on one CUDA device (e.g. ``x [B, C, H, W]``
            float32, the context ``[2B, T, Dc]``). Their values are copied into static buffers each call.
        trajectory: ``(static_inputs, noise) -> out``: the whole sampling loop on the static buffers, with
            ``noise [n_noise, *noise_shape]`` float32 (None when ``n_noise == 0``) holding the draws in the
            order the eager loop makes them. It must not synchronise with the host or draw random numbers.
        n_noise: number of noise draws over the trajectory.
        noise_shape: shape of one draw (the sampler state's shape).
        generator: the generator the eager loop would draw from (None: the device's default generator), or
            the list of per-row generators it would draw from.
        warmup: eager runs on a side stream before capture (autotuning, library initialisation).
        graph_cache: where captured graphs are kept (default: the process-wide cache).
        draw: ``draw(k) -> [*noise_shape]``, the k-th noise draw (default: :func:`draw_noise` from ``generator``).
        noise_dtype: dtype of the static noise buffer.

    Returns:
        A fresh tensor holding the trajectory's output (a copy: later replays do not overwrite it).

    Raises:
        ValueError: an input is not on CUDA, devices differ, or the noise description is inconsistent.
    """
    device = _check(inputs, n_noise, noise_shape, generator)
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (autotuning must finish before capture), got {warmup}")
    store = _CACHE if graph_cache is None else graph_cache
    full_key = graph_key(key, model, inputs, n_noise, noise_shape) + (noise_dtype,)
    entry = store.get(full_key, model)
    if entry is None:
        entry = _capture(model, inputs, trajectory, n_noise, noise_shape, device, warmup, noise_dtype)
        store.put(full_key, entry)
    if draw is None:
        draw = lambda k: draw_noise(noise_shape, generator, device, noise_dtype)  # noqa: E731
    with torch.no_grad():
        for static, t in zip(entry.inputs, inputs):
            static.copy_(t)
        for i in range(n_noise):
            entry.noise[i].copy_(draw(i))
        entry.graph.replay()
        return entry.output.clone()


def _capture(model, inputs, trajectory, n_noise, noise_shape, device, warmup, noise_dtype=torch.float32) -> _Graph:
    # Static buffers are ordinary tensors even when the capture happens under inference_mode, so a later
    # call outside inference_mode may still copy into them.
    with torch.inference_mode(False), torch.no_grad():
        static = tuple(t.detach().clone() for t in inputs)
        noise = None
        if n_noise:
            # Warm-up and capture read the buffer's address, not its values; the real draws come per replay.
            noise = torch.zeros((n_noise, *noise_shape), dtype=noise_dtype, device=device)
    with torch.no_grad(), torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                trajectory(static, noise)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = trajectory(static, noise)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"trajectory must return a torch.Tensor, got {type(out).__name__}")
    return _Graph(g, static, noise, out, _model_ref(model), trajectory)


def _plan_key(tables) -> tuple:
    p = tables.plan
    return (p.sampler, p.K, p.coef.tobytes(), p.slots.tobytes(), p.sigma_eval.tobytes(), p.noise.tobytes(),
            float(p.c_in0), float(p.pre_noise), str(tables.coef.device), tables.dtype)


def run_graphed(
    tables,
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    guidance_scale: float | None = None,
    cond: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    net_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    graph_cache: GraphCache | None = None,
    model_kwargs: dict[str, torch.Tensor] | None = None,
    noise_sampler: Callable[[float, float], torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`.loop.run` captured as one CUDA graph and replayed; same arguments, same result bit for bit.

    Args:
        tables: the plan's device tables (``loop.DeviceTables``), on x's CUDA device.
        model: the network, called by the loop as ``model(x_in, sigma[, context])``.
        x: ``[B, ...]`` starting sample on a CUDA device (already multiplied by ``sigmas[0]``).
        generator: the noise generator (a CUDA generator on x's device, a list of them, one per row of x, or
            None for the default one).
        guidance_scale, cond, uncond, net_dtype, backend, noise_sampler: as for :func:`.loop.run`.
        graph_cache: where graphs are kept (default: the process-wide cache).
        model_kwargs: tensors every model call receives as keyword arguments; inputs of the graph (static
            buffers), like ``x``, ``cond`` and ``uncond``.
        noise_sampler: draws the noise instead of ``generator`` (see :func:`diffusion_fast.sample`).

    Returns:
        ``[B, ...]`` sample in the tables' dtype (a fresh tensor).

    Raises:
        ValueError: a tensor is not on CUDA, or the generator is on another device.
    """
    extra = dict(model_kwargs or {})
    names = ("x",) + tuple(n for n, t in (("cond", cond), ("uncond", uncond)) if t is not None)
    given = {"x": x, "cond": cond, "uncond": uncond}
    inputs = [given[n] for n in names] + list(extra.values())
    names += tuple(f"model_kwargs.{k}" for k in extra)
    plan = tables.plan
    n_noise = len(plan.draws)
    noise_shape = tuple(x.shape)
    like = torch.empty(noise_shape, dtype=tables.dtype, device=x.device)
    draw = make_draw(plan, generator, noise_sampler, like)
    key = ("sample", _plan_key(tables), names,
           None if guidance_scale is None else float(guidance_scale), net_dtype, backend)

    def trajectory(static: tuple[torch.Tensor, ...], noise: torch.Tensor | None) -> torch.Tensor:
        t = dict(zip(names, static))
        kw = {k: t[f"model_kwargs.{k}"] for k in extra}
        return run(tables, model, t["x"], generator=generator, guidance_scale=guidance_scale,
                   cond=t.get("cond"), uncond=t.get("uncond"), net_dtype=net_dtype, backend=backend, noise=noise,
                   model_kwargs=kw)

    # ``tables`` travels inside ``trajectory`` (kept by the cache entry): the graph reads its coefficient
    # tensors by address, so they must outlive the graph even if the plan cache drops them.
    return graphed_call(key, model, inputs, trajectory, n_noise=n_noise, noise_shape=noise_shape,
                        generator=generator, graph_cache=graph_cache, draw=draw, noise_dtype=tables.dtype)
