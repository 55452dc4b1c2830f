"""Where one UNet evaluation's GPU time goes, replayed inside a CUDA graph: a per-kernel breakdown.

For diffusers' SD1.5 UNet (random bf16 weights, CFG batch 2, 64x64 latents) as the stock model runs it, and for
our own UNet on the same weights with ``auto`` ops, one forward is captured in a CUDA graph and replayed under
``torch.profiler``; every kernel's GPU time is summed by name and by category (convolution, matmul, attention,
GroupNorm, elementwise and the rest). The categories come from kernel-name patterns (:data:`CATEGORIES`), so
the raw list of the largest kernels is kept beside them to check the sorting. Without a GPU the same runs
eagerly on the tiny config with CPU activities (a smoke run of the script, not a measurement).

    python benchmarks/profile_step.py --json profile.json [--model sd15] [--replays 5]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict

import torch

CATEGORIES = (  # first match wins; matched against lower-cased kernel names
    ("attention", r"attention|attn|fmha|flash|sdpa|softmax"),
    ("group_norm", r"group_?norm|gn_nchw|gn_nhwc"),
    ("convolution", r"conv|implicit_gemm|fprop|dgrad|wgrad|winograd|nchwtonhwc|nhwctonchw"),
    ("matmul", r"gemm|cutlass|cublas|matmul|xmma|sm90_|sm80_|addmm|linear"),
    ("sampler_step", r"sampler_step"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|copy|cat|index|gelu|silu|add|mul|fill|upsample"),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def build(model: str, device: torch.device):
    from diffusion_fast.bench.e2e import _ours_unet, build_context

    ctx = build_context(model, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    u = ctx.pipe.unet
    B = 2 * ctx.batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, u.config.in_channels, u.config.sample_size, u.config.sample_size, generator=g)
    ctxt = torch.randn(B, 77, u.config.cross_attention_dim, generator=g)
    x, ctxt = x.to(device, ctx.dtype), ctxt.to(device, ctx.dtype)
    t = torch.full((B,), 500.0, device=device)
    ours = _ours_unet(ctx).set_backend("auto")
    return {
        "diffusers_unet": lambda: u(x, t, encoder_hidden_states=ctxt, return_dict=False)[0],
        "ours_unet_auto": lambda: ours(x, t, ctxt),
    }


def profile(fn, device: torch.device, replays: int) -> list[tuple[str, float, int]]:
    """``[(kernel name, total ms, calls)]`` of ``replays`` replays of one captured call (eager on CPU)."""
    from torch.profiler import ProfilerActivity

    cuda = device.type == "cuda"
    with torch.no_grad():
        fn()
        run = fn
        if cuda:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            graph.replay()
            torch.cuda.synchronize()
            run = graph.replay
        acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(replays):
                run()
            if cuda:
                torch.cuda.synchronize()
    totals: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if cuda and ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if not cuda and (ev.name.startswith("aten::") is False or ev.cpu_parent is not None):
            continue  # CPU smoke: top-level aten ops only
        us = ev.device_time if cuda else ev.cpu_time
        totals[ev.name][0] += us / 1e3 / replays
        totals[ev.name][1] += 1
    return sorted(((n, ms, c // replays) for n, (ms, c) in totals.items()), key=lambda r: -r[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="sd15 (default on a GPU) or sd15-tiny (default on a CPU)")
    ap.add_argument("--replays", type=int, default=5)
    ap.add_argument("--json", help="write the breakdown here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = args.model or ("sd15" if device.type == "cuda" else "sd15-tiny")
    out = {"model": model, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
           "replays": args.replays, "what": "GPU time per UNet forward inside a CUDA graph (CPU: eager aten time)",
           "runs": {}}
    for name, fn in build(model, device).items():
        try:
            rows = profile(fn, device, args.replays)
        except Exception as exc:  # one model failing to capture must not lose the other's breakdown
            out["runs"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        total = sum(ms for _, ms, _ in rows) or 1.0
        cats: dict[str, float] = defaultdict(float)
        for n, ms, _ in rows:
            cats[category(n)] += ms
        out["runs"][name] = {"total_ms": total, "categories_ms": dict(cats),
                             "kernels": [{"name": n[:200], "ms": ms, "calls": c} for n, ms, c in rows[:40]]}
        print(f"{name}: {total:.3f} ms per forward, {len(rows)} distinct kernels")
        for cat, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
            print(f"  {cat:<13} {ms:8.3f} ms  {ms / total:6.1%}")
        for n, ms, c in rows[:8]:
            print(f"    {ms:8.3f} ms  x{c:<4} {n[:90]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if all("error" not in r for r in out["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
