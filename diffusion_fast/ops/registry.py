"""Backend registry: which implementation of an op serves a given call.

Every op (``group_norm``, ``attention``, ``sampler_step``) has a reference backend ``"torch"`` and may have
fast backends (``"triton"``, ``"cuda"``; attention also ``"sdpa"``, torch's own kernels). A backend is
registered by the *name of the module* that holds it, so that importing ``diffusion_fast`` never imports
Triton or loads the CUDA extension; the module is imported the first time the backend is considered.

A backend module defines:

* ``available() -> str | None`` — ``None`` when the backend can run on this machine at all, else the reason
  (e.g. ``"triton is not installed"``, ``"no CUDA device"``).
* ``supports(**call) -> str | None`` — ``None`` when it can serve this particular call (shapes, dtypes,
  device, strides), else the reason. It is called after the op's own input checks, with the same keyword
  arguments that ``forward`` receives.
* ``forward(**call)`` — runs the op.

``backend="auto"`` walks :func:`auto_order` for the tensors' device and takes the first backend that is
available and supports the call; an explicitly named backend that cannot serve raises
:class:`BackendUnavailable` with its reason.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

BACKENDS = ("torch", "triton", "cuda")  # the backend names every op may have
EXTRA_BACKENDS = {"attention": ("sdpa",)}  # torch's own attention kernels (scaled_dot_product_attention)


def names(op: str) -> tuple[str, ...]:
    """The backend names ``op`` may have: :data:`BACKENDS` and its own extras."""
    return BACKENDS + EXTRA_BACKENDS.get(op, ())


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot serve the call; the message says why."""


@dataclass
class _Entry:
    op: str
    name: str
    module: str
    _mod: ModuleType | None = field(default=None, repr=False)
    _import_error: str | None = field(default=None, repr=False)

    def load(self) -> ModuleType | None:
        if self._mod is None and self._import_error is None:
            try:
                self._mod = importlib.import_module(self.module)
            except Exception as exc:  # a missing optional dependency is a reason, not a crash
                self._import_error = f"{self.name} backend for {self.op} failed to import: {exc}"
        return self._mod

    def available(self) -> str | None:
        mod = self.load()
        if mod is None:
            return self._import_error
        return mod.available()


_REGISTRY: dict[str, dict[str, _Entry]] = {}

# Preference order of ``auto`` per op and device type: a fixed order, or a rule that looks at the call's
# shapes. The CUDA rules come from measured data (benchmarks/results/2026-11-26-h200-run2.json, H200, bf16): the
# CUDA kernels win where a call is short (launch cost dominates: the pybind11 launch is cheaper than a Triton
# launch) and the Triton kernels win on large, bandwidth- or matmul-bound calls. Every rule is overridable
# with DIFFUSION_FAST_AUTO_<OP>=cuda,triton,torch.
_FAST_SMALL = ("cuda", "triton", "torch")
_FAST_LARGE = ("triton", "cuda", "torch")
# Attention falls back to torch's SDPA kernels before the float32 reference, for the calls our kernels decline
# (e.g. head dims the CUDA kernels are not compiled for). Where SDPA beats our kernels on time inside a CUDA
# graph is for a GPU run of `diffusion-fast bench ops` to show (the `auto` case and per-backend graph times);
# the order above is still the host-timed crossover of run2.
_ATTN_SMALL = ("cuda", "triton", "sdpa", "torch")
_ATTN_LARGE = ("triton", "cuda", "sdpa", "torch")


def _group_norm_rule(call: dict[str, Any]) -> tuple[str, ...]:
    # [2,320,128,128] (10.5M): cuda 35 us, triton 90 us; [8,512,128,128] (67M): triton 120 us, cuda 193 us.
    return _FAST_SMALL if call["x"].numel() < (1 << 24) else _FAST_LARGE


def _attention_rule(call: dict[str, Any]) -> tuple[str, ...]:
    # cuda: cross-attention (77 keys) and S <= 1024 at every head dim, and D=40 at S=4096 (269 vs 323 us);
    # triton: power-of-two head dims on long sequences (S=4096, D=64: 218 vs 445 us; D=128: 607 vs 1220 us).
    q, k = call["q"], call["k"]
    Sq, Sk, D = q.shape[1], k.shape[1], q.shape[3]
    pow2 = D & (D - 1) == 0
    return _ATTN_SMALL if Sk <= 128 or Sq * Sk <= (1 << 21) or not pow2 else _ATTN_LARGE


def _sampler_step_rule(call: dict[str, Any]) -> tuple[str, ...]:
    # [1,4,64,64]: cuda 27 us, triton 51 us; 64M elements: triton 397 us, cuda 506 us.
    return _FAST_SMALL if call["x"].numel() < (1 << 22) else _FAST_LARGE


_AUTO_ORDER: dict[str, dict[str, tuple[str, ...] | Callable[[dict[str, Any]], tuple[str, ...]]]] = {
    "group_norm": {"cuda": _group_norm_rule},
    "attention": {"cuda": _attention_rule},
    "sampler_step": {"cuda": _sampler_step_rule},
}


def register(op: str, name: str, module: str) -> None:
    """Register backend ``name`` of ``op``, implemented in the importable module ``module``."""
    if name not in names(op):
        raise ValueError(f"backend name must be one of {names(op)}, got {name!r}")
    _REGISTRY.setdefault(op, {})[name] = _Entry(op, name, module)


def set_auto_order(op: str, device_type: str, order: tuple[str, ...]) -> None:
    """Set the order in which ``backend="auto"`` tries backends of ``op`` on ``device_type``."""
    for name in order:
        if name not in names(op):
            raise ValueError(f"order: unknown backend {name!r}; expected names from {names(op)}")
    _AUTO_ORDER.setdefault(op, {})[device_type] = tuple(order)


def auto_order(op: str, device_type: str, call: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The order ``auto`` tries backends of ``op`` in on ``device_type`` (for this call, when rules apply)."""
    env = os.environ.get(f"DIFFUSION_FAST_AUTO_{op.upper()}")
    if env:
        return tuple(n.strip() for n in env.split(",") if n.strip())
    order = _AUTO_ORDER.get(op, {}).get(device_type, ("torch",))
    if callable(order):
        return order(call) if call is not None else _FAST_SMALL
    return order


def backends(op: str) -> dict[str, _Entry]:
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; registered ops: {sorted(_REGISTRY)}")
    return _REGISTRY[op]


def status(op: str) -> dict[str, str | None]:
    """``{backend: None if usable on this machine else the reason}`` for ``op``."""
    return {name: entry.available() for name, entry in backends(op).items()}


def resolve(op: str, backend: str, device: torch.device, call: dict[str, Any]) -> Callable[..., Any]:
    """Return the ``forward`` of the backend that serves ``call`` (already input-checked by the op)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    entries = backends(op)
    if backend != "auto":
        if backend not in names(op):
            raise ValueError(f"backend must be 'auto' or one of {names(op)}, got {backend!r}")
        entry = entries.get(backend)
        if entry is None:
            raise BackendUnavailable(f"{op}: backend {backend!r} is not registered for this op")
        reason = entry.available()
        if reason is None:
            reason = entry.load().supports(**call)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend {backend!r} cannot serve this call: {reason}")
        return entry.load().forward
    reasons = []
    for name in auto_order(op, device.type, call):
        entry = entries.get(name)
        if entry is None:
            continue
        reason = entry.available()
        if reason is None:
            reason = entry.load().supports(**call)
        if reason is None:
            return entry.load().forward
        reasons.append(f"{name}: {reason}")
    # The reference serves every valid call on every device.
    ref = entries["torch"]
    if ref.load().supports(**call) is None:
        return ref.load().forward
    raise BackendUnavailable(f"{op}: no backend can serve this call ({'; '.join(reasons)})")


def explain(op: str, device: torch.device, call: dict[str, Any]) -> list[tuple[str, str | None]]:
    """For diagnostics: ``[(backend, reason or None)]`` for each backend of ``op`` on this call."""
    out = []
    for name, entry in backends(op).items():
        reason = entry.available()
        if reason is None:
            reason = entry.load().supports(**call)
        out.append((name, reason))
    return out
