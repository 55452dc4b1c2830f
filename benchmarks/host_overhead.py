"""Host-side cost of one op call per backend at SD1.5 sizes (where a call moves only megabytes).

Times ``n`` back-to-back calls with the host clock and no synchronisation inside (the GPU work queues up, so
the figure is what the host spends issuing a call), then profiles the slowest backend's calls.
Usage: python benchmarks/host_overhead.py [--profile-op group_norm] [--n 300]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F

from diffusion_fast import ops
from diffusion_fast.ops.rows import coef_width


def cases(device):
    bf = torch.bfloat16
    x = torch.randn(2, 320, 64, 64, device=device, dtype=bf)
    w = torch.randn(320, device=device, dtype=bf)
    q = torch.randn(2, 4096, 8, 40, device=device, dtype=bf)
    kc = torch.randn(2, 77, 8, 40, device=device, dtype=bf)
    st = torch.randn(1, 4, 64, 64, device=device)
    mo = torch.randn(2, 4, 64, 64, device=device, dtype=bf)
    coef = torch.randn(coef_width(1), device=device)
    slots = torch.tensor([0, -1], device=device)
    hist = torch.randn(1, 1, 4, 64, 64, device=device)
    net = torch.empty(2, 4, 64, 64, device=device, dtype=bf)
    return {
        "group_norm": (lambda b: ops.group_norm(x, 32, w, w, 1e-5, "silu", backend=b),
                       lambda: F.silu(F.group_norm(x, 32, w, w, 1e-5))),
        "attention_cross": (lambda b: ops.attention(q, kc, kc, backend=b),
                            lambda: F.scaled_dot_product_attention(q.transpose(1, 2), kc.transpose(1, 2),
                                                                   kc.transpose(1, 2))),
        "sampler_step": (lambda b: ops.sampler_step(st, mo, coef, slots, hist, None, out=st, net_input=net,
                                                    backend=b), None),
    }


def host_us(fn, n):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n * 1e6
    return host, wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--profile-op", default="group_norm")
    args = ap.parse_args()
    device = torch.device("cuda")
    table = cases(device)
    print(f"{'op':16s} {'impl':8s} {'host us/call':>12s} {'wall us/call':>12s}")
    for op, (call, baseline) in table.items():
        for b in ("torch", "triton", "cuda"):
            try:
                h, w = host_us(lambda b=b, call=call: call(b), args.n)
                print(f"{op:16s} {b:8s} {h:12.1f} {w:12.1f}")
            except Exception as exc:  # a backend that cannot serve is reported, not fatal
                print(f"{op:16s} {b:8s} failed: {type(exc).__name__}: {str(exc)[:80]}")
        if baseline is not None:
            h, w = host_us(baseline, args.n)
            print(f"{op:16s} {'eager':8s} {h:12.1f} {w:12.1f}")
    call = table[args.profile_op][0]
    for b in ("triton", "cuda"):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.n):
            call(b)
        prof.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
        print(f"--- profile {args.profile_op} backend={b}")
        print("\n".join(line for line in s.getvalue().splitlines() if line.strip())[:3500])


if __name__ == "__main__":
    main()
