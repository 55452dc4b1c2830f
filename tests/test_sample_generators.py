"""sample(..., generator=[g0, g1, ...]): row b's noise comes from generator b alone, whatever the batch."""

import pytest
import torch

import diffusion_fast as df
from diffusion_fast.samplers.loop import draw_noise
from diffusion_fast.schedules import karras

MU, S2 = 0.3, 0.25


def gauss_D(x, sigma):
    """Exact denoiser of N(MU, S2) data: elementwise, so a row's result cannot depend on other rows."""
    s = sigma.view(-1, *[1] * (x.dim() - 1)).double()
    return (MU + S2 / (S2 + s * s) * (x.double() - MU)).float()


def _gens(seeds, device="cpu"):
    return [torch.Generator(device).manual_seed(s) for s in seeds]


def test_draw_noise_row_b_is_drawn_from_generator_b():
    seeds = [5, 11, 5, 2]
    z = draw_noise((4, 3, 8), _gens(seeds), torch.device("cpu"))
    assert z.shape == (4, 3, 8) and z.dtype == torch.float32
    for b, s in enumerate(seeds):
        assert torch.equal(z[b], torch.randn(3, 8, generator=torch.Generator().manual_seed(s)))
    assert torch.equal(z[0], z[2]) and not torch.equal(z[0], z[1])


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "ddim"])
def test_each_row_equals_its_own_single_row_run_bit_for_bit(sampler):
    sig = karras(7, 0.05, 10.0)
    seeds = [3, 17, 29, 41, 53]
    opts = {"eta": 1.0} if sampler == "ddim" else {}
    x = torch.randn(5, 2, 16, generator=torch.Generator().manual_seed(0)) * 10
    batched = df.sample(gauss_D, x, sig, sampler, generator=_gens(seeds), **opts)
    for b, s in enumerate(seeds):
        alone = df.sample(gauss_D, x[b:b + 1], sig, sampler, generator=torch.Generator().manual_seed(s), **opts)
        assert torch.equal(batched[b:b + 1], alone), f"row {b} (seed {s}) differs from its own run"
    # and in another batch, in another position, with other neighbours
    again = df.sample(gauss_D, x[[3, 1]], sig, sampler, generator=_gens([seeds[3], seeds[1]]), **opts)
    assert torch.equal(again, batched[[3, 1]])


def test_a_list_of_generators_advances_each_generator():
    sig = karras(4, 0.05, 10.0)
    gens = _gens([1, 2])
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    a = df.sample(gauss_D, x, sig, "euler_ancestral", generator=gens)
    b = df.sample(gauss_D, x, sig, "euler_ancestral", generator=gens)  # generators moved on: new noise
    assert not torch.equal(a, b)


@pytest.mark.parametrize("gen, exc, match", [
    (lambda: _gens([1, 2]), ValueError, r"list of 2 generators but the batch has 3 rows"),
    (lambda: _gens([1, 2]) + [7], TypeError, r"generator\[2\] must be a torch.Generator, got int"),
    (lambda: "seed", TypeError, r"generator must be a torch.Generator, got str"),
])
def test_bad_generator_lists_are_named(gen, exc, match):
    x = torch.randn(3, 8)
    with pytest.raises(exc, match=match):
        df.sample(gauss_D, x, karras(3, 0.05, 10.0), "euler_ancestral", generator=gen())


@pytest.mark.gpu
def test_gpu_cuda_graph_with_per_row_generators_equals_eager():
    sig = karras(6, 0.05, 10.0)
    x = torch.randn(3, 4, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 10
    eager = df.sample(gauss_D, x, sig, "euler_ancestral", generator=_gens([1, 2, 3], "cuda"))
    graphed = df.sample(gauss_D, x, sig, "euler_ancestral", generator=_gens([1, 2, 3], "cuda"), cuda_graph=True)
    assert torch.equal(eager, graphed)


# -- the digits Pipeline passes per-image generators and per-prompt negatives through ------------------------

@pytest.fixture(scope="module")
def pipe():
    return df.Pipeline.from_pretrained("digits")


def test_pipeline_image_k_starts_from_generator_k(pipe):
    prompts = ["3", "7", "0"]
    out = pipe(prompts, steps=3, generator=_gens([10, 20, 30]), progress=False, return_trajectory=True)
    assert out.seed is None and len(out.images) == 3
    for k, s in enumerate([10, 20, 30]):
        alone = pipe(prompts[k], steps=3, seed=s, progress=False, return_trajectory=True)
        assert torch.equal(out.trajectory[0].x[k], alone.trajectory[0].x[0])


def test_pipeline_per_image_generators_with_num_images_are_prompt_major(pipe):
    out = pipe(["3", "7"], steps=2, num_images=2, generator=_gens([1, 2, 3, 4]), progress=False,
               return_trajectory=True)
    z = out.trajectory[0].x
    for k, s in enumerate([1, 2, 3, 4]):
        assert torch.equal(z[k], torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(s)) * z.new_tensor(
            float(pipe.sigmas(2)[0])))


def test_pipeline_negative_prompt_list_is_one_per_prompt(pipe):
    both = pipe(["3", "3"], negative_prompt=["8", "0"], steps=4, generator=_gens([5, 5]), progress=False)
    for k, neg in enumerate(["8", "0"]):
        alone = pipe("3", negative_prompt=neg, steps=4, seed=5, progress=False)
        # batched network calls may round differently in the last bits (see diffusion_fast.batch)
        torch.testing.assert_close(both.samples[k], alone.samples[0], rtol=0, atol=1e-5)
    assert not torch.equal(both.samples[0], both.samples[1])


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(negative_prompt=["8"]), ValueError, r"one str per prompt \(2\), got 1 items"),
    (dict(negative_prompt=["8", 0]), ValueError, r"one str per prompt"),
    (dict(negative_prompt=8), TypeError, r"negative_prompt must be a str, a list of str or None, got int"),
    (dict(generator=[torch.Generator()]), ValueError, r"list of 1 generators but the batch has 2 rows"),
])
def test_pipeline_list_argument_errors(pipe, kwargs, err, match):
    with pytest.raises(err, match=match):
        pipe(["3", "7"], steps=2, progress=False, **kwargs)
