"""Input checks shared by the ops. Each error names the argument, the value and the limit."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t: object, *, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; supported: {allowed}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for n, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {first_name} is on {first.device}; "
                             "all tensors must be on the same device")
    return first.device


def check_same_dtype(**tensors: torch.Tensor | None) -> torch.dtype:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for n, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                            "they must have the same dtype")
    return first.dtype


def check_finite_float(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return v


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:<current>`` are the same device."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def _extent(t: torch.Tensor) -> tuple[int, int] | None:
    """(first byte, one past the last byte) that ``t`` can touch; None when empty. Live allocations never share
    addresses, so two tensors overlap only if these ranges do."""
    n = t.numel()
    if n == 0:
        return None
    lo = t.data_ptr()
    if t.is_contiguous():
        return lo, lo + n * t.element_size()
    return lo, lo + (1 + sum((k - 1) * st for k, st in zip(t.shape, t.stride()))) * t.element_size()


def _bytes(t: torch.Tensor):
    """Every byte address ``t`` touches (numpy int64), for the rare exact test of interleaved strided views."""
    import numpy as np

    offs = np.zeros((), dtype=np.int64)
    for n, st in zip(t.shape, t.stride()):
        offs = np.add.outer(offs, np.arange(n, dtype=np.int64) * st)
    first = t.data_ptr() + offs.reshape(-1) * t.element_size()
    return (first[:, None] + np.arange(t.element_size())).reshape(-1)


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors share any byte of memory. Reads only sizes, strides and addresses (no values)."""
    return _overlap(a, _extent(a), b, _extent(b))


def _overlap(a: torch.Tensor, ea, b: torch.Tensor, eb) -> bool:
    if ea is None or eb is None or ea[1] <= eb[0] or eb[1] <= ea[0]:
        return False
    if a.is_contiguous() and b.is_contiguous():
        return True
    import numpy as np

    return bool(np.intersect1d(_bytes(a), _bytes(b)).size)


def check_no_overlap(written: dict[str, torch.Tensor | None], read: dict[str, torch.Tensor | None],
                     allow: tuple[tuple[str, str], ...] = ()) -> None:
    """Every written tensor shares no memory with any other tensor given, except the pairs in ``allow`` when
    they are the very same view (same address, shape, strides and dtype: an in-place update). Costs a few
    microseconds: address ranges first, an exact test only for interleaved strided views."""
    items = [(n, t, _extent(t)) for n, t in (*written.items(), *read.items()) if t is not None]
    for i, (wa, a, ea) in enumerate(items):
        if wa not in written:
            break  # written tensors come first; every pair with one of them has been seen
        if ea is None:
            continue
        for nb, b, eb in items[i + 1:]:
            if eb is None or ea[1] <= eb[0] or eb[1] <= ea[0]:
                continue
            if ((wa, nb) in allow or (nb, wa) in allow) and _same_view(a, b):
                continue
            if _overlap(a, ea, b, eb):
                raise ValueError(f"{wa} overlaps {nb} in memory; the op writes {wa}, so it must not share memory "
                                 f"with {nb}")


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)
