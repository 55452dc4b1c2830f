"""What optimize(pipe) changes, measured: each pipeline's difference from stock, and what runs where.

    python benchmarks/diffusers_optimize_report.py            # both parts
    python benchmarks/diffusers_optimize_report.py --tiny     # only the tiny float32 comparison
    python benchmarks/diffusers_optimize_report.py --full     # only the full-size architectures

1. Tiny random pipelines (configs.pipeline(name)), float32 on CPU: the optimized pipeline's latents against
   the stock pipeline's (max |diff| / max |stock|, 4 steps, CFG where the pipeline runs it), and whether
   unoptimize gives the stock latents back bit for bit.
2. The published architectures (configs.*_config(name, "full")) built on the meta device, optimized, and run
   once at their usual resolution on meta tensors (shapes only, no memory): every attention module and ResNet
   block with what served it, and the calls the stock processor served instead (with the reason).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from diffusers_helpers import meta_pipeline, rel_err, run  # noqa: E402

from diffusion_fast.integrations.diffusers import configs as C  # noqa: E402
from diffusion_fast.integrations.diffusers.patch import format_report, optimize, report, unoptimize  # noqa: E402


def tiny() -> None:
    print(f"{'pipeline':14} {'max rel diff':>12}  unoptimize bit-identical  attention calls (ours / stock)")
    for name in C.PIPELINES:
        pipe = C.pipeline(name)
        stock = run(pipe, name, steps=4)
        optimize(pipe)
        out = run(pipe, name, steps=4)
        rows = report(pipe)
        ours = sum(r.calls for r in rows)
        fell = sum(sum(r.fallbacks.values()) for r in rows)
        unoptimize(pipe)
        same = torch.equal(run(pipe, name, steps=4), stock)
        print(f"{name:14} {rel_err(out, stock):12.2e}  {str(same):24}  {ours} / {fell}")


def _meta(*shape):
    return torch.empty(*shape, device="meta")


def _full_forward(name: str, model) -> None:
    """One call at the usual resolution (SD1.5 512², the others 1024²), batch 2 where the pipeline runs CFG."""
    with torch.no_grad():
        if name == "sd15":
            model(_meta(2, 4, 64, 64), _meta(2), _meta(2, 77, 768))
        elif name == "sdxl":
            model(_meta(2, 4, 128, 128), _meta(2), _meta(2, 77, 2048),
                  added_cond_kwargs={"text_embeds": _meta(2, 1280), "time_ids": _meta(2, 6)})
        elif name == "flux":  # guidance-distilled: no CFG batch; 64x64 packed latents, 512 T5 tokens
            model(_meta(1, 4096, 64), encoder_hidden_states=_meta(1, 512, 4096), pooled_projections=_meta(1, 768),
                  timestep=_meta(1), img_ids=_meta(4096, 3), txt_ids=_meta(512, 3), guidance=_meta(1))
        elif name == "sd3":
            model(_meta(2, 16, 128, 128), encoder_hidden_states=_meta(2, 333, 4096), pooled_projections=_meta(2, 2048),
                  timestep=_meta(2))
        else:  # pixart-sigma: 300 T5 tokens with the pipeline's attention mask
            model(_meta(2, 4, 128, 128), encoder_hidden_states=_meta(2, 300, 4096), timestep=_meta(2),
                  encoder_attention_mask=torch.ones(2, 300, device="meta"),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def full() -> None:
    for name in ("sd15", "sdxl", "flux", "sd3", "pixart-sigma"):
        pipe = optimize(meta_pipeline(name))
        _full_forward(name, pipe.unet if name in ("sd15", "sdxl") else pipe.transformer)
        lines = format_report(pipe).splitlines()
        kept = [ln for ln in lines if ln.startswith("  ")]
        print(f"{name} (full size, one call on meta):")
        for ln in lines[:2]:
            if not ln.startswith("  "):
                print("  " + ln)
        if kept:  # one example line per distinct reason
            seen = set()
            for ln in kept:
                reason = ln.split("  ", 4)[-1]
                if reason not in seen:
                    seen.add(reason)
                    print(f"  e.g. {ln.strip()}  [{sum(1 for k in kept if k.endswith(reason))} modules like this]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.tiny or not args.full:
        tiny()
    if args.full or not args.tiny:
        full()


if __name__ == "__main__":
    main()
