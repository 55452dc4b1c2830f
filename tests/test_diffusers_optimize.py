"""optimize / unoptimize on the UNet pipelines (SD1.5, SDXL, their img2img), and optimize's API and errors.

Every comparison is against the same stock diffusers pipeline called with the same arguments (random tiny
weights from configs, float32 on CPU): latents within float32 rounding (<= 1e-5 relative), bit-identical
after unoptimize, weights untouched.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers_helpers import (  # noqa: E402
    UNET_PIPELINES,
    OpSpy,
    assert_same_weights,
    bf16_errors,
    chosen_backends,
    count_forwards,
    denoiser,
    rel_err,
    run,
    weights,
    within_twice_stock,
)

import diffusion_fast  # noqa: E402
from diffusion_fast.integrations.diffusers import configs as C  # noqa: E402
from diffusion_fast.integrations.diffusers import patch as O  # noqa: E402
from diffusion_fast.integrations.diffusers import processors as P  # noqa: E402
from diffusion_fast.integrations.diffusers.patch import (  # noqa: E402
    format_report,
    is_optimized,
    optimize,
    report,
    unoptimize,
)


def attention_modules(model):
    return [m for m in model.modules() if isinstance(m, diffusers.models.attention_processor.Attention)]


def resnets(model):
    return [m for m in model.modules() if isinstance(m, diffusers.models.resnet.ResnetBlock2D)]


@pytest.mark.parametrize("name", UNET_PIPELINES)
def test_optimized_unet_pipeline_matches_stock_and_unoptimize_restores_it(name):
    pipe = C.pipeline(name)
    model = denoiser(pipe)
    stock = run(pipe, name)
    processors = dict(model.attn_processors)
    classes = {n: type(m) for n, m in model.named_modules()}
    signature = inspect.signature(pipe.__call__)
    before = weights(model)

    assert optimize(pipe) is pipe and is_optimized(pipe)
    assert inspect.signature(pipe.__call__) == signature
    assert all(isinstance(p, P.FastAttnProcessor) for p in model.attn_processors.values())
    out = run(pipe, name)
    assert out.shape == stock.shape and torch.isfinite(out).all()
    assert rel_err(out, stock) <= 1e-5
    assert_same_weights(model, before)

    assert unoptimize(pipe) is pipe and not is_optimized(pipe)
    assert all(model.attn_processors[k] is v for k, v in processors.items())
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not any("diffusion_fast_backend" in m.__dict__ for m in model.modules())
    assert torch.equal(run(pipe, name), stock)
    assert_same_weights(model, before)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_spy_every_attention_and_resnet_runs_the_ops(name, monkeypatch):
    pipe = optimize(C.pipeline(name))
    model = denoiser(pipe)
    n_attn, n_res = len(attention_modules(model)), len(resnets(model))
    evals = count_forwards(model)
    with OpSpy(monkeypatch) as spy:
        run(pipe, name, steps=2)
    assert evals[0] >= 2 and n_attn > 0 and n_res > 0  # PNDM (SD1.5) evaluates once more than its steps
    assert spy.counts == {"attention": n_attn * evals[0], "group_norm": 2 * n_res * evals[0]}
    # q, k, v reach the op as [B, S, H, D] views of the projections: no transpose, no copy.
    for q, k, v in spy.attention:
        for t in (q, k, v):
            assert t.dim() == 4 and t._base is not None and t.stride(-1) == 1
            assert t.stride(1) == t.shape[2] * t.shape[3]  # tokens are rows of the projection output
    rows = report(pipe)
    assert {r.runs for r in rows} == {"diffusion_fast"}
    assert sum(r.calls for r in rows) == n_attn * evals[0] and not any(r.fallbacks for r in rows)
    assert format_report(pipe).splitlines()[:2] == [
        f"attention: {n_attn}/{n_attn} modules run diffusion_fast; {n_attn * evals[0]} calls on diffusion_fast, "
        "0 on the stock processor so far",
        f"resnet: {n_res}/{n_res} modules run diffusion_fast"]


def unet_with_narrow_heads():
    """SD1.5-tiny layout whose first block has head dim 4 (the op needs multiples of 8): those keep SDPA."""
    cfg = dict(C.unet_config("sd15"), attention_head_dim=8)  # 8 heads: 32 ch -> dim 4, 64 ch -> dim 8
    torch.manual_seed(3)
    return diffusers.UNet2DConditionModel(**cfg).eval()


def test_heads_the_op_declines_keep_their_processor_and_are_reported(monkeypatch):
    pipe = C.pipeline("sd15")
    pipe.unet = unet_with_narrow_heads()
    stock = run(pipe, "sd15", steps=2)
    optimize(pipe)
    rows = [r for r in report(pipe) if r.kind == "attention"]
    kept = [r for r in rows if r.runs != "diffusion_fast"]
    served = [r for r in rows if r.runs == "diffusion_fast"]
    assert kept and served
    for r in kept:
        assert r.name.startswith(("unet.down_blocks.0.", "unet.up_blocks.1."))
        assert r.runs == r.original == "AttnProcessor2_0"
        assert r.reason == "head dim 4: diffusion_fast.ops.attention serves multiples of 8 up to 256"
    assert all(isinstance(pipe.unet.get_submodule(r.name[len("unet."):]).processor,
                          diffusers.models.attention_processor.AttnProcessor2_0) for r in kept)
    assert "(head dim 4: diffusion_fast.ops.attention serves multiples of 8 up to 256)" in format_report(pipe)
    evals = count_forwards(pipe.unet)
    with OpSpy(monkeypatch) as spy:
        out = run(pipe, "sd15", steps=2)
    assert spy.counts["attention"] == evals[0] * len(served)
    assert rel_err(out, stock) <= 1e-5


def test_fused_qkv_projections_are_served_from_views_of_one_projection(monkeypatch):
    pipe = C.pipeline("sd15")
    pipe.fuse_qkv_projections(unet=True, vae=False)
    stock = run(pipe, "sd15", steps=2)
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    optimize(pipe)
    with OpSpy(monkeypatch) as spy:
        out = run(pipe, "sd15", steps=2)
    assert rel_err(out, stock) <= 1e-5
    self_attn = [(q, k, v) for q, k, v in spy.attention if q.shape[1] == k.shape[1]]
    assert self_attn
    for q, k, v in self_attn:  # chunks of the fused qkv output, read through strides
        for t in (q, k, v):
            assert t._base is not None and t.stride(1) == 3 * t.shape[2] * t.shape[3]
    unoptimize(pipe)
    assert torch.equal(run(pipe, "sd15", steps=2), stock)


def test_spatial_attention_with_group_norm_and_residual_matches_stock():
    """The VAE-style attention (4-D input, its own GroupNorm, residual connection, one head) takes the same path."""
    attn = C.pipeline("sd15").vae.decoder.mid_block.attentions[0]
    assert attn.group_norm is not None and attn.residual_connection and attn.heads == 1
    x = torch.randn(2, attn.query_dim, 5, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = attn(x)
        processor = P.FastAttnProcessor(attn.processor)
        attn.set_processor(processor)
        ours = attn(x)
    assert processor.calls == 1 and not processor.fallbacks
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5 * stock.abs().max().item())


def test_calls_the_op_cannot_take_run_the_stock_processor_and_are_counted():
    unet = C.pipeline("sd15").unet.double()
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 16, attn.query_dim, generator=g).double(), torch.randn(2, 5, 32, generator=g).double()
    mask = torch.zeros(2, 1, 5, dtype=torch.float64)
    mask[:, :, 3:] = -10000.0
    with torch.no_grad():
        stock = attn(x, ctx), attn(x.float().double(), ctx, attention_mask=mask)
        processor = P.FastAttnProcessor(attn.processor)
        attn.set_processor(processor)
        ours = attn(x, ctx), attn(x, ctx, attention_mask=mask)
    assert all(torch.equal(a, b) for a, b in zip(ours, stock))
    assert processor.calls == 0 and processor.fallbacks == {
        "dtype float64: diffusion_fast.ops.attention serves float32, float16 and bfloat16": 1, P.MASK_REASON: 1}


def resnet_block(**kw) -> diffusers.models.resnet.ResnetBlock2D:
    torch.manual_seed(0)
    block = diffusers.models.resnet.ResnetBlock2D(**kw).eval()
    with torch.no_grad():  # norms away from identity, so a mix-up of weight and bias shows
        for n in (block.norm1, block.norm2):
            n.weight.normal_(1.0, 0.3)
            n.bias.normal_(0.0, 0.3)
    return block


@pytest.mark.parametrize("kw, temb_batch", [
    (dict(in_channels=16, out_channels=24, temb_channels=12, groups=8), 3),  # conv shortcut, per-sample temb
    (dict(in_channels=16, temb_channels=12, groups=4, up=True, output_scale_factor=2.0), 1),  # temb broadcast
    (dict(in_channels=16, out_channels=8, temb_channels=12, groups=4, down=True, skip_time_act=True), 3),
    (dict(in_channels=16, temb_channels=None, groups=8, eps=1e-5), None),  # a VAE-style block: no temb
])
def test_fused_resnet_block_matches_the_stock_block(kw, temb_batch):
    block = resnet_block(**kw)
    assert P.resnet_reason(block) is None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, 7, 5, generator=g) + 0.5  # odd spatial size, off-centre
    temb = None if temb_batch is None else torch.randn(temb_batch, 12, generator=g)
    with torch.no_grad():
        stock = block(x, temb)
        block.__class__ = P.FusedResnetBlock2D
        fused = block(x, temb)
    assert fused.shape == stock.shape
    torch.testing.assert_close(fused, stock, rtol=1e-5, atol=1e-5 * stock.abs().max().item())


@pytest.mark.parametrize("kw, reason", [
    (dict(time_embedding_norm="scale_shift"), "time_embedding_norm='scale_shift'"),
    (dict(non_linearity="mish"), "nonlinearity Mish"),
])
def test_resnet_blocks_the_op_cannot_fuse_are_left_alone(kw, reason):
    block = resnet_block(in_channels=16, temb_channels=12, groups=8, **kw)
    assert P.resnet_reason(block).startswith(reason)


def test_resnet_with_hooked_norm_is_left_alone():
    block = resnet_block(in_channels=16, temb_channels=12, groups=8)
    block.norm2.register_forward_hook(lambda *a: None)
    assert P.resnet_reason(block) == "norm2 has forward hooks (the fused op would skip them)"


def test_unet_with_scale_shift_resnets_keeps_them_and_still_matches(monkeypatch):
    pipe = C.pipeline("sd15")
    torch.manual_seed(4)
    pipe.unet = diffusers.UNet2DConditionModel(**C.unet_config("sd15"), resnet_time_scale_shift="scale_shift").eval()
    stock = run(pipe, "sd15", steps=2)
    optimize(pipe)
    kept = [r for r in report(pipe) if r.kind == "resnet"]
    assert kept and all(r.runs == "ResnetBlock2D" and "scale_shift" in r.reason for r in kept)
    with OpSpy(monkeypatch) as spy:
        out = run(pipe, "sd15", steps=2)
    assert "group_norm" not in spy.counts and spy.counts["attention"] > 0
    assert rel_err(out, stock) <= 1e-5


# ------------------------------------------------------------------------------------------------------------
# The API: options, repeated calls, errors
# ------------------------------------------------------------------------------------------------------------


def test_optimize_twice_is_idempotent_and_other_options_are_refused():
    pipe = C.pipeline("sd15")
    optimize(pipe)
    processors = dict(pipe.unet.attn_processors)
    assert optimize(pipe) is pipe
    assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())
    with pytest.raises(ValueError, match=r"already optimized with backend='auto'; call unoptimize\(pipe\) before "
                                         r"optimizing with backend='torch'"):
        optimize(pipe, backend="torch")
    unoptimize(pipe)
    optimize(pipe, backend="torch")
    assert {p.backend for p in pipe.unet.attn_processors.values()} == {"torch"}
    assert {m.diffusion_fast_backend for m in resnets(pipe.unet)} == {"torch"}


def test_a_unet_shared_by_two_pipelines_is_optimized_once():
    pipe = C.pipeline("sd15")
    other = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    optimize(pipe)
    with pytest.raises(ValueError, match="optimized through another pipeline that shares it; unoptimize that one"):
        optimize(other)
    assert not is_optimized(other)
    unoptimize(pipe)
    optimize(other)
    assert is_optimized(other)


def test_unsupported_pipeline_types_are_refused_with_the_list():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    expected = ("optimize does not support DDPMPipeline; supported pipelines: StableDiffusionPipeline, "
                "StableDiffusionImg2ImgPipeline, StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, "
                "FluxPipeline, FluxImg2ImgPipeline, StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline, "
                "PixArtSigmaPipeline")
    with pytest.raises(TypeError) as e:
        optimize(pipe)
    assert str(e.value) == expected
    with pytest.raises(TypeError, match="optimize does not support Module; supported pipelines: "):
        optimize(torch.nn.Module())


@pytest.mark.parametrize("kw, exc, message", [
    (dict(sampler="dpmpp_9"), ValueError, "sampler must be one of ddim, dpm_2, dpmpp_2m, "),
    (dict(fused_loop=True), ValueError, "fused_loop=True runs pipe.scheduler (PNDMScheduler) as diffusion_fast's "
                                        "Scheduler, which refuses it: PNDMScheduler has no matching sampler here"),
    (dict(cuda_graph=True), ValueError, "cuda_graph=True needs fused_loop=True"),
    (dict(sampler_options={"eta": 0.5}), ValueError, "sampler_options needs sampler="),
    (dict(fused_loop=1), TypeError, "fused_loop must be a bool, got int"),
    (dict(sampler=3), TypeError, "sampler must be None or a sampler name, got int"),
    (dict(backend="fast"), ValueError, "backend must be 'auto' or one of torch, triton, cuda; got 'fast'"),
    (dict(backend=None), TypeError, "backend must be a str, got NoneType"),
])
def test_bad_options_are_refused_and_leave_the_pipeline_alone(kw, exc, message):
    pipe = C.pipeline("sd15")
    processors = dict(pipe.unet.attn_processors)
    with pytest.raises(exc) as e:
        optimize(pipe, **kw)
    assert str(e.value).startswith(message)
    assert not is_optimized(pipe)
    assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())


def test_a_backend_that_cannot_run_here_is_refused_with_its_reason():
    from diffusion_fast import ops

    pipe = C.pipeline("sd15")
    for backend in ("triton", "cuda"):
        reasons = [(op, ops.status(op)[backend]) for op in ("attention", "group_norm")]
        reasons = [(op, r) for op, r in reasons if r is not None]
        if reasons:
            op, reason = reasons[0]
            with pytest.raises(ValueError) as e:
                optimize(pipe, backend=backend)
            assert str(e.value) == f"backend={backend!r} cannot run {op} here: {reason}"
            assert not is_optimized(pipe)
        else:
            assert optimize(pipe, backend=backend) is pipe
            unoptimize(pipe)


def test_unoptimize_and_report_need_an_optimized_pipeline():
    pipe = C.pipeline("sd15")
    with pytest.raises(ValueError, match="StableDiffusionPipeline is not optimized by diffusion_fast; nothing to undo"):
        unoptimize(pipe)
    with pytest.raises(ValueError, match=r"not optimized by diffusion_fast; call optimize\(pipe\) first"):
        report(pipe)


def test_a_processor_replaced_after_optimize_is_kept_by_unoptimize_and_reported():
    pipe = optimize(C.pipeline("sd15"))
    name, attn = next((n, m) for n, m in pipe.unet.named_modules()
                      if isinstance(m, diffusers.models.attention_processor.Attention))
    mine = diffusers.models.attention_processor.AttnProcessor()
    attn.set_processor(mine)
    row = next(r for r in report(pipe) if r.name == f"unet.{name}")
    assert row.runs == "AttnProcessor" and row.reason == "its processor was replaced by AttnProcessor after optimize"
    unoptimize(pipe)
    assert attn.processor is mine


def test_top_level_exports_and_import_diffusion_fast_never_imports_diffusers():
    for _ in range(2):  # the lazy lookup gives the functions every time, with their module already imported
        assert diffusion_fast.optimize is optimize and diffusion_fast.unoptimize is unoptimize
    from diffusion_fast.integrations.diffusers import format_report as f
    from diffusion_fast.integrations.diffusers import report as r

    assert (r, f) == (report, format_report)
    code = ("import sys, diffusion_fast; "
            "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_supported_pipeline_list_names_real_diffusers_classes():
    for name, attr in O.SUPPORTED_PIPELINES.items():
        cls = getattr(diffusers, name)
        assert attr in inspect.signature(cls.__init__).parameters, (name, attr)


# ------------------------------------------------------------------------------------------------------------
# GPU: bf16, against a float32 stock run, with the stock bf16 pipeline's own error as the yardstick
# ------------------------------------------------------------------------------------------------------------


def bf16_forward_errors(name: str, device: str = "cuda") -> tuple[float, float, float]:
    """(our bf16 error, stock bf16 error, max |reference|): one denoiser call against the float32 stock one."""
    model32 = denoiser(C.pipeline(name, device=device))
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2, 4, 24, 24, device=device, generator=g)
    ctx = torch.randn(2, 11, model32.config.cross_attention_dim, device=device, generator=g)
    t = torch.tensor([17.0, 801.0], device=device)
    extra = {}
    if name == "sdxl":
        cond = model32.config.projection_class_embeddings_input_dim - 6 * model32.config.addition_time_embed_dim
        extra = {"text_embeds": torch.randn(2, cond, device=device, generator=g),
                 "time_ids": torch.rand(2, 6, device=device, generator=g) * 64}

    def fwd(model, dtype):
        with torch.no_grad():
            return model(x.to(dtype), t, ctx.to(dtype),
                         added_cond_kwargs={k: v.to(dtype) for k, v in extra.items()} or None).sample.float()

    ref = fwd(model32, torch.float32)
    pipe = C.pipeline(name, dtype=torch.bfloat16, device=device)
    stock = (fwd(denoiser(pipe), torch.bfloat16) - ref).abs().max().item()
    ours = (fwd(denoiser(optimize(pipe)), torch.bfloat16) - ref).abs().max().item()
    return ours, stock, ref.abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("name", UNET_PIPELINES)
def test_bf16_unet_pipeline_error_is_within_twice_stock_bf16_error(name):
    errors = bf16_errors(name)
    assert within_twice_stock(*errors), errors


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_bf16_unet_forward_error_is_within_twice_stock_bf16_error(name):
    errors = bf16_forward_errors(name)
    assert within_twice_stock(*errors), errors


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_bf16_unet_ops_run_kernels_on_cuda(name, monkeypatch):
    """On CUDA, "auto" must pick kernels (not the float32 references) for the UNet's attention and GroupNorm."""
    pipe = optimize(C.pipeline(name, dtype=torch.bfloat16, device="cuda"))
    chosen = chosen_backends(monkeypatch, pipe, name, steps=1, dtype=torch.bfloat16, device="cuda")
    assert set(chosen) == {"attention", "group_norm"}, chosen
    assert not any("reference" in m for mods in chosen.values() for m in mods), chosen
