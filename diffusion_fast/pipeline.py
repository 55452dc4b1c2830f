"""Text to image: prompt -> tokens -> context, noise -> ``diffusion_fast.sample`` -> PIL images.

    from diffusion_fast import Pipeline
    pipe = Pipeline.from_pretrained("digits")
    out = pipe("a handwritten seven", seed=7)
    out.images[0].resize((256, 256), resample=0).save("seven.png")

A model folder holds ``config.json`` (see :data:`FORMAT`) and ``model.safetensors`` (``unet.*`` and
``text_encoder.*`` tensors). Weights are read with safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .models.text import TextConfig, TextEncoder, WordTokenizer
from .models.unet import UNet2DConditionModel, UNetConfig
from .ops.registry import BACKENDS
from .schedules.formulas import SCHEDULES as _ALL_SCHEDULES

FORMAT = "diffusion_fast.pipeline/1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BUILTIN_MODELS = ("digits",)
PREDICTIONS = ("v_prediction", "epsilon", "sample")
# The schedules a pipeline builds for its (VE) model: every closed form but rectified flow's.
SCHEDULES = tuple(s for s in _ALL_SCHEDULES if s != "flow")


def timestep_from_sigma(sigma: torch.Tensor, scale: float) -> torch.Tensor:
    """The UNet's timestep for noise level ``sigma``: ``scale * ln(sigma) / 4`` (EDM's ``c_noise``, scaled so
    the sinusoidal embedding sees a range like DDPM's 0..1000). ``sigma``: ``[B]`` -> ``[B]`` float32."""
    return torch.log(sigma.float()) * (scale / 4.0)


@dataclass
class TrajectoryStep:
    """One sampler step: the state after it (``x``, at ``sigma_next``) and the step's denoised estimate.

    ``x`` and ``denoised`` are float32 CPU tensors ``[K, C, H, W]`` in model space (unit-std pixels)."""

    i: int
    sigma: float
    sigma_next: float
    x: torch.Tensor
    denoised: torch.Tensor


@dataclass
class PipelineOutput:
    """What a pipeline call returns.

    Attributes:
        images: ``K`` PIL images (mode ``"L"``) at the model's native size.
        samples: ``[K, C, H, W]`` float32 in ``[0, 1]`` (0 = empty, 1 = full intensity of the data).
        seed: the seed the noise was drawn from (drawn at random when none was given), or None when a
            ``generator`` was passed.
        trajectory: with ``return_trajectory=True``, the initial noise (``i = -1``) and every step.
    """

    images: list
    samples: torch.Tensor
    seed: Optional[int] = None
    trajectory: Optional[list[TrajectoryStep]] = field(default=None, repr=False)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _resolve_model_dir(name_or_path: Union[str, os.PathLike]) -> Path:
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_MODELS:
        return WEIGHTS_DIR / name_or_path
    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(f"{str(name_or_path)!r} is neither a built-in model {BUILTIN_MODELS} nor a folder "
                                "with config.json and model.safetensors")
    for f in ("config.json", "model.safetensors"):
        if not (path / f).is_file():
            raise FileNotFoundError(f"model folder {str(path)!r} has no {f}")
    return path


class Pipeline:
    """Prompt + seed -> image, driving :func:`diffusion_fast.sample` with classifier-free guidance.

    Args:
        unet: the denoising network, called as ``unet(x, timestep, context)``.
        text_encoder, tokenizer: turn prompts into the ``[B, L, D]`` context.
        config: the model folder's ``config.json`` as a dict (pixel scaling, noise range, prediction type,
            defaults).
        device: where to run.
        backend: the ops' backend for the UNet, the text encoder and the sampler step (``"auto"``,
            ``"torch"``, ``"triton"``, ``"cuda"``).
        dtype: the networks' dtype (sampler state stays float32). Default float32.
        cuda_graph: forwarded to ``sample(..., cuda_graph=True)`` when True.
    """

    def __init__(self, unet: UNet2DConditionModel, text_encoder: TextEncoder, tokenizer: WordTokenizer,
                 config: dict[str, Any], *, device: Union[str, torch.device] = "cpu", backend: str = "auto",
                 dtype: Optional[torch.dtype] = None, cuda_graph: bool = False) -> None:
        if not isinstance(backend, str) or backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
        if config.get("format") != FORMAT:
            raise ValueError(f"config format must be {FORMAT!r}, got {config.get('format')!r}")
        if config.get("prediction") not in PREDICTIONS:
            raise ValueError(f"config prediction must be one of {PREDICTIONS}, got {config.get('prediction')!r}")
        self.config = config
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # A generator made for "cuda" reports "cuda:<current>"; name the index so they compare equal.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = torch.float32 if dtype is None else dtype
        self.backend = backend
        self.cuda_graph = bool(cuda_graph)
        self.tokenizer = tokenizer
        self.unet = unet.to(self.device, self.dtype).eval().set_backend(backend)
        self.text_encoder = text_encoder.to(self.device, self.dtype).eval().set_backend(backend)
        self.prediction = config["prediction"]
        self.timestep_scale = float(config["timestep_scale"])
        self.sigma_min = float(config["sigma_min"])
        self.sigma_max = float(config["sigma_max"])
        self.rho = float(config.get("rho", 7.0))
        pix = config["pixels"]
        self.pixel_mean, self.pixel_std = float(pix["mean"]), float(pix["std"])
        self.pixel_max, self.invert = float(pix["max_value"]), bool(pix.get("invert", False))
        self.defaults = dict(config.get("defaults", {}))

    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, os.PathLike] = "digits", *,
                        device: Union[str, torch.device] = "cpu", backend: str = "auto",
                        dtype: Optional[torch.dtype] = None, cuda_graph: bool = False) -> Pipeline:
        """Load a built-in model (``"digits"``) or a local folder with ``config.json`` + ``model.safetensors``."""
        from safetensors.torch import load_file

        path = _resolve_model_dir(name_or_path)
        config = json.loads((path / "config.json").read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"{path / 'config.json'}: format must be {FORMAT!r}, got {config.get('format')!r}")
        tokenizer = WordTokenizer.from_dict(config["tokenizer"])
        unet = UNet2DConditionModel(UNetConfig.from_dict(config["unet"]))
        text = TextEncoder(TextConfig.from_dict(config["text_encoder"]))
        tensors = load_file(str(path / "model.safetensors"))
        parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}}
        for k, v in tensors.items():
            prefix, _, rest = k.partition(".")
            if prefix not in parts:
                raise ValueError(f"{path / 'model.safetensors'}: unexpected tensor {k!r} (expected unet.* or "
                                 "text_encoder.*)")
            parts[prefix][rest] = v
        unet.load_state_dict(parts["unet"], strict=True)
        text.load_state_dict(parts["text_encoder"], strict=True)
        return cls(unet, text, tokenizer, config, device=device, backend=backend, dtype=dtype,
                   cuda_graph=cuda_graph)

    # -- conversions -------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """``B`` prompts -> context ``[B, L, D]`` (ValueError for an unknown word, listing the vocabulary)."""
        ids = self.tokenizer(list(prompts)).to(self.device)
        with torch.no_grad():
            return self.text_encoder(ids)

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space pixels ``[..]`` -> ``[0, 1]`` intensities (clamped), float32."""
        return ((x.float() * self.pixel_std + self.pixel_mean) / self.pixel_max).clamp(0.0, 1.0)

    def to_pil(self, unit: torch.Tensor) -> list:
        """``[K, C, H, W]`` intensities in ``[0, 1]`` -> K PIL images (``"L"`` for one channel, else ``"RGB"``)."""
        from PIL import Image

        v = 1.0 - unit if self.invert else unit
        arr = (v * 255.0).round().to(torch.uint8).cpu()
        out = []
        for img in arr:
            if img.shape[0] == 1:
                out.append(Image.fromarray(img[0].numpy(), mode="L"))
            else:
                out.append(Image.fromarray(img[:3].permute(1, 2, 0).contiguous().numpy(), mode="RGB"))
        return out

    def sigmas(self, steps: int, schedule: str = "karras") -> torch.Tensor:
        """The noise levels of ``schedule`` (one of :data:`SCHEDULES`, default Karras) for ``steps`` steps over
        the model's range: ``[steps + 1]`` float64, ending in 0 (ComfyUI's ``ddim_uniform`` / ``beta`` can give
        one step more or fewer). The table schedulers pick from the model's log-uniform table of 1000 levels
        between ``sigma_min`` and ``sigma_max`` (what ComfyUI keeps for a continuous-sigma model); the Align
        Your Steps tables are the published ones (tuned for their models' ranges)."""
        from . import schedules

        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
        if schedule in ("karras", "polyexponential"):
            rho = self.rho if schedule == "karras" else 1.0
            return getattr(schedules, schedule)(steps, self.sigma_min, self.sigma_max, rho)
        if schedule == "exponential":
            return schedules.exponential(steps, self.sigma_min, self.sigma_max)
        if schedule.startswith("ays_"):
            return schedules.align_your_steps(steps, schedule[4:])
        return schedules.get(schedule, steps, model_sigmas=schedules.edm_sigmas(self.sigma_min, self.sigma_max))

    # -- sampling ----------------------------------------------------------------------------------------
    def _denoiser(self) -> Callable[..., torch.Tensor]:
        unet, scale = self.unet, self.timestep_scale

        def model(x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return unet(x, timestep_from_sigma(sigma, scale), context)

        return model

    def __call__(
        self,
        prompt: Union[str, Sequence[str]],
        negative_prompt: Optional[str] = None,
        steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        seed: Optional[int] = None,
        sampler: Optional[str] = None,
        schedule: Optional[str] = None,
        num_images: int = 1,
        generator: Optional[torch.Generator] = None,
        callback: Optional[Callable[[dict], None]] = None,
        progress: bool = True,
        return_trajectory: bool = False,
        cuda_graph: Optional[bool] = None,
    ) -> PipelineOutput:
        """Generate ``num_images`` images per prompt.

        Args:
            prompt: one prompt or a list of prompts (``K = len(prompts) * num_images`` images in all).
            negative_prompt: replaces the empty prompt as the unconditional half of guidance.
            steps: sampler steps (default from the model config, 20 for digits).
            guidance_scale: classifier-free guidance scale ``g`` (``uncond + g * (cond - uncond)``); 1 runs
                the conditional model alone (and ignores ``negative_prompt``). Default from the model config.
            seed: the noise seed; same seed, device and backend give a bit-identical image.
            sampler: a name from ``diffusion_fast.SAMPLERS`` (default ``"dpmpp_2m"``).
            schedule: a name from :data:`SCHEDULES` (default ``"karras"``); see :meth:`sigmas`.
            num_images: images per prompt, each from different noise.
            generator: a ``torch.Generator`` on the pipeline's device instead of ``seed``.
            callback: called after each step with the sampler's dict (``x``, ``i``, ``sigma``, ``sigma_next``,
                ``denoised``).
            progress: show a progress bar.
            return_trajectory: also return every step's state and denoised estimate (``.trajectory``).
            cuda_graph: capture the sampling loop as a CUDA graph (default: the pipeline's setting).

        Returns:
            :class:`PipelineOutput` with ``.images`` (PIL), ``.samples`` ``[K, C, H, W]`` in ``[0, 1]``,
            ``.seed`` and (on request) ``.trajectory``.
        """
        from . import SAMPLERS, sample

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompt must be a str or a non-empty list of str")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a str or None, got {type(negative_prompt).__name__}")
        steps = _positive_int("steps", self.defaults.get("steps", 20) if steps is None else steps)
        num_images = _positive_int("num_images", num_images)
        sampler = self.defaults.get("sampler", "dpmpp_2m") if sampler is None else sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
        schedule = self.defaults.get("schedule", "karras") if schedule is None else schedule
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
        g = self.defaults.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {g!r}")
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if generator is None:
            if seed is None:
                seed = int.from_bytes(os.urandom(4), "little")
            generator = torch.Generator(self.device).manual_seed(seed)
        cuda_graph = self.cuda_graph if cuda_graph is None else bool(cuda_graph)

        K = len(prompts) * num_images
        cond = self.encode_prompts([p for p in prompts for _ in range(num_images)])
        guided = float(g) != 1.0
        uncond = self.encode_prompts([negative_prompt or ""] * K) if guided else None

        cfg = self.unet.config
        shape = (K, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        sigmas = self.sigmas(steps, schedule)
        noise = torch.randn(shape, generator=generator, device=self.device, dtype=torch.float32)
        x = noise * float(sigmas[0])

        trajectory: Optional[list[TrajectoryStep]] = None
        cb = callback
        if return_trajectory:
            trajectory = [TrajectoryStep(-1, float(sigmas[0]), float(sigmas[0]), x.detach().cpu().clone(),
                                         torch.full_like(x, float("nan")).cpu())]

            def cb(d: dict) -> None:
                trajectory.append(TrajectoryStep(int(d["i"]), float(d["sigma"]), float(d["sigma_next"]),
                                                 d["x"].detach().float().cpu().clone(),
                                                 d["denoised"].detach().float().cpu().clone()))
                if callback is not None:
                    callback(d)

        kwargs: dict[str, Any] = dict(generator=generator, callback=cb, progress=progress, cond=cond,
                                      prediction=self.prediction, net_dtype=self.dtype, backend=self.backend)
        if guided:
            kwargs.update(guidance_scale=float(g), uncond=uncond)
        if cuda_graph:
            kwargs["cuda_graph"] = True
        with torch.no_grad():
            out = sample(self._denoiser(), x, sigmas, sampler, **kwargs)
        unit = self.to_unit(out)
        return PipelineOutput(images=self.to_pil(unit), samples=unit.cpu(), seed=seed, trajectory=trajectory)

    # -- pictures ----------------------------------------------------------------------------------------
    def strip(self, trajectory: Sequence[TrajectoryStep], index: int = 0, scale: int = 16,
              max_columns: int = 21):
        """The image developing step by step: top row the state ``x`` (noise first, scaled to unit variance
        for display), bottom row the denoised estimate of each step. Returns a PIL image.

        Args:
            trajectory: ``PipelineOutput.trajectory``.
            index: which of the ``K`` images.
            scale: nearest-neighbour upscaling of each 8x8 cell.
            max_columns: at most this many columns (evenly chosen steps, always the first and the last).
        """
        from PIL import Image

        scale = _positive_int("scale", scale)
        if not trajectory:
            raise ValueError("trajectory is empty; call the pipeline with return_trajectory=True")
        n = len(trajectory)
        cols = list(range(n)) if n <= max_columns else sorted(
            {round(j * (n - 1) / (max_columns - 1)) for j in range(max_columns)})
        top, bottom = [], []
        for j in cols:
            st = trajectory[j]
            x = st.x[index:index + 1]
            top.append(self.to_unit(x / math.sqrt(st.sigma_next ** 2 + 1)))
            d = st.denoised[index:index + 1]
            bottom.append(self.to_unit(torch.nan_to_num(d, nan=-self.pixel_mean / self.pixel_std)))
        cells = [self.to_pil(t)[0] for t in top + bottom]
        w, h = cells[0].size
        gap = max(1, scale // 4)
        W = len(cols) * (w * scale + gap) + gap
        H = 2 * (h * scale + gap) + gap
        canvas = Image.new("L", (W, H), 160)
        for k, cell in enumerate(cells):
            r, c = divmod(k, len(cols))
            canvas.paste(cell.resize((w * scale, h * scale), Image.NEAREST),
                         (gap + c * (w * scale + gap), gap + r * (h * scale + gap)))
        return canvas


def grid(images: Sequence, scale: int = 1, columns: Optional[int] = None, gap: int = 0):
    """Tile PIL images (all the same size) into one, upscaled by ``scale`` (nearest). Returns a PIL image."""
    from PIL import Image

    scale = _positive_int("scale", scale)
    if not images:
        raise ValueError("images is empty")
    n = len(images)
    columns = min(n, 8) if columns is None else _positive_int("columns", columns)
    rows = (n + columns - 1) // columns
    w, h = images[0].size
    cw, ch = w * scale, h * scale
    canvas = Image.new(images[0].mode, (columns * cw + (columns + 1) * gap, rows * ch + (rows + 1) * gap),
                       160 if images[0].mode == "L" else (160, 160, 160))
    for k, img in enumerate(images):
        r, c = divmod(k, columns)
        canvas.paste(img.resize((cw, ch), Image.NEAREST), (gap + c * (cw + gap), gap + r * (ch + gap)))
    return canvas
