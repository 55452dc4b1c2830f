"""The three ops as torch custom ops (namespace ``diffusion_fast``), so ``torch.compile`` traces through them.

``torch.compile`` cannot see inside a Triton launch picked at run time by the backend registry; a custom op is
an opaque node with a fake (meta) implementation that gives output shapes, dtypes and strides without
running anything. The public ops (:mod:`diffusion_fast.ops`) check their input, fill in defaults (the
attention scale, ``out``) and then, while ``torch.compile`` is tracing, call the custom op instead of the
registry; so a model built on the public ops compiles with ``fullgraph=True``:

* ``diffusion_fast::group_norm`` and ``diffusion_fast::attention`` are functional (fresh outputs);
* ``diffusion_fast::sampler_step`` mutates ``hist``, ``out`` and ``net_input`` in place and returns nothing.

A custom op's real implementation is only the registry's dispatch: its arguments were checked by the public
op that traced it, so nothing is checked twice and this module imports nothing but the registry.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import registry

__all__ = ["group_norm", "attention", "sampler_step"]


def _dispatch(op: str, backend: str, device: torch.device, **call):
    return registry.resolve(op, backend, device, call)(**call)


@torch.library.custom_op("diffusion_fast::group_norm", mutates_args=())
def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    activation: Optional[str],
    add: Optional[torch.Tensor],
    backend: str,
) -> torch.Tensor:
    """x: ``[N, C, *spatial]`` -> same shape, dtype and memory format (arguments checked by the public op)."""
    return _dispatch("group_norm", backend, x.device, x=x, num_groups=num_groups, weight=weight, bias=bias,
                     eps=eps, activation=activation, add=add)


@group_norm.register_fake
def _group_norm_fake(x, num_groups, weight, bias, eps, activation, add, backend):
    return torch.empty_like(x)  # every backend keeps x's dtype and memory format


@torch.library.custom_op("diffusion_fast::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    """q: ``[B, Sq, H, D]``, k/v: ``[B, Sk, H, D]`` -> ``[B, Sq, H, D]`` contiguous (checked by the public op)."""
    return _dispatch("attention", backend, q.device, q=q, k=k, v=v, scale=scale)


@attention.register_fake
def _attention_fake(q, k, v, scale, backend):
    return q.new_empty(q.shape)  # [B, Sq, H, D], contiguous, q.dtype


@torch.library.custom_op("diffusion_fast::sampler_step", mutates_args=("hist", "out", "net_input"))
def sampler_step(
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
    """One coefficient row applied in place (``out``, ``hist``, ``net_input``; checked by the public op)."""
    _dispatch("sampler_step", backend, x.device, x=x, model_output=model_output, coef=coef, slots=slots,
              hist=hist, noise=noise, out=out, net_input=net_input)


@sampler_step.register_fake
def _sampler_step_fake(x, model_output, coef, slots, hist, noise, out, net_input, backend):
    return None
