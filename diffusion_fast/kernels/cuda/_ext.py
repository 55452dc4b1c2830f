"""Loads the CUDA extension ``diffusion_fast._C`` and answers whether (and on which tensors) it can run.

Nothing here touches the CUDA runtime until a CUDA tensor is involved: on a machine without a GPU the
module imports and :func:`available` says ``"no CUDA device"``.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

# dtype codes of csrc/launchers.h
F32, F16, BF16, NONE = 0, 1, 2, -1
DTYPE_CODES = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}

_state: dict[str, object] = {}


def ext() -> ModuleType | None:
    """The extension module, or None when it is not built / fails to load (see :func:`load_error`)."""
    if "mod" not in _state:
        try:
            _state["mod"] = importlib.import_module("diffusion_fast._C")
            _state["err"] = None
        except Exception as exc:  # not built, or built for another Python
            _state["mod"] = None
            _state["err"] = f"{type(exc).__name__}: {exc}"
    return _state["mod"]  # type: ignore[return-value]


def load_error() -> str | None:
    ext()
    return _state["err"]  # type: ignore[return-value]


@functools.cache
def available() -> str | None:
    """None when the CUDA kernels can run on this machine at all, else the reason (asked once per process)."""
    mod = ext()
    if mod is None:
        return ("the CUDA extension diffusion_fast._C is not built (reinstall with nvcc on PATH, e.g. "
                f"`pip install -e .`): {load_error()}")
    if not torch.cuda.is_available():
        return "no CUDA device"
    n, err = mod.device_count()
    if n == 0:
        return "no CUDA device" + (f" ({err})" if err else "")
    return None


@functools.cache
def _probe(index: int) -> str | None:
    return ext().probe(index) or None


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def sm_count(t: torch.Tensor) -> int:
    return _sm_count(device_index(t))


def stream(t: torch.Tensor) -> int:
    """The handle of torch's current stream on ``t``'s device (a capture stream inside a CUDA graph)."""
    return torch.cuda.current_stream(t.device).cuda_stream


def device_reason(**tensors: torch.Tensor | None) -> str | None:
    """None when every given tensor is a CUDA tensor on a device this build has kernels for."""
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type != "cuda":
            return f"{name} is on {t.device}; the cuda backend needs CUDA tensors"
        if first is None:
            first = t
    if first is not None:
        return _probe(device_index(first))
    return None


def dtype_code(t: torch.Tensor | None) -> int:
    return NONE if t is None else DTYPE_CODES[t.dtype]


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def is_channels_last(x: torch.Tensor) -> bool:
    """x ``[N, C, *spatial]`` is dense with the channels innermost (channels_last / channels_last_3d)."""
    return x.permute(0, *range(2, x.dim()), 1).is_contiguous()
