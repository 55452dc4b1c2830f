"""Random-weight diffusers pipelines built from configs, at full size and tiny: for tests and benchmarks.

Nothing here downloads anything. The full-size configs are those the published checkpoints ship
(``unet/config.json``, ``transformer/config.json``, ``vae/config.json``); the tiny ones keep the same layout
(block types, attention kinds, conditioning) with a few channels, so a CPU runs a whole pipeline in
milliseconds, and every attention head dim is a multiple of 8 (so :func:`diffusion_fast.ops.attention`
serves it).

* :func:`pipeline` — ``pipeline("sd15", size="tiny")`` builds a stock diffusers pipeline (``sd15``,
  ``sd15-img2img``, ``sdxl``, ``sdxl-img2img``, ``flux``, ``flux-img2img``, ``sd3``, ``sd3-img2img``,
  ``pixart-sigma``) with random weights drawn from a seeded generator, so the same call gives the same
  weights. ``init="fast"`` builds the parameters on the meta device and draws them on the target device
  (:func:`fill_random`): a full-size Flux transformer (12 B parameters) is ready on a GPU in seconds.
* :func:`word_tokenizer` — a CLIP tokenizer whose vocabulary is the 256 byte symbols (no merges, no files
  to fetch): any prompt tokenizes, one token per character.
* :func:`conditioning` — random text conditioning of the right shapes (and the call options) for a
  pipeline built without text encoders (the transformer pipelines: their T5 encoders are what this avoids).

UNet pipelines (SD1.5, SDXL) get tiny random CLIP text encoders with :func:`word_tokenizer`, so they take
prompts as strings. Transformer pipelines are built without text encoders (``text_encoder=None`` ...); call
them with ``prompt_embeds`` / ``pooled_prompt_embeds`` (and the negative ones for CFG) from
:func:`conditioning`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import Any

import torch

PIPELINES = ("sd15", "sd15-img2img", "sdxl", "sdxl-img2img", "flux", "flux-img2img", "sd3", "sd3-img2img",
             "pixart-sigma")
SIZES = ("tiny", "full")

# --------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------

_SD_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                 "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
_SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                   "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "interpolation_type": "linear",
                   "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
                   "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
                   "trained_betas": None, "use_karras_sigmas": False}
_FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
                   "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000,
                   "shift": 3.0, "use_dynamic_shifting": True}
_SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
_PIXART_SCHEDULER = {"_class_name": "DPMSolverMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear",
                     "beta_start": 0.0001, "num_train_timesteps": 1000, "prediction_type": "epsilon",
                     "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                     "lower_order_final": True, "timestep_spacing": "linspace", "steps_offset": 0,
                     "use_karras_sigmas": False, "trained_betas": None}

_UNET = {
    ("sd15", "full"): dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
    ("sd15", "tiny"): dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8),
    ("sdxl", "full"): dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32),
    ("sdxl", "tiny"): dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8),
}

_VAE = {
    "full": dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 latent_channels=4, norm_num_groups=32, sample_size=512),
    "tiny": dict(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 latent_channels=4, norm_num_groups=4, sample_size=16),
}

_TRANSFORMER = {
    ("flux", "full"): dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                           num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                           guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    ("flux", "tiny"): dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                           guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    ("sd3", "full"): dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                          num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                          pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
    ("sd3", "tiny"): dict(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                          num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                          pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16),
    ("pixart-sigma", "full"): dict(sample_size=128, num_layers=28, attention_head_dim=72, num_attention_heads=16,
                                   in_channels=4, out_channels=8, patch_size=2, cross_attention_dim=1152,
                                   caption_channels=4096, norm_type="ada_norm_single", norm_elementwise_affine=False,
                                   norm_eps=1e-6, use_additional_conditions=False, interpolation_scale=None),
    ("pixart-sigma", "tiny"): dict(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                   in_channels=4, out_channels=8, patch_size=2, cross_attention_dim=16,
                                   caption_channels=32, norm_type="ada_norm_single", norm_elementwise_affine=False,
                                   norm_eps=1e-6, use_additional_conditions=False, interpolation_scale=None),
}

# Text conditioning shapes without text encoders: (sequence length, width, pooled width) per pipeline family.
_TEXT = {
    ("flux", "full"): (512, 4096, 768), ("flux", "tiny"): (7, 32, 32),
    ("sd3", "full"): (333, 4096, 2048), ("sd3", "tiny"): (7, 32, 64),
    ("pixart-sigma", "full"): (300, 4096, None), ("pixart-sigma", "tiny"): (7, 32, None),
}

# The full flux / sd3 VAEs have 16 latent channels (flux packs 2x2 patches of them: 64 transformer channels);
# the tiny ones keep 4, as the tiny transformers expect (flux: 16 = 4 x 2 x 2).
_VAE_LATENT = {("flux", "full"): 16, ("sd3", "full"): 16, ("flux", "tiny"): 4, ("sd3", "tiny"): 4}
_VAE_SHIFT = {"flux": (0.3611, 0.1159), "sd3": (1.5305, 0.0609)}  # (scaling_factor, shift_factor)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _family(name: str) -> str:
    return name.split("-img2img")[0]


def unet_config(name: str, size: str = "tiny") -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config of ``name`` ("sd15" or "sdxl") at ``size`` ("tiny" or "full")."""
    _check_choice("size", size, SIZES)
    return dict(_UNET[(_check_choice("name", _family(name), ("sd15", "sdxl")), size)])


def transformer_config(name: str, size: str = "tiny") -> dict[str, Any]:
    """The transformer config of ``name`` ("flux", "sd3" or "pixart-sigma") at ``size``."""
    _check_choice("size", size, SIZES)
    return dict(_TRANSFORMER[(_check_choice("name", _family(name), ("flux", "sd3", "pixart-sigma")), size)])


def scheduler_config(name: str) -> dict[str, Any]:
    """The scheduler config the published checkpoint of ``name`` ships (SD1.5's is a PNDMScheduler)."""
    family = _check_choice("name", _family(name), ("sd15", "sdxl", "flux", "sd3", "pixart-sigma"))
    return dict({"sd15": _SD_SCHEDULER, "sdxl": _SDXL_SCHEDULER, "flux": _FLUX_SCHEDULER, "sd3": _SD3_SCHEDULER,
                 "pixart-sigma": _PIXART_SCHEDULER}[family])


# --------------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------------


INITS = ("module", "fast")


@contextlib.contextmanager
def _parameters_on_meta():
    """While active, every parameter a module registers is moved to the meta device (no memory, and the
    module's own init functions run on it as no-ops); buffers stay where they are built, with their values
    (position tables and the like are computed in ``__init__``, not drawn)."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(self, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


@torch.no_grad()
def fill_random(model: torch.nn.Module, *, seed: int, dtype: torch.dtype,
                device: torch.device | str) -> torch.nn.Module:
    """Give every parameter of ``model`` that lives on the meta device random values on ``device``, in place.

    Parameters are drawn in ``named_modules`` order from one ``torch.Generator`` on ``device`` seeded with
    ``seed``, directly in ``dtype`` (no float32 copy), at a scale that keeps activations of order one through
    a deep stack of blocks: a weight of two or more dims (linear, convolution, embedding tables such as
    PixArt's ``scale_shift_table``) ``N(0, 1/fan_in)`` with ``fan_in`` the product of its trailing dims, and
    the bias of such a layer likewise; a one-dim ``weight`` (LayerNorm, RMSNorm, GroupNorm) ``1 + N(0, 0.1^2)``
    and any other one-dim parameter ``N(0, 0.1^2)`` — not exactly one and zero, so a kernel that drops a norm's
    affine parameters shows up in a comparison. Tied parameters stay tied. The same seed, device, dtype and
    module gives the same values (a CUDA generator draws other numbers than a CPU one).

    Returns ``model``, its parameters on ``device`` in ``dtype`` (``requires_grad`` as they were).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    done: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if id(p) in done:
                module._parameters[name] = done[id(p)]
                continue
            t = torch.empty(p.shape, dtype=dtype, device=device)
            if p.ndim >= 2:
                t.normal_(0.0, max(1, math.prod(p.shape[1:])) ** -0.5, generator=gen)
            elif name == "bias" and getattr(module, "weight", None) is not None and module.weight.ndim >= 2:
                t.normal_(0.0, max(1, math.prod(module.weight.shape[1:])) ** -0.5, generator=gen)
            elif name == "weight":
                t.normal_(1.0, 0.1, generator=gen)
            else:
                t.normal_(0.0, 0.1, generator=gen)
            new = torch.nn.Parameter(t, requires_grad=p.requires_grad)
            done[id(p)] = module._parameters[name] = new
    return model


def _build(factory, seed: int, dtype: torch.dtype, device, init: str = "module"):
    if init == "fast":
        with torch.device("cpu"), _parameters_on_meta():
            model = factory()
        fill_random(model, seed=seed, dtype=dtype, device=device)
        return model.to(device=device, dtype=dtype).eval()  # the buffers, built on the host
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    model = model.to(device=device) if dtype == torch.float32 else model.to(device=device, dtype=dtype)
    return model.eval()


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP byte-level BPE's printable stand-in for each of the 256 bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def word_tokenizer(model_max_length: int = 77):
    """A CLIP tokenizer over the 256 byte symbols and no merges: every character is one token.

    Written to a temporary folder and loaded from there (transformers reads vocabularies from files);
    ids 0..255 are the bytes, 256..511 the same with the end-of-word mark, 512 / 513 start / end of text.
    """
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"),
                             model_max_length=model_max_length, pad_token="<|endoftext|>")


def _clip(hidden: int, projection: bool, seed: int, dtype, device, layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=hidden,
                         intermediate_size=2 * hidden, num_attention_heads=4, num_hidden_layers=layers,
                         projection_dim=hidden, vocab_size=514, max_position_embeddings=77, hidden_act="gelu")
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return _build(lambda: cls(cfg), seed, dtype, device)


def _override(cfg: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    for key, value in (overrides or {}).items():
        if key not in cfg:
            raise ValueError(f"overrides: {key!r} is not a key of this denoiser's config; keys: {', '.join(cfg)}")
        cfg[key] = value
    return cfg


def _vae(size: str, family: str, seed: int, dtype, device, init: str = "module"):
    from diffusers import AutoencoderKL

    cfg = dict(_VAE[size])
    if family in ("flux", "sd3"):
        cfg["latent_channels"] = _VAE_LATENT[(family, size)]
        cfg["scaling_factor"], cfg["shift_factor"] = _VAE_SHIFT[family]
        cfg["use_quant_conv"] = cfg["use_post_quant_conv"] = False
    elif family == "sdxl":
        cfg["scaling_factor"] = 0.13025
    return _build(lambda: AutoencoderKL(**cfg), seed, dtype, device, init)


def pipeline(name: str, size: str = "tiny", *, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
             text_encoders: bool | None = None, init: str = "module", overrides: dict[str, Any] | None = None):
    """A stock diffusers pipeline with random weights (the same for the same ``seed``).

    Args:
        name: one of :data:`PIPELINES`.
        size: "tiny" (a few channels; runs on a CPU in milliseconds) or "full" (the published architecture;
            billions of parameters for flux — build it on a GPU).
        dtype, device: where the weights live.
        seed: seeds the weight initialisation of every component.
        text_encoders: build random CLIP text encoders with :func:`word_tokenizer` (default: True for the
            tiny UNet pipelines, False otherwise; the transformer pipelines never get them — pass
            :func:`conditioning`).
        init: how the denoiser and the VAE get their weights: "module" (each module's own init rule, drawn
            from the global RNG seeded with ``seed``, built where the caller's default device is) or "fast"
            (parameters built on the meta device and drawn on ``device`` in ``dtype`` by :func:`fill_random`;
            the way to build a full-size Flux or SD3). The tiny text encoders always use their own rule.
        overrides: config keys of the denoiser (UNet or transformer) to replace, e.g.
            ``{"num_layers": 4, "num_single_layers": 8}`` for a Flux-shaped transformer with fewer blocks.

    Returns:
        The diffusers pipeline (``StableDiffusionPipeline``, ``StableDiffusionImg2ImgPipeline``,
        ``StableDiffusionXLPipeline``, ``StableDiffusionXLImg2ImgPipeline``, ``FluxPipeline``,
        ``FluxImg2ImgPipeline``, ``StableDiffusion3Pipeline``, ``StableDiffusion3Img2ImgPipeline`` or
        ``PixArtSigmaPipeline``), progress bar off, safety checker none.
    """
    import diffusers

    _check_choice("name", name, PIPELINES)
    _check_choice("size", size, SIZES)
    _check_choice("init", init, INITS)
    family = _family(name)
    img2img = name.endswith("-img2img")
    unet_family = family in ("sd15", "sdxl")
    if text_encoders is None:
        text_encoders = unet_family and size == "tiny"
    if text_encoders and not unet_family:
        raise ValueError(f"text_encoders=True is only available for the UNet pipelines (sd15, sdxl), not {name!r}; "
                         "pass the keyword arguments of diffusion_fast.integrations.diffusers.configs.conditioning")
    sched_cfg = scheduler_config(family)
    scheduler_cls = getattr(diffusers, sched_cfg.pop("_class_name"))
    scheduler = scheduler_cls.from_config(sched_cfg)
    vae = _vae(size, family, seed + 1, dtype, device, init)
    parts: dict[str, Any] = {"scheduler": scheduler, "vae": vae}
    if unet_family:
        ucfg = _override(unet_config(family, size), overrides)
        parts["unet"] = _build(lambda: diffusers.UNet2DConditionModel(**ucfg), seed, dtype, device, init)
        hidden = {"tiny": 32, "full": 768}[size]
        te = tok = te2 = tok2 = None
        if text_encoders:
            tok = word_tokenizer()
            te = _clip(hidden, False, seed + 2, dtype, device)
            if family == "sdxl":
                tok2 = word_tokenizer()
                te2 = _clip(hidden, True, seed + 3, dtype, device)
        parts.update(text_encoder=te, tokenizer=tok)
        if family == "sd15":
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
        else:
            parts.update(text_encoder_2=te2, tokenizer_2=tok2)
            cls = diffusers.StableDiffusionXLImg2ImgPipeline if img2img else diffusers.StableDiffusionXLPipeline
    else:
        models = {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel",
                  "pixart-sigma": "PixArtTransformer2DModel"}
        model_cls = getattr(diffusers, models[family])
        tcfg = _override(transformer_config(family, size), overrides)
        parts["transformer"] = _build(lambda: model_cls(**tcfg), seed, dtype, device, init)
        if family == "flux":
            parts.update(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
            cls = diffusers.FluxImg2ImgPipeline if img2img else diffusers.FluxPipeline
        elif family == "sd3":
            parts.update(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                         text_encoder_3=None, tokenizer_3=None)
            cls = diffusers.StableDiffusion3Img2ImgPipeline if img2img else diffusers.StableDiffusion3Pipeline
        else:
            parts.update(text_encoder=None, tokenizer=None)
            cls = diffusers.PixArtSigmaPipeline
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def conditioning(name: str, size: str = "tiny", *, batch: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32,
                  device="cpu") -> dict[str, torch.Tensor]:
    """Keyword arguments that stand in for the prompt of a transformer pipeline built without text encoders.

    Returns random ``prompt_embeds`` ``[batch, S, C]`` and, for flux and sd3, ``pooled_prompt_embeds``
    ``[batch, P]``; for sd3 and pixart-sigma also the ``negative_*`` ones (their pipelines run
    classifier-free guidance); for pixart-sigma the attention masks (all ones) and
    ``use_resolution_binning=False`` (its bins are for the published sample sizes only) and
    ``negative_prompt=None``.
    """
    family = _check_choice("name", _family(name), ("flux", "sd3", "pixart-sigma"))
    _check_choice("size", size, SIZES)
    seq, width, pooled = _TEXT[(family, size)]
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    out = {"prompt_embeds": r(batch, seq, width)}
    if pooled is not None:
        out["pooled_prompt_embeds"] = r(batch, pooled)
    if family in ("sd3", "pixart-sigma"):
        out["negative_prompt_embeds"] = r(batch, seq, width)
        if pooled is not None:
            out["negative_pooled_prompt_embeds"] = r(batch, pooled)
    if family == "pixart-sigma":
        ones = torch.ones(batch, seq, dtype=torch.long, device=device)
        out["prompt_attention_mask"] = ones
        out["negative_prompt_attention_mask"] = ones.clone()
        out["use_resolution_binning"] = False
        out["negative_prompt"] = None  # its default "" would clash with negative_prompt_embeds
    return out
