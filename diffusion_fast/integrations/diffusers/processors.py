"""diffusers attention processors and a ResNet block forward that run diffusion_fast's ops.

Each processor replaces one stock diffusers processor on one attention module (through diffusers' own
``set_processor``) and does exactly what that processor does — the same projections, norms, RoPE, output
projections and dropout, in the same order — except that the attention itself is
:func:`diffusion_fast.ops.attention` on ``[B, S, H, D]`` tensors: the projections are split into heads with
``unflatten`` (a view, no transpose, no copy) and the op's ``[B, S, H, D]`` output is flattened back (a view).

=============================  ==============================  =====================================
stock processor                replaced by                     used by
=============================  ==============================  =====================================
``AttnProcessor2_0``           :class:`FastAttnProcessor`      UNet self/cross attention, PixArt
``FusedAttnProcessor2_0``      :class:`FastAttnProcessor`      the same after ``fuse_qkv_projections``
``JointAttnProcessor2_0``      :class:`FastJointAttnProcessor`  SD3 joint attention (and SD3.5's attn2)
``FluxAttnProcessor``          :class:`FastFluxAttnProcessor`  Flux joint and single-stream attention
=============================  ==============================  =====================================

A call the op cannot take (an attention mask, a dtype the op does not serve) runs the stock processor
instead, and the processor counts it under its reason (:attr:`FastProcessor.fallbacks`), so
:func:`~diffusion_fast.integrations.diffusers.optimize.report` can say what ran where.

:class:`FusedResnetBlock2D` is ``ResnetBlock2D`` with a forward that runs each GroupNorm -> SiLU pair as one
``ops.group_norm(..., activation="silu")`` and adds the time embedding inside the second one (``add=``).
``optimize`` swaps a block's class to it (and back); parameters and buffers are untouched.
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    JointAttnProcessor2_0,
)
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from ... import ops
from ...ops._checks import FLOAT_DTYPES
from ...ops.attention import MAX_HEAD_DIM

HEAD_DIM_MULTIPLE = 8  # ops.attention serves head dims that are multiples of 8, up to MAX_HEAD_DIM


def head_dim_reason(head_dim: int) -> Optional[str]:
    """Why :func:`diffusion_fast.ops.attention` cannot serve heads of ``head_dim`` channels (None: it can)."""
    if head_dim % HEAD_DIM_MULTIPLE != 0 or not 0 < head_dim <= MAX_HEAD_DIM:
        return (f"head dim {head_dim}: diffusion_fast.ops.attention serves multiples of {HEAD_DIM_MULTIPLE} "
                f"up to {MAX_HEAD_DIM}")
    return None


def _dtype_reason(t: torch.Tensor) -> Optional[str]:
    if t.dtype not in FLOAT_DTYPES:
        return f"dtype {str(t.dtype).replace('torch.', '')}: diffusion_fast.ops.attention serves float32, " \
               "float16 and bfloat16"
    return None


MASK_REASON = "called with an attention_mask: diffusion_fast.ops.attention takes no mask"


class FastProcessor:
    """Common part of the processors: the stock processor it replaces, the op backend, call statistics.

    Attributes:
        original: the stock processor object this one replaced (restored by ``unoptimize``; it also serves
            the calls the op cannot take).
        backend: the ``backend=`` given to the op.
        calls: calls served by ``ops.attention``.
        fallbacks: ``{reason: count}`` of calls served by ``original`` instead.
    """

    def __init__(self, original, backend: str = "auto") -> None:
        self.original = original
        self.backend = backend
        self.calls = 0
        self.fallbacks: dict[str, int] = {}

    def _fallback(self, reason: str) -> None:
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``[B, Sq, H, D]`` x ``[B, Sk, H, D]`` -> ``[B, Sq, H * D]`` (the op's contiguous output, flattened)."""
        self.calls += 1
        return ops.attention(q, k, v, backend=self.backend).flatten(2, 3)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(original={type(self.original).__name__}, backend={self.backend!r})"


class FastAttnProcessor(FastProcessor):
    """``AttnProcessor2_0`` / ``FusedAttnProcessor2_0`` with ``ops.attention`` (self- and cross-attention)."""

    def __init__(self, original, backend: str = "auto") -> None:
        super().__init__(original, backend)
        self.fused = isinstance(original, FusedAttnProcessor2_0)

    # The signature is the stock one: Attention.forward passes on only the keyword arguments it names.
    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                 temb: Optional[torch.Tensor] = None, *args, **kwargs) -> torch.Tensor:
        reason = MASK_REASON if attention_mask is not None else _dtype_reason(hidden_states)
        if reason is None and (args or kwargs.get("scale") is not None):
            reason = "called with the deprecated scale argument"  # the stock processor warns about it
        if reason is not None:
            self._fallback(reason)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if self.fused and encoder_hidden_states is None:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)  # views of one projection
        else:
            query = attn.to_q(hidden_states)
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            if self.fused:
                key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
            else:
                key = attn.to_k(encoder_hidden_states)
                value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.unflatten(-1, (attn.heads, head_dim))  # [B, S, H, D] views: no transpose, no copy
        key = key.unflatten(-1, (attn.heads, head_dim))
        value = value.unflatten(-1, (attn.heads, head_dim))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self._attend(query, key, value).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class FastJointAttnProcessor(FastProcessor):
    """``JointAttnProcessor2_0`` (SD3) with ``ops.attention``: image tokens then context tokens, one attention.

    Like the stock processor it ignores ``attention_mask``.
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                 *args, **kwargs):
        reason = _dtype_reason(hidden_states)
        if reason is not None:
            self._fallback(reason)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

        sample_len = hidden_states.shape[1]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.unflatten(-1, (attn.heads, head_dim))
        key = key.unflatten(-1, (attn.heads, head_dim))
        value = value.unflatten(-1, (attn.heads, head_dim))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            context_query = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (attn.heads, head_dim))
            context_key = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (attn.heads, head_dim))
            context_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (attn.heads, head_dim))
            if attn.norm_added_q is not None:
                context_query = attn.norm_added_q(context_query)
            if attn.norm_added_k is not None:
                context_key = attn.norm_added_k(context_key)
            query = torch.cat([query, context_query], dim=1)
            key = torch.cat([key, context_key], dim=1)
            value = torch.cat([value, context_value], dim=1)

        hidden_states = self._attend(query, key, value).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :sample_len], hidden_states[:, sample_len:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def _flux_projections(attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor]):
    """q, k, v of the image tokens and of the context tokens (None without context), as FluxAttnProcessor
    computes them: separate linears, or chunks (views) of the fused ones after ``fuse_qkv_projections``."""
    with_context = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        context = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1) if with_context else (None,) * 3
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        context = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                   attn.add_v_proj(encoder_hidden_states)) if with_context else (None,) * 3
    return (query, key, value, *context)


class FastFluxAttnProcessor(FastProcessor):
    """``FluxAttnProcessor`` with ``ops.attention``: context tokens then image tokens, RoPE on both (the
    double-stream blocks), or the already joined sequence (the single-stream blocks)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: Optional[torch.Tensor] = None, image_rotary_emb: Optional[torch.Tensor] = None):
        reason = MASK_REASON if attention_mask is not None else _dtype_reason(hidden_states)
        if reason is not None:
            self._fallback(reason)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        query, key, value, context_query, context_key, context_value = _flux_projections(
            attn, hidden_states, encoder_hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            context_query = attn.norm_added_q(context_query.unflatten(-1, (-1, attn.head_dim)))
            context_key = attn.norm_added_k(context_key.unflatten(-1, (-1, attn.head_dim)))
            context_value = context_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([context_query, query], dim=1)
            key = torch.cat([context_key, key], dim=1)
            value = torch.cat([context_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self._attend(query, key, value).to(query.dtype)
        if encoder_hidden_states is not None:
            context_len = encoder_hidden_states.shape[1]
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [context_len, hidden_states.shape[1] - context_len], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


# Stock processor type -> the processor that replaces it (exact types: a subclass may do something else).
PROCESSORS = {
    AttnProcessor2_0: FastAttnProcessor,
    FusedAttnProcessor2_0: FastAttnProcessor,
    JointAttnProcessor2_0: FastJointAttnProcessor,
    FluxAttnProcessor: FastFluxAttnProcessor,
}


def attention_head_dim(attn) -> int:
    """The head dim the stock processor of ``attn`` splits its projections into."""
    if isinstance(attn, Attention):
        return attn.inner_kv_dim // attn.heads  # what AttnProcessor2_0 computes from the key projection
    return attn.head_dim  # FluxAttention


def attention_reason(attn) -> Optional[str]:
    """Why the processor of attention module ``attn`` stays as it is (None: a Fast*Processor replaces it)."""
    processor = attn.processor
    kind = type(processor)
    if kind not in PROCESSORS:
        names = ", ".join(sorted({k.__name__ for k in PROCESSORS}))
        return f"processor {kind.__name__} is not one diffusion_fast replaces ({names})"
    if isinstance(attn, Attention):
        if attn.inner_kv_dim != attn.inner_dim:
            return f"key/value heads ({attn.inner_kv_dim} channels) differ from query heads ({attn.inner_dim})"
        if attn.inner_dim % attn.heads != 0:
            return f"{attn.inner_dim} channels do not split into {attn.heads} heads"
    if getattr(processor, "_parallel_config", None) is not None:
        return "context-parallel attention (a parallel config is set on the processor)"
    return head_dim_reason(attention_head_dim(attn))


# ----------------------------------------------------------------------------------------------------------
# ResnetBlock2D
# ----------------------------------------------------------------------------------------------------------


def _plain_group_norm(norm) -> bool:
    return type(norm) is torch.nn.GroupNorm


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_hf_hook", None) is not None)


def resnet_reason(block: ResnetBlock2D) -> Optional[str]:
    """Why ``block`` keeps diffusers' forward (None: :class:`FusedResnetBlock2D` serves it)."""
    if type(block) is not ResnetBlock2D:
        return f"{type(block).__name__} is a subclass of ResnetBlock2D with its own forward"
    if block.time_embedding_norm != "default":
        return (f"time_embedding_norm={block.time_embedding_norm!r}: only the default additive time embedding "
                "fuses into GroupNorm")
    if type(block.nonlinearity) is not torch.nn.SiLU:
        return f"nonlinearity {type(block.nonlinearity).__name__}: the fused op applies SiLU"
    for name in ("norm1", "norm2"):
        norm = getattr(block, name)
        if not _plain_group_norm(norm):
            return f"{name} is {type(norm).__name__}, not torch.nn.GroupNorm"
        if _has_hooks(norm):
            return f"{name} has forward hooks (the fused op would skip them)"
    if "forward" in block.__dict__ or _has_hooks(block):
        return "its forward is wrapped on the instance (e.g. by an offloading hook)"
    return None


class FusedResnetBlock2D(ResnetBlock2D):
    """``ResnetBlock2D`` whose GroupNorm -> SiLU pairs are each one ``ops.group_norm(..., activation="silu")``,
    the time embedding added inside the second (``add=``). Same parameters, same semantics.

    ``optimize`` assigns this class to a stock block (``block.__class__ = FusedResnetBlock2D``) after checking
    :func:`resnet_reason`, and sets ``block.diffusion_fast_backend``; ``unoptimize`` assigns the stock class
    back and removes the attribute. Never constructed directly.
    """

    diffusion_fast_backend = "auto"

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs.get("scale") is not None or input_tensor.dtype not in FLOAT_DTYPES:
            return super().forward(input_tensor, temb, *args, **kwargs)  # the stock path (it warns / upcasts)
        backend = self.diffusion_fast_backend
        n1, n2 = self.norm1, self.norm2
        hidden_states = ops.group_norm(input_tensor, n1.num_groups, n1.weight, n1.bias, n1.eps, "silu",
                                       backend=backend)
        if self.upsample is not None:
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)
        hidden_states = self.conv1(hidden_states)

        add = None
        if self.time_emb_proj is not None and temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            add = self.time_emb_proj(temb)
            N, C = hidden_states.shape[:2]
            if add.dim() != 2 or add.shape[1] != C or add.shape[0] not in (1, N) or add.dtype not in FLOAT_DTYPES:
                # Not a per-(sample, channel) vector: add it the stock way, then normalise.
                hidden_states = hidden_states + add[:, :, None, None]
                add = None
            elif add.shape[0] != N:
                add = add.expand(N, C)
        elif temb is not None:
            hidden_states = hidden_states + temb  # stock: a block without time_emb_proj adds temb as given
        hidden_states = ops.group_norm(hidden_states, n2.num_groups, n2.weight, n2.bias, n2.eps, "silu", add=add,
                                       backend=backend)

        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)
        if self.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor
