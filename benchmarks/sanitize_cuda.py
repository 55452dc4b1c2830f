"""One small call of every CUDA kernel variant, each checked against the reference backend, for
compute-sanitizer (no benchmark: the point is that every kernel runs once under the tool):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck  python benchmarks/sanitize_cuda.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck python benchmarks/sanitize_cuda.py

With the caching allocator off every tensor is its own allocation, so memcheck sees an access one element
past a tensor. Results are checked against the float64 oracle under its tolerance rule
(``diffusion_fast/kernels/reference/oracle.py``; the sampler step bit for bit against the reference). Exit status
1 when any result fails, 2 when the backend is unavailable.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from diffusion_fast import ops
from diffusion_fast.kernels.cuda import _ext
from diffusion_fast.kernels.cuda import attention as cuda_attn
from diffusion_fast.kernels.reference import oracle
from diffusion_fast.ops.rows import coef_width

FAILURES: list[str] = []


def report(name: str, got: torch.Tensor, exact: torch.Tensor, yardstick: torch.Tensor | None,
           floor: float | None = None) -> None:
    c = oracle.check(got, exact, yardstick, floor=floor, what=name)
    print(f"{'ok  ' if c.ok else 'FAIL'} {name}: max error {c.err:.3g} (bound {c.bound:.3g})")
    if not c.ok:
        FAILURES.append(name)


@contextlib.contextmanager
def sm_count(n: int):
    """Pretend the GPU has n SMs, to steer group_norm onto its fused (small n) or split (large n) grid."""
    real = _ext.sm_count
    _ext.sm_count = lambda t: n
    try:
        yield
    finally:
        _ext.sm_count = real


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def group_norm_calls() -> None:
    # Vector paths (fp16, fp32) and scalar paths (bf16: odd HW, C = 30); each group is large enough
    # (> 8192 elements) for the split grid to take two or more blocks.
    for dtype, (N, C, H, W, G) in ((torch.float16, (2, 32, 32, 40, 4)), (torch.bfloat16, (2, 30, 45, 45, 5)),
                                   (torch.float32, (2, 16, 48, 48, 4))):
        base = torch.randn(N, C, H, W, device="cuda").to(dtype)
        w = torch.randn(C, device="cuda", dtype=dtype)
        b = torch.randn(C, device="cuda", dtype=dtype)
        add = torch.randn(N, C, device="cuda", dtype=dtype)
        for layout, x in (("nchw", base), ("channels_last", channels_last(base))):
            for grid, n_sm in (("fused", 1), ("split", 1000)):
                splits = _ext.ext().group_norm_splits(N, C, H * W, G, layout != "nchw", 1, n_sm)
                assert (splits > 1) == (grid == "split"), (grid, splits)
                with sm_count(n_sm):
                    got = ops.group_norm(x, G, w, b, 1e-5, "silu", add=add, backend="cuda")
                want = ops.group_norm(x, G, w, b, 1e-5, "silu", add=add, backend="torch")
                report(f"group_norm {dtype} {tuple(x.shape)} G={G} {layout} {grid}", got,
                       oracle.group_norm(x, G, w, b, 1e-5, "silu", add), want, floor=1e-5)


def sampler_step_calls() -> None:
    for shape, mo_dtype in (((2, 4, 8, 8), torch.bfloat16), ((3, 5, 7), torch.float16)):
        K, B = 3, shape[0]
        x = torch.randn(shape, device="cuda")
        mo = torch.randn((2 * B, *shape[1:]), device="cuda").to(mo_dtype)
        coef = torch.randn(coef_width(K), device="cuda")
        slots = torch.tensor([2, 0], device="cuda", dtype=torch.int32)
        hist = torch.randn((K, *shape), device="cuda")
        noise = torch.randn(shape, device="cuda")
        results = []
        for backend in ("cuda", "torch"):
            h = hist.clone()
            out = torch.empty_like(x)
            net = torch.empty((2 * B, *shape[1:]), device="cuda", dtype=mo_dtype)
            ops.sampler_step(x, mo, coef, slots, h, noise, out=out, net_input=net, backend=backend)
            results.append((out, h, net))
        for what, got, want in zip(("out", "hist", "net_input"), *results):
            # the CUDA step rounds in the reference's float32 order: bit for bit
            report(f"sampler_step {shape} {mo_dtype} K={K} cfg {what}", got, want.double(), None, floor=0.0)


def attention_calls() -> None:
    for dtype, D, Sk in ((torch.float16, 40, 77), (torch.float16, 40, 150), (torch.bfloat16, 80, 77),
                         (torch.bfloat16, 80, 150), (torch.float16, 64, 33), (torch.bfloat16, 128, 130),
                         (torch.float16, 160, 100), (torch.bfloat16, 160, 140)):
        q = torch.randn(1, 70, 2, D, device="cuda", dtype=dtype)
        k = torch.randn(1, Sk, 2, D, device="cuda", dtype=dtype)
        v = torch.randn(1, Sk, 2, D, device="cuda", dtype=dtype)
        got = ops.attention(q, k, v, backend="cuda")
        report(f"attention {dtype} D={D} Sq=70 Sk={Sk} {cuda_attn.path(q, k)}", got,
               oracle.attention(q, k, v, D**-0.5), oracle.attention_lowp(q, k, v, D**-0.5))


def main() -> int:
    reason = _ext.available()
    if reason is not None:
        print(f"cuda backend unavailable: {reason}")
        return 2
    group_norm_calls()
    sampler_step_calls()
    attention_calls()
    torch.cuda.synchronize()
    print(f"{'FAILED: ' + ', '.join(FAILURES) if FAILURES else 'all CUDA kernels match the reference'}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
