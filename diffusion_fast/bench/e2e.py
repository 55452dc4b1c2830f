"""End-to-end sampling speed: a UNet with random weights, CFG, N steps of ``diffusion_fast.sample``.

Variants, all in the same run on the same model and inputs:

* ``eager`` (baseline) — what a user runs without this library's kernels: the model's GroupNorm as torch
  eager (``F.group_norm`` then SiLU), attention through torch SDPA, the sampler update as the reference
  torch ops;
* ``fast`` — every op on ``backend="auto"`` (the fastest backend available for the device);
* ``fast_graph`` — ``fast`` with the whole trajectory captured in one CUDA graph (CUDA only).

Each variant reports time per sampling call (median, p20, p80 over repeats), steps per second, host
synchronisations per step (``torch.cuda.set_sync_debug_mode("warn")`` warnings, CUDA only) and host reads of
device scalars per step (a ``TorchDispatchMode`` counting ``aten._local_scalar_dense`` and friends, any
device), both as the difference between a 4-step and a 2-step call divided by 2 so per-call setup is not
counted per step; peak memory (CUDA) and its ratio to ``eager``. ``fast_graph`` also records whether its
result equals ``fast``'s bit for bit.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .ops import dtype_name
from .progress import Progress
from .timing import quantile, synchronize

VARIANTS = ("eager", "fast", "fast_graph")
# Loop backend and model backends of each variant: (sample(backend=...), set_backend args, set_backend kwargs).
VARIANT_BACKENDS: dict[str, tuple[str, tuple, dict]] = {
    "reference": ("torch", ("torch",), {}),
    "eager": ("torch", (), {"group_norm": "eager", "attention": "sdpa"}),
    "fast": ("auto", ("auto",), {}),
    "fast_graph": ("auto", ("auto",), {}),
}
SYNC_STEPS = (2, 4)
CONTEXT_TOKENS = 77


class EpsUNet(torch.nn.Module):
    """The sampler's model contract over a UNet: ``(x_in, sigma [B], context) -> epsilon``.

    The UNet's timestep input receives sigma itself: with random weights the value changes nothing about
    speed, and it keeps the benchmark independent of any discrete-timestep schedule.
    """

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, sigma, context)


@dataclass
class E2EModel:
    """A network to benchmark and the geometry of its inputs."""

    net: torch.nn.Module  # (sample [B, C, H, W], timestep [B], context [B, T, Dc]) -> [B, C, H, W]
    in_channels: int
    latent: int
    context_dim: int
    config: str


def build_unet(config: str, device: torch.device, dtype: torch.dtype) -> E2EModel:
    """``UNet2DConditionModel(UNetConfig.<config>())`` with random weights, built directly on ``device``."""
    from ..models.unet import UNet2DConditionModel, UNetConfig

    factory = getattr(UNetConfig, config, None)
    if factory is None:
        raise ValueError(f"config: UNetConfig has no configuration named {config!r}")
    cfg = factory()
    with torch.device(device):
        net = UNet2DConditionModel(cfg)
    net = net.to(dtype).eval().requires_grad_(False)
    latent = 64 if config == "sd15" else int(getattr(cfg, "sample_size", 64))
    return E2EModel(net, int(getattr(cfg, "in_channels", 4)), latent,
                    int(getattr(cfg, "cross_attention_dim", 768)), config)


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
    """Counts host synchronisations (CUDA: ``set_sync_debug_mode`` warnings) and host scalar reads."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.syncs: int | None = None
        self.reads = 0

    def __enter__(self):
        self._reads = ScalarReadCounter()
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
        self.reads = self._reads.count
        return False


def _karras(steps: int) -> torch.Tensor:
    from ..schedules import karras

    return karras(steps, 0.0292, 14.6146)


def run_e2e(
    device: torch.device,
    dtype: torch.dtype,
    *,
    model: E2EModel | None = None,
    config: str = "sd15",
    steps: int = 25,
    repeats: int = 3,
    variants: Sequence[str] = VARIANTS,
    sampler: str = "dpmpp_2m",
    guidance_scale: float = 7.5,
    seed: int = 0,
    progress: Progress | None = None,
    sample_fn: Callable[..., torch.Tensor] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Benchmark full sampling runs.

    Args:
        device, dtype: where and in which dtype the network runs (sampler state stays float32).
        model: the network (default: :func:`build_unet` of ``config``).
        config: UNet configuration name (``"sd15"`` on GPU; a small one such as ``"digits"`` on CPU).
        steps: sampling steps per call (one CFG network evaluation of batch 2 each for ``dpmpp_2m``).
        repeats: timed calls per variant (after one warm-up call).
        variants: subset of ``("reference", "eager", "fast", "fast_graph")``.
        sampler, guidance_scale, seed: passed to ``diffusion_fast.sample``.
        progress: progress display or None.
        sample_fn: the sampling entry point (default ``diffusion_fast.sample``).

    Returns:
        ``(cases, skipped)`` in the results schema.
    """
    for v in variants:
        if v not in VARIANT_BACKENDS:
            raise ValueError(f"variants: unknown variant {v!r}; expected names from {tuple(VARIANT_BACKENDS)}")
    if steps < max(SYNC_STEPS):
        raise ValueError(f"steps must be >= {max(SYNC_STEPS)}, got {steps}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if sample_fn is None:
        from .. import sample as sample_fn
    if model is None:
        try:
            model = build_unet(config, device, dtype)
        except ValueError:
            raise
        except Exception as exc:  # the model code cannot build here: say why, measure nothing
            return [], [{"key": f"e2e/{config}/*/{dtype_name(dtype)}/*",
                         "reason": f"building the {config} UNet failed: {type(exc).__name__}: {exc}"[:400]}]
    cuda = device.type == "cuda"
    net = EpsUNet(model.net)
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, CONTEXT_TOKENS, model.context_dim, generator=gen).to(device, dtype)
    uncond = torch.randn(1, CONTEXT_TOKENS, model.context_dim, generator=gen).to(device, dtype)
    shape = (1, model.in_channels, model.latent, model.latent)
    # Schedules are built (and read on the host) here, outside the counted and timed calls.
    sigma_cache = {n: (s, float(s[0])) for n in (steps, *SYNC_STEPS) for s in [_karras(n)]}

    def call(variant: str, n_steps: int) -> torch.Tensor:
        sigmas, sigma_max = sigma_cache[n_steps]
        g = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * sigma_max
        kwargs: dict[str, Any] = dict(generator=g, guidance_scale=guidance_scale, cond=cond, uncond=uncond,
                                      prediction="epsilon", net_dtype=dtype, backend=VARIANT_BACKENDS[variant][0])
        if variant == "fast_graph":
            kwargs["cuda_graph"] = True
        with torch.inference_mode():
            return sample_fn(net, x, sigmas, sampler, **kwargs)

    label = f"b1-cfg-{model.latent}x{model.latent}-{sampler}-{steps}steps"
    params = {"config": model.config, "batch": 1, "cfg_batch": 2, "latent": list(shape), "steps": steps,
              "sampler": sampler, "guidance_scale": guidance_scale, "prediction": "epsilon",
              "repeats": repeats}
    cases: list[dict] = []
    skipped: list[dict] = []
    outputs: dict[str, torch.Tensor] = {}
    if progress is not None:
        progress.add(len(variants))
    for variant in variants:
        key = f"e2e/{model.config}/{label}/{dtype_name(dtype)}/{variant}"
        if progress is not None:
            progress.step(key)
        if variant == "fast_graph" and not cuda:
            skipped.append({"key": key, "reason": "CUDA graphs need a CUDA device"})
            continue
        _, args, kw = VARIANT_BACKENDS[variant]
        try:
            model.net.set_backend(*args, **kw)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            outputs[variant] = call(variant, steps).clone()  # warm-up: autotuning, capture
            times = []
            for _ in range(repeats):
                synchronize(device)
                t0 = time.perf_counter()
                call(variant, steps)
                synchronize(device)
                times.append((time.perf_counter() - t0) * 1e3)
            peak = torch.cuda.max_memory_allocated(device) if cuda else None
            counts = {}
            for n in SYNC_STEPS:
                call(variant, n)  # steady state: plan tables built (and the graph captured) outside the count
                synchronize(device)
                with SyncCounter(device) as sc:
                    call(variant, n)
                    synchronize(device)
                counts[n] = sc
        except Exception as exc:  # a variant that cannot run here is recorded with its reason
            skipped.append({"key": key, "reason": f"{type(exc).__name__}: {str(exc).strip()[:300]}"})
            continue
        finally:
            if variant == "fast_graph":
                from ..samplers import graph

                graph.clear_cache()
        lo, hi = SYNC_STEPS
        med = quantile(times, 0.5)
        case = {
            "key": key, "suite": "e2e", "op": "e2e", "set": model.config, "impl": variant,
            "kind": "baseline" if variant in ("eager", "reference") else "variant", "dtype": dtype_name(dtype),
            "params": dict(params), "median_ms": med, "p20_ms": quantile(times, 0.2),
            "p80_ms": quantile(times, 0.8), "samples": len(times), "steps_per_s": steps / (med * 1e-3),
            "scalar_reads_per_step": (counts[hi].reads - counts[lo].reads) / (hi - lo),
            # A one-off sync in the shorter call (first use of a library path) can make the difference
            # negative; per step is then 0, and both raw counts stay in params.
            "host_syncs_per_step": (None if not cuda else max(0.0, (counts[hi].syncs - counts[lo].syncs) / (hi - lo))),
            "peak_mem_bytes": peak,
        }
        case["params"]["host_syncs_per_call"] = counts[hi].syncs
        case["params"]["host_syncs_per_call_short"] = counts[lo].syncs
        case["params"]["scalar_reads_per_call"] = counts[hi].reads
        case["params"]["output_finite"] = bool(torch.isfinite(outputs[variant]).all())
        if variant == "fast_graph" and "fast" in outputs:
            diff = (outputs["fast_graph"].float() - outputs["fast"].float()).abs().max()
            case["params"]["matches_uncaptured"] = bool(torch.equal(outputs["fast_graph"], outputs["fast"]))
            case["params"]["max_abs_diff_vs_uncaptured"] = float(diff)
        cases.append(case)
    base = {c["impl"]: c for c in cases if c["kind"] == "baseline"}
    for c in cases:
        c["speedup"] = {n: b["median_ms"] / c["median_ms"] for n, b in base.items() if n != c["impl"]}
        if "eager" in base and c["impl"] != "eager":
            c["vs_best_baseline"] = base["eager"]["median_ms"] / c["median_ms"]
            c["best_baseline"] = "eager"
            if c["peak_mem_bytes"] and base["eager"]["peak_mem_bytes"]:
                c["mem_vs_baseline"] = c["peak_mem_bytes"] / base["eager"]["peak_mem_bytes"]
    return cases, skipped
