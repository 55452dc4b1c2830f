"""sample(model_kwargs=..., noise_sampler=...): extra tensors for every model call, and noise drawn by the caller
(k-diffusion's ``noise_sampler(sigma, sigma_next)`` contract).

Eager runs are compared bit for bit with the equivalent run that does without the new argument (a closure over
the tensors; a generator drawing the same numbers); on a GPU the CUDA-graph replay is compared bit for bit with
the eager run, with new tensor values and new noise on each call.
"""

from __future__ import annotations

import pytest
import torch
from test_graph import Toy, _inputs
from test_sample_api import gauss_D

import diffusion_fast as df
from diffusion_fast.samplers import graph
from diffusion_fast.schedules import karras


def _model(x, sigma, ctx, *, shift, scale):
    return gauss_D(x, sigma) * scale.view(-1, *[1] * (x.dim() - 1)) + shift


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun", "euler_ancestral"])
def test_model_kwargs_reach_every_call_as_keyword_arguments(sampler):
    B = 3
    x = torch.randn(B, 2, 5, generator=torch.Generator().manual_seed(0)) * 10
    cond, uncond = torch.randn(B, 4), torch.zeros(B, 4)
    shift = torch.randn(2, 5, generator=torch.Generator().manual_seed(1)) * 0.01  # no batch dimension
    scale = 1 + 0.01 * torch.rand(2 * B, generator=torch.Generator().manual_seed(2))  # CFG batch [uncond; cond]
    seen = []

    def model(x_in, sigma, ctx, **kw):
        seen.append(kw)
        return _model(x_in, sigma, ctx, **kw)

    sig = karras(5, 0.05, 10.0)
    kw = dict(guidance_scale=3.0, cond=cond, uncond=uncond)
    out = df.sample(model, x, sig, sampler, model_kwargs={"shift": shift, "scale": scale},
                    generator=torch.Generator().manual_seed(3), **kw)
    assert seen and all(set(k) == {"shift", "scale"} and k["shift"] is shift and k["scale"] is scale for k in seen)
    ref = df.sample(lambda x_in, s, c: _model(x_in, s, c, shift=shift, scale=scale), x, sig, sampler,
                    generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(out, ref)


def test_noise_sampler_replaces_the_generator_draw_for_draw():
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)) * 10
    sig = karras(6, 0.05, 10.0)
    g = torch.Generator().manual_seed(4)
    shapes = []

    def noise(sigma, sigma_next):  # k-diffusion's contract: the levels of this draw
        shapes.append((sigma, sigma_next))
        return torch.randn(x.shape, generator=g, dtype=torch.float32)

    out = df.sample(gauss_D, x, sig, "dpmpp_2m_sde", noise_sampler=noise)
    ref = df.sample(gauss_D, x, sig, "dpmpp_2m_sde", generator=torch.Generator().manual_seed(4))
    assert torch.equal(out, ref)
    plan = df.samplers.build_plan("dpmpp_2m_sde", sig)
    assert shapes == [(s0, s1) for _, s0, s1 in plan.draws] and len(shapes) == int(plan.noise.sum())


def test_noise_sampler_with_one_generator_per_item_and_another_dtype():
    """One generator per batch item (what diffusers' randn_tensor does with a list): item 1 of a batch equals
    the same item sampled alone; a bfloat16 draw is read as it is."""
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)) * 10
    sig = karras(5, 0.05, 10.0)

    def per_item(seeds, dtype=torch.float32):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return lambda s0, s1: torch.cat([torch.randn((1, 3, 4), generator=g, dtype=dtype) for g in gens])

    both = df.sample(gauss_D, x, sig, "euler_ancestral", noise_sampler=per_item([7, 8]))
    alone = df.sample(gauss_D, x[1:], sig, "euler_ancestral", noise_sampler=per_item([8]))
    assert torch.equal(both[1:], alone)
    half = df.sample(gauss_D, x, sig, "euler_ancestral", noise_sampler=per_item([7, 8], torch.bfloat16))
    assert torch.isfinite(half).all() and not torch.equal(half, both) and (half - both).abs().max() < 0.1


@pytest.mark.parametrize("kw, exc, message", [
    (dict(model_kwargs=[1]), TypeError, "model_kwargs must be a mapping of names to tensors, got list"),
    (dict(model_kwargs={"a b": torch.ones(1)}), TypeError, "model_kwargs keys must be keyword names, got 'a b'"),
    (dict(model_kwargs={"a": 1.0}), TypeError, "model_kwargs['a'] must be a torch.Tensor, got float"),
    (dict(model_kwargs={"a": torch.ones(1, device="meta")}), ValueError,
     "model_kwargs['a'] is on meta but x is on cpu"),
    (dict(noise_sampler=3), ValueError,
     "noise_sampler must be a callable noise_sampler(sigma, sigma_next) -> tensor or 'brownian', got 3"),
    (dict(noise_sampler=torch.randn, generator=torch.Generator()), ValueError,
     "pass generator or a noise_sampler callable, not both: the callable draws the noise itself"),
])
def test_bad_model_kwargs_and_noise_samplers_are_refused(kw, exc, message):
    with pytest.raises(exc) as e:
        df.sample(gauss_D, torch.randn(2, 3), karras(3, 0.1, 5.0), "euler_ancestral", **kw)
    assert str(e.value) == message


def test_a_noise_sampler_returning_the_wrong_shape_is_refused_by_the_step():
    with pytest.raises(ValueError, match=r"must return a tensor of x's shape \(2, 3\) on cpu, got \(3,\) on cpu"):
        df.sample(gauss_D, torch.randn(2, 3), karras(3, 0.1, 5.0), "euler_ancestral",
                  noise_sampler=lambda s0, s1: torch.randn(3))


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde"])
def test_cuda_graph_takes_new_model_kwargs_and_noise_on_each_replay(sampler):
    graph.clear_cache()
    torch.manual_seed(0)
    toy = Toy().cuda()

    def model(x_in, sigma, ctx, *, offset):
        return toy(x_in, sigma, ctx) + offset

    sig = karras(5, 0.03, 14.6)
    results = []
    for seed in (1, 2):
        x, cond, uncond = _inputs("cuda", torch.float32, seed=seed)
        offset = torch.full((1, 4, 1, 1), 0.01 * seed, device="cuda")
        kw = dict(guidance_scale=2.0, cond=cond, uncond=uncond, prediction="epsilon",
                  model_kwargs={"offset": offset})
        cpu = torch.Generator().manual_seed(seed)
        noise = lambda s0, s1, g=cpu, n=x.shape: torch.randn(n, generator=g).cuda()  # noqa: E731 - CPU draws, GPU latents
        eager = df.sample(model, x, sig, sampler, noise_sampler=noise, **kw)
        cpu.manual_seed(seed)
        got = df.sample(model, x, sig, sampler, noise_sampler=noise, cuda_graph=True, **kw)
        assert torch.equal(got, eager), (got - eager).abs().max()
        results.append(got)
    assert len(graph.cache()) == 1 and not torch.equal(results[0], results[1])
    graph.clear_cache()
