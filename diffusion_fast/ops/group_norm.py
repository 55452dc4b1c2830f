"""GroupNorm with an optional fused SiLU and an optional per-(sample, channel) pre-add."""

from __future__ import annotations

from typing import Optional

import torch

from . import library, registry
from ._checks import FLOAT_DTYPES, check_finite_float, check_same_device, check_tensor

registry.register("group_norm", "torch", "diffusion_fast.kernels.reference.group_norm")
registry.register("group_norm", "triton", "diffusion_fast.kernels.triton.group_norm")
registry.register("group_norm", "cuda", "diffusion_fast.kernels.cuda.group_norm")

ACTIVATIONS = (None, "silu")


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    activation: Optional[str] = None,
    *,
    add: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Group normalization, optionally followed by SiLU.

    Semantics (the ``"torch"`` reference): ``h = x + add[:, :, None, ...]`` (when ``add`` is given), then per
    sample and per group of ``C // num_groups`` channels ``y = (h - mean) / sqrt(var + eps)`` with the
    biased variance computed in float32 (two-pass), then ``y * weight[c] + bias[c]``, then ``silu(y)`` when
    ``activation == "silu"``. All math is float32; the result is stored in ``x.dtype``.

    Args:
        x: ``[N, C, *spatial]`` (rank 3 to 5), float32/float16/bfloat16, contiguous or channels_last; the
            output has the same shape, dtype and memory format.
        num_groups: number of groups; must divide ``C``.
        weight, bias: ``[C]`` affine parameters (both or neither), float32 or ``x.dtype``.
        eps: added to the variance.
        activation: ``None`` or ``"silu"``.
        add: ``[N, C]`` values added per (sample, channel) before the statistics — the timestep embedding of
            a ResNet block, fused.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
    """
    check_tensor("x", x)
    if not 3 <= x.dim() <= 5:
        raise ValueError(f"x must have rank 3 to 5 ([N, C, *spatial]), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    N, C = x.shape[0], x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    if num_groups < 1 or C % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must be >= 1 and divide the channel count C={C}")
    if (weight is None) != (bias is None):
        raise ValueError("weight and bias must be given together (both or neither)")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_tensor(name, p)
        if p.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"{name} has dtype {p.dtype}; it must be float32 or x's dtype {x.dtype}")
        if tuple(p.shape) != (C,):
            raise ValueError(f"{name} must have shape [C]=({C},), got {tuple(p.shape)}")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"weight ({weight.dtype}) and bias ({bias.dtype}) must have the same dtype")
    if add is not None:
        check_tensor("add", add, dtypes=FLOAT_DTYPES)
        if tuple(add.shape) != (N, C):
            raise ValueError(f"add must have shape [N, C]=({N}, {C}), got {tuple(add.shape)}")
    eps = check_finite_float("eps", eps, positive=True)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    device = check_same_device(x=x, weight=weight, bias=bias, add=add)
    if torch.compiler.is_compiling():  # traced as one custom op (ops/library.py) so torch.compile keeps it whole
        return library.group_norm(x, num_groups, weight, bias, eps, activation, add, backend)
    call = dict(x=x, num_groups=num_groups, weight=weight, bias=bias, eps=eps, activation=activation, add=add)
    return registry.resolve("group_norm", backend, device, call)(**call)
