"""The three ops as torch custom ops (namespace ``diffusion_fast``), so ``torch.compile`` traces through them.

``torch.compile`` cannot see inside a Triton launch picked at run time by the backend registry; a custom op is
an opaque node with a fake (meta) implementation that gives output shapes, dtypes and strides without
running anything. A model that calls the functions below compiles with ``fullgraph=True``:

* ``diffusion_fast::group_norm`` and ``diffusion_fast::attention`` are functional (fresh outputs);
* ``diffusion_fast::sampler_step`` mutates ``hist``, ``out`` and ``net_input`` in place and returns nothing;
  :func:`sampler_step` below allocates ``out`` when needed and returns it, like the public op.

Each real implementation calls the public op in :mod:`diffusion_fast.ops` (input checks, then the
registry's choice of backend), so there is one definition of every op's semantics.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["group_norm", "attention", "sampler_step"]


@torch.library.custom_op("diffusion_fast::group_norm", mutates_args=())
def _group_norm_op(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    activation: Optional[str],
    add: Optional[torch.Tensor],
    backend: str,
) -> torch.Tensor:
    from .group_norm import group_norm as op

    return op(x, num_groups, weight, bias, eps, activation, add=add, backend=backend)


@_group_norm_op.register_fake
def _group_norm_fake(x, num_groups, weight, bias, eps, activation, add, backend):
    return torch.empty_like(x)  # every backend keeps x's dtype and memory format


@torch.library.custom_op("diffusion_fast::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float], backend: str
) -> torch.Tensor:
    from .attention import attention as op

    return op(q, k, v, scale, backend=backend)


@_attention_op.register_fake
def _attention_fake(q, k, v, scale, backend):
    return q.new_empty(q.shape)  # [B, Sq, H, D], contiguous, q.dtype


@torch.library.custom_op("diffusion_fast::sampler_step", mutates_args=("hist", "out", "net_input"))
def _sampler_step_op(
    x: torch.Tensor,
    model_output: torch.Tensor,
    coef: torch.Tensor,
    slots: Optional[torch.Tensor],
    hist: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    out: torch.Tensor,
    net_input: Optional[torch.Tensor],
    backend: str,
) -> None:
    from .sampler_step import sampler_step as op

    op(x, model_output, coef, slots, hist, noise, out=out, net_input=net_input, backend=backend)


@_sampler_step_op.register_fake
def _sampler_step_fake(x, model_output, coef, slots, hist, noise, out, net_input, backend):
    return None


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
    """:func:`diffusion_fast.ops.group_norm` as a custom op. x: ``[N, C, *spatial]`` -> same shape/format."""
    return _group_norm_op(x, num_groups, weight, bias, float(eps), activation, add, backend)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`diffusion_fast.ops.attention` as a custom op. q: ``[B, Sq, H, D]``, k/v: ``[B, Sk, H, D]``."""
    return _attention_op(q, k, v, None if scale is None else float(scale), backend)


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
    """:func:`diffusion_fast.ops.sampler_step` as a custom op (mutates hist/out/net_input); returns ``out``.

    x: ``[B, *S]`` float32; model_output ``[B or 2B, *S]``; coef ``[9 + 2K]``; hist ``[K, B, *S]``.
    """
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _sampler_step_op(x, model_output, coef, slots, hist, noise, out, net_input, backend)
    return out
