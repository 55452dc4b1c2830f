"""Op benchmarks: group_norm(+SiLU), attention and sampler_step, every backend and ``auto`` beside the baselines.

Each *case* is one (op, shape set, shape, dtype, implementation). Implementations are the op's registered
backends called through the public op (``kind="backend"``: the torch reference, triton, cuda, sdpa), ``auto``
itself (the registry's choice for that call, recorded as ``params.auto_pick``), and what a user would run
instead (``kind="baseline"``): torch eager, each torch SDPA backend forced, ``torch.compile`` of the reference.

Every case records two times: ``median_ms`` of calls issued back to back from the host (what an eager loop
sees; at SD1.5 sizes mostly the host's cost of a call) and, on CUDA, ``graph_median_ms``, the GPU time of a
call replayed inside a captured CUDA graph (what a captured trajectory sees, and what ``auto``'s rules should
follow). Each also records the bytes and FLOPs of its written-out model, the rates and fractions of the card's
measured peaks they give, its error against the float64 oracle (``kernels/reference/oracle.py``) and whether
that error is within the oracle's tolerance rule, and same-run speedups over every baseline on the same shape.

Byte and FLOP models (``s`` = bytes per element of the storage dtype, ``n`` = elements of one tensor):

* group_norm: ``bytes = 2 * n(x) * s + 2 * C * s`` — x read once, y written once, weight and bias. A
  two-pass kernel that reads x twice still counts once: the model is the floor, not the kernel's traffic.
* attention: ``flops = 4 * B * H * Sq * Sk * D`` (q kᵀ and p v, 2 FLOPs per multiply-add; softmax not
  counted), ``bytes = (2 * B * Sq * H * D + 2 * B * Sk * H * D) * s`` (q read, o written, k and v read).
* sampler_step (CFG batch, K history slots): ``bytes = 4n (x) + 2n * s (model output) + 4nK (history read)
  + 4n per history slot written + 4n (out) + 2n * s (next network input) [+ 4n noise]``, n = elements of x.

The roofline time of a case is ``max(bytes / copy_bandwidth, flops / matmul_rate)``; ``roofline_frac`` is
that floor over the measured median (1.0 = at the card's limit).

The three ops are rows of one table (:data:`SPECS`): each :class:`OpSpec` says how to build its inputs, call
it, name its baselines, read its outputs and compute its oracle; :func:`run_ops` runs any row the same way.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .. import ops as dfops
from ..kernels.reference import oracle
from ..ops import registry
from ..ops.rows import AD, AH, AX, AZ, BD, BH, BX, CIN, G, P, Q, coef_width
from .cases import first_line, ratios, skip
from .progress import Progress
from .timing import measure, measure_graph, rotation_count

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SETS = ("tiny", "sd15", "sdxl", "large", "dit")

# Representative sampler coefficients (a CFG scale of 7.5, an epsilon model at sigma 2, a 2nd-order update).
_COEF = {G: 7.5, P: 1.0, Q: -2.0, AX: 0.8, AD: 0.25, AZ: 0.1, BX: 0.0, BD: 0.0, CIN: 0.45}
_COEF_HIST = (-0.05, 0.0)  # (a_h, b_h) for each history slot


def dtype_name(dtype: torch.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    return str(dtype).replace("torch.", "")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _randn(shape, gen: torch.Generator, device, dtype) -> torch.Tensor:
    # Drawn where the generator lives (the bench device: large inputs would take seconds on the host).
    return torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------- the table


@dataclass
class Impl:
    """One way to run an op: ``bind(inputs)`` returns a zero-argument callable that runs it on that set."""

    name: str
    kind: str  # "backend" or "baseline"
    bind: Callable[[dict], Callable[[], Any]]
    compiled: bool = False
    skip: str | None = None  # reason this implementation does not run at all here
    limit: Callable[[dict], str | None] | None = None  # per-shape reason not to run (e.g. memory)


@dataclass
class Shape:
    op: str
    set: str
    name: str
    params: dict
    bytes: int
    flops: int | None
    footprint: int  # bytes of one input set (inputs and outputs), for the L2 rotation
    make: Callable[[torch.device, torch.dtype, torch.Generator], dict] = field(repr=False)


@dataclass(frozen=True)
class OpSpec:
    """One op as the benchmark sees it (a row of :data:`SPECS`)."""

    name: str
    sets: dict[str, list]  # shape set -> entries understood by ``shape``
    shape: Callable[[Any, str, torch.dtype], Shape]  # one entry of a set -> Shape
    call: Callable[[dict, str], Any]  # the public op on one input set, with a backend name
    registry_call: Callable[[dict], dict]  # the keyword arguments the registry resolves a backend for
    baselines: Callable[[int], list[Impl]]  # (math_limit_bytes) -> what a user would run instead
    compile_args: Callable[[dict], tuple]  # the reference forward's arguments (the torch.compile baseline)
    outputs: Callable[[Any, dict], list[torch.Tensor]]  # what a call produced: its result or written buffers
    oracle: Callable[[dict], tuple[list, list, list]]  # (exact float64, yardstick, storage dtype) per output

    def shapes(self, set_name: str, dtype: torch.dtype) -> list[Shape]:
        """The op's shapes in ``set_name`` (none when the set has nothing for this op, e.g. GroupNorm in ``dit``)."""
        return [self.shape(entry, set_name, dtype) for entry in self.sets.get(set_name, [])]


# ---- group_norm: (shape, groups). SD1.5 at 512^2 with the CFG batch of 2; SDXL at 1024^2; large is
# bandwidth-bound (a VAE decoder at 512^2, a batch of SDXL-sized activations).
GROUP_NORM_SETS: dict[str, list[tuple[tuple[int, ...], int]]] = {
    "tiny": [((2, 64, 8, 8), 32), ((1, 96, 5, 7), 32)],
    "sd15": [((2, 320, 64, 64), 32), ((2, 640, 32, 32), 32), ((2, 1280, 16, 16), 32), ((2, 1280, 8, 8), 32)],
    "sdxl": [((2, 320, 128, 128), 32), ((2, 640, 64, 64), 32), ((2, 1280, 32, 32), 32)],
    "large": [((8, 512, 128, 128), 32), ((1, 128, 512, 512), 32)],
}


def _gn_shape(entry, set_name: str, dtype: torch.dtype) -> Shape:
    shape, groups = entry
    n, C, s = math.prod(shape), shape[1], _itemsize(dtype)
    nbytes = 2 * n * s + 2 * C * s

    def make(device, dt, gen):
        return {"x": _randn(shape, gen, device, dt) * 2.0 + 0.5, "weight": _randn((C,), gen, device, dt) * 0.2 + 1.0,
                "bias": _randn((C,), gen, device, dt) * 0.2, "groups": groups}

    return Shape("group_norm", set_name, "x".join(map(str, shape)) + f"-g{groups}-silu",
                 {"shape": list(shape), "groups": groups, "activation": "silu", "memory_format": "contiguous"},
                 nbytes, None, nbytes, make)


def _gn_eager(t):
    x, w, b, g = t["x"], t["weight"], t["bias"], t["groups"]
    return lambda: F.silu(F.group_norm(x, g, w, b, 1e-5))


GROUP_NORM = OpSpec(
    name="group_norm",
    sets=GROUP_NORM_SETS,
    shape=_gn_shape,
    call=lambda t, backend: dfops.group_norm(t["x"], t["groups"], t["weight"], t["bias"], 1e-5, "silu",
                                             backend=backend),
    registry_call=lambda t: dict(x=t["x"], num_groups=t["groups"], weight=t["weight"], bias=t["bias"], eps=1e-5,
                                 activation="silu", add=None),
    baselines=lambda math_limit: [Impl("eager", "baseline", _gn_eager)],
    compile_args=lambda t: (t["x"], t["groups"], t["weight"], t["bias"], 1e-5, "silu", None),
    outputs=lambda result, t: [result],
    oracle=lambda t: ([oracle.group_norm(t["x"], t["groups"], t["weight"], t["bias"], 1e-5, "silu")],
                      [oracle.group_norm_lowp(t["x"], t["groups"], t["weight"], t["bias"], 1e-5, "silu")],
                      [t["x"].dtype]),
)

# ---- attention: (B, Sq, Sk, H, D[, text tokens]). Self-attention has Sk == Sq; cross-attention reads 77 text
# tokens; joint attention (the DiTs: Flux, SD3) is self-attention over image tokens followed by text tokens, the
# sixth entry. dit: Flux at 1024^2 (4096 image + 512 T5 tokens, 24 heads of 128; one evaluation per step: B = 1)
# and SD3 at 1024^2 (4096 image + 77 CLIP + 256 T5 = 333 text tokens, 24 heads of 64, CFG: B = 2); the joint
# lengths 4608 and 4429 are not multiples of the kernels' tiles (4429 is odd), which is the point.
ATTENTION_SETS: dict[str, list[tuple[int, ...]]] = {
    "tiny": [(1, 64, 64, 2, 40), (1, 37, 77, 3, 24)],
    "sd15": [(2, 4096, 4096, 8, 40), (2, 1024, 1024, 8, 80), (2, 256, 256, 8, 160),
             (2, 4096, 77, 8, 40), (2, 1024, 77, 8, 80), (2, 256, 77, 8, 160)],
    "sdxl": [(2, 4096, 4096, 10, 64), (2, 1024, 1024, 20, 64), (2, 4096, 77, 10, 64), (2, 1024, 77, 20, 64)],
    "large": [(2, 4096, 4096, 16, 128), (1, 16384, 16384, 16, 64)],
    "dit": [(1, 4096 + 512, 4096 + 512, 24, 128, 512), (2, 4096 + 333, 4096 + 333, 24, 64, 333)],
}
SDPA_BASELINES = (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_efficient", "EFFICIENT_ATTENTION"),
                  ("sdpa_cudnn", "CUDNN_ATTENTION"), ("sdpa_math", "MATH"))


def _attn_shape(entry, set_name: str, dtype: torch.dtype) -> Shape:
    B, Sq, Sk, H, D = entry[:5]
    text = entry[5] if len(entry) > 5 else None
    flops = 4 * B * H * Sq * Sk * D
    nbytes = (2 * B * Sq * H * D + 2 * B * Sk * H * D) * _itemsize(dtype)
    kind = "joint" if text is not None else "self" if Sk == Sq else "cross"
    if kind == "joint":
        name = f"joint-b{B}-h{H}-s{Sq - text}+{text}-d{D}"
    else:
        name = f"{kind}-b{B}-h{H}-s{Sq}" + (f"-k{Sk}" if kind == "cross" else "") + f"-d{D}"
    extra = {} if text is None else {"image_tokens": Sq - text, "text_tokens": text}

    def make(device, dt, gen):
        return {"q": _randn((B, Sq, H, D), gen, device, dt), "k": _randn((B, Sk, H, D), gen, device, dt),
                "v": _randn((B, Sk, H, D), gen, device, dt)}

    return Shape("attention", set_name, name,
                 {"B": B, "Sq": Sq, "Sk": Sk, "H": H, "D": D, "kind": kind, "layout": "BSHD", **extra}, nbytes, flops,
                 nbytes, make)


def _sdpa_forced(sdpa_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = getattr(SDPBackend, sdpa_name)

    def bind(t):
        # SDPA takes [B, H, S, D]: transposed views of the [B, S, H, D] inputs, output viewed back.
        q, k, v = (t[n].transpose(1, 2) for n in ("q", "k", "v"))

        def run():
            with sdpa_kernel(which):
                return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return run
    return bind


def _sdpa_math_limit(max_bytes: int):
    def limit(t):
        B, Sq, H, _ = t["q"].shape
        scores = B * H * Sq * t["k"].shape[1] * 4
        if scores > max_bytes:
            return (f"the math backend materialises {scores / 2**30:.1f} GiB of scores, over the "
                    f"{max_bytes / 2**30:.1f} GiB limit of this run")
        return None
    return limit


def _attn_baselines(math_limit: int) -> list[Impl]:
    out = []
    for impl_name, sdpa_name in SDPA_BASELINES:
        try:
            bind, why = _sdpa_forced(sdpa_name), None
        except (ImportError, AttributeError) as exc:
            bind, why = (lambda t: None), f"torch has no SDPA backend {sdpa_name}: {exc}"
        out.append(Impl(impl_name, "baseline", bind, skip=why,
                        limit=_sdpa_math_limit(math_limit) if sdpa_name == "MATH" else None))
    return out


def _attn_args(t) -> tuple:
    q = t["q"]
    return q, t["k"], t["v"], 1.0 / math.sqrt(q.shape[-1])


ATTENTION = OpSpec(
    name="attention",
    sets=ATTENTION_SETS,
    shape=_attn_shape,
    call=lambda t, backend: dfops.attention(t["q"], t["k"], t["v"], backend=backend),
    registry_call=lambda t: dict(zip(("q", "k", "v", "scale"), _attn_args(t))),
    baselines=_attn_baselines,
    compile_args=_attn_args,
    outputs=lambda result, t: [result],
    oracle=lambda t: ([oracle.attention(*_attn_args(t))], [oracle.attention_lowp(*_attn_args(t))], [t["q"].dtype]),
)

# ---- sampler_step: (latent shape of x, K history slots, noise). The model output is the CFG batch [2B, ...].
SAMPLER_STEP_SETS: dict[str, list[tuple[tuple[int, ...], int, bool]]] = {
    "tiny": [((1, 4, 8, 8), 1, False), ((1, 3, 5, 7), 0, True)],
    "sd15": [((1, 4, 64, 64), 1, False), ((1, 4, 64, 64), 0, True)],
    "sdxl": [((1, 4, 128, 128), 1, False)],
    "large": [((4, 16, 1024, 1024), 1, False)],
    "dit": [((1, 16, 128, 128), 1, False)],  # SD3's 16-channel latents at 1024^2, CFG
}


def _ss_shape(entry, set_name: str, dtype: torch.dtype) -> Shape:
    shape, K, noise = entry
    n, s = math.prod(shape), _itemsize(dtype)
    writes = 1 if K else 0
    nbytes = 4 * n + 2 * n * s + 4 * n * K + 4 * n * writes + 4 * n + 2 * n * s + (4 * n if noise else 0)
    name = "x".join(map(str, shape)) + f"-cfg-k{K}" + ("-noise" if noise else "")

    def make(device, dt, gen):
        B = shape[0]
        row = torch.zeros(coef_width(K), dtype=torch.float64)
        for idx, v in _COEF.items():
            row[idx] = v
        for k in range(K):
            row[AH + k], row[BH(K) + k] = _COEF_HIST
        return {
            "x": _randn(shape, gen, device, torch.float32) * 2.0,
            "model_output": _randn((2 * B,) + shape[1:], gen, device, dt),
            "coef": row.to(device=device, dtype=torch.float32),
            "coef_list": row.tolist(),
            "slots": torch.tensor([0 if K else -1, -1], dtype=torch.int32, device=device),
            "hist": _randn((K,) + shape, gen, device, torch.float32) if K else None,
            "noise": _randn(shape, gen, device, torch.float32) if noise else None,
            "out": torch.empty(shape, dtype=torch.float32, device=device),
            "net_input": torch.empty((2 * B,) + shape[1:], dtype=dt, device=device),
        }

    return Shape("sampler_step", set_name, name,
                 {"shape": list(shape), "cfg": True, "hist": K, "noise": noise, "model_output_dtype": dtype_name(dtype),
                  "net_input_dtype": dtype_name(dtype), "prediction": "epsilon"}, nbytes, None, nbytes, make)


def _ss_eager(t):
    # What a sampler written as separate torch ops does per step (k-diffusion style, Python float
    # coefficients): CFG combine, epsilon -> denoised, the update, the history write, the next network input.
    x, mo, hist, noise, out, ni = t["x"], t["model_output"], t["hist"], t["noise"], t["out"], t["net_input"]
    c = t["coef_list"]
    B = x.shape[0]
    K = 0 if hist is None else hist.shape[0]

    def run():
        u, cond = mo[:B].float(), mo[B:].float()
        raw = u + c[G] * (cond - u)
        d = c[P] * x + c[Q] * raw
        x_new = c[AX] * x + c[AD] * d
        if noise is not None:
            x_new = x_new + c[AZ] * noise
        for k in range(K):
            x_new = x_new + c[AH + k] * hist[k]
        if K:
            hist[0].copy_(d)
        out.copy_(x_new)
        v = (c[CIN] * x_new).to(ni.dtype)
        ni[:B] = v
        ni[B:] = v
        return out
    return run


_SS_ARGS = ("x", "model_output", "coef", "slots", "hist", "noise", "out", "net_input")


def _ss_outputs(result, t) -> list[torch.Tensor]:
    # sampler_step writes its results into buffers: out, the next network input, the history.
    return [t["out"], t["net_input"]] + ([t["hist"]] if t["hist"] is not None else [])


def _ss_oracle(t):
    args = [t[a] for a in _SS_ARGS[:6]]
    exact = oracle.sampler_step(*args, t["net_input"])
    low = oracle.sampler_step_lowp(*args, t["net_input"])
    order = (0, 2, 1)  # (out, net_input, hist), the order of _ss_outputs
    dts = [torch.float32, t["net_input"].dtype, torch.float32]
    keep = 3 if t["hist"] is not None else 2
    return [exact[i] for i in order][:keep], [low[i] for i in order][:keep], dts[:keep]


SAMPLER_STEP = OpSpec(
    name="sampler_step",
    sets=SAMPLER_STEP_SETS,
    shape=_ss_shape,
    call=lambda t, backend: dfops.sampler_step(*(t[a] for a in _SS_ARGS[:6]), out=t["out"],
                                               net_input=t["net_input"], backend=backend),
    registry_call=lambda t: {a: t[a] for a in _SS_ARGS},
    baselines=lambda math_limit: [Impl("eager", "baseline", _ss_eager)],
    compile_args=lambda t: tuple(t[a] for a in _SS_ARGS),
    outputs=_ss_outputs,
    oracle=_ss_oracle,
)

SPECS: dict[str, OpSpec] = {s.name: s for s in (GROUP_NORM, ATTENTION, SAMPLER_STEP)}
OPS = tuple(SPECS)


def shapes(op: str, set_name: str, dtype: torch.dtype) -> list[Shape]:
    """The shapes of ``op`` in shape set ``set_name``."""
    return SPECS[op].shapes(set_name, dtype)


# --------------------------------------------------------------------------------------------- implementations


def _interpreted_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _backend_impl(spec: OpSpec, name: str) -> Callable[[dict], Callable[[], Any]]:
    return lambda t: (lambda: spec.call(t, name))


def _compiled(spec: OpSpec) -> Callable[[dict], Callable[[], Any]]:
    import importlib

    ref = importlib.import_module(f"diffusion_fast.kernels.reference.{spec.name}").forward

    def bind(t):
        fn = torch.compile(ref, dynamic=False)
        args = spec.compile_args(t)
        return lambda: fn(*args)
    return bind


def auto_pick(op: str, device: torch.device, call: dict) -> str:
    """The name of the backend ``backend="auto"`` resolves ``call`` to (the registry's own choice)."""
    fn = registry.resolve(op, "auto", device, call)
    for name, entry in registry.backends(op).items():
        mod = entry.load()
        if mod is not None and getattr(mod, "forward", None) is fn:
            return name
    return "unknown"


def implementations(op: str, device: torch.device, *, math_limit_bytes: int) -> list[Impl]:
    """Every implementation of ``op`` this run considers, with a reason for those that cannot run here."""
    spec = SPECS[op]
    impls = []
    for name, reason in registry.status(op).items():
        if reason is None and name == "triton" and _interpreted_triton():
            reason = "Triton runs in its interpreter here (TRITON_INTERPRET=1): its time says nothing"
        impls.append(Impl(name, "backend", _backend_impl(spec, name), skip=reason))
    impls.append(Impl("auto", "backend", _backend_impl(spec, "auto")))
    impls.extend(spec.baselines(math_limit_bytes))
    why = None if device.type == "cuda" else "torch.compile baseline runs on CUDA only"
    impls.append(Impl("compile", "baseline", _compiled(spec), compiled=True, skip=why))
    return impls


# --------------------------------------------------------------------------------------------- checking


def _clone_inputs(t: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in t.items()}


@dataclass
class Verdict:
    """A result against the oracle: the largest error, the bound of the rule, and whether it holds."""

    max_abs_err: float
    tolerance: float
    ok: bool
    detail: str = ""


def check_outputs(spec: OpSpec, got: list[torch.Tensor], expected: tuple[list, list, list]) -> Verdict:
    """Check the outputs of one call against ``spec.oracle``'s ``(exact, yardstick, dtype)`` lists."""
    err, tol, ok, detail = 0.0, 0.0, True, ""
    for g, exact, yard, dt in zip(got, *expected):
        c = oracle.check(g, exact, yard, dtype=dt, what=spec.name)
        err, tol = max(err, c.err), max(tol, c.bound)
        if not c.ok and ok:
            ok, detail = False, c.message()[:300]
    return Verdict(err, tol, ok, detail)


# --------------------------------------------------------------------------------------------- running


class _CompileBudget:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.spent = 0.0

    def reason(self) -> str | None:
        if self.seconds <= 0:
            return "torch.compile baseline disabled (--compile-budget 0)"
        if self.spent >= self.seconds:
            return f"this op's share of the torch.compile budget ({self.seconds:.0f} s) is spent"
        return None


@dataclass
class OpsRun:
    """Results of :func:`run_ops`: case dicts and ``{key, reason}`` for what did not run."""

    cases: list[dict]
    skipped: list[dict]


def case_key(shape: Shape, dtype: torch.dtype, impl: str) -> str:
    return f"{shape.op}/{shape.set}/{shape.name}/{dtype_name(dtype)}/{impl}"


def run_ops(
    device: torch.device,
    dtype: torch.dtype,
    *,
    ops: Sequence[str] = OPS,
    sets: Sequence[str] = ("sd15",),
    impls: Sequence[str] | None = None,
    peaks: dict,
    budget_ms: float = 100.0,
    compile_budget_s: float = 0.0,
    graph: bool | None = None,
    cache_bytes: int | None = None,
    progress: Progress | None = None,
    seed: int = 0,
    deadline: float | None = None,
) -> OpsRun:
    """Run the op benchmarks.

    Args:
        device: where the ops run (CUDA: events; CPU: host clock).
        dtype: storage dtype of the activations (sampler state is float32 regardless).
        ops: subset of :data:`OPS`.
        sets: subset of :data:`SETS`.
        impls: restrict to these implementation names (e.g. ``["torch", "eager"]``); None = all.
        peaks: from :func:`diffusion_fast.bench.peaks.measure_peaks`.
        budget_ms: timed duration per case (each of the two timings on CUDA).
        compile_budget_s: total seconds ``torch.compile`` baselines may spend compiling (0 = none).
        graph: also time each case replayed inside a CUDA graph (default: on CUDA).
        cache_bytes: last-level cache size for the input rotation (default: the GPU's L2, 32 MiB on CPU).
        progress: progress display, or None.
        seed: seed of the input generator.
        deadline: a ``time.perf_counter()`` value; shapes not started by then are recorded as skipped (so a
            time-boxed run still writes its results).

    Returns:
        :class:`OpsRun`.
    """
    for op in ops:
        if op not in SPECS:
            raise ValueError(f"ops: unknown op {op!r}; expected names from {OPS}")
    for s in sets:
        if s not in SETS:
            raise ValueError(f"sets: unknown shape set {s!r}; expected names from {SETS}")
    cuda = device.type == "cuda"
    graph = cuda if graph is None else graph
    if graph and not cuda:
        raise ValueError("graph timing needs a CUDA device")
    if cache_bytes is None:
        cache_bytes = 32 << 20
        if cuda:
            cache_bytes = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or 50 << 20
    if cuda:
        free, _ = torch.cuda.mem_get_info(device)
        rotate_limit = min(4 << 30, free // 8)
        math_limit = min(16 << 30, free // 4)
    else:
        rotate_limit = 256 << 20
        math_limit = 256 << 20
    # Each op gets an equal share of the compile budget, so the first op's shapes cannot use it all.
    compile_budgets = {op: _CompileBudget(compile_budget_s / len(ops)) for op in ops}
    gen = torch.Generator(device=device).manual_seed(seed)
    cases: list[dict] = []
    skipped: list[dict] = []

    # Set by set (all ops of the first set, then the next): a time limit drops whole sets, not a whole op.
    plan = [(SPECS[op], s, sh) for s in sets for op in ops for sh in shapes(op, s, dtype)]
    impl_lists = {op: [im for im in implementations(op, device, math_limit_bytes=math_limit)
                       if impls is None or im.name in impls] for op in ops}
    for op, lst in impl_lists.items():
        for im in lst:
            if im.skip is not None:
                skip(skipped, f"{op}/*/*/{dtype_name(dtype)}/{im.name}", im.skip)
    if progress is not None:
        progress.add(sum(1 for spec, _, _ in plan for im in impl_lists[spec.name] if im.skip is None))

    for spec, set_name, shape in plan:
        if deadline is not None and time.perf_counter() > deadline:
            skip(skipped, f"{spec.name}/{set_name}/{shape.name}/{dtype_name(dtype)}/*",
                 "not run: this run's time limit (--time-limit) was reached")
            continue
        n_sets = rotation_count(shape.footprint, cache_bytes, max_sets=16 if cuda else 4,
                                max_total_bytes=rotate_limit)
        try:
            inputs = [shape.make(device, dtype, gen) for _ in range(n_sets)]
        except (RuntimeError, MemoryError) as exc:  # e.g. out of memory on a smaller card
            skip(skipped, f"{spec.name}/{set_name}/{shape.name}/{dtype_name(dtype)}/*",
                 "inputs could not be created: " + first_line(exc))
            continue
        # Timed calls update sampler_step's history in place: checks start from an untouched copy.
        pristine = _clone_inputs(inputs[0])
        oracle_cache: dict[str, tuple] = {}

        def expected(spec=spec, pristine=pristine, cache=oracle_cache) -> tuple:
            if "v" not in cache:  # once per shape, and only when some implementation ran
                cache["v"] = spec.oracle(_clone_inputs(pristine))
            return cache["v"]

        shape_cases = []
        for im in impl_lists[spec.name]:
            if im.skip is not None:
                continue
            key = case_key(shape, dtype, im.name)
            if progress is not None:
                progress.step(key)
            case = _run_case(spec, shape, im, key, dtype, device, inputs, pristine, expected,
                             compile_budgets[spec.name], skipped, budget_ms, graph, peaks)
            if case is not None:
                shape_cases.append(case)
        ratios(shape_cases, is_baseline=lambda c: c["kind"] == "baseline" or c["impl"] == "torch")
        if graph:
            ratios(shape_cases, field="graph_median_ms", out="graph_speedup",
                   is_baseline=lambda c: c["kind"] == "baseline" or c["impl"] == "torch",
                   best_out="graph_best_baseline", vs_out="graph_vs_best_baseline")
            _auto_vs_fastest(shape_cases)
        cases.extend(shape_cases)
        del inputs, pristine, oracle_cache
        if cuda:
            torch.cuda.empty_cache()
    return OpsRun(cases, skipped)


def _run_case(spec: OpSpec, shape: Shape, im: Impl, key: str, dtype: torch.dtype, device: torch.device,
              inputs: list[dict], pristine: dict, expected: Callable[[], tuple], budget: _CompileBudget,
              skipped: list[dict], budget_ms: float, graph: bool, peaks: dict) -> dict | None:
    cuda = device.type == "cuda"
    if im.compiled:
        if budget.reason() is not None:
            skip(skipped, key, budget.reason())
            return None
        # A fresh compilation per case: dynamo's per-function recompile limit would otherwise silently fall
        # back to eager after a few shapes.
        torch._dynamo.reset()
    why = im.limit(inputs[0]) if im.limit is not None else None
    if why is not None:
        skip(skipped, key, why)
        return None
    # First call on a private copy: errors, compilation and the check against the oracle.
    probe = _clone_inputs(pristine)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            res = im.bind(probe)()
            if cuda:
                torch.cuda.synchronize(device)
        except Exception as exc:  # record why this implementation cannot run this case
            notes = "; ".join(dict.fromkeys(str(w.message).strip().splitlines()[0]
                                            for w in caught if str(w.message).strip()))
            skip(skipped, key, first_line(exc) + (f" ({notes})" if notes else ""))
            return None
    first_s = time.perf_counter() - t0
    if im.compiled:
        budget.spent += first_s
    verdict = check_outputs(spec, spec.outputs(res, probe), expected())
    params = dict(shape.params)
    if im.name == "auto":
        params["auto_pick"] = auto_pick(spec.name, device, spec.registry_call(probe))
    del probe, res
    fns = [im.bind(t) for t in inputs]
    try:
        timing = measure(fns, device, budget_ms=budget_ms)
    except Exception as exc:  # one failing case must not end the run
        skip(skipped, key, "failed while timing: " + first_line(exc))
        return None
    case = {"key": key, "suite": "ops", "op": spec.name, "set": shape.set, "impl": im.name, "kind": im.kind,
            "dtype": dtype_name(dtype), "params": params, **timing.as_dict()}
    if graph:
        try:
            g = measure_graph(fns, device, budget_ms=budget_ms / 2, set_bytes=shape.footprint)
            case.update(graph_median_ms=g.median_ms, graph_p20_ms=g.p20_ms, graph_p80_ms=g.p80_ms)
            case.update(_figures(shape, g.median_ms, peaks, prefix="graph_"))
            params["graph_calls_per_replay"] = g.calls_per_sample
        except Exception as exc:  # e.g. an implementation that synchronises cannot be captured
            params["graph_error"] = first_line(exc)
            case["graph_median_ms"] = None
            torch.cuda.synchronize(device)
    if im.compiled:
        params["compile_s"] = round(first_s, 3)
    case.update(_figures(shape, timing.median_ms, peaks))
    case.update(max_abs_err=verdict.max_abs_err, tolerance=verdict.tolerance, correct=verdict.ok)
    if not verdict.ok:
        params["error_detail"] = verdict.detail
    return case


def _auto_vs_fastest(shape_cases: list[dict]) -> None:
    """On the ``auto`` case: the backend fastest under graph replay on this shape, and whether auto picked it."""
    auto = next((c for c in shape_cases if c["impl"] == "auto"), None)
    timed = [c for c in shape_cases if c["kind"] == "backend" and c["impl"] != "auto" and c.get("graph_median_ms")]
    if auto is None or not timed:
        return
    fastest = min(timed, key=lambda c: c["graph_median_ms"])
    auto["params"]["fastest_backend_graph"] = fastest["impl"]
    auto["params"]["auto_picks_fastest_graph"] = auto["params"].get("auto_pick") == fastest["impl"]


def _figures(shape: Shape, median_ms: float, peaks: dict, prefix: str = "") -> dict:
    """Rates of one time against the byte/FLOP model and the card's peaks (``prefix="graph_"`` for graph time)."""
    t = median_ms * 1e-3
    gbps = shape.bytes / t / 1e9
    fig = {"gbps": gbps, "frac_copy_peak": gbps / peaks["copy_gbps"], "tflops": None, "frac_matmul_peak": None}
    floor = shape.bytes / (peaks["copy_gbps"] * 1e9)
    if shape.flops:
        tflops = shape.flops / t / 1e12
        fig["tflops"] = tflops
        fig["frac_matmul_peak"] = tflops / peaks["matmul_tflops"]
        floor = max(floor, shape.flops / (peaks["matmul_tflops"] * 1e12))
    fig["roofline_frac"] = floor / t
    if not prefix:
        fig.update(bytes=shape.bytes, flops=shape.flops)
    return {prefix + k: v for k, v in fig.items()}
