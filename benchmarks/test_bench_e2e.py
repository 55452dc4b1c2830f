"""End-to-end sampling as pytest-benchmark cases: the variants of ``diffusion-fast bench e2e``.

On CUDA the SD1.5-shaped UNet (random bf16 weights, 64x64 latents, CFG, 25 steps); on CPU the small
``digits`` UNet for a few steps, so the suite runs anywhere.
"""

from __future__ import annotations

import pytest
import torch

from diffusion_fast.bench.e2e import CONTEXT_TOKENS, VARIANT_BACKENDS, EpsUNet, build_unet
from diffusion_fast.bench.timing import synchronize


@pytest.fixture(scope="module")
def unet(bench_env):
    device, dtype = bench_env
    return build_unet("sd15" if device.type == "cuda" else "digits", device, dtype), device, dtype


@pytest.mark.parametrize("variant", ["eager", "fast", "fast_graph"])
def test_e2e(benchmark, unet, variant, request):
    import diffusion_fast as df
    from diffusion_fast.schedules import karras

    model, device, dtype = unet
    if variant == "fast_graph" and device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    steps = request.config.getoption("--bench-e2e-steps") or (25 if device.type == "cuda" else 4)
    loop_backend, args, kw = VARIANT_BACKENDS[variant]
    model.net.set_backend(*args, **kw)
    net = EpsUNet(model.net)
    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(1, CONTEXT_TOKENS, model.context_dim, generator=gen).to(device, dtype)
    uncond = torch.randn(1, CONTEXT_TOKENS, model.context_dim, generator=gen).to(device, dtype)
    sigmas = karras(steps, 0.0292, 14.6146)
    x = torch.randn(1, model.in_channels, model.latent, model.latent, generator=gen).to(device) * float(sigmas[0])

    def run():
        with torch.inference_mode():
            out = df.sample(net, x, sigmas, "dpmpp_2m", guidance_scale=7.5, cond=cond, uncond=uncond,
                            prediction="epsilon", net_dtype=dtype, backend=loop_backend,
                            cuda_graph=variant == "fast_graph")
        synchronize(device)
        return out

    benchmark.extra_info.update(config=model.config, steps=steps, variant=variant, sampler="dpmpp_2m")
    out = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert torch.isfinite(out).all()
    if variant == "fast_graph":
        from diffusion_fast.samplers import graph

        graph.clear_cache()
