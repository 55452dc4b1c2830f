"""An SD-style conditional UNet built from the project's ops.

The structure and parameter names are those of diffusers' ``UNet2DConditionModel`` (SD1.x layout:
``CrossAttnDownBlock2D`` / ``DownBlock2D`` down path, ``UNetMidBlock2DCrossAttn``, ``UpBlock2D`` /
``CrossAttnUpBlock2D`` up path, GEGLU feed-forward, 1x1-conv projections around the transformer), so a
diffusers state dict of the same configuration loads with ``load_state_dict(strict=True)``.

Every GroupNorm (+SiLU) and every attention runs through :mod:`diffusion_fast.ops`; in the ResNet blocks the
timestep embedding is added inside the second GroupNorm (``norm2(h + temb)`` is ``group_norm(h, add=temb)``).
Convolutions, linears, layer norms and GELU are plain torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import MAX_HEAD_DIM
from .layers import Attention, GroupNorm, set_op_backends

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass
class UNetConfig:
    """Configuration of :class:`UNet2DConditionModel` (field names follow diffusers' config where they exist).

    ``attention_heads`` is the number of heads of every transformer (SD1.5's diffusers config calls this
    ``attention_head_dim = 8``); the head dimension is ``channels // attention_heads`` and must be a multiple
    of 8, at most 256.
    """

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    attention_heads: int = 8
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    transformer_layers_per_block: int = 1
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        self.validate()

    @classmethod
    def sd15(cls) -> UNetConfig:
        """Stable Diffusion 1.5's UNet: 4-channel 64x64 latents, 320/640/1280/1280, 8 heads, context 768."""
        return cls()

    @classmethod
    def digits(cls) -> UNetConfig:
        """The embedded 8x8 handwritten-digits model (one channel, context from the small text encoder)."""
        return cls(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            attention_heads=2,
            cross_attention_dim=64,
            norm_num_groups=8,
        )

    def validate(self) -> None:
        def pos_int(name: str, v: object) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"UNetConfig.{name} must be an int >= 1, got {v!r}")

        for name in ("sample_size", "in_channels", "out_channels", "layers_per_block", "attention_heads",
                     "cross_attention_dim", "norm_num_groups", "transformer_layers_per_block"):
            pos_int(name, getattr(self, name))
        n = len(self.block_out_channels)
        if n < 1:
            raise ValueError("UNetConfig.block_out_channels must have at least one entry")
        for name, types, allowed in (("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
                                     ("up_block_types", self.up_block_types, UP_BLOCK_TYPES)):
            if len(types) != n:
                raise ValueError(f"UNetConfig.{name} has {len(types)} entries; it must have one per "
                                 f"block_out_channels entry ({n})")
            for t in types:
                if t not in allowed:
                    raise ValueError(f"UNetConfig.{name}: unknown block type {t!r}; supported: {allowed}")
        for c in self.block_out_channels:
            pos_int("block_out_channels[i]", c)
            if c % self.norm_num_groups != 0:
                raise ValueError(f"UNetConfig.norm_num_groups={self.norm_num_groups} must divide every block "
                                 f"channel count, got {c}")
            hd = c // self.attention_heads
            if c % self.attention_heads != 0 or hd % 8 != 0 or hd > MAX_HEAD_DIM:
                raise ValueError(f"UNetConfig: {c} channels / attention_heads={self.attention_heads} must give "
                                 f"a head dim that is a multiple of 8 and at most {MAX_HEAD_DIM}")
        if self.block_out_channels[0] % 2 != 0:
            raise ValueError("UNetConfig.block_out_channels[0] (the timestep projection size) must be even")
        if not self.norm_eps > 0:
            raise ValueError(f"UNetConfig.norm_eps must be > 0, got {self.norm_eps}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """Build from :meth:`to_dict`'s output; unknown keys are a ValueError naming them."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown UNetConfig keys {unknown}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> UNetConfig:
        """Map a diffusers ``UNet2DConditionModel`` config (its ``config.json``) onto this structure.

        Raises ValueError for options this UNet does not implement (e.g. linear projections, class
        embeddings, a different mid block).
        """
        unsupported = {
            "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
            "mid_block_type": "UNetMidBlock2DCrossAttn", "time_embedding_type": "positional",
            "resnet_time_scale_shift": "default", "only_cross_attention": False, "dual_cross_attention": False,
            "upcast_attention": False, "center_input_sample": False, "encoder_hid_dim": None,
            "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "act_fn": "silu",
        }
        for key, expected in unsupported.items():
            if key in d and d[key] != expected and not (key == "upcast_attention" and d[key] is None):
                raise ValueError(f"diffusers config {key}={d[key]!r} is not supported (expected {expected!r})")
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        tl = d.get("transformer_layers_per_block", 1)
        for name, v in (("attention heads", heads), ("transformer_layers_per_block", tl)):
            if isinstance(v, (list, tuple)):
                if len(set(v)) != 1:
                    raise ValueError(f"per-block {name} {v} is not supported; all blocks must be equal")
        heads = heads[0] if isinstance(heads, (list, tuple)) else heads
        tl = tl[0] if isinstance(tl, (list, tuple)) else tl
        return cls(
            sample_size=d.get("sample_size") or 64,
            in_channels=d.get("in_channels", 4),
            out_channels=d.get("out_channels", 4),
            block_out_channels=tuple(d.get("block_out_channels", (320, 640, 1280, 1280))),
            down_block_types=tuple(d.get("down_block_types", cls.down_block_types)),
            up_block_types=tuple(d.get("up_block_types", cls.up_block_types)),
            layers_per_block=d.get("layers_per_block", 2),
            attention_heads=heads,
            cross_attention_dim=d.get("cross_attention_dim", 1280),
            norm_num_groups=d.get("norm_num_groups", 32),
            norm_eps=d.get("norm_eps", 1e-5),
            flip_sin_to_cos=d.get("flip_sin_to_cos", True),
            freq_shift=d.get("freq_shift", 0),
            transformer_layers_per_block=tl,
        )


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps: ``[B]`` -> ``[B, dim]`` float32 (DDPM / diffusers)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_1 -> SiLU -> linear_2``: ``[B, in_dim]`` -> ``[B, dim]``."""

    def __init__(self, in_dim: int, dim: int, **fk) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim, **fk)
        self.linear_2 = nn.Linear(dim, dim, **fk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GN+SiLU -> conv -> (+temb inside GN) GN+SiLU -> conv, plus a (1x1-conv) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, eps: float, **fk) -> None:
        super().__init__()
        self.norm1 = GroupNorm(groups, in_ch, eps, "silu", **fk)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, **fk)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch, **fk)
        self.norm2 = GroupNorm(groups, out_ch, eps, "silu", **fk)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, **fk)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1, **fk) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.norm2(h, add=self.time_emb_proj(F.silu(temb))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int, **fk) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2, **fk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, **fk) -> None:
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult, **fk), nn.Dropout(0.0), nn.Linear(dim * mult, dim, **fk)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention to the context, GEGLU feed-forward; residual around each."""

    def __init__(self, dim: int, heads: int, context_dim: int, **fk) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, **fk)
        self.attn1 = Attention(dim, heads, **fk)
        self.norm2 = nn.LayerNorm(dim, **fk)
        self.attn2 = Attention(dim, heads, context_dim, **fk)
        self.norm3 = nn.LayerNorm(dim, **fk)
        self.ff = FeedForward(dim, **fk)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """GroupNorm -> 1x1 conv -> transformer blocks over the H*W tokens -> 1x1 conv, plus the input."""

    def __init__(self, ch: int, heads: int, context_dim: int, groups: int, layers: int, **fk) -> None:
        super().__init__()
        self.norm = GroupNorm(groups, ch, 1e-6, None, **fk)
        self.proj_in = nn.Conv2d(ch, ch, 1, **fk)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(ch, heads, context_dim, **fk) for _ in range(layers)])
        self.proj_out = nn.Conv2d(ch, ch, 1, **fk)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)
        return self.proj_out(h) + x


class Downsample2D(nn.Module):
    def __init__(self, ch: int, **fk) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1, **fk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, ch: int, **fk) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1, **fk)

    def forward(self, x: torch.Tensor, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class DownBlock(nn.Module):
    """``CrossAttnDownBlock2D`` (with ``attentions``) or ``DownBlock2D`` (without)."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, temb_dim: int, cross: bool, downsample: bool,
                 **fk) -> None:
        super().__init__()
        n, g, eps = cfg.layers_per_block, cfg.norm_num_groups, cfg.norm_eps
        # Registration order as in diffusers (attentions, resnets, samplers): the same state-dict order.
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out_ch, cfg.attention_heads, cfg.cross_attention_dim, g,
                                cfg.transformer_layers_per_block, **fk) for _ in range(n)]) if cross else None
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_dim, g, eps, **fk) for i in range(n)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, **fk)]) if downsample else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """``CrossAttnUpBlock2D`` (with ``attentions``) or ``UpBlock2D`` (without); each resnet eats one skip."""

    def __init__(self, prev_ch: int, out_ch: int, in_ch: int, cfg: UNetConfig, temb_dim: int, cross: bool,
                 upsample: bool, **fk) -> None:
        super().__init__()
        n, g, eps = cfg.layers_per_block + 1, cfg.norm_num_groups, cfg.norm_eps
        resnets = []
        for i in range(n):
            skip_ch = in_ch if i == n - 1 else out_ch
            res_in = prev_ch if i == 0 else out_ch
            resnets.append(ResnetBlock2D(res_in + skip_ch, out_ch, temb_dim, g, eps, **fk))
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out_ch, cfg.attention_heads, cfg.cross_attention_dim, g,
                                cfg.transformer_layers_per_block, **fk) for _ in range(n)]) if cross else None
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch, **fk)]) if upsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor,
                size: Optional[tuple[int, int]]) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, ch: int, cfg: UNetConfig, temb_dim: int, **fk) -> None:
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.attentions = nn.ModuleList([Transformer2DModel(ch, cfg.attention_heads, cfg.cross_attention_dim, g,
                                                            cfg.transformer_layers_per_block, **fk)])
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb_dim, g, eps, **fk) for _ in range(2)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class UNet2DConditionModel(nn.Module):
    """Conditional UNet: ``forward(sample [B, C_in, H, W], timestep [B], encoder_hidden_states [B, L, D_ctx])
    -> [B, C_out, H, W]`` in ``sample``'s dtype.

    ``timestep`` is a float tensor (fractional timesteps allowed; a 0-dim tensor is broadcast to the batch).
    ``H`` and ``W`` may be any size >= 1; the up path resizes to each skip's size.

    Args:
        config: a :class:`UNetConfig` (``UNetConfig.sd15()``, ``UNetConfig.digits()``, ...).
        device, dtype: where and in which dtype to create the parameters (``device="meta"`` builds the
            structure without memory).
    """

    def __init__(self, config: UNetConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"config must be a UNetConfig, got {type(config).__name__}")
        self.config = config
        fk = dict(device=device, dtype=dtype)
        ch = config.block_out_channels
        temb_dim = ch[0] * 4
        g, eps = config.norm_num_groups, config.norm_eps
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1, **fk)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim, **fk)
        n = len(ch)
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()  # registered before mid_block, as in diffusers (state-dict order)
        out = ch[0]
        for i, t in enumerate(config.down_block_types):
            inp, out = out, ch[i]
            self.down_blocks.append(DownBlock(inp, out, config, temb_dim, t == "CrossAttnDownBlock2D",
                                              downsample=i < n - 1, **fk))
        self.mid_block = UNetMidBlock2DCrossAttn(ch[-1], config, temb_dim, **fk)
        rev = list(reversed(ch))
        out = rev[0]
        for i, t in enumerate(config.up_block_types):
            prev, out = out, rev[i]
            inp = rev[min(i + 1, n - 1)]
            self.up_blocks.append(UpBlock(prev, out, inp, config, temb_dim, t == "CrossAttnUpBlock2D",
                                          upsample=i < n - 1, **fk))
        self.conv_norm_out = GroupNorm(g, ch[0], eps, "silu", **fk)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, 3, padding=1, **fk)

    @classmethod
    def from_pretrained(cls, folder: Union[str, os.PathLike], subfolder: Optional[str] = None, *,
                        variant: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                        dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
        """Load a diffusers ``UNet2DConditionModel`` folder (``config.json`` + safetensors weights).

        ``UNet2DConditionModel.from_pretrained("path/to/sd15", subfolder="unet")`` reads a pipeline folder as
        written by diffusers' ``save_pretrained``; without ``subfolder`` ``folder`` is the UNet's own folder.
        Weights are read with safetensors only (``diffusion_pytorch_model[.variant].safetensors``, or the
        shards listed in ``diffusion_pytorch_model.safetensors.index[.variant].json``); nothing is unpickled.

        Args:
            folder: a local folder.
            subfolder: the UNet's folder inside ``folder`` (``"unet"`` in a pipeline folder).
            variant: the weights' variant (``"fp16"`` reads ``diffusion_pytorch_model.fp16.safetensors``), named
                as diffusers' ``save_pretrained(variant=...)`` names it.
            device, dtype: where and in which dtype the parameters end up.

        Raises:
            FileNotFoundError: no such folder, no ``config.json``, or no safetensors weights (the message says
                when only pickled ``.bin`` weights are there).
            ValueError: a config this UNet does not implement (the message names the config key and value), or
                weights that do not fit the config (missing, unexpected or misshapen tensors, named).
        """
        from safetensors.torch import load_file

        root = Path(folder) / subfolder if subfolder else Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"{str(root)!r} is not a folder (folder={str(folder)!r}, subfolder={subfolder!r})")
        config_path = root / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{str(root)!r} has no config.json: not a diffusers model folder")
        with open(config_path) as f:
            raw = json.load(f)
        try:
            config = UNetConfig.from_diffusers(_supported_diffusers_unet_config(raw))
        except ValueError as e:
            raise ValueError(f"{config_path}: {e}") from None
        files = _safetensors_files(root, variant)
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(str(file), device=str(device)))
        with torch.device("meta"):
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        misshapen = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})" for k in expected
                     if k in state and tuple(state[k].shape) != expected[k]]
        for what, names in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
            if names:
                more = f" and {len(names) - 5} more" if len(names) > 5 else ""
                raise ValueError(f"{root}: the weights do not fit the config: {len(names)} {what} tensor(s): "
                                 f"{', '.join(names[:5])}{more}")
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device=device, dtype=dtype).eval()

    def set_backend(self, backend: Optional[str] = None, *, group_norm: Optional[str] = None,
                    attention: Optional[str] = None) -> UNet2DConditionModel:
        """Choose the ops' backends: ``backend`` for both, or per op.

        ``group_norm``: ``"auto" | "torch" | "triton" | "cuda" | "eager"`` (``"eager"`` is ``F.group_norm``
        then ``F.silu``, the plain-PyTorch baseline). ``attention``: ``"auto" | "torch" | "triton" | "cuda" |
        "sdpa"`` (``"sdpa"`` is ``F.scaled_dot_product_attention``). Returns ``self``.
        """
        set_op_backends(self, backend, group_norm=group_norm, attention=attention)
        return self

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4 or sample.shape[1] != cfg.in_channels:
            shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
            raise ValueError(f"sample must be [B, {cfg.in_channels}, H, W], got {shape}")
        B = sample.shape[0]
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(timestep, dtype=torch.float32, device=sample.device)
        if timestep.dim() == 0:
            timestep = timestep.expand(B)
        if tuple(timestep.shape) != (B,):
            raise ValueError(f"timestep must be [B]=({B},) or a scalar, got {tuple(timestep.shape)}")
        ctx = encoder_hidden_states
        if (not isinstance(ctx, torch.Tensor) or ctx.dim() != 3 or ctx.shape[0] != B
                or ctx.shape[2] != cfg.cross_attention_dim):
            shape = tuple(ctx.shape) if isinstance(ctx, torch.Tensor) else type(ctx).__name__
            raise ValueError(f"encoder_hidden_states must be [B, L, {cfg.cross_attention_dim}] with B={B}, "
                             f"got {shape}")
        dtype = self.conv_in.weight.dtype
        x = sample.to(dtype)
        ctx = ctx.to(dtype)
        t_emb = timestep_embedding(timestep.to(sample.device), cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                   cfg.freq_shift)
        temb = self.time_embedding(t_emb.to(dtype))

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, temb, ctx)
            skips.extend(s)
        x = self.mid_block(x, temb, ctx)
        for block in self.up_blocks:
            mine = skips[len(skips) - len(block.resnets):]
            del skips[len(skips) - len(block.resnets):]
            size = tuple(skips[-1].shape[-2:]) if skips else None
            x = block(x, mine, temb, ctx, size)
        x = self.conv_out(self.conv_norm_out(x))
        return x.to(sample.dtype)


# ----------------------------------------------------------------------------------------------------------
# Loading diffusers folders
# ----------------------------------------------------------------------------------------------------------

# diffusers UNet2DConditionModel config keys that UNetConfig.from_diffusers reads or checks itself.
_DIFFUSERS_MAPPED = frozenset({
    "sample_size", "in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
    "layers_per_block", "attention_head_dim", "num_attention_heads", "cross_attention_dim", "norm_num_groups",
    "norm_eps", "flip_sin_to_cos", "freq_shift", "transformer_layers_per_block", "use_linear_projection",
    "class_embed_type", "addition_embed_type", "mid_block_type", "time_embedding_type", "resnet_time_scale_shift",
    "only_cross_attention", "dual_cross_attention", "upcast_attention", "center_input_sample", "encoder_hid_dim",
    "time_cond_proj_dim", "conv_in_kernel", "conv_out_kernel", "act_fn",
})
# The other keys, with the values this UNet implements (what diffusers does when the key is at its default).
_DIFFUSERS_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "downsample_padding": (1,), "mid_block_scale_factor": (1, 1.0), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0), "time_embedding_dim": (None,), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "attention_type": ("default",), "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,), "num_class_embeds": (None,), "encoder_hid_dim_type": (None,),
    "reverse_transformer_layers_per_block": (None,), "mid_block_only_cross_attention": (None, False),
}
# Keys that only matter together with an option that is checked elsewhere (dropout: inference only).
_DIFFUSERS_IRRELEVANT = frozenset({"dropout", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                                   "addition_embed_type_num_heads"})


def _supported_diffusers_unet_config(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (a diffusers ``config.json``) without its ``_`` metadata, after checking that every key is one this
    UNet implements at that value; ValueError naming each key that is not."""
    name = raw.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        raise ValueError(f"_class_name={name!r}: this folder holds a {name}, not a UNet2DConditionModel")
    config = {k: v for k, v in raw.items() if not k.startswith("_")}
    problems = []
    for key, value in config.items():
        if key in _DIFFUSERS_MAPPED or key in _DIFFUSERS_IRRELEVANT:
            continue
        allowed = _DIFFUSERS_NEUTRAL.get(key)
        if allowed is None:
            problems.append(f"{key}={value!r} (a key this UNet does not know)")
        elif value not in allowed:
            problems.append(f"{key}={value!r} (supported: {' or '.join(map(repr, allowed))})")
    if problems:
        raise ValueError(f"diffusers config not supported by diffusion_fast's UNet: {'; '.join(problems)}")
    return config


def _safetensors_files(root: Path, variant: Optional[str]) -> list[Path]:
    """The safetensors file(s) of a diffusers model folder: one file, or the shards its index lists."""
    def named(name: str) -> Path:  # diffusers puts the variant before the last suffix
        if variant:
            head, _, tail = name.rpartition(".")
            name = f"{head}.{variant}.{tail}"
        return root / name

    single = named("diffusion_pytorch_model.safetensors")
    if single.is_file():
        return [single]
    index = named("diffusion_pytorch_model.safetensors.index.json")
    if index.is_file():
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [root / s for s in shards]
        for file in files:
            if file.parent != root or not file.is_file():
                raise FileNotFoundError(f"{index} lists shard {file.name!r}, which is not in {str(root)!r}")
        return files
    pickled = sorted(p.name for p in root.glob("*.bin"))
    if pickled:
        raise FileNotFoundError(f"{str(root)!r} has only pickled weights ({', '.join(pickled)}); diffusion_fast "
                                "reads safetensors only and never unpickles: re-save the model with diffusers' "
                                "save_pretrained(..., safe_serialization=True)")
    raise FileNotFoundError(f"{str(root)!r} has no {single.name} (nor {index.name})")
