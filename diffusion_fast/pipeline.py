"""Text to image: prompt -> tokens -> context, noise -> ``diffusion_fast.sample`` -> PIL images.

    from diffusion_fast import Pipeline
    pipe = Pipeline.from_pretrained("digits")
    out = pipe("a handwritten seven", seed=7)
    out.images[0].resize((256, 256), resample=0).save("seven.png")

A model folder holds ``config.json`` (see :data:`FORMAT`) and ``model.safetensors`` (``unet.*`` and
``text_encoder.*`` tensors). Weights are read with safetensors only; nothing is unpickled. Everything a folder
holds is checked when it is loaded (structure, values, tensor names, shapes, dtypes, finiteness, defaults), so
a damaged or inconsistent model is refused by ``from_pretrained`` with the file and the reason, not later.

Limits: ``steps`` at most :data:`MAX_STEPS`; images are sampled in batches of ``batch_size``
(:data:`DEFAULT_BATCH_SIZE`); a call whose results would not fit in the memory available is refused before
anything is allocated; pictures (:func:`grid`, :meth:`Pipeline.strip`) have at most
:data:`MAX_PICTURE_PIXELS` pixels.
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
from .ops._checks import FLOAT_DTYPES
from .samplers.api import check_generator, check_guidance_scale
from .samplers.tables import SAMPLERS
from .schedules.formulas import SCHEDULES as _ALL_SCHEDULES

FORMAT = "diffusion_fast.pipeline/1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BUILTIN_MODELS = ("digits",)
PREDICTIONS = ("v_prediction", "epsilon", "sample")
#: Most sampler steps per call. Diffusers' schedulers stop at the 1000 training timesteps; far below that the
#: sampler's error is already smaller than the model's, so more steps only cost time (1000 take ~10 s here).
MAX_STEPS = 1000
#: Images per ``sample()`` call: larger counts are split, so the network's working memory stays bounded.
DEFAULT_BATCH_SIZE = 256
#: Largest picture :func:`grid` and :meth:`Pipeline.strip` make: PIL's decompression-bomb threshold, so every
#: picture written can be opened again by PIL's defaults (89.5 M pixels, ~90 MB in mode L).
MAX_PICTURE_PIXELS = 89_478_485
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64-bit seeds
DEFAULT_KEYS = ("steps", "sampler", "schedule", "guidance_scale")
# The schedules a pipeline builds for its (VE) model: every closed form but rectified flow's.
SCHEDULES = tuple(s for s in _ALL_SCHEDULES if s != "flow")


def check_schedule(value: object, name: str = "schedule") -> str:
    """A schedule name a pipeline can build (one of :data:`SCHEDULES`)."""
    if not isinstance(value, str) or value not in SCHEDULES:
        raise ValueError(f"{name} must be one of {', '.join(SCHEDULES)}; got {value!r}")
    return value


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


@dataclass(frozen=True)
class Settings:
    """A pipeline call's arguments with the model's defaults filled in (see :meth:`Pipeline.settings`).

    ``sampler`` and ``guidance_scale`` are passed on as they are: :func:`diffusion_fast.sample` owns their
    checks. ``count`` is the number of images, ``len(prompts) * num_images``."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]  # one per prompt ("" for none)
    steps: int
    sampler: Any
    schedule: str
    guidance_scale: Any
    num_images: int
    count: int
    seed: Optional[int]
    batch_size: int

    @property
    def guided(self) -> bool:
        """Whether the call runs classifier-free guidance (any scale other than 1)."""
        return self.guidance_scale != 1.0


def _int_in(name: str, value: object, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        limit = f">= {lo}" if hi is None else f">= {lo} and at most {hi}"
        raise ValueError(f"{name} must be {limit}, got {value}")
    return value


def _positive_int(name: str, value: object) -> int:
    return _int_in(name, value, 1)


def _finite(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a :class:`torch.device` (``cuda`` with its index named, so that
    it compares equal to a generator's device); ValueError for anything else or a CUDA device not present."""
    if isinstance(device, str):
        try:
            d = torch.device(device)
        except RuntimeError:
            d = None
    elif isinstance(device, torch.device):
        d = device
    else:
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    if d is None or d.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {str(device)!r}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: no CUDA device is available here")
        count = torch.cuda.device_count()
        if d.index is not None and d.index >= count:
            raise ValueError(f"device {str(device)!r}: there {'is' if count == 1 else 'are'} only {count} CUDA "
                             f"device{'s' if count > 1 else ''} (cuda:0..cuda:{count - 1})")
        if d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())
    return d


def _check_dtype(dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        raise TypeError(f"dtype must be one of {names} (the dtypes the ops compute with), got {dtype}")
    return dtype


def check_config(config: object) -> None:
    """Check a model folder's ``config.json`` (as a dict): structure, values and defaults. The sections
    ``unet``, ``text_encoder`` and ``tokenizer`` are checked by their own ``from_dict``."""
    if not isinstance(config, dict):
        raise ValueError(f"config.json must be a JSON object, got a JSON {type(config).__name__}")
    if config.get("format") != FORMAT:
        raise ValueError(f"config.json: format must be {FORMAT!r}, got {config.get('format')!r}")
    for key in ("unet", "text_encoder", "tokenizer", "pixels"):
        if key not in config:
            raise ValueError(f"config.json: missing section {key!r}")
        if not isinstance(config[key], dict):
            raise ValueError(f"config.json: {key!r} must be a JSON object, got {type(config[key]).__name__}")
    if config.get("prediction") not in PREDICTIONS:
        raise ValueError(f"config.json: prediction must be one of {PREDICTIONS}, got {config.get('prediction')!r}")
    for key in ("timestep_scale", "sigma_min", "sigma_max"):
        if key not in config:
            raise ValueError(f"config.json: missing {key!r}")
        _finite(f"config.json: {key}", config[key], positive=key != "timestep_scale")
    if not config["sigma_min"] < config["sigma_max"]:
        raise ValueError(f"config.json: sigma_min={config['sigma_min']} must be < sigma_max={config['sigma_max']}")
    _finite("config.json: rho", config.get("rho", 7.0), positive=True)
    pix = config["pixels"]
    for key in ("mean", "std", "max_value"):
        if key not in pix:
            raise ValueError(f"config.json: missing pixels.{key}")
        _finite(f"config.json: pixels.{key}", pix[key], positive=key != "mean")
    if not isinstance(pix.get("invert", False), bool):
        raise ValueError(f"config.json: pixels.invert must be true or false, got {pix['invert']!r}")
    defaults = config.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ValueError(f"config.json: defaults must be a JSON object, got {type(defaults).__name__}")
    unknown = sorted(set(defaults) - set(DEFAULT_KEYS))
    if unknown:
        raise ValueError(f"config.json: unknown defaults {unknown}; known: {list(DEFAULT_KEYS)}")
    try:
        if "steps" in defaults:
            _int_in("defaults.steps", defaults["steps"], 1, MAX_STEPS)
        if "sampler" in defaults and defaults["sampler"] not in SAMPLERS:
            raise ValueError(f"defaults.sampler must be one of {', '.join(SAMPLERS)}; got {defaults['sampler']!r}")
        if "schedule" in defaults:
            check_schedule(defaults["schedule"], "defaults.schedule")
        if "guidance_scale" in defaults:
            check_guidance_scale(defaults["guidance_scale"], "defaults.guidance_scale")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config.json: {exc}") from None


def _check_parts(unet: UNetConfig, text: TextConfig, tokenizer: WordTokenizer) -> None:
    """The tokenizer, the text encoder and the UNet fit together."""
    if len(tokenizer.vocab) > text.vocab_size:
        raise ValueError(f"config.json: the tokenizer's vocabulary ({len(tokenizer.vocab)} tokens with the special "
                         f"ones) is larger than text_encoder.vocab_size={text.vocab_size}")
    if tokenizer.max_length != text.max_length:
        raise ValueError(f"config.json: tokenizer.max_length={tokenizer.max_length} must equal "
                         f"text_encoder.max_length={text.max_length}")
    if text.width != unet.cross_attention_dim:
        raise ValueError(f"config.json: text_encoder.width={text.width} must equal unet.cross_attention_dim="
                         f"{unet.cross_attention_dim} (the context the UNet attends to)")
    if unet.in_channels != unet.out_channels:
        raise ValueError(f"config.json: unet.in_channels={unet.in_channels} must equal unet.out_channels="
                         f"{unet.out_channels} (the sampler state and the network's output have one shape)")


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU. Never unpickles: anything else is refused."""
    import safetensors
    from safetensors.torch import load_file

    error = getattr(safetensors, "SafetensorError", Exception)
    try:
        return load_file(str(file))
    except (error, OSError, ValueError) as exc:
        raise ValueError(f"{file}: not a readable safetensors file ({exc})") from None


def _load_weights(module: torch.nn.Module, prefix: str, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Load ``prefix.*`` tensors into ``module`` after checking names, shapes, dtypes and values."""
    expected = module.state_dict()
    got = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    missing = [k for k in expected if k not in got]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{file}: missing tensor '{prefix}.{missing[0]}'{more}")
    unexpected = [k for k in got if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(f"{file}: unexpected tensor '{prefix}.{unexpected[0]}'{more}")
    for k, want in expected.items():
        t = got[k]
        if not t.is_floating_point():
            raise ValueError(f"{file}: tensor '{prefix}.{k}' has dtype {str(t.dtype).replace('torch.', '')}; "
                             "weights must be floating point")
        if t.shape != want.shape:
            raise ValueError(f"{file}: tensor '{prefix}.{k}' has shape {tuple(t.shape)} but config.json describes "
                             f"{tuple(want.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{file}: tensor '{prefix}.{k}' is not finite ({int((~torch.isfinite(t)).sum())} NaN "
                             "or inf values): the weights are damaged")
    module.load_state_dict(got, strict=True)


def _available_memory(device: torch.device) -> Optional[int]:
    """Bytes that can still be allocated on ``device`` (host: MemAvailable), or None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _canvas_size(n: int, cell: tuple[int, int], scale: int, columns: int, gap: int) -> tuple[int, int]:
    rows = (n + columns - 1) // columns
    w, h = cell
    return columns * w * scale + (columns + 1) * gap, rows * h * scale + (rows + 1) * gap


def check_picture_size(size: tuple[int, int], what: str = "the picture") -> None:
    """ValueError when a ``(width, height)`` picture has more than :data:`MAX_PICTURE_PIXELS` pixels."""
    pixels = size[0] * size[1]
    if pixels > MAX_PICTURE_PIXELS:
        raise ValueError(f"{what} would be {size[0]} x {size[1]} = {pixels:,} pixels; the limit is "
                         f"{MAX_PICTURE_PIXELS:,} (lower the scale or the number of images)")


def grid_size(n: int, cell: tuple[int, int], scale: int = 1, columns: Optional[int] = None,
              gap: int = 0) -> tuple[int, int]:
    """``(width, height)`` of the picture :func:`grid` makes from ``n`` images of size ``cell``, computed
    without making it."""
    _positive_int("n", n)
    scale = _positive_int("scale", scale)
    columns = min(n, 8) if columns is None else _positive_int("columns", columns)
    _int_in("gap", gap, 0)
    return _canvas_size(n, cell, scale, columns, gap)


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
        self.device = resolve_device(device)
        self.dtype = _check_dtype(dtype)
        check_config(config)
        _check_parts(unet.config, text_encoder.config, tokenizer)
        self.config = config
        self.backend = backend  # checked by set_backend below (the models' layers own backend names)
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
        """Load a built-in model (``"digits"``) or a local folder with ``config.json`` + ``model.safetensors``.

        Raises:
            FileNotFoundError: no such model or folder, or a file is missing.
            ValueError: anything wrong in the folder (the message names the file and the reason), a bad
                ``device`` or ``backend``. TypeError: a ``dtype`` the ops do not compute with.
        """
        path = _resolve_model_dir(name_or_path)
        cfg_file, weights_file = path / "config.json", path / "model.safetensors"
        try:
            config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cfg_file}: not valid JSON ({exc})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{cfg_file}: cannot be read ({exc})") from None
        check_config(config)
        parts = {}
        for key, build in (("tokenizer", WordTokenizer.from_dict),
                           ("unet", lambda d: UNet2DConditionModel(UNetConfig.from_dict(d))),
                           ("text_encoder", lambda d: TextEncoder(TextConfig.from_dict(d)))):
            try:
                parts[key] = build(config[key])
            except (TypeError, ValueError, KeyError) as exc:
                raise ValueError(f"{cfg_file}: {key}: {exc}") from None
        pipe = cls(parts["unet"], parts["text_encoder"], parts["tokenizer"], config, device=device,
                   backend=backend, dtype=dtype, cuda_graph=cuda_graph)
        tensors = _read_safetensors(weights_file)
        stray = [k for k in tensors if k.partition(".")[0] not in ("unet", "text_encoder")]
        if stray:
            raise ValueError(f"{weights_file}: unexpected tensor {stray[0]!r} (expected unet.* or text_encoder.*)")
        _load_weights(pipe.unet, "unet", tensors, weights_file)
        _load_weights(pipe.text_encoder, "text_encoder", tensors, weights_file)
        return pipe

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

        check_schedule(schedule)
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

    def settings(
        self,
        prompt: Union[str, Sequence[str]],
        negative_prompt: Optional[Union[str, Sequence[str]]] = None,
        steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        seed: Optional[int] = None,
        sampler: Optional[str] = None,
        num_images: int = 1,
        generator: Optional[Union[torch.Generator, Sequence[torch.Generator]]] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        return_trajectory: bool = False,
        schedule: Optional[str] = None,
    ) -> Settings:
        """Check a call's arguments and fill in the model's defaults, without sampling (what ``__call__`` does
        first; arguments as there). A command line uses it to refuse bad input before any work and to learn
        the image count and the seed. A random seed is drawn here when neither ``seed`` nor ``generator`` is
        given. Raises ValueError / TypeError naming the argument."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else []
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompt must be a str or a non-empty list of str")
        if isinstance(negative_prompt, (list, tuple)):
            if len(negative_prompt) != len(prompts) or not all(isinstance(n, str) for n in negative_prompt):
                raise ValueError(f"negative_prompt as a list must hold one str per prompt ({len(prompts)}), got "
                                 f"{len(negative_prompt)} items")
            negatives = list(negative_prompt)
        elif negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * len(prompts)
        else:
            raise TypeError(f"negative_prompt must be a str, a list of str or None, got "
                            f"{type(negative_prompt).__name__}")
        for p in dict.fromkeys(prompts + negatives):
            self.tokenizer.encode(p)  # an unknown word or a prompt too long: ValueError before any work
        steps = _int_in("steps", self.defaults.get("steps", 20) if steps is None else steps, 1, MAX_STEPS)
        num_images = _positive_int("num_images", num_images)
        batch_size = _positive_int("batch_size", batch_size)
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
            raise ValueError(f"seed must be an int with 0 <= seed < 2**64, got {seed!r}")
        count = len(prompts) * num_images
        if generator is not None:
            check_generator(generator, count, self.device)
        elif seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        self._check_memory(count, steps, return_trajectory, num_images)
        sampler = self.defaults.get("sampler", "dpmpp_2m") if sampler is None else sampler
        schedule = check_schedule(self.defaults.get("schedule", "karras") if schedule is None else schedule)
        g = self.defaults.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
        return Settings(tuple(prompts), tuple(negatives), steps, sampler, schedule, g, num_images, count, seed,
                        batch_size)

    def _check_memory(self, count: int, steps: int, return_trajectory: bool, num_images: int) -> None:
        """Refuse a call whose results cannot fit in memory, before allocating them. Counted: the noise and the
        state of every image on the device; on the host the samples, the [0, 1] copy, the 8-bit pictures (with
        PIL's per-image overhead) and the trajectory. The network's working memory is bounded by the batch."""
        cfg = self.unet.config
        per_image = cfg.in_channels * cfg.sample_size ** 2
        host = count * (per_image * 13 + 1024)
        if return_trajectory:
            host += count * (steps + 1) * 2 * per_image * 4
        device = count * per_image * 8
        need = {"cpu": host + device} if self.device.type == "cpu" else {"cpu": host, self.device.type: device}
        for dev, n in need.items():
            avail = _available_memory(self.device if dev == "cuda" else torch.device("cpu"))
            if avail is not None and n > avail:
                raise ValueError(f"num_images={num_images} ({count} images) would need about {n:,} bytes of {dev} "
                                 f"memory for the results; {avail:,} bytes are available. Generate fewer images "
                                 "per call.")

    def __call__(
        self,
        prompt: Union[str, Sequence[str]],
        negative_prompt: Optional[Union[str, Sequence[str]]] = None,
        steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        seed: Optional[int] = None,
        sampler: Optional[str] = None,
        num_images: int = 1,
        generator: Optional[Union[torch.Generator, Sequence[torch.Generator]]] = None,
        callback: Optional[Callable[[dict], None]] = None,
        progress: bool = True,
        return_trajectory: bool = False,
        cuda_graph: Optional[bool] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        schedule: Optional[str] = None,
    ) -> PipelineOutput:
        """Generate ``num_images`` images per prompt.

        Args:
            prompt: one prompt or a list of prompts (``K = len(prompts) * num_images`` images in all).
            negative_prompt: replaces the empty prompt as the unconditional half of guidance; a list gives one
                per prompt.
            steps: sampler steps, 1 to :data:`MAX_STEPS` (default from the model config, 20 for digits).
            guidance_scale: classifier-free guidance scale ``g`` (``uncond + g * (cond - uncond)``, finite,
                ``>= 0``); 1 runs the conditional model alone (and ignores ``negative_prompt``). Default from the
                model config.
            seed: the noise seed, ``0 <= seed < 2**64``. The same seed, device, backend, torch build, batch
                size and (on CPU) thread count (``torch.get_num_threads()``) give a bit-identical image: torch's
                CPU convolutions split their sums by thread count.
            sampler: a name from ``diffusion_fast.SAMPLERS`` (default ``"dpmpp_2m"``).
            schedule: a name from :data:`SCHEDULES` (default ``"karras"``); see :meth:`sigmas`.
            num_images: images per prompt, each from different noise.
            generator: a ``torch.Generator`` on the pipeline's device instead of ``seed``, or a list of ``K`` of
                them, one per image (prompt-major): image ``k``'s starting noise and sampler noise then come from
                ``generator[k]`` alone, so it is the same image whatever other images share the call.
            callback: called after each step with the sampler's dict (``x``, ``i``, ``sigma``, ``sigma_next``,
                ``denoised``); with more than ``batch_size`` images, once per step for each batch.
            progress: show a progress bar.
            return_trajectory: also return every step's state and denoised estimate (``.trajectory``).
            cuda_graph: capture the sampling loop as a CUDA graph (default: the pipeline's setting).
            batch_size: images per network batch; more are sampled batch after batch (the noise of every
                image is drawn first, in one call, so an image's noise does not depend on the batch size;
                stochastic samplers draw their step noise per batch).

        Returns:
            :class:`PipelineOutput` with ``.images`` (PIL), ``.samples`` ``[K, C, H, W]`` in ``[0, 1]``,
            ``.seed`` and (on request) ``.trajectory``.

        Raises:
            ValueError / TypeError: a bad argument, named (before any sampling).
            FloatingPointError: the result is not finite (NaN or inf): the model returned non-finite values or
                a very large guidance scale overflowed float32. No image is returned.
        """
        from . import sample
        from .samplers.loop import draw_noise

        st = self.settings(prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale,
                           seed=seed, sampler=sampler, num_images=num_images, generator=generator,
                           batch_size=batch_size, return_trajectory=return_trajectory, schedule=schedule)
        if generator is None:
            generator = torch.Generator(self.device).manual_seed(st.seed)
        cuda_graph = self.cuda_graph if cuda_graph is None else bool(cuda_graph)

        K = st.count
        cfg = self.unet.config
        sigmas = self.sigmas(st.steps, st.schedule)
        noise = draw_noise((K, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator, self.device)
        x_all = noise * float(sigmas[0])

        kwargs: dict[str, Any] = dict(generator=generator, progress=progress, prediction=self.prediction,
                                      net_dtype=self.dtype, backend=self.backend, check_finite=True)
        if st.guided:
            kwargs["guidance_scale"] = st.guidance_scale
        if cuda_graph:
            kwargs["cuda_graph"] = True
        outs, trajectories = [], []
        for start in range(0, K, st.batch_size):
            stop = min(K, start + st.batch_size)
            x = x_all[start:stop]
            if isinstance(generator, (list, tuple)):
                kwargs["generator"] = list(generator[start:stop])
            kwargs["cond"] = self.encode_prompts([st.prompts[i // st.num_images] for i in range(start, stop)])
            if st.guided:
                kwargs["uncond"] = self.encode_prompts([st.negative_prompts[i // st.num_images]
                                                        for i in range(start, stop)])
            steps_seen: Optional[list[TrajectoryStep]] = None
            cb = callback
            if return_trajectory:
                steps_seen = [TrajectoryStep(-1, float(sigmas[0]), float(sigmas[0]), x.detach().cpu().clone(),
                                             torch.full_like(x, float("nan")).cpu())]

                def cb(d: dict, steps_seen=steps_seen) -> None:
                    steps_seen.append(TrajectoryStep(int(d["i"]), float(d["sigma"]), float(d["sigma_next"]),
                                                     d["x"].detach().float().cpu().clone(),
                                                     d["denoised"].detach().float().cpu().clone()))
                    if callback is not None:
                        callback(d)

                trajectories.append(steps_seen)
            if cb is not None:
                kwargs["callback"] = cb
            with torch.no_grad():
                outs.append(sample(self._denoiser(), x, sigmas, st.sampler, **kwargs))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        trajectory: Optional[list[TrajectoryStep]] = None
        if return_trajectory:
            trajectory = [TrajectoryStep(first.i, first.sigma, first.sigma_next,
                                         torch.cat([t[j].x for t in trajectories]),
                                         torch.cat([t[j].denoised for t in trajectories]))
                          for j, first in enumerate(trajectories[0])]
        unit = self.to_unit(out)
        return PipelineOutput(images=self.to_pil(unit), samples=unit.cpu(), seed=st.seed, trajectory=trajectory)

    # -- pictures ----------------------------------------------------------------------------------------
    def strip_size(self, steps: int, scale: int = 16, max_columns: int = 21) -> tuple[int, int]:
        """``(width, height)`` of the picture :meth:`strip` makes for a ``steps``-step trajectory."""
        n = _positive_int("steps", steps) + 1
        cols = len(_strip_columns(n, max_columns))
        cell = (self.unet.config.sample_size,) * 2
        return _canvas_size(2 * cols, cell, _positive_int("scale", scale), cols, max(1, scale // 4))

    def strip(self, trajectory: Sequence[TrajectoryStep], index: int = 0, scale: int = 16,
              max_columns: int = 21):
        """The image developing step by step: top row the state ``x`` (noise first, scaled to unit variance
        for display), bottom row the denoised estimate of each step. Returns a PIL image of at most
        :data:`MAX_PICTURE_PIXELS` pixels (ValueError beyond, before allocating).

        Args:
            trajectory: ``PipelineOutput.trajectory``.
            index: which of the ``K`` images.
            scale: nearest-neighbour upscaling of each 8x8 cell.
            max_columns: at most this many columns (>= 2: evenly chosen steps, always the first and the last).
        """
        from PIL import Image

        scale = _positive_int("scale", scale)
        if not trajectory:
            raise ValueError("trajectory is empty; call the pipeline with return_trajectory=True")
        cols = _strip_columns(len(trajectory), max_columns)
        gap = max(1, scale // 4)
        h, w = trajectory[0].x.shape[-2:]
        W, H = _canvas_size(2 * len(cols), (w, h), scale, len(cols), gap)
        check_picture_size((W, H), "the strip")
        top, bottom = [], []
        for j in cols:
            st = trajectory[j]
            x = st.x[index:index + 1]
            top.append(self.to_unit(x / math.sqrt(st.sigma_next ** 2 + 1)))
            d = st.denoised[index:index + 1]
            bottom.append(self.to_unit(torch.nan_to_num(d, nan=-self.pixel_mean / self.pixel_std)))
        cells = [self.to_pil(t)[0] for t in top + bottom]
        canvas = Image.new("L", (W, H), 160)
        for k, cell in enumerate(cells):
            r, c = divmod(k, len(cols))
            canvas.paste(cell.resize((w * scale, h * scale), Image.NEAREST),
                         (gap + c * (w * scale + gap), gap + r * (h * scale + gap)))
        return canvas


def _strip_columns(n: int, max_columns: int) -> list[int]:
    max_columns = _int_in("max_columns", max_columns, 2)
    if n <= max_columns:
        return list(range(n))
    return sorted({round(j * (n - 1) / (max_columns - 1)) for j in range(max_columns)})


def grid(images: Sequence, scale: int = 1, columns: Optional[int] = None, gap: int = 0):
    """Tile PIL images (all the same size) into one, upscaled by ``scale`` (nearest). Returns a PIL image of
    :func:`grid_size`; ValueError, before allocating, beyond :data:`MAX_PICTURE_PIXELS` pixels."""
    from PIL import Image

    if not images:
        raise ValueError("images is empty")
    n = len(images)
    w, h = images[0].size
    size = grid_size(n, (w, h), scale, columns, gap)
    check_picture_size(size)
    columns = min(n, 8) if columns is None else columns
    cw, ch = w * scale, h * scale
    canvas = Image.new(images[0].mode, size, 160 if images[0].mode == "L" else (160, 160, 160))
    for k, img in enumerate(images):
        r, c = divmod(k, columns)
        canvas.paste(img.resize((cw, ch), Image.NEAREST), (gap + c * (cw + gap), gap + r * (ch + gap)))
    return canvas
