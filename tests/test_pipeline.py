"""The text-to-image pipeline on the embedded digits model: loading, seeds, outputs, prompt following."""

from __future__ import annotations

import inspect
import json
import shutil

import pytest
import torch

import diffusion_fast
from diffusion_fast import Pipeline
from diffusion_fast.pipeline import WEIGHTS_DIR, PipelineOutput

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_pretrained("digits")


@pytest.fixture(scope="module")
def judge():
    """An SVC trained on real digits (the evaluation's judge; ~99% held out)."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from sklearn.svm import SVC

    ds = sklearn_datasets.load_digits()
    return SVC(kernel="rbf", gamma="scale", C=10.0).fit(ds.data, ds.target)


def test_embedded_weights_are_small_safetensors_with_config_and_card():
    d = WEIGHTS_DIR / "digits"
    assert (d / "model.safetensors").stat().st_size < 5_000_000
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["format"] == "diffusion_fast.pipeline/1" and cfg["prediction"] == "v_prediction"
    card = (d / "MODEL_CARD.md").read_text()
    assert "load_digits" in card and "accuracy" in card.lower()


def test_weights_are_read_with_safetensors_only():
    src = inspect.getsource(diffusion_fast.pipeline)
    assert "torch.load" not in src and "pickle" not in src.replace("unpickled", "")


def test_pipeline_is_exported_lazily():
    assert diffusion_fast.Pipeline is Pipeline


def test_outputs(pipe):
    out = pipe("a handwritten seven", seed=7, progress=False)
    assert isinstance(out, PipelineOutput) and out.seed == 7 and out.trajectory is None
    assert len(out.images) == 1
    img = out.images[0]
    assert img.size == (8, 8) and img.mode == "L"
    assert out.samples.shape == (1, 1, 8, 8) and out.samples.dtype == torch.float32
    assert 0.0 <= out.samples.min() and out.samples.max() <= 1.0
    # Ink is dark on light paper: the PNG is 255 * (1 - intensity).
    px = torch.tensor(list(img.tobytes()), dtype=torch.float32).view(8, 8)
    assert torch.equal(px, (255 * (1 - out.samples[0, 0])).round())


def test_seed_is_bit_identical_and_seeds_differ(pipe):
    a = pipe("7", seed=123, progress=False).samples
    b = pipe("7", seed=123, progress=False).samples
    c = pipe("7", seed=124, progress=False).samples
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    g = pipe("7", generator=torch.Generator().manual_seed(123), progress=False)
    assert torch.equal(g.samples, a) and g.seed is None


def test_explicit_torch_backend_matches_auto_on_cpu(pipe):
    ref = Pipeline.from_pretrained("digits", backend="torch")
    assert torch.equal(ref("3", seed=5, progress=False).samples, pipe("3", seed=5, progress=False).samples)


def test_num_images_draws_different_noise_and_prompt_lists(pipe):
    out = pipe("seven", num_images=3, seed=1, progress=False)
    assert len(out.images) == 3 and out.samples.shape == (3, 1, 8, 8)
    assert not torch.equal(out.samples[0], out.samples[1]) and not torch.equal(out.samples[1], out.samples[2])
    two = pipe(["one", "two"], num_images=2, seed=1, progress=False)
    assert two.samples.shape == (4, 1, 8, 8)


def test_seed_drawn_at_random_is_reported_and_reproduces(pipe):
    out = pipe("4", progress=False)
    assert isinstance(out.seed, int)
    assert torch.equal(pipe("4", seed=out.seed, progress=False).samples, out.samples)


def test_trajectory_and_callback(pipe):
    calls = []
    out = pipe("a handwritten two", seed=3, steps=6, progress=False, return_trajectory=True,
               callback=lambda d: calls.append(sorted(d)))
    assert len(calls) == 6 and calls[0] == ["denoised", "i", "sigma", "sigma_next", "x"]
    tr = out.trajectory
    assert [s.i for s in tr] == [-1, 0, 1, 2, 3, 4, 5]
    assert tr[0].sigma == pytest.approx(pipe.sigma_max) and tr[-1].sigma_next == 0.0
    # The last state is the image.
    torch.testing.assert_close(pipe.to_unit(tr[-1].x), out.samples, rtol=0, atol=0)
    strip = pipe.strip(tr, scale=4)
    assert strip.size[1] > strip.size[0] / 7 / 2 and strip.mode == "L"
    assert torch.equal(out.samples, pipe("a handwritten two", seed=3, steps=6, progress=False).samples)


def test_guidance_one_skips_the_unconditional_half(pipe, monkeypatch):
    seen = {}
    real = diffusion_fast.sample

    def spy(model, x, sigmas, sampler, **kw):
        seen.update(kw)
        return real(model, x, sigmas, sampler, **kw)

    monkeypatch.setattr(diffusion_fast, "sample", spy)
    pipe("5", seed=0, guidance_scale=1.0, progress=False, negative_prompt="3")
    assert "guidance_scale" not in seen and "uncond" not in seen and "cuda_graph" not in seen
    seen.clear()
    pipe("5", seed=0, guidance_scale=3.0, progress=False)
    assert seen["guidance_scale"] == 3.0 and seen["uncond"].shape == seen["cond"].shape
    assert seen["prediction"] == "v_prediction"


def test_cuda_graph_is_forwarded_only_when_true(pipe, monkeypatch):
    seen = {}
    monkeypatch.setattr(diffusion_fast, "sample", lambda model, x, sigmas, sampler, **kw: seen.update(kw) or x)
    pipe("5", seed=0, progress=False)
    assert "cuda_graph" not in seen
    pipe("5", seed=0, progress=False, cuda_graph=True)
    assert seen["cuda_graph"] is True


def test_negative_prompt_changes_the_image(pipe):
    a = pipe("8", seed=2, progress=False).samples
    b = pipe("8", seed=2, progress=False, negative_prompt="3").samples
    assert not torch.equal(a, b)


def test_follows_the_prompt(pipe, judge):
    """A reduced version of train/evaluate_digits.py: 10 digits x 2 seeds, default settings."""
    correct = 0
    for seed in (1000, 1001):
        out = pipe([f"a handwritten {w}" for w in DIGIT_WORDS], seed=seed, progress=False)
        pred = judge.predict(out.samples.reshape(10, -1).double().numpy() * 16.0)
        correct += int((pred == list(range(10))).sum())
    assert correct >= 16, f"{correct}/20 generated digits read as prompted"


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(steps=0), ValueError, "steps must be >= 1"),
    (dict(steps=2.5), TypeError, "steps must be an int"),
    (dict(sampler="nope"), ValueError, "sampler must be one of"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be a finite number"),
    (dict(num_images=0), ValueError, "num_images must be >= 1"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "either seed or generator"),
    (dict(seed=-1), ValueError, "seed must be an int >= 0"),
])
def test_argument_errors(pipe, kwargs, err, match):
    with pytest.raises(err, match=match):
        pipe("7", progress=False, **kwargs)


def test_unknown_word_is_a_value_error(pipe):
    with pytest.raises(ValueError, match="unknown word 'banana'.*vocabulary is:"):
        pipe("banana", progress=False)
    with pytest.raises(ValueError, match="unknown word 'purple'"):
        pipe("7", negative_prompt="purple", progress=False)


def test_from_pretrained_local_folder_and_errors(tmp_path):
    shutil.copytree(WEIGHTS_DIR / "digits", tmp_path / "m")
    p = Pipeline.from_pretrained(tmp_path / "m")
    q = Pipeline.from_pretrained(str(tmp_path / "m"))
    assert torch.equal(p("1", seed=0, progress=False).samples, q("1", seed=0, progress=False).samples)
    with pytest.raises(FileNotFoundError, match="neither a built-in model"):
        Pipeline.from_pretrained("sd99")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Pipeline.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="backend must be one of"):
        Pipeline.from_pretrained("digits", backend="eager")


@pytest.mark.gpu
def test_gpu_unet_matches_float64_reference():
    """The digits UNet through the fast backends on CUDA, against a float64 CPU run of the same weights."""
    pipe = Pipeline.from_pretrained("digits")
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([-1500.0, -300.0, 0.0, 700.0])
    ctx = pipe.encode_prompts(["7", "a handwritten two", "", "the digit 0"])
    with torch.no_grad():
        ref = unet.double().set_backend(group_norm="eager", attention="sdpa")(x.double(), t, ctx.double())
        unet.float().cuda()
        fast = unet.set_backend("auto")(x.cuda(), t.cuda(), ctx.cuda()).double().cpu()
        plain = unet.set_backend("torch")(x.cuda(), t.cuda(), ctx.cuda()).double().cpu()
    err_fast, err_plain = (fast - ref).abs().max().item(), (plain - ref).abs().max().item()
    assert err_fast <= 2 * err_plain + 1e-5, (err_fast, err_plain)


@pytest.mark.gpu
def test_gpu_pipeline_seeds_and_cuda_graph():
    pipe = Pipeline.from_pretrained("digits", device="cuda")
    prompts = [f"a handwritten {w}" for w in DIGIT_WORDS]
    a = pipe(prompts, seed=11, progress=False).samples
    assert torch.equal(a, pipe(prompts, seed=11, progress=False).samples)
    assert torch.equal(a, pipe(prompts, seed=11, progress=False, cuda_graph=True).samples)
    assert not torch.equal(a, pipe(prompts, seed=12, progress=False).samples)
    bf = Pipeline.from_pretrained("digits", device="cuda", dtype=torch.bfloat16)
    c = bf(prompts, seed=11, progress=False).samples
    assert torch.isfinite(c).all() and c.shape == a.shape


@pytest.mark.parametrize("prompt, match", [(" ".join(["seven"] * 10_000), "has 10000 words"),
                                           (" ".join(["banana"] * 10_000), "unknown word 'banana'"),
                                           (" ".join(f"w{i}" for i in range(10_000)), r"\(and 9995 more\)")])
def test_a_huge_prompt_gives_a_short_error(pipe, prompt, match):
    with pytest.raises(ValueError, match=match) as ei:
        pipe(prompt, progress=False)
    assert len(str(ei.value)) < 400
