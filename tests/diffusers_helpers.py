"""Shared by the optimize tests: calling the tiny pipelines, measuring differences, spying on the ops."""

from __future__ import annotations

import contextlib

import torch

from diffusion_fast.integrations.diffusers import configs as C
from diffusion_fast.integrations.diffusers.patch import optimize
from diffusion_fast.ops import registry

UNET_PIPELINES = ("sd15", "sd15-img2img", "sdxl", "sdxl-img2img")
DIT_PIPELINES = ("flux", "flux-img2img", "sd3", "sd3-img2img", "pixart-sigma")


def meta_pipeline(name: str):
    """The published architecture of ``name`` as a pipeline with only its denoiser (on meta) and scheduler."""
    import diffusers

    sched_cfg = C.scheduler_config(name)
    scheduler = getattr(diffusers, sched_cfg.pop("_class_name")).from_config(sched_cfg)
    with torch.device("meta"):
        if name in ("sd15", "sdxl"):
            model = diffusers.UNet2DConditionModel(**C.unet_config(name, "full"))
        else:
            cls = {"flux": diffusers.FluxTransformer2DModel, "sd3": diffusers.SD3Transformer2DModel,
                   "pixart-sigma": diffusers.PixArtTransformer2DModel}[name]
            model = cls(**C.transformer_config(name, "full"))
    none = dict(vae=None, text_encoder=None, tokenizer=None)
    if name == "sd15":
        return diffusers.StableDiffusionPipeline(**none, unet=model, scheduler=scheduler, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
    if name == "sdxl":
        return diffusers.StableDiffusionXLPipeline(**none, text_encoder_2=None, tokenizer_2=None, unet=model,
                                                   scheduler=scheduler)
    if name == "flux":
        return diffusers.FluxPipeline(**none, text_encoder_2=None, tokenizer_2=None, transformer=model,
                                      scheduler=scheduler)
    if name == "sd3":
        return diffusers.StableDiffusion3Pipeline(**none, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                                  tokenizer_3=None, transformer=model, scheduler=scheduler)
    return diffusers.PixArtSigmaPipeline(**none, transformer=model, scheduler=scheduler)


def call_kwargs(name: str, *, steps: int = 3, seed: int = 0, size: int = 16, dtype=torch.float32,
                device="cpu") -> dict:
    """Keyword arguments of one call of tiny pipeline ``name`` (latents out, fixed seeds)."""
    kw = dict(num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(seed),
              height=size, width=size)
    if name.startswith(("sd15", "sdxl")):
        kw["prompt"] = "a red cat"
        kw["negative_prompt"] = "blurry"
    else:
        kw.update(C.conditioning(name, dtype=dtype, device=device))
    if name.endswith("img2img"):
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        kw["image"] = image.to(device=device, dtype=dtype)
        kw["strength"] = 0.7
    return kw


def run(pipe, name: str, **kw) -> torch.Tensor:
    with torch.no_grad():
        return pipe(**call_kwargs(name, **kw)).images


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| in float64."""
    x, ref = x.double(), ref.double()
    return ((x - ref).abs().max() / ref.abs().max()).item()


def denoiser(pipe) -> torch.nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def weights(model: torch.nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """Every state-dict entry with its storage address, to prove nothing was copied or re-laid out."""
    return {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}


def assert_same_weights(model: torch.nn.Module, before: dict[str, tuple[int, torch.Tensor]]) -> None:
    now = model.state_dict()
    assert list(now) == list(before)
    for k, (ptr, value) in before.items():
        assert now[k].data_ptr() == ptr and torch.equal(now[k], value), k


class OpSpy(contextlib.AbstractContextManager):
    """Counts the calls that reach the ops' backend dispatch (every op call goes through registry.resolve),
    per op, and keeps the attention calls' q, k, v."""

    def __init__(self, monkeypatch) -> None:
        self.counts: dict[str, int] = {}
        self.attention: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        real = registry.resolve

        def resolve(op, backend, device, call):
            self.counts[op] = self.counts.get(op, 0) + 1
            if op == "attention":
                self.attention.append((call["q"], call["k"], call["v"]))
            return real(op, backend, device, call)

        self._undo = lambda: monkeypatch.setattr(registry, "resolve", real)
        monkeypatch.setattr(registry, "resolve", resolve)

    def __exit__(self, *exc) -> None:
        self._undo()


def count_forwards(model: torch.nn.Module) -> list[int]:
    """A one-element list counting ``model``'s forward calls from now on."""
    n = [0]
    model.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1))
    return n


def bf16_errors(name: str, steps: int = 3, device: str = "cuda") -> tuple[float, float, float]:
    """(our bf16 error, stock bf16 error, max |reference|): latents against the float32 stock pipeline."""
    kw = dict(steps=steps, device=device)
    ref = run(C.pipeline(name, device=device), name, **kw).float()
    stock = C.pipeline(name, dtype=torch.bfloat16, device=device)
    stock_out = run(stock, name, dtype=torch.bfloat16, **kw).float()
    ours = run(optimize(stock), name, dtype=torch.bfloat16, **kw).float()
    assert torch.isfinite(ours).all()
    return (ours - ref).abs().max().item(), (stock_out - ref).abs().max().item(), ref.abs().max().item()


def within_twice_stock(ours: float, stock: float, scale: float) -> bool:
    """flash-attention's rule: our low-precision error at most 2x the stock low-precision error; the floor (one
    bf16 rounding of the largest value) only matters if the stock run happens to be exact."""
    return ours <= max(2 * stock, scale * 2.0 ** -8)


def chosen_backends(monkeypatch, pipe, name: str, **kw) -> dict[str, set[str]]:
    """{op: the backend modules that served its calls} over one call of ``pipe``."""
    chosen: dict[str, set[str]] = {}
    real = registry.resolve

    def resolve(op, backend, device, call):
        fn = real(op, backend, device, call)
        chosen.setdefault(op, set()).add(fn.__module__)
        return fn

    monkeypatch.setattr(registry, "resolve", resolve)
    try:
        run(pipe, name, **kw)
    finally:
        monkeypatch.setattr(registry, "resolve", real)
    return chosen
