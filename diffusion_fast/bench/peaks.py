"""The card's own limits, measured at the start of each run: copy bandwidth and matmul rate.

* Copy bandwidth: ``dst.copy_(src)`` of a large buffer, counted as ``2 * nbytes`` (read + write) per call,
  which is the same accounting the op models use (every byte read or written once).
* Matmul rate: ``a @ b`` with ``[M, K] x [K, N]`` operands, ``2 * M * N * K`` FLOPs per call, in bfloat16 on
  a GPU (the dtype the UNet runs in) and float32 on CPU.

A fraction of these peaks is what a benchmark reports beside its time: a kernel at 0.9 of the copy
bandwidth has little left to gain, whatever the card.
"""

from __future__ import annotations

import torch

from .timing import measure

GPU_COPY_BYTES = 1 << 30
CPU_COPY_BYTES = 64 << 20
GPU_MATMUL = 8192
CPU_MATMUL = 1024


def measure_peaks(device: torch.device, *, quick: bool = False) -> dict:
    """Measure copy bandwidth (GB/s) and matmul rate (TFLOP/s) on ``device``.

    Args:
        device: a CUDA or CPU device.
        quick: smaller buffers and shorter timing (tests).

    Returns:
        ``{"copy_gbps", "copy_bytes", "matmul_tflops", "matmul_dtype", "matmul_shape"}``; ``copy_bytes`` is
        the size of the copied buffer, ``matmul_shape`` is ``[M, N, K]``.
    """
    cuda = device.type == "cuda"
    nbytes = GPU_COPY_BYTES if cuda else CPU_COPY_BYTES
    n = GPU_MATMUL if cuda else CPU_MATMUL
    if quick:
        nbytes //= 16
        n //= 4
    budget = 30.0 if quick else 200.0
    copy_gbps = 2 * nbytes / (_time_copy(nbytes, device, budget) * 1e-3) / 1e9
    dtype = torch.bfloat16 if cuda else torch.float32
    matmul_tflops = 2 * n**3 / (_time_matmul(n, dtype, device, budget) * 1e-3) / 1e12
    return {
        "copy_gbps": copy_gbps,
        "copy_bytes": nbytes,
        "matmul_tflops": matmul_tflops,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_shape": [n, n, n],
    }


def _time_copy(nbytes: int, device: torch.device, budget: float) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return measure([lambda: dst.copy_(src)], device, budget_ms=budget, min_samples=5, max_samples=50).median_ms


def _time_matmul(n: int, dtype: torch.dtype, device: torch.device, budget: float) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return measure([lambda: a @ b], device, budget_ms=budget, min_samples=5, max_samples=50).median_ms
