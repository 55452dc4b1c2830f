"""What every Triton kernel module of this backend shares: can Triton run here, and on which tensors."""

from __future__ import annotations

import functools
import os

import torch

try:  # Triton is optional: without it the backend reports the reason instead of failing to import.
    import triton  # noqa: F401

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - depends on the machine
    _IMPORT_ERROR = f"triton is not importable: {exc}"

# Read once, when the kernels are defined: ``@triton.jit`` decides between compiled and interpreted
# kernels at decoration time, so a later change of the variable would not change what runs.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Offsets inside the kernels are int32 except where a kernel widens them explicitly; larger tensors are
# declined by ``supports`` rather than silently overflowing.
MAX_NUMEL = 2**31 - 1


def available() -> str | None:
    """None when Triton kernels can run on this machine, else the reason."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if INTERPRET:
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors)"
    return None


def device_reason(*tensors: torch.Tensor | None) -> str | None:
    """None when every tensor lives where the kernels run (CUDA, or CPU under the interpreter)."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda":
            if INTERPRET:
                return "TRITON_INTERPRET=1 runs kernels on CPU tensors only"
            continue
        if t.device.type == "cpu" and INTERPRET:
            continue
        return (f"tensor on {t.device} is not served: Triton kernels run on CUDA tensors "
                "(or on CPU tensors with TRITON_INTERPRET=1)")
    return None


def numel_reason(**tensors: torch.Tensor | None) -> str | None:
    """None when every element offset of every tensor fits in int32 (strided views: the span they reach)."""
    for name, t in tensors.items():
        if t is None or t.numel() == 0:
            continue
        span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
        if max(span, t.numel()) > MAX_NUMEL:
            return (f"{name} spans {max(span, t.numel())} elements; the Triton kernels index with int32 "
                    f"(at most {MAX_NUMEL})")
    return None


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def prev_pow2(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Under the interpreter there is no GPU to fill; planning as if for a mid-sized card makes the tests exercise
# the split reductions that a real card at batch 1 needs.
INTERPRET_SM_COUNT = 16


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a fixed stand-in for CPU tensors under the interpreter)."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRET_SM_COUNT


def is_capturing() -> bool:
    """True while the current CUDA stream is being captured into a graph (no syncs, no autotuning)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def bf16_staging(t: torch.Tensor | None):
    """``(tensor the kernel writes, finish)`` for an output tensor ``t``.

    The Triton interpreter truncates fp32 -> bf16 casts, where the GPU rounds to nearest even. Under the
    interpreter a bf16 output is therefore written as fp32 into a staging tensor of the same strides and
    rounded by torch in ``finish()``; on a GPU the kernel writes ``t`` directly and ``finish`` does nothing.
    """
    if INTERPRET and t is not None and t.dtype == torch.bfloat16:
        tmp = torch.empty_like(t, dtype=torch.float32)
        return tmp, lambda: t.copy_(tmp)
    return t, lambda: None
