"""CUDA-graph capture of the sampling trajectory: the noise hand-over and the cache on CPU, the captured
trajectory bit for bit against the uncaptured one on a GPU."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from torch import nn

import diffusion_fast as df
from diffusion_fast.samplers import graph
from diffusion_fast.samplers.loop import get_plan, run
from diffusion_fast.schedules import karras


class Toy(nn.Module):
    """A small conditional network: ``(x_in [B, C, H, W], sigma [B], context [B, T, Dc]) -> [B, C, H, W]``."""

    def __init__(self, channels: int = 4, ctx: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.lin = nn.Linear(ctx, channels)
        self.norm = _WithBackend()

    def forward(self, x, sigma, context):
        scale = torch.log(sigma.to(x.dtype))[:, None, None, None]
        h = self.conv(x) + self.lin(context.mean(1))[:, :, None, None] * scale
        return torch.tanh(h)


class _WithBackend(nn.Module):
    backend = "auto"


def _tables(sampler: str, steps: int, device, guidance=3.0, prediction="epsilon"):
    sigmas = np.asarray(karras(steps, 0.03, 14.6).double().cpu().numpy())
    return get_plan(sampler, sigmas, prediction, "ve", guidance, {}, torch.device(device))


def _inputs(device, dtype, seed=0, shape=(1, 4, 8, 8)):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 14.6).to(device)
    cond = torch.randn(shape[0], 5, 8, generator=g).to(device, dtype)
    uncond = torch.randn(shape[0], 5, 8, generator=g).to(device, dtype)
    return x, cond, uncond


# ------------------------------------------------------------------------------------------------ CPU


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2m"])
def test_predrawn_noise_reproduces_the_eager_loop_bit_for_bit(sampler):
    # What the captured graph relies on: draws made up front with draw_noise and handed to the loop give
    # the eager loop's result and leave the generator in the same state.
    torch.manual_seed(0)
    model = Toy()
    tables = _tables(sampler, 5, "cpu")
    x, cond, uncond = _inputs("cpu", torch.float32)
    g1 = torch.Generator().manual_seed(123)
    eager = run(tables, model, x, generator=g1, guidance_scale=3.0, cond=cond, uncond=uncond)
    n = int(tables.plan.noise.sum())
    assert (n > 0) == (sampler != "dpmpp_2m")
    g2 = torch.Generator().manual_seed(123)
    noise = torch.stack([graph.draw_noise(x.shape, g2, x.device) for _ in range(n)]) if n else None
    got = run(tables, model, x, generator=None, guidance_scale=3.0, cond=cond, uncond=uncond, noise=noise)
    assert torch.equal(got, eager)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_noise_buffer_of_the_wrong_length_is_an_error():
    tables = _tables("euler_ancestral", 4, "cpu")
    x, cond, uncond = _inputs("cpu", torch.float32)
    n = int(tables.plan.noise.sum())
    noise = torch.zeros((n - 1, *x.shape))
    with pytest.raises(ValueError, match=rf"holds {n - 1} draws; the plan makes {n}"):
        run(tables, Toy(), x, guidance_scale=3.0, cond=cond, uncond=uncond, noise=noise)


def test_run_graphed_refuses_cpu_tensors():
    tables = _tables("dpmpp_2m", 3, "cpu")
    x, cond, uncond = _inputs("cpu", torch.float32)
    with pytest.raises(ValueError, match=r"CUDA device; inputs\[0\] \(shape \(1, 4, 8, 8\)\) is on cpu"):
        graph.run_graphed(tables, Toy(), x, guidance_scale=3.0, cond=cond, uncond=uncond)
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA tensors"):
        df.sample(Toy(), x, karras(3, 0.03, 14.6), guidance_scale=3.0, cond=cond, uncond=uncond,
                  prediction="epsilon", cuda_graph=True)


def test_graphed_call_checks_its_noise_description():
    with pytest.raises(ValueError, match="n_noise must be an int >= 0"):
        graph._check([torch.empty(1, device="meta")], -1, None, None)


class _Entry:
    def __init__(self, model):
        self.model_ref = graph._model_ref(model)
        self.released = False
        self.graph = self

    def reset(self):
        self.released = True


class _Model:
    pass


def test_graph_cache_is_lru_and_releases_evicted_graphs():
    cache = graph.GraphCache(capacity=2)
    m = _Model()
    entries = [_Entry(m) for _ in range(3)]
    cache.put("a", entries[0])
    cache.put("b", entries[1])
    assert cache.get("a", m) is entries[0]  # "a" becomes the most recent
    cache.put("c", entries[2])  # evicts "b"
    assert cache.get("b", m) is None and entries[1].released
    assert cache.get("a", m) is entries[0] and cache.get("c", m) is entries[2] and len(cache) == 2
    cache.clear()
    assert len(cache) == 0 and entries[0].released and entries[2].released


def test_graph_cache_never_returns_a_graph_of_a_freed_model():
    cache = graph.GraphCache()
    m = _Model()
    cache.put("k", _Entry(m))
    other = _Model()
    assert cache.get("k", other) is None  # same key, different model object
    m2 = _Model()
    cache.put("k2", _Entry(m2))
    del m2
    gc.collect()
    assert cache.get("k2", _Model()) is None


def test_graph_key_changes_with_everything_the_capture_depends_on():
    model = Toy()
    x = torch.randn(1, 4, 8, 8)
    base = graph.graph_key("k", model, [x], 2, x.shape)
    assert graph.graph_key("k", model, [x.clone()], 2, x.shape) == base  # values do not matter
    assert graph.graph_key("k2", model, [x], 2, x.shape) != base
    assert graph.graph_key("k", model, [torch.randn(2, 4, 8, 8)], 2, x.shape) != base
    assert graph.graph_key("k", model, [x.double()], 2, x.shape) != base
    assert graph.graph_key("k", model, [x], 3, x.shape) != base
    assert graph.graph_key("k", Toy(), [x], 2, x.shape) != base
    model.norm.backend = "torch"  # what model.set_backend changes
    assert graph.graph_key("k", model, [x], 2, x.shape) != base
    model.norm.backend = "auto"
    assert graph.graph_key("k", model, [x], 2, x.shape) == base
    model.conv.weight = nn.Parameter(model.conv.weight.detach().clone())  # replaced, not updated in place
    assert graph.graph_key("k", model, [x], 2, x.shape) != base
    with torch.no_grad():
        model.conv.weight.add_(1.0)  # updated in place: the graph reads the new values
    assert graph.graph_key("k", model, [x], 2, x.shape) == graph.graph_key("k", model, [x], 2, x.shape)


# ------------------------------------------------------------------------------------------------ GPU


def _sample(model, x, cond, uncond, sampler, steps, seed, graphed, dtype=torch.bfloat16, backend="auto"):
    g = torch.Generator(device=x.device).manual_seed(seed)
    out = df.sample(model, x, karras(steps, 0.03, 14.6), sampler, generator=g, guidance_scale=5.0, cond=cond,
                    uncond=uncond, prediction="epsilon", net_dtype=dtype, backend=backend, cuda_graph=graphed)
    return out, g.get_state()


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde", "heun", "unipc"])
def test_cuda_graph_sample_equals_uncaptured_bit_for_bit(sampler):
    graph.clear_cache()
    torch.manual_seed(0)
    model = Toy().cuda().to(torch.bfloat16)
    for seed in (1, 2):  # the second call replays the same graph with new inputs and new noise
        x, cond, uncond = _inputs("cuda", torch.bfloat16, seed=seed)
        eager, g_eager = _sample(model, x, cond, uncond, sampler, 6, seed, False)
        got, g_graph = _sample(model, x, cond, uncond, sampler, 6, seed, True)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        assert torch.equal(got, eager), (got - eager).abs().max()
        assert torch.equal(g_graph, g_eager)
    assert len(graph.cache()) == 1


@pytest.mark.gpu
def test_cuda_graph_recaptures_when_shape_dtype_schedule_or_backend_change():
    graph.clear_cache()
    torch.manual_seed(0)
    model = Toy().cuda().to(torch.bfloat16)
    x, cond, uncond = _inputs("cuda", torch.bfloat16)
    _sample(model, x, cond, uncond, "dpmpp_2m", 4, 0, True)
    assert len(graph.cache()) == 1
    x2, c2, u2 = _inputs("cuda", torch.bfloat16, shape=(2, 4, 16, 8))
    eager, _ = _sample(model, x2, c2, u2, "dpmpp_2m", 4, 0, False)
    got, _ = _sample(model, x2, c2, u2, "dpmpp_2m", 4, 0, True)
    assert torch.equal(got, eager) and len(graph.cache()) == 2
    _sample(model, x, cond, uncond, "dpmpp_2m", 5, 0, True)  # another schedule
    _sample(model, x, cond, uncond, "euler", 4, 0, True)  # another sampler
    assert len(graph.cache()) == 4
    model32 = Toy().cuda()
    eager, _ = _sample(model32, x, cond.float(), uncond.float(), "euler", 4, 0, False, dtype=torch.float32)
    got, _ = _sample(model32, x, cond.float(), uncond.float(), "euler", 4, 0, True, dtype=torch.float32)
    assert torch.equal(got, eager)
    graph.clear_cache()


@pytest.mark.gpu
def test_cuda_graph_unet_follows_set_backend_and_matches_uncaptured():
    from diffusion_fast.models.unet import UNet2DConditionModel, UNetConfig

    graph.clear_cache()
    torch.manual_seed(0)
    cfg = UNetConfig.digits()
    with torch.device("cuda"):
        unet = UNet2DConditionModel(cfg).to(torch.bfloat16).eval()
    net = lambda x, s, c: unet(x, s, c)  # noqa: E731 - the sampler's model contract over the UNet
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, device="cuda") * 14.6
    cond = torch.randn(2, 7, cfg.cross_attention_dim, device="cuda", dtype=torch.bfloat16)
    uncond = torch.randn_like(cond)
    with torch.inference_mode():
        for backends in ({"group_norm": "eager", "attention": "sdpa"}, {"backend": "auto"}):
            unet.set_backend(**backends)
            eager, ge = _sample(net, x, cond, uncond, "dpmpp_2m_sde", 5, 3, False)
            got, gg = _sample(net, x, cond, uncond, "dpmpp_2m_sde", 5, 3, True)
            assert torch.equal(got, eager) and torch.equal(gg, ge)
    graph.clear_cache()


@pytest.mark.gpu
def test_cuda_graph_default_generator_matches_uncaptured():
    graph.clear_cache()
    model = Toy().cuda()
    x, cond, uncond = _inputs("cuda", torch.float32)
    sig = karras(5, 0.03, 14.6)
    kw = dict(guidance_scale=2.0, cond=cond, uncond=uncond, prediction="epsilon")
    torch.cuda.manual_seed(7)
    eager = df.sample(model, x, sig, "euler_ancestral", **kw)
    torch.cuda.manual_seed(7)
    got = df.sample(model, x, sig, "euler_ancestral", cuda_graph=True, **kw)
    assert torch.equal(got, eager)
    graph.clear_cache()


def test_graph_key_sees_modules_behind_a_closure_or_bound_method():
    toy = Toy()
    fn = lambda x, s, c: toy(x, s, c)  # noqa: E731
    x = torch.randn(1, 4, 8, 8)
    for model in (fn, toy.forward):
        before = graph.graph_key("k", model, [x], 0, None)
        toy.norm.backend = "eager"
        assert graph.graph_key("k", model, [x], 0, None) != before
        toy.norm.backend = "auto"
        assert graph.graph_key("k", model, [x], 0, None) == before


@pytest.mark.gpu
def test_cuda_graph_captured_under_inference_mode_replays_outside_it():
    graph.clear_cache()
    model = Toy().cuda()
    x, cond, uncond = _inputs("cuda", torch.float32)
    with torch.inference_mode():
        first, _ = _sample(model, x, cond, uncond, "euler_ancestral", 4, 5, True, dtype=torch.float32)
    with torch.no_grad():
        again, _ = _sample(model, x, cond, uncond, "euler_ancestral", 4, 5, True, dtype=torch.float32)
    eager, _ = _sample(model, x, cond, uncond, "euler_ancestral", 4, 5, False, dtype=torch.float32)
    assert len(graph.cache()) == 1
    assert torch.equal(first, eager) and torch.equal(again, eager)
    graph.clear_cache()
