"""Op benchmarks: group_norm(+SiLU), attention and sampler_step, every backend beside the baselines.

Each *case* is one (op, shape set, shape, dtype, implementation). Implementations are the op's registered
backends called through the public op (``kind="backend"``: torch reference, triton, cuda) and what a user
would run instead (``kind="baseline"``): torch eager, each torch SDPA backend, ``torch.compile`` of the
reference. Every case records its time, the bytes and FLOPs of its written-out model, the rates those give,
their fraction of the card's measured peaks, its error against the float32 reference on the same inputs, and
its speedup over every baseline measured on the same shape in the same run.

Byte and FLOP models (``s`` = bytes per element of the storage dtype, ``n`` = elements of one tensor):

* group_norm: ``bytes = 2 * n(x) * s + 2 * C * s`` — x read once, y written once, weight and bias. A
  two-pass kernel that reads x twice still counts once: the model is the floor, not the kernel's traffic.
* attention: ``flops = 4 * B * H * Sq * Sk * D`` (q kᵀ and p v, 2 FLOPs per multiply-add; softmax not
  counted), ``bytes = (2 * B * Sq * H * D + 2 * B * Sk * H * D) * s`` (q read, o written, k and v read).
* sampler_step (CFG batch, K history slots): ``bytes = 4n (x) + 2n * s (model output) + 4nK (history read)
  + 4n per history slot written + 4n (out) + 2n * s (next network input) [+ 4n noise]``, n = elements of x.

The roofline time of a case is ``max(bytes / copy_bandwidth, flops / matmul_rate)``; ``roofline_frac`` is
that floor over the measured median (1.0 = at the card's limit).
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
from ..ops import registry
from ..ops.rows import AD, AH, AX, AZ, BD, BH, BX, CIN, G, P, Q, coef_width
from .progress import Progress
from .timing import measure, rotation_count

OPS = ("group_norm", "attention", "sampler_step")
BACKENDS = ("torch", "triton", "cuda")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# --------------------------------------------------------------------------------------------- shape sets
# group_norm: (shape, groups). SD1.5 at 512^2 with the CFG batch of 2; SDXL at 1024^2; large is bandwidth-bound
# (a VAE decoder at 512^2, a batch of SDXL-sized activations).
GROUP_NORM_SETS: dict[str, list[tuple[tuple[int, ...], int]]] = {
    "tiny": [((2, 64, 8, 8), 32), ((1, 96, 5, 7), 32)],
    "sd15": [((2, 320, 64, 64), 32), ((2, 640, 32, 32), 32), ((2, 1280, 16, 16), 32), ((2, 1280, 8, 8), 32)],
    "sdxl": [((2, 320, 128, 128), 32), ((2, 640, 64, 64), 32), ((2, 1280, 32, 32), 32)],
    "large": [((8, 512, 128, 128), 32), ((1, 128, 512, 512), 32)],
}
# attention: (B, Sq, Sk, H, D). Self-attention has Sk == Sq; cross-attention reads 77 text tokens.
ATTENTION_SETS: dict[str, list[tuple[int, int, int, int, int]]] = {
    "tiny": [(1, 64, 64, 2, 40), (1, 37, 77, 3, 24)],
    "sd15": [(2, 4096, 4096, 8, 40), (2, 1024, 1024, 8, 80), (2, 256, 256, 8, 160),
             (2, 4096, 77, 8, 40), (2, 1024, 77, 8, 80), (2, 256, 77, 8, 160)],
    "sdxl": [(2, 4096, 4096, 10, 64), (2, 1024, 1024, 20, 64), (2, 4096, 77, 10, 64), (2, 1024, 77, 20, 64)],
    "large": [(2, 4096, 4096, 16, 128), (1, 16384, 16384, 16, 64)],
}
# sampler_step: (latent shape of x, K history slots, noise). The model output is the CFG batch [2B, ...].
SAMPLER_STEP_SETS: dict[str, list[tuple[tuple[int, ...], int, bool]]] = {
    "tiny": [((1, 4, 8, 8), 1, False), ((1, 3, 5, 7), 0, True)],
    "sd15": [((1, 4, 64, 64), 1, False), ((1, 4, 64, 64), 0, True)],
    "sdxl": [((1, 4, 128, 128), 1, False)],
    "large": [((4, 16, 1024, 1024), 1, False)],
}
SETS = ("tiny", "sd15", "sdxl", "large")

# Representative coefficients (a CFG scale of 7.5, an epsilon model at sigma 2, a 2nd-order update).
_COEF = {G: 7.5, P: 1.0, Q: -2.0, AX: 0.8, AD: 0.25, AZ: 0.1, BX: 0.0, BD: 0.0, CIN: 0.45}
_COEF_HIST = (-0.05, 0.0)  # (a_h, b_h) for each history slot


def dtype_name(dtype: torch.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------- op specs


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


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _gen_randn(shape, gen: torch.Generator, device, dtype) -> torch.Tensor:
    # Drawn where the generator lives (the bench device: large inputs would take seconds on the host).
    return torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32).to(device=device,
                                                                                       dtype=dtype)


def group_norm_shapes(set_name: str, dtype: torch.dtype) -> list[Shape]:
    s = _itemsize(dtype)
    out = []
    for shape, groups in GROUP_NORM_SETS[set_name]:
        n = math.prod(shape)
        C = shape[1]
        nbytes = 2 * n * s + 2 * C * s

        def make(device, dt, gen, shape=shape, C=C, groups=groups):
            return {
                "x": _gen_randn(shape, gen, device, dt) * 2.0 + 0.5,
                "weight": _gen_randn((C,), gen, device, dt) * 0.2 + 1.0,
                "bias": _gen_randn((C,), gen, device, dt) * 0.2,
                "groups": groups,
            }

        out.append(Shape("group_norm", set_name, "x".join(map(str, shape)) + f"-g{groups}-silu",
                         {"shape": list(shape), "groups": groups, "activation": "silu",
                          "memory_format": "contiguous"}, nbytes, None, nbytes, make))
    return out


def attention_shapes(set_name: str, dtype: torch.dtype) -> list[Shape]:
    s = _itemsize(dtype)
    out = []
    for B, Sq, Sk, H, D in ATTENTION_SETS[set_name]:
        flops = 4 * B * H * Sq * Sk * D
        nbytes = (2 * B * Sq * H * D + 2 * B * Sk * H * D) * s
        kind = "self" if Sk == Sq else "cross"
        name = f"{kind}-b{B}-h{H}-s{Sq}" + (f"-k{Sk}" if kind == "cross" else "") + f"-d{D}"

        def make(device, dt, gen, B=B, Sq=Sq, Sk=Sk, H=H, D=D):
            return {"q": _gen_randn((B, Sq, H, D), gen, device, dt),
                    "k": _gen_randn((B, Sk, H, D), gen, device, dt),
                    "v": _gen_randn((B, Sk, H, D), gen, device, dt)}

        out.append(Shape("attention", set_name, name,
                         {"B": B, "Sq": Sq, "Sk": Sk, "H": H, "D": D, "kind": kind, "layout": "BSHD"},
                         nbytes, flops, nbytes, make))
    return out


def sampler_step_shapes(set_name: str, dtype: torch.dtype) -> list[Shape]:
    s = _itemsize(dtype)
    out = []
    for shape, K, noise in SAMPLER_STEP_SETS[set_name]:
        n = math.prod(shape)
        writes = 1 if K else 0
        nbytes = 4 * n + 2 * n * s + 4 * n * K + 4 * n * writes + 4 * n + 2 * n * s + (4 * n if noise else 0)
        name = "x".join(map(str, shape)) + f"-cfg-k{K}" + ("-noise" if noise else "")

        def make(device, dt, gen, shape=shape, K=K, noise=noise):
            B = shape[0]
            row = torch.zeros(coef_width(K), dtype=torch.float64)
            for idx, v in _COEF.items():
                row[idx] = v
            for k in range(K):
                row[AH + k], row[BH(K) + k] = _COEF_HIST
            return {
                "x": _gen_randn(shape, gen, device, torch.float32) * 2.0,
                "model_output": _gen_randn((2 * B,) + shape[1:], gen, device, dt),
                "coef": row.to(device=device, dtype=torch.float32),
                "coef_list": row.tolist(),
                "slots": torch.tensor([0 if K else -1, -1], dtype=torch.int32, device=device),
                "hist": _gen_randn((K,) + shape, gen, device, torch.float32) if K else None,
                "noise": _gen_randn(shape, gen, device, torch.float32) if noise else None,
                "out": torch.empty(shape, dtype=torch.float32, device=device),
                "net_input": torch.empty((2 * B,) + shape[1:], dtype=dt, device=device),
            }

        out.append(Shape("sampler_step", set_name, name,
                         {"shape": list(shape), "cfg": True, "hist": K, "noise": noise,
                          "model_output_dtype": dtype_name(dtype), "net_input_dtype": dtype_name(dtype),
                          "prediction": "epsilon"}, nbytes, None, nbytes, make))
    return out


SHAPES = {"group_norm": group_norm_shapes, "attention": attention_shapes, "sampler_step": sampler_step_shapes}


# --------------------------------------------------------------------------------------------- implementations


def _gn_backend(name: str):
    def bind(t):
        x, w, b, g = t["x"], t["weight"], t["bias"], t["groups"]
        return lambda: dfops.group_norm(x, g, w, b, 1e-5, "silu", backend=name)
    return bind


def _gn_eager(t):
    x, w, b, g = t["x"], t["weight"], t["bias"], t["groups"]
    return lambda: F.silu(F.group_norm(x, g, w, b, 1e-5))


def _attn_backend(name: str):
    def bind(t):
        q, k, v = t["q"], t["k"], t["v"]
        return lambda: dfops.attention(q, k, v, backend=name)
    return bind


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = getattr(SDPBackend, backend_name)

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
        Sk = t["k"].shape[1]
        scores = B * H * Sq * Sk * 4
        if scores > max_bytes:
            return (f"the math backend materialises {scores / 2**30:.1f} GiB of scores, over the "
                    f"{max_bytes / 2**30:.1f} GiB limit of this run")
        return None
    return limit


def _ss_backend(name: str):
    def bind(t):
        a = (t["x"], t["model_output"], t["coef"], t["slots"], t["hist"], t["noise"])
        out, ni = t["out"], t["net_input"]
        return lambda: dfops.sampler_step(*a, out=out, net_input=ni, backend=name)
    return bind


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


def _compiled(op: str):
    import importlib

    ref = importlib.import_module(f"diffusion_fast.kernels.reference.{op}").forward

    def bind(t):
        fn = torch.compile(ref, dynamic=False)
        if op == "group_norm":
            x, w, b, g = t["x"], t["weight"], t["bias"], t["groups"]
            return lambda: fn(x, g, w, b, 1e-5, "silu", None)
        if op == "attention":
            q, k, v = t["q"], t["k"], t["v"]
            scale = 1.0 / math.sqrt(q.shape[-1])
            return lambda: fn(q, k, v, scale)
        return lambda: fn(t["x"], t["model_output"], t["coef"], t["slots"], t["hist"], t["noise"], t["out"],
                          t["net_input"])
    return bind


def _interpreted_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def implementations(op: str, device: torch.device, *, math_limit_bytes: int) -> list[Impl]:
    """Every implementation of ``op`` this run considers, with a reason for those that cannot run here."""
    status = registry.status(op)
    impls = []
    for name in BACKENDS:
        if name not in status:
            continue
        reason = status[name]
        if reason is None and name == "triton" and _interpreted_triton():
            reason = "Triton runs in its interpreter here (TRITON_INTERPRET=1): its time says nothing"
        bind = {"group_norm": _gn_backend, "attention": _attn_backend, "sampler_step": _ss_backend}[op](name)
        impls.append(Impl(name, "backend", bind, skip=reason))
    if op == "group_norm":
        impls.append(Impl("eager", "baseline", _gn_eager))
    elif op == "attention":
        for impl_name, sdpa_name in (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_efficient", "EFFICIENT_ATTENTION"),
                                     ("sdpa_cudnn", "CUDNN_ATTENTION"), ("sdpa_math", "MATH")):
            try:
                bind = _sdpa(sdpa_name)
                skip = None
            except (ImportError, AttributeError) as exc:
                bind, skip = (lambda t: None), f"torch has no SDPA backend {sdpa_name}: {exc}"
            limit = _sdpa_math_limit(math_limit_bytes) if sdpa_name == "MATH" else None
            impls.append(Impl(impl_name, "baseline", bind, skip=skip, limit=limit))
    else:
        impls.append(Impl("eager", "baseline", _ss_eager))
    skip = None if device.type == "cuda" else "torch.compile baseline runs on CUDA only"
    impls.append(Impl("compile", "baseline", _compiled(op), compiled=True, skip=skip))
    return impls


# --------------------------------------------------------------------------------------------- running


def _clone_inputs(t: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in t.items()}


def _outputs(result: Any, t: dict) -> list[torch.Tensor]:
    # sampler_step writes its results into buffers; compare all of them.
    if "net_input" in t:
        outs = [t["out"], t["net_input"]]
        if t["hist"] is not None:
            outs.append(t["hist"])
        return outs
    return [result]


def _max_err(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    err = 0.0
    for a, b in zip(got, ref):
        d = (a.float() - b.float()).abs()
        err = max(err, float(d.max())) if d.numel() else err
        if not torch.isfinite(a.float()).all():
            return float("inf")
    return err


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


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
    cache_bytes: int | None = None,
    progress: Progress | None = None,
    seed: int = 0,
) -> OpsRun:
    """Run the op benchmarks.

    Args:
        device: where the ops run (CUDA: events; CPU: host clock).
        dtype: storage dtype of the activations (sampler state is float32 regardless).
        ops: subset of :data:`OPS`.
        sets: subset of :data:`SETS`.
        impls: restrict to these implementation names (e.g. ``["torch", "eager"]``); None = all.
        peaks: from :func:`diffusion_fast.bench.peaks.measure_peaks`.
        budget_ms: timed duration per case.
        compile_budget_s: total seconds ``torch.compile`` baselines may spend compiling (0 = none).
        cache_bytes: last-level cache size for the input rotation (default: the GPU's L2, 32 MiB on CPU).
        progress: progress display, or None.
        seed: seed of the input generator.

    Returns:
        :class:`OpsRun`.
    """
    for op in ops:
        if op not in OPS:
            raise ValueError(f"ops: unknown op {op!r}; expected names from {OPS}")
    for s in sets:
        if s not in SETS:
            raise ValueError(f"sets: unknown shape set {s!r}; expected names from {SETS}")
    cuda = device.type == "cuda"
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

    plan = [(op, s, sh) for op in ops for s in sets for sh in SHAPES[op](s, dtype)]
    impl_lists = {op: implementations(op, device, math_limit_bytes=math_limit) for op in ops}
    for op, lst in impl_lists.items():
        for im in lst:
            if impls is not None and im.name not in impls:
                continue
            if im.skip is not None:
                skipped.append({"key": f"{op}/*/*/{dtype_name(dtype)}/{im.name}", "reason": im.skip})
    if progress is not None:
        progress.add(sum(1 for op, _, _ in plan for im in impl_lists[op]
                         if im.skip is None and (impls is None or im.name in impls)))

    for op, set_name, shape in plan:
        n_sets = rotation_count(shape.footprint, cache_bytes, max_sets=16 if cuda else 4,
                                max_total_bytes=rotate_limit)
        try:
            inputs = [shape.make(device, dtype, gen) for _ in range(n_sets)]
        except (RuntimeError, MemoryError) as exc:  # e.g. out of memory on a smaller card
            skipped.append({"key": f"{op}/{set_name}/{shape.name}/{dtype_name(dtype)}/*",
                            "reason": "inputs could not be created: " + _first_line(exc)})
            continue
        # Timed calls update sampler_step's history in place: checks start from an untouched copy.
        pristine = _clone_inputs(inputs[0])
        ref_out = None
        shape_cases = []
        for im in impl_lists[op]:
            if impls is not None and im.name not in impls:
                continue
            key = case_key(shape, dtype, im.name)
            if im.skip is not None:
                continue
            if progress is not None:
                progress.step(key)
            if im.compiled:
                if compile_budgets[op].reason() is not None:
                    skipped.append({"key": key, "reason": compile_budgets[op].reason()})
                    continue
                # A fresh compilation per case: dynamo's per-function recompile limit would otherwise
                # silently fall back to eager after a few shapes.
                torch._dynamo.reset()
            why = im.limit(inputs[0]) if im.limit is not None else None
            if why is not None:
                skipped.append({"key": key, "reason": why})
                continue
            if ref_out is None:
                probe = _clone_inputs(pristine)
                ref_out = [o.clone() for o in _outputs(_ref_bind(op)(probe)(), probe)]
            # First call on a private copy: errors, compilation and the check against the reference.
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
                    skipped.append({"key": key, "reason": _first_line(exc) + (f" ({notes})" if notes else "")})
                    continue
            first_s = time.perf_counter() - t0
            if im.compiled:
                compile_budgets[op].spent += first_s
            err = _max_err(_outputs(res, probe), ref_out)
            del probe, res
            fns = [im.bind(t) for t in inputs]
            try:
                timing = measure(fns, device, budget_ms=budget_ms)
            except Exception as exc:  # one failing case must not end the run
                skipped.append({"key": key, "reason": "failed while timing: " + _first_line(exc)})
                continue
            case = {
                "key": key, "suite": "ops", "op": op, "set": set_name, "impl": im.name, "kind": im.kind,
                "dtype": dtype_name(dtype), "params": dict(shape.params), **timing.as_dict(),
            }
            if im.compiled:
                case["params"]["compile_s"] = round(first_s, 3)
            case.update(_figures(shape, timing.median_ms, peaks))
            case["max_abs_err"] = err
            shape_cases.append(case)
        _speedups(shape_cases)
        cases.extend(shape_cases)
        del inputs, pristine, ref_out
        if cuda:
            torch.cuda.empty_cache()
    return OpsRun(cases, skipped)


def _ref_bind(op: str):
    return {"group_norm": _gn_backend, "attention": _attn_backend, "sampler_step": _ss_backend}[op]("torch")


def _figures(shape: Shape, median_ms: float, peaks: dict) -> dict:
    t = median_ms * 1e-3
    gbps = shape.bytes / t / 1e9
    fig = {"bytes": shape.bytes, "flops": shape.flops, "gbps": gbps,
           "frac_copy_peak": gbps / peaks["copy_gbps"], "tflops": None, "frac_matmul_peak": None}
    floor = shape.bytes / (peaks["copy_gbps"] * 1e9)
    if shape.flops:
        tflops = shape.flops / t / 1e12
        fig["tflops"] = tflops
        fig["frac_matmul_peak"] = tflops / peaks["matmul_tflops"]
        floor = max(floor, shape.flops / (peaks["matmul_tflops"] * 1e12))
    fig["roofline_frac"] = floor / t
    return fig


def _speedups(shape_cases: list[dict]) -> None:
    """Speedup of each case over every baseline and the reference backend measured on the same shape."""
    refs = {c["impl"]: c["median_ms"] for c in shape_cases if c["kind"] == "baseline" or c["impl"] == "torch"}
    baselines = {c["impl"]: c["median_ms"] for c in shape_cases if c["kind"] == "baseline"}
    for c in shape_cases:
        c["speedup"] = {name: ms / c["median_ms"] for name, ms in refs.items() if name != c["impl"]}
        others = {n: ms for n, ms in baselines.items() if n != c["impl"]}
        if others:
            best = min(others, key=others.get)
            c["best_baseline"] = best
            c["vs_best_baseline"] = others[best] / c["median_ms"]
