"""optimize(pipe, fused_loop=True[, cuda_graph=True]): the denoising loop replaced by diffusion_fast.sample.

Every comparison calls the same tiny random pipeline (float32, CPU) with the same arguments three ways:
* stock: the diffusers pipeline with the diffusers scheduler class implementing the sampler;
* stepped: optimize(pipe) with diffusion_fast's Scheduler built from that stock scheduler (the pipeline's own
  loop, one Scheduler.step per evaluation);
* fused: optimize(pipe, fused_loop=True) (one sample() call for the whole trajectory).
Latents (output_type="latent") agree within float32 rounding (<= 1e-5 relative), decoded images too; the
same generator gives the same noise to the stochastic samplers. The errors a user sees are tested verbatim.
Run ``python tests/test_diffusers_fused.py`` for the table of measured differences.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from unittest import mock

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers_helpers import call_kwargs, rel_err, within_twice_stock  # noqa: E402
from test_sample_api import NoSync  # noqa: E402

from diffusion_fast.integrations.diffusers import configs as C  # noqa: E402
from diffusion_fast.integrations.diffusers import fused as F  # noqa: E402
from diffusion_fast.integrations.diffusers.patch import is_optimized, optimize, unoptimize  # noqa: E402
from diffusion_fast.integrations.diffusers.scheduler import METHODS, Scheduler  # noqa: E402

RTOL = 1e-5
PIPELINES = C.PIPELINES


@functools.cache
def _pipe(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return C.pipeline(name)


@contextlib.contextmanager
def pipeline(name: str, scheduler=None):
    """The cached tiny pipeline ``name``, with ``scheduler`` for the duration; left unoptimized, as it was."""
    pipe = _pipe(name)
    original = pipe.scheduler
    if scheduler is not None:
        pipe.scheduler = scheduler
    try:
        yield pipe
    finally:
        if is_optimized(pipe):
            unoptimize(pipe)
        pipe.scheduler = original


def stock_scheduler(name: str, sampler: str | None, **kw):
    """The diffusers scheduler implementing ``sampler`` on pipeline ``name``'s noise schedule (None: its own), or
    None where diffusers has no class that runs it in that pipeline (flow-matching samplers other than euler;
    FlowMatchHeun takes no custom sigmas, which Flux passes)."""
    base = _base_scheduler(name)
    cls = type(base).__name__
    if sampler is None:
        return base
    if cls.startswith("FlowMatch"):
        target = {"euler": "FlowMatchEulerDiscreteScheduler", "heun": "FlowMatchHeunDiscreteScheduler"}.get(sampler)
        if target is None or (name.startswith("flux") and sampler == "heun"):
            return None
    else:
        target = METHODS[sampler].cls
    if sampler == "dpmpp_2m_sde":
        kw = {"algorithm_type": "sde-dpmsolver++", **kw}
    return getattr(diffusers, target).from_config(base.config, **kw)


def _base_scheduler(name: str):
    cfg = C.scheduler_config(name.replace("-img2img", ""))
    return getattr(diffusers, cfg.pop("_class_name")).from_config(cfg)


def call(pipe, name: str, seed: int = 0, **extra):
    """One call of ``pipe`` with call_kwargs(name) and ``extra`` (a callable ``generator`` is called for fresh ones)."""
    kw = call_kwargs(name, seed=seed)
    kw.update(extra)
    if callable(kw["generator"]):
        kw["generator"] = kw["generator"]()
    torch.manual_seed(seed)  # the flow pipelines give their scheduler no generator: the global one draws
    with torch.no_grad():
        return pipe(**kw).images


def three_ways(name: str, sampler: str | None, scheduler_kw: dict | None = None, **extra):
    """(stock, stepped, fused) outputs of one call (see the module docstring); stock is None where diffusers has no
    scheduler class running ``sampler`` in that pipeline (then stepped and fused run Scheduler.from_config(its
    scheduler, sampler=sampler))."""
    stock_sched = stock_scheduler(name, sampler, **(scheduler_kw or {}))
    ours = Scheduler.from_config(stock_sched) if stock_sched is not None else \
        Scheduler.from_config(_base_scheduler(name), sampler=sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pipeline(name) as pipe:
            stock = None
            if stock_sched is not None:
                pipe.scheduler = stock_sched
                stock = call(pipe, name, **extra)
            pipe.scheduler = ours
            optimize(pipe)
            stepped = call(pipe, name, **extra)
            unoptimize(pipe)
            pipe.scheduler = stock_sched if stock_sched is not None else ours  # the fused loop converts a stock one
            optimize(pipe, fused_loop=True)
            with mock.patch.object(F, "sample", wraps=F.sample) as spy:
                fused = call(pipe, name, **extra)
            assert spy.call_count == 1  # the whole trajectory in one sample() call
    return stock, stepped, fused


def check(stock, stepped, fused) -> None:
    """fused = stepped = stock within float32 rounding (stock where there is one)."""
    assert torch.isfinite(fused).all()
    assert rel_err(fused, stepped) <= RTOL, f"fused vs stepped: {rel_err(fused, stepped):.3g}"
    if stock is not None:
        assert rel_err(fused, stock) <= RTOL, f"fused vs stock: {rel_err(fused, stock):.3g}"


def _flat(images):
    if isinstance(images, list):  # PIL
        import numpy as np

        return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) for i in images]))
    return torch.as_tensor(images).float()


# ------------------------------------------------------------------------------------------------------------
# Fused = stepped = stock
# ------------------------------------------------------------------------------------------------------------

UNET_SAMPLERS = [("euler", {}, {}), ("euler_ancestral", {}, {}), ("heun", {}, {}), ("dpm_2", {}, {}),
                 ("lms", {}, {}), ("ddim", {}, {"eta": 0.5}), ("dpmpp_2m", {}, {}), ("dpmpp_2m_sde", {}, {}),
                 ("unipc", {}, {}), ("dpmpp_2m", {"use_karras_sigmas": True}, {})]

CASES = (
    [("sd15", s, kw, extra) for s, kw, extra in UNET_SAMPLERS]
    + [("sd15-img2img", s, kw, extra) for s, kw, extra in UNET_SAMPLERS if s != "lms"]
    + [(n, s, {}, {}) for n in ("sdxl", "sdxl-img2img") for s in (None, "euler_ancestral", "dpmpp_2m_sde")]
    + [(n, s, {}, {}) for n in ("flux", "flux-img2img", "sd3", "sd3-img2img")
       for s in (None, "heun", "dpmpp_2m", "euler_ancestral")]
    + [("pixart-sigma", s, {}, {}) for s in (None, "euler_ancestral", "dpmpp_2m_sde", "unipc")]
)


@pytest.mark.parametrize("name,sampler,scheduler_kw,extra", CASES,
                         ids=[f"{n}-{s}{'-karras' if kw else ''}" for n, s, kw, _ in CASES])
def test_fused_loop_gives_the_stepped_and_the_stock_latents(name, sampler, scheduler_kw, extra):
    check(*three_ways(name, sampler, scheduler_kw, **extra))


@pytest.mark.parametrize("name,sampler", [("sd15", "dpmpp_2m_sde"), ("sdxl", None), ("flux", None),
                                          ("sd3-img2img", None), ("pixart-sigma", None)])
def test_decoded_images_match(name, sampler):
    stock, stepped, fused = three_ways(name, sampler, output_type="pt")
    assert fused.shape == stock.shape and fused.dim() == 4
    check(stock, stepped, fused)


def test_pil_output_and_return_dict_false_are_the_pipelines_own():
    with pipeline("sdxl") as pipe:
        ref = call(pipe, "sdxl", output_type="pil")
        optimize(pipe, fused_loop=True)
        out = call(pipe, "sdxl", output_type="pil")
        kw = call_kwargs("sdxl")
        with torch.no_grad():
            tup = pipe(**{**kw, "return_dict": False})
    assert isinstance(tup, tuple) and len(tup) == 1
    assert len(out) == len(ref) == 1
    assert (_flat(out) - _flat(ref)).abs().max() <= 1  # 8-bit images from float32-equal latents


# Batches: several prompts x num_images_per_prompt, one generator per image (per-item noise).
@pytest.mark.parametrize("name,sampler", [("sd15", "euler_ancestral"), ("sdxl-img2img", "dpmpp_2m_sde"),
                                          ("pixart-sigma", "dpmpp_2m_sde"), ("flux", None), ("sd3", None),
                                          ("sd15-img2img", "ddim")])
def test_batches_and_one_generator_per_image(name, sampler):
    n_prompts, per_prompt = 2, 2
    if name in ("flux", "sd3"):  # their encode_prompt does not repeat given pooled embeddings per image
        per_prompt = 1
    if name.startswith(("sd15", "sdxl")):
        extra = {"prompt": ["a red cat", "a blue dog"], "negative_prompt": ["blurry", "dark"]}
    else:
        extra = {k: v for k, v in C.conditioning(name, batch=n_prompts).items()}
    if name.endswith("img2img"):
        extra["image"] = torch.rand(n_prompts * per_prompt, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    def gens():  # generators are consumed: fresh ones for each call
        return [torch.Generator().manual_seed(10 + i) for i in range(n_prompts * per_prompt)]

    extra_kw = {"eta": 0.7} if sampler == "ddim" else {}  # per-item noise in DDIM's own draws
    outs = []
    for _ in range(2):
        stock, stepped, fused = three_ways(name, sampler, num_images_per_prompt=per_prompt, generator=gens,
                                           **extra, **extra_kw)
        outs.append(fused)
        assert fused.shape[0] == n_prompts * per_prompt
        check(stock, stepped, fused)
    assert torch.equal(outs[0], outs[1])


def test_per_item_generators_give_each_image_its_own_noise():
    """With one generator per image, an image does not depend on the others (stochastic sampler)."""
    with pipeline("sd15", stock_scheduler("sd15", "euler_ancestral")) as pipe:
        optimize(pipe, fused_loop=True)
        both = call(pipe, "sd15", prompt=["a red cat", "a blue dog"], negative_prompt=["", ""],
                    generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)])
        one = call(pipe, "sd15", prompt="a blue dog", negative_prompt="", generator=torch.Generator().manual_seed(6))
    assert rel_err(both[1:], one) <= RTOL


@pytest.mark.parametrize("name", ["sd15", "flux", "sd3", "pixart-sigma"])
def test_latents_given_by_the_user(name):
    sampler = "dpmpp_2m" if name == "sd15" else None
    with pipeline(name) as pipe:
        shape = call(pipe, name).shape  # the latents a call makes (Flux: packed)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    check(*three_ways(name, sampler, latents=latents))


@pytest.mark.parametrize("name,sampler,extra", [
    ("sd15", "euler", {"timesteps": [901, 701, 401, 101]}),
    ("sdxl", None, {"sigmas": [12.0, 5.0, 1.5, 0.4]}),
    ("flux", None, {"sigmas": [1.0, 0.7, 0.4, 0.1]}),
    ("sd3", None, {"sigmas": [1.0, 0.6, 0.3]}),
    ("pixart-sigma", "dpmpp_2m", {"timesteps": [999, 800, 500, 200]}),
])
def test_custom_timesteps_and_sigmas_go_to_set_timesteps(name, sampler, extra):
    check(*three_ways(name, sampler, **extra))


def test_flux_true_cfg_runs_as_one_cfg_batch():
    neg = C.conditioning("flux", seed=4)
    extra = {"true_cfg_scale": 3.0, "negative_prompt_embeds": neg["prompt_embeds"],
             "negative_pooled_prompt_embeds": neg["pooled_prompt_embeds"]}
    for name in ("flux", "flux-img2img"):
        stock, stepped, fused = three_ways(name, None, **extra)
        plain, _, _ = three_ways(name, None)
        assert rel_err(stock, plain) > 1e-2  # true CFG changes the result
        check(stock, stepped, fused)


@pytest.mark.parametrize("name,key", [("sd15", "cross_attention_kwargs"), ("sdxl-img2img", "cross_attention_kwargs"),
                                      ("sd3", "joint_attention_kwargs"), ("flux", "joint_attention_kwargs")])
def test_attention_kwargs_reach_every_network_evaluation(name, key):
    sampler = "euler" if name == "sd15" else None
    # SD3 / Flux: a LoRA scale (no LoRA layers here: the same result); the UNets: a key the attention processors
    # ignore (a LoRA scale would make encode_prompt rescale the tiny text encoders' missing LoRA layers)
    value = {"scale": 0.5} if key == "joint_attention_kwargs" else {"unused_key": 1}
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs.get(key))

    stock, stepped, _ = three_ways(name, sampler, **{key: value})
    with pipeline(name, stock_scheduler(name, sampler)) as pipe:
        optimize(pipe, fused_loop=True)
        handle = denoiser_of(pipe).register_forward_pre_hook(hook, with_kwargs=True)
        try:
            fused = call(pipe, name, **{key: value})
        finally:
            handle.remove()
    check(stock, stepped, fused)
    steps = 2 if name.endswith("img2img") else 3  # strength 0.7 of 3 steps
    assert len(seen) == 1 + steps and all(v == value for v in seen), seen  # the recorded call, then one per step


def test_sampler_option_and_sampler_options_swap_in_the_scheduler():
    with pipeline("sd15") as pipe:
        original = pipe.scheduler
        optimize(pipe, sampler="dpmpp_2m_sde", sampler_options={"eta": 0.5}, fused_loop=True)
        assert isinstance(pipe.scheduler, Scheduler) and pipe.scheduler.sampler == "dpmpp_2m_sde"
        assert pipe.scheduler.config.sampler_options["eta"] == 0.5
        fused = call(pipe, "sd15")
        unoptimize(pipe)
        assert pipe.scheduler is original
        pipe.scheduler = Scheduler.from_config(original, sampler="dpmpp_2m_sde", eta=0.5)
        stepped = call(pipe, "sd15")
    assert rel_err(fused, stepped) <= RTOL


def test_scheduler_changed_after_optimize_is_followed():
    with pipeline("sdxl") as pipe:
        optimize(pipe, fused_loop=True)
        first = call(pipe, "sdxl")
        pipe.scheduler = stock_scheduler("sdxl", "dpmpp_2m")
        second = call(pipe, "sdxl")
        unoptimize(pipe)
        assert isinstance(pipe.scheduler, diffusers.DPMSolverMultistepScheduler)  # the user's, kept
        ref = call(pipe, "sdxl")
    assert rel_err(second, ref) <= RTOL and rel_err(first, ref) > 1e-3


# ------------------------------------------------------------------------------------------------------------
# unoptimize, the per-instance class swap, the signature
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd15-img2img", "sdxl", "flux", "sd3-img2img", "pixart-sigma"])
def test_unoptimize_restores_the_pipeline_bit_for_bit(name):
    sampler = "dpmpp_2m" if name.startswith("sd15") else None
    with pipeline(name, stock_scheduler(name, sampler)) as pipe:
        cls, sched, config = type(pipe), pipe.scheduler, dict(pipe.config)
        ref = call(pipe, name)
        optimize(pipe, sampler="euler_ancestral" if name.startswith("sd") else None, fused_loop=True)
        assert type(pipe) is not cls and isinstance(pipe, cls) and type(pipe).__name__ == cls.__name__
        other = C.pipeline(name) if name == "flux" else None
        if other is not None:  # the class swap is per instance: another pipeline of the class is untouched
            assert type(other) is cls
        call(pipe, name)
        unoptimize(pipe)
        assert type(pipe) is cls and pipe.scheduler is sched and dict(pipe.config) == config
        assert not hasattr(pipe, F.ATTR)
        assert torch.equal(call(pipe, name), ref)


def test_the_call_keeps_its_signature_and_the_pipeline_its_name(tmp_path):
    with pipeline("sd15", stock_scheduler("sd15", "euler")) as pipe:
        before = inspect.signature(pipe.__call__)
        optimize(pipe, fused_loop=True)
        assert inspect.signature(pipe.__call__) == before
        assert '"_class_name": "StableDiffusionPipeline"' in pipe.to_json_string()  # what save_pretrained writes
        assert type(pipe).__name__ == "StableDiffusionPipeline"


@pytest.mark.parametrize("cls", sorted(F.PIPELINE_FAMILIES))
def test_stock_call_signature_is_the_one_the_fused_loop_follows(cls):
    """Fails when diffusers' __call__ gains, loses or reorders parameters: each needs a decision in fused.py."""
    have = tuple(p for p in inspect.signature(getattr(diffusers, cls).__call__).parameters if p != "self")
    assert have == F.SIGNATURES[cls], (f"{cls}.__call__ changed: new {set(have) - set(F.SIGNATURES[cls])}, "
                                       f"gone {set(F.SIGNATURES[cls]) - set(have)}")
    assert set(have) <= set(F.PARAMETERS), set(have) - set(F.PARAMETERS)


def test_a_changed_signature_is_refused(monkeypatch):
    monkeypatch.setitem(F.SIGNATURES, "FluxPipeline", F.SIGNATURES["FluxPipeline"][:-1] + ("new_option",))
    with pipeline("flux") as pipe:
        with pytest.raises(ValueError) as e:
            optimize(pipe, fused_loop=True)
        assert not is_optimized(pipe)
    assert str(e.value) == ("fused_loop=True follows FluxPipeline.__call__ of diffusers 0.42.1; the installed "
                            "diffusers' takes other parameters (new: ['max_sequence_length'], gone: ['new_option'], "
                            "or a new order): use fused_loop=False")


def test_a_subclass_overriding_call_is_refused():
    class Mine(diffusers.StableDiffusionXLPipeline):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    pipe = Mine(**_pipe("sdxl").components)
    with pytest.raises(TypeError) as e:
        optimize(pipe, fused_loop=True)
    assert str(e.value) == ("fused_loop=True replaces the denoising loop of StableDiffusionXLPipeline.__call__; Mine "
                            "overrides __call__, so its loop is unknown: use fused_loop=False")
    assert not is_optimized(pipe) and type(pipe) is Mine


# ------------------------------------------------------------------------------------------------------------
# No host synchronisation in the denoising part
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,sampler", [("sd15", "dpmpp_2m_sde"), ("sdxl-img2img", None), ("flux", None),
                                          ("sd3", None), ("pixart-sigma", "euler_ancestral")])
def test_the_denoising_part_never_synchronises(name, sampler, monkeypatch):
    """From the loop's first denoiser call to the end of the pipeline call (latents out): no op that reads a
    device value on the host (NoSync fails on aten::_local_scalar_dense, item, nonzero, equal, ...)."""
    mode, entered = NoSync(), []
    record = F._FusedCall._record

    def recording(self, model, args, kwargs):
        if not entered:
            entered.append(mode.__enter__())
        return record(self, model, args, kwargs)

    monkeypatch.setattr(F._FusedCall, "_record", recording)
    with pipeline(name, stock_scheduler(name, sampler)) as pipe:
        optimize(pipe, fused_loop=True)
        try:
            out = call(pipe, name)
        finally:
            if entered:
                mode.__exit__(None, None, None)
    assert entered and torch.isfinite(out).all()


def test_no_sync_mode_catches_a_sync_in_the_denoiser(monkeypatch):
    """The test above can fail: a denoiser reading a device value is caught."""
    mode, entered = NoSync(), []
    record = F._FusedCall._record

    def recording(self, model, args, kwargs):
        if not entered:
            entered.append(mode.__enter__())
        return record(self, model, args, kwargs)

    monkeypatch.setattr(F._FusedCall, "_record", recording)
    with pipeline("sd3") as pipe:
        optimize(pipe, fused_loop=True)
        hook = pipe.transformer.register_forward_pre_hook(lambda m, a: [torch.ones(1).sum().item()] and None)
        try:
            with pytest.raises(AssertionError, match="host-device sync"):
                call(pipe, "sd3")
        finally:
            hook.remove()
            if entered:
                mode.__exit__(None, None, None)


def test_one_network_call_per_evaluation():
    with pipeline("sdxl", stock_scheduler("sdxl", "heun")) as pipe:
        n = [0]  # counted inside the network: the recorded call of the loop's first iteration runs nothing
        hook = pipe.unet.conv_in.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1))
        try:
            call(pipe, "sdxl")
            stock_calls = n[0]
            n[0] = 0
            optimize(pipe, fused_loop=True)
            call(pipe, "sdxl")
        finally:
            hook.remove()
    assert n[0] == stock_calls == 5  # heun, 3 steps: 2 + 2 + 1 evaluations


# ------------------------------------------------------------------------------------------------------------
# Callbacks and interrupts
# ------------------------------------------------------------------------------------------------------------


def _recorder(names=("latents",), interrupt_at=None):
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append((i, t.clone(), {k: v.clone() for k, v in kwargs.items()}))
        if interrupt_at is not None and i == interrupt_at:
            pipe._interrupt = True
        return kwargs

    return seen, callback


@pytest.mark.parametrize("name,sampler,names", [
    ("sd15", "euler", ("latents", "prompt_embeds")),  # variance-exploding latents
    ("sd15-img2img", "dpmpp_2m", ("latents",)),  # unit-variance latents
    ("sdxl", None, ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids")),
    ("flux-img2img", None, ("latents", "prompt_embeds")),
    ("sd3", None, ("latents", "prompt_embeds", "pooled_prompt_embeds")),
])
def test_callback_sees_what_the_stock_loop_hands_it(name, sampler, names):
    stock_seen, stock_cb = _recorder()
    fused_seen, fused_cb = _recorder()
    extra = dict(callback_on_step_end_tensor_inputs=list(names))
    with pipeline(name, stock_scheduler(name, sampler)) as pipe:
        stock = call(pipe, name, callback_on_step_end=stock_cb, **extra)
        optimize(pipe, fused_loop=True)
        fused = call(pipe, name, callback_on_step_end=fused_cb, **extra)
    assert rel_err(fused, stock) <= RTOL
    assert len(fused_seen) == len(stock_seen) > 1
    for (i, t, kw), (si, st, skw) in zip(fused_seen, stock_seen):
        assert i == si and torch.equal(t, st)
        assert set(kw) == set(names)
        for k in names:
            assert kw[k].dtype == skw[k].dtype and rel_err(kw[k], skw[k]) <= RTOL, (i, k, rel_err(kw[k], skw[k]))


@pytest.mark.parametrize("name,sampler", [("sd15", "dpmpp_2m"), ("flux", None)])
def test_interrupt_from_the_callback_stops_where_the_stock_loop_stops(name, sampler):
    _, stock_cb = _recorder(interrupt_at=1)
    fused_seen, fused_cb = _recorder(interrupt_at=1)
    with pipeline(name, stock_scheduler(name, sampler)) as pipe:
        stock = call(pipe, name, callback_on_step_end=stock_cb)
        assert pipe.interrupt
        optimize(pipe, fused_loop=True)
        fused = call(pipe, name, callback_on_step_end=fused_cb)
        assert pipe.interrupt  # as the stock loop leaves it
        whole = call(pipe, name)
        assert not pipe.interrupt
    assert len(fused_seen) == 2
    assert rel_err(fused, stock) <= RTOL and rel_err(whole, stock) > 1e-3


def test_pixart_callback_and_callback_steps():
    seen = {"stock": [], "fused": []}

    def cb(key):
        return lambda step, t, latents: seen[key].append((step, int(t), latents.clone()))

    with pipeline("pixart-sigma") as pipe:
        call(pipe, "pixart-sigma", callback=cb("stock"), callback_steps=2, num_inference_steps=5)
        optimize(pipe, fused_loop=True)
        call(pipe, "pixart-sigma", callback=cb("fused"), callback_steps=2, num_inference_steps=5)
        assert "_interrupt" not in pipe.__dict__  # PixArt has no interrupt flag; none is left behind
    assert [s[:2] for s in seen["fused"]] == [s[:2] for s in seen["stock"]] and len(seen["fused"]) == 3
    for (_, _, a), (_, _, b) in zip(seen["fused"], seen["stock"]):
        assert rel_err(a, b) <= RTOL


# ------------------------------------------------------------------------------------------------------------
# What is refused, and how
# ------------------------------------------------------------------------------------------------------------

REFUSED = [
    ("sd15", {"guidance_rescale": 0.7},
     "guidance_rescale=0.7 is not supported with fused_loop=True: guidance rescale needs the standard deviation of "
     "each CFG half per step; the fused step combines the halves linearly; use optimize(pipe) without fused_loop (or "
     "leave it at its default, 0.0)"),
    ("sd15", {"ip_adapter_image_embeds": [torch.zeros(2, 1, 8)]},
     "ip_adapter_image_embeds=[<tensor (2, 1, 8)>] is not supported with fused_loop=True: IP-Adapter inputs are not "
     "supported with fused_loop=True (their image embeddings go through the attention processors per step); use "
     "optimize(pipe) without fused_loop (or leave it at its default, None)"),
    ("sdxl", {"denoising_end": 0.8},
     "denoising_end=0.8 is not supported with fused_loop=True: it ends the loop part-way (for a refiner); the fused "
     "loop runs the scheduler's whole trajectory; use optimize(pipe) without fused_loop (or leave it at its default, "
     "None)"),
    ("sdxl-img2img", {"denoising_start": 0.5},
     "denoising_start=0.5 is not supported with fused_loop=True: it starts the loop part-way (after a base model); "
     "the fused loop runs the scheduler's whole trajectory; use optimize(pipe) without fused_loop (or leave it at "
     "its default, None)"),
    ("sd3", {"skip_guidance_layers": [1]},
     "skip_guidance_layers=[1] is not supported with fused_loop=True: skip-layer guidance adds a third denoiser call "
     "on some steps; use optimize(pipe) without fused_loop (or leave it at its default, None)"),
    ("flux", {"callback_on_step_end": diffusers.callbacks.SDCFGCutoffCallback(cutoff_step_ratio=0.5)},
     "callback_on_step_end=SDCFGCutoffCallback(...) is not supported with fused_loop=True: PipelineCallback objects "
     "change the conditioning part-way, and the fused loop runs the whole trajectory with the conditioning it starts "
     "with; use optimize(pipe) without fused_loop"),
    ("sd15", {"callback_on_step_end": lambda *a: a[-1], "callback_on_step_end_tensor_inputs":
              ["latents", "negative_prompt_embeds"]},
     "callback_on_step_end_tensor_inputs names 'negative_prompt_embeds', which the fused loop cannot hand a callback "
     "(it can: latents, prompt_embeds); use optimize(pipe) without fused_loop"),
    ("sd15", {"eta": 0.3},
     "step(eta=0.3): eta is a per-step argument only for the 'ddim' sampler (as DDIMScheduler.step); set the "
     "'euler' sampler's options with Scheduler.from_config(..., eta=...)"),
]


@pytest.mark.parametrize("name,extra,message", REFUSED, ids=[next(iter(e)) for _, e, _ in REFUSED])
def test_per_step_options_the_fused_loop_cannot_honour_are_refused(name, extra, message):
    sampler = "euler" if name == "sd15" else None
    with pipeline(name, stock_scheduler(name, sampler)) as pipe:
        optimize(pipe, fused_loop=True)
        with pytest.raises(ValueError) as e:
            call(pipe, name, **extra)
        # nothing was left patched by the failed call
        assert "forward" not in denoiser_of(pipe).__dict__ and pipe.scheduler.__class__.__name__ != "_LoopScheduler"
    assert str(e.value) == message


def denoiser_of(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def test_callback_with_a_two_evaluation_sampler_is_refused():
    with pipeline("sd15", stock_scheduler("sd15", "heun")) as pipe:
        optimize(pipe, fused_loop=True)
        with pytest.raises(ValueError) as e:
            call(pipe, "sd15", callback_on_step_end=lambda p, i, t, kw: kw)
    assert str(e.value) == (
        "callback_on_step_end is not supported with fused_loop=True and the 'heun' sampler: it evaluates the network "
        "twice per step, and diffusers' loop calls back after each evaluation, with intermediate latents the fused "
        "loop never forms; use a one-evaluation sampler, or optimize(pipe) without fused_loop")


@pytest.mark.parametrize("change", ["replace", "in_place"])
def test_a_callback_that_changes_the_latents_is_refused(change):
    def cb(pipe, i, t, kw):
        if i == 1:
            if change == "replace":
                return {"latents": kw["latents"] * 0}
            kw["latents"].mul_(0)
        return kw

    with pipeline("sd3") as pipe:
        optimize(pipe, fused_loop=True)
        with pytest.raises(ValueError) as e:
            call(pipe, "sd3", callback_on_step_end=cb)
    what = "changed 'latents' at step 1: with fused_loop=True the callback may read the tensors it is given but " \
        "not replace or modify them (the trajectory runs on)" if change == "replace" else \
        "modified 'latents' in place at step 1: with fused_loop=True the callback may read the tensors it is " \
        "given but not modify them"
    assert str(e.value) == f"callback_on_step_end {what}; use optimize(pipe) without fused_loop"


def test_callback_with_cuda_graph_is_refused_before_anything_runs():
    with pipeline("sdxl") as pipe:
        optimize(pipe, fused_loop=True, cuda_graph=True)
        with pytest.raises(ValueError) as e:
            call(pipe, "sdxl", callback_on_step_end=lambda p, i, t, kw: kw)
        assert str(e.value) == (
            "callback_on_step_end is not supported with cuda_graph=True: the graph replays the whole trajectory at "
            "once, with no host code between steps; use optimize(pipe, fused_loop=True) without cuda_graph for "
            "per-step callbacks")
        if not torch.cuda.is_available():
            with pytest.raises(ValueError) as e:
                call(pipe, "sdxl")
            assert str(e.value) == ("optimize(pipe, cuda_graph=True): the pipeline runs on cpu; CUDA graphs need a "
                                    "CUDA device (pipe.to('cuda')), or optimize without cuda_graph")


def test_pndm_needs_a_sampler_and_schedules_sample_cannot_walk_are_refused():
    with pipeline("sd15") as pipe:  # SD1.5's PNDMScheduler
        with pytest.raises(ValueError) as e:
            optimize(pipe, fused_loop=True)
        assert not is_optimized(pipe)
    assert str(e.value).startswith(
        "fused_loop=True runs pipe.scheduler (PNDMScheduler) as diffusion_fast's Scheduler, which refuses it: "
        "PNDMScheduler has no matching sampler here; its noise schedule (betas, steps_offset, prediction_type, "
        "...) is used as is: pass sampler=, one of ddim, dpm_2, ")
    assert str(e.value).endswith("(optimize(pipe, fused_loop=True, sampler=...) swaps in a scheduler with that "
                                 "sampler)")
    with pipeline("sd15-img2img") as pipe:
        optimize(pipe, fused_loop=True, sampler="lms")
        with pytest.raises(ValueError) as e:
            call(pipe, "sd15-img2img")
    assert str(e.value) == (
        "fused_loop=True cannot run this schedule: LMSDiscreteScheduler keeps its full-schedule coefficients when a "
        "run starts at step 1 (img2img), where sample() over the remaining sigmas starts its multistep afresh: use "
        "step() (step() means optimize(pipe) without fused_loop)")


def test_a_denoiser_cache_is_refused():
    from diffusers.hooks import FirstBlockCacheConfig

    with pipeline("flux") as pipe:
        optimize(pipe, fused_loop=True)
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
        try:
            with pytest.raises(ValueError) as e:
                call(pipe, "flux")
        finally:
            pipe.transformer.disable_cache()
    assert str(e.value) == ("pipe.transformer has a cache enabled (enable_cache): its per-step state is not supported "
                            "with fused_loop=True; disable_cache() first, or use optimize(pipe) without fused_loop")


def test_every_refused_parameter_has_its_reason():
    for name, rule in F.PARAMETERS.items():
        assert rule in ("pass", "handled") or (rule[0] == "refused" and rule[2]), name


# ------------------------------------------------------------------------------------------------------------
# GPU: bf16 against the stock bf16 error, and the CUDA graph bit for bit
# ------------------------------------------------------------------------------------------------------------


def _gpu_call(pipe, name, dtype, seed=0, **extra):
    kw = call_kwargs(name, seed=seed, dtype=dtype, device="cuda")
    kw.update(extra)
    torch.manual_seed(seed)
    with torch.no_grad():
        return pipe(**kw).images.float()


@pytest.mark.gpu
@pytest.mark.parametrize("name", PIPELINES)
def test_bf16_fused_loop_error_is_within_twice_the_stock_bf16_error(name):
    """bf16 tolerance from the reference's own bf16 error: stock bf16 vs stock float32 (latents)."""
    sampler = "dpmpp_2m" if name.startswith("sd15") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_pipe = C.pipeline(name, device="cuda")
        ref_pipe.scheduler = stock_scheduler(name, sampler)
        ref = _gpu_call(ref_pipe, name, torch.float32)
        pipe = C.pipeline(name, dtype=torch.bfloat16, device="cuda")
        pipe.scheduler = stock_scheduler(name, sampler)
        stock = _gpu_call(pipe, name, torch.bfloat16)
        optimize(pipe, fused_loop=True)
        fused = _gpu_call(pipe, name, torch.bfloat16)
    errors = ((fused - ref).abs().max().item(), (stock - ref).abs().max().item(), ref.abs().max().item())
    assert torch.isfinite(fused).all() and within_twice_stock(*errors), errors


@pytest.mark.gpu
@pytest.mark.parametrize("name,sampler", [(n, None) for n in PIPELINES if not n.startswith("sd15")]
                         + [("sd15", "dpmpp_2m"), ("sd15-img2img", "euler_ancestral"), ("sdxl", "dpmpp_2m_sde")])
def test_cuda_graph_replay_equals_the_fused_loop_bit_for_bit(name, sampler, monkeypatch):
    from diffusion_fast.samplers import graph

    captures = []
    capture = graph._capture
    monkeypatch.setattr(graph, "_capture", lambda *a, **k: captures.append(1) or capture(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = C.pipeline(name, dtype=torch.bfloat16, device="cuda")
        pipe.scheduler = stock_scheduler(name, sampler)
        optimize(pipe, fused_loop=True)
        eager = [_gpu_call(pipe, name, torch.bfloat16, seed=s) for s in (0, 1)]
        unoptimize(pipe)
        optimize(pipe, fused_loop=True, cuda_graph=True)
        graphed = [_gpu_call(pipe, name, torch.bfloat16, seed=s) for s in (0, 1, 0)]
    assert len(captures) == 1  # captured once, replayed for the next calls (new noise, new conditioning)
    assert torch.equal(graphed[0], eager[0]) and torch.equal(graphed[1], eager[1]) and torch.equal(graphed[2],
                                                                                                 eager[0])
    assert not torch.equal(graphed[0], graphed[1])


@pytest.mark.gpu
@pytest.mark.parametrize("generator", ["cpu", "cpu-list", "cuda"])
def test_generators_on_either_device_draw_the_scheduler_noise_on_cuda(generator):
    """Stochastic sampler on a CUDA pipeline: a CPU generator (what diffusers' examples pass; draws are copied to the
    GPU), one per image, or a CUDA one give the noise Scheduler.step draws (the same kernels on both sides)."""
    def gens():
        if generator == "cpu-list":
            return [torch.Generator().manual_seed(i) for i in range(2)]
        return torch.Generator(generator).manual_seed(0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = C.pipeline("sdxl", device="cuda")
        pipe.scheduler = Scheduler.from_config(stock_scheduler("sdxl", "euler_ancestral"))
        optimize(pipe)
        extra = dict(prompt=["a red cat", "a dog"], negative_prompt=["", ""])
        stepped = _gpu_call(pipe, "sdxl", torch.float32, generator=gens(), **extra)
        unoptimize(pipe)
        optimize(pipe, fused_loop=True)
        fused = _gpu_call(pipe, "sdxl", torch.float32, generator=gens(), **extra)
    assert rel_err(fused, stepped) <= RTOL


# ------------------------------------------------------------------------------------------------------------
# The table of measured differences: python tests/test_diffusers_fused.py
# ------------------------------------------------------------------------------------------------------------

def _optimized_stock(name: str, sampler: str | None, scheduler_kw: dict | None = None, **extra):
    """optimize(pipe) (the kernels only) with the stock scheduler, or None where there is no stock scheduler."""
    stock_sched = stock_scheduler(name, sampler, **(scheduler_kw or {}))
    if stock_sched is None:
        return None
    with pipeline(name, stock_sched) as pipe:
        optimize(pipe)
        return call(pipe, name, **extra)


if __name__ == "__main__":
    torch.set_num_threads(1)
    diffusers.utils.logging.set_verbosity_error()
    print(f"{'pipeline':14s} {'sampler':16s} {'vs stepped':>11s} {'vs optimize':>12s} {'vs stock':>9s}   (fused loop, "
          "max |diff| / max |reference|, float32 latents)")
    for name, sampler, kw, extra in CASES:
        stock, stepped, fused = three_ways(name, sampler, kw, **extra)
        optimized = _optimized_stock(name, sampler, kw, **extra)
        label = (sampler or "(its own)") + ("-karras" if kw else "")
        cols = [f"{rel_err(fused, ref):.2e}" if ref is not None else "-" for ref in (stepped, optimized, stock)]
        print(f"{name:14s} {label:16s} {cols[0]:>11s} {cols[1]:>12s} {cols[2]:>9s}")
