"""Building blocks shared by the UNet and the text encoder: GroupNorm(+SiLU) and attention through the ops.

Each module that calls an op carries a ``backend`` attribute; :func:`set_op_backends` sets it on every such
module of a model. Besides the ops' own backends (``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"``) two
baselines are accepted: ``"eager"`` for GroupNorm (``F.group_norm`` then ``F.silu``, what a plain PyTorch
model runs) and ``"sdpa"`` for attention (``F.scaled_dot_product_attention``).

Parameter names follow diffusers (``to_q``, ``to_k``, ``to_v``, ``to_out.0``; GroupNorm ``weight``/``bias``)
so that checkpoints map one to one.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import attention as attention_op
from ..ops import group_norm as group_norm_op
from ..ops.registry import BACKENDS

GROUP_NORM_BACKENDS = ("auto",) + BACKENDS + ("eager",)
ATTENTION_BACKENDS = ("auto",) + BACKENDS + ("sdpa",)


def _check_backend(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


class GroupNorm(nn.Module):
    """GroupNorm with an optional fused SiLU and fused per-channel pre-add, via :func:`ops.group_norm`.

    ``forward(x [N, C, *spatial], add [N, C] | None) -> [N, C, *spatial]``; parameters ``weight``, ``bias``
    ``[C]`` as in ``torch.nn.GroupNorm``.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, activation: Optional[str] = None,
                 *, device=None, dtype=None) -> None:
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError(f"num_groups={num_groups} must divide num_channels={num_channels}")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.activation = activation
        self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        self.backend = "auto"

    def forward(self, x: torch.Tensor, add: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.backend == "eager":
            if add is not None:
                x = x + add.to(x.dtype).view(add.shape + (1,) * (x.dim() - 2))
            y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            return F.silu(y) if self.activation == "silu" else y
        return group_norm_op(x, self.num_groups, self.weight, self.bias, self.eps, self.activation, add=add,
                             backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, activation={self.activation}, "
                f"backend={self.backend!r}")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Attention with the default scale: q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]`` -> ``[B, Sq, H, D]``."""
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return attention_op(q, k, v, backend=backend)


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention with diffusers' parameter names.

    ``forward(x [B, S, query_dim], context [B, L, context_dim] | None) -> [B, S, query_dim]``; self-attention
    when ``context`` is None. ``to_q``/``to_k``/``to_v`` have no bias, ``to_out.0`` has one.
    """

    def __init__(self, query_dim: int, heads: int, context_dim: Optional[int] = None, *, device=None,
                 dtype=None) -> None:
        super().__init__()
        if query_dim % heads != 0:
            raise ValueError(f"heads={heads} must divide query_dim={query_dim}")
        self.heads = heads
        self.head_dim = query_dim // heads
        context_dim = query_dim if context_dim is None else context_dim
        fk = dict(device=device, dtype=dtype)
        self.to_q = nn.Linear(query_dim, query_dim, bias=False, **fk)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False, **fk)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False, **fk)
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim, **fk), nn.Dropout(0.0)])
        self.backend = "auto"

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        ctx = x if context is None else context
        B, S, _ = x.shape
        L = ctx.shape[1]
        q = self.to_q(x).view(B, S, self.heads, self.head_dim)
        k = self.to_k(ctx).view(B, L, self.heads, self.head_dim)
        v = self.to_v(ctx).view(B, L, self.heads, self.head_dim)
        out = attend(q, k, v, self.backend).reshape(B, S, self.heads * self.head_dim)
        return self.to_out[0](out)


def set_op_backends(model: nn.Module, backend: Optional[str] = None, *, group_norm: Optional[str] = None,
                    attention: Optional[str] = None) -> None:
    """Set the op backend of every :class:`GroupNorm` and :class:`Attention` inside ``model``.

    ``backend`` applies to both ops; ``group_norm`` / ``attention`` override it per op. ``None`` leaves
    that op's setting as it is.
    """
    if backend is not None:
        _check_backend("backend", backend, ("auto",) + BACKENDS)
        group_norm = backend if group_norm is None else group_norm
        attention = backend if attention is None else attention
    if group_norm is not None:
        _check_backend("group_norm", group_norm, GROUP_NORM_BACKENDS)
    if attention is not None:
        _check_backend("attention", attention, ATTENTION_BACKENDS)
    for m in model.modules():
        if isinstance(m, GroupNorm) and group_norm is not None:
            m.backend = group_norm
        elif isinstance(m, Attention) and attention is not None:
            m.backend = attention
