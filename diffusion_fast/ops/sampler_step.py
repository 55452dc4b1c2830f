"""The one fused op behind every sampler: CFG combine, raw-output conversion, update, history write.

Every sampler's update is a linear combination of the current state ``x``, the denoised estimate ``D`` of
this network evaluation, ``K`` stored history slots and noise ``z``, with coefficients that depend only on
the schedule (see :mod:`diffusion_fast.samplers`). One row of the sampler's coefficient table drives one
call; the row's layout (the indices ``G``, ``P``, ... below) is :mod:`diffusion_fast.ops.rows`. With
``row = coef`` (float32, on the device):

    raw    = model_output                                       # [B, ...], or for a CFG batch [2B, ...]:
    raw    = u + row[G] * (c - u)   where u, c = model_output[:B], model_output[B:]   (uncond first)
    D      = row[P] * x + row[Q] * raw                           # epsilon / v / sample / flow -> denoised
    x_new  = row[AX] * x + row[AD] * D + row[AZ] * z + sum_k row[AH + k] * hist[k]
    y      = row[BX] * x + row[BD] * D + sum_k row[BH(K) + k] * hist[k]
    hist[slots[0]] = D      (unless slots[0] == -1)
    hist[slots[1]] = y      (unless slots[1] == -1; when both name one slot, D is written)
    out    = x_new
    net_input[:B] (and net_input[B:2B] for a CFG batch) = (row[CIN] * x_new).to(net_input.dtype)

All reads happen before any write (element by element), so ``out`` may be ``x`` and a slot that is read may
be overwritten in the same call. Math is float32; ``x``, ``hist``, ``out`` and ``coef`` are float32 — or all
float64, which only the reference backend serves (a float64 reference run of a sampler).

Slots: ``-1`` writes nothing, ``0..K-1`` writes that slot; any other value is an error. The op reads slot
values on the host only where that costs no device synchronisation — CPU tensors, for every backend — and
raises ValueError there. On a GPU only the kernels read them; there every backend (reference, Triton, CUDA)
writes nothing for a value outside ``[0, K)``, whatever its width (64-bit values are compared as 64-bit).
The sampling loop's slot tables are built on the host and are always valid.

Buffers: ``out``, ``hist`` and ``net_input`` are written, so none may share memory with another argument,
except ``out`` being ``x`` itself (the same view: an in-place update); checked from addresses and strides.

Nothing here looks at tensor values on a device, so the op never synchronises and a CUDA graph can replay it
with a new row copied into ``coef``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import library, registry
from ._checks import FLOAT_DTYPES, check_no_overlap, check_same_device, check_tensor
from .rows import MAX_HIST, coef_width

_STATE_DTYPES = (torch.float32, torch.float64)
_ANY_FLOAT = FLOAT_DTYPES + (torch.float64,)

registry.register("sampler_step", "torch", "diffusion_fast.kernels.reference.sampler_step")
registry.register("sampler_step", "triton", "diffusion_fast.kernels.triton.sampler_step")
registry.register("sampler_step", "cuda", "diffusion_fast.kernels.cuda.sampler_step")


def sampler_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    coef: torch.Tensor,
    slots: Optional[torch.Tensor] = None,
    hist: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
    net_input: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Apply one coefficient row (see the module docstring for the exact formula).

    Args:
        x: ``[B, *S]`` float32 (or float64) sampler state at which the network was evaluated.
        model_output: ``[B, *S]`` or ``[2B, *S]`` (CFG batch: unconditional half first), any float dtype.
        coef: ``[9 + 2K]`` coefficient row in x's dtype, on x's device.
        slots: ``[2]`` int32/int64 ``(slot for D, slot for y)``, each -1 ("no write") or ``0..K-1``; required
            when ``K > 0`` (see "Slots" above).
        hist: ``[K, B, *S]`` history in x's dtype, ``K <= 8``; updated in place.
        noise: ``[B, *S]`` standard normal noise (any float dtype) or None (then ``row[AZ]`` is unused).
        out: ``[B, *S]`` result buffer in x's dtype; may be ``x`` (no other overlap). Allocated when None.
        net_input: ``[B, *S]`` or ``[2B, *S]`` buffer (any float dtype) that receives the next network input
            ``row[CIN] * x_new`` (duplicated into both halves for a CFG batch); skipped when None.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (a float64 state: ``"auto"`` or ``"torch"``).

    Returns:
        ``out`` (``x_new``).
    """
    check_tensor("x", x, dtypes=_STATE_DTYPES)
    state = (x.dtype,)
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty [B, ...] tensor, got shape {tuple(x.shape)}")
    B, S = x.shape[0], tuple(x.shape[1:])
    check_tensor("model_output", model_output, dtypes=_ANY_FLOAT)
    if tuple(model_output.shape[1:]) != S or model_output.shape[0] not in (B, 2 * B):
        raise ValueError(
            f"model_output must have shape [B, ...] or [2B, ...] with B={B} and trailing dims {S} "
            f"(x's), got {tuple(model_output.shape)}"
        )
    K = 0
    if hist is not None:
        check_tensor("hist", hist, dtypes=state)
        if hist.dim() != x.dim() + 1 or tuple(hist.shape[1:]) != tuple(x.shape):
            raise ValueError(f"hist must have shape [K, *x.shape] = [K, {B}, ...], got {tuple(hist.shape)}")
        K = hist.shape[0]
        if not 1 <= K <= MAX_HIST:
            raise ValueError(f"hist must have 1 to {MAX_HIST} slots, got K={K}")
    check_tensor("coef", coef, dtypes=state)
    if coef.dim() != 1 or coef.shape[0] != coef_width(K):
        raise ValueError(f"coef must be a 1-D row of {coef_width(K)} = 9 + 2K values for K={K} history "
                         f"slots, got shape {tuple(coef.shape)}")
    if K > 0 or slots is not None:
        if slots is None:
            raise ValueError(f"slots is required when hist has K={K} slots")
        check_tensor("slots", slots, dtypes=(torch.int32, torch.int64))
        if tuple(slots.shape) != (2,):
            raise ValueError(f"slots must have shape [2] (slot for D, slot for y), got {tuple(slots.shape)}")
    if noise is not None:
        check_tensor("noise", noise, dtypes=_ANY_FLOAT)
        if noise.shape != x.shape:
            raise ValueError(f"noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    else:
        check_tensor("out", out, dtypes=state)
        if out.shape != x.shape:
            raise ValueError(f"out must have x's shape {tuple(x.shape)}, got {tuple(out.shape)}")
    if net_input is not None:
        check_tensor("net_input", net_input, dtypes=_ANY_FLOAT)
        if tuple(net_input.shape[1:]) != S or net_input.shape[0] not in (B, 2 * B):
            raise ValueError(f"net_input must have shape [B, ...] or [2B, ...] with B={B} and trailing dims "
                             f"{S}, got {tuple(net_input.shape)}")
    device = check_same_device(x=x, model_output=model_output, coef=coef, slots=slots, hist=hist,
                               noise=noise, out=out, net_input=net_input)
    if device.type != "meta" and not torch.compiler.is_compiling():
        check_no_overlap(dict(out=out, hist=hist, net_input=net_input),
                         dict(x=x, model_output=model_output, coef=coef, slots=slots, noise=noise),
                         allow=(("out", "x"),))
        if slots is not None and device.type == "cpu":
            _check_slot_values(slots.tolist(), K)
    if torch.compiler.is_compiling():  # traced as one custom op (ops/library.py), mutating hist/out/net_input
        library.sampler_step(x, model_output, coef, slots, hist, noise, out, net_input, backend)
        return out
    call = dict(x=x, model_output=model_output, coef=coef, slots=slots, hist=hist, noise=noise, out=out,
                net_input=net_input)
    return registry.resolve("sampler_step", backend, device, call)(**call)


def _check_slot_values(values: list[int], K: int) -> None:
    """Host values only (a CPU tensor's ``tolist`` reads memory directly: no device, no dispatch)."""
    if any(v != -1 and not 0 <= v < K for v in values):
        limit = f"0..{K - 1} (a history slot)" if K else "nothing else: hist has no slots"
        raise ValueError(f"slots must be -1 (no write) or {limit}, got {values}")
