"""optimize / unoptimize on the transformer pipelines: Flux (joint + single-stream attention with RoPE), SD3
(joint attention), PixArt-Sigma (self/cross attention), and their img2img variants.

Each is compared with the same stock diffusers pipeline (random tiny weights from configs, prompt embeddings
passed directly, float32 on CPU): latents within float32 rounding (<= 1e-5 relative), bit-identical after
unoptimize, weights untouched. Full-size configs are built on the meta device to check what they would run.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers_helpers import (  # noqa: E402
    DIT_PIPELINES,
    OpSpy,
    assert_same_weights,
    bf16_errors,
    chosen_backends,
    count_forwards,
    denoiser,
    meta_pipeline,
    rel_err,
    run,
    weights,
    within_twice_stock,
)

from diffusion_fast.integrations.diffusers import configs as C  # noqa: E402
from diffusion_fast.integrations.diffusers import processors as P  # noqa: E402
from diffusion_fast.integrations.diffusers.patch import (  # noqa: E402
    format_report,
    optimize,
    report,
    unoptimize,
)

FAST = {"flux": P.FastFluxAttnProcessor, "sd3": P.FastJointAttnProcessor, "pixart-sigma": P.FastAttnProcessor}


def family(name: str) -> str:
    return name.split("-img2img")[0]


@pytest.mark.parametrize("name", DIT_PIPELINES)
def test_optimized_transformer_pipeline_matches_stock_and_unoptimize_restores_it(name):
    pipe = C.pipeline(name)
    model = denoiser(pipe)
    stock = run(pipe, name)
    processors = dict(model.attn_processors)
    before = weights(model)

    optimize(pipe)
    assert {type(p) for p in model.attn_processors.values()} == {FAST[family(name)]}
    out = run(pipe, name)
    assert out.shape == stock.shape and torch.isfinite(out).all()
    assert rel_err(out, stock) <= 1e-5
    assert_same_weights(model, before)

    unoptimize(pipe)
    assert all(model.attn_processors[k] is v for k, v in processors.items())
    assert torch.equal(run(pipe, name), stock)
    assert_same_weights(model, before)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_spy_every_attention_of_flux_and_sd3_runs_the_op(name, monkeypatch):
    pipe = optimize(C.pipeline(name))
    model = denoiser(pipe)
    n_attn = len(model.attn_processors)
    evals = count_forwards(model)
    with OpSpy(monkeypatch) as spy:
        run(pipe, name, steps=2)
    assert evals[0] == 2 and n_attn >= 2
    assert spy.counts == {"attention": n_attn * evals[0]}
    rows = report(pipe)
    assert len(rows) == n_attn and {r.runs for r in rows} == {"diffusion_fast"}
    assert sum(r.calls for r in rows) == n_attn * evals[0]
    for q, k, v in spy.attention:  # [B, S, H, D] with the joint sequence: image + text tokens (7 of them)
        assert q.dim() == 4 and q.shape == k.shape == v.shape and q.is_contiguous()
        assert q.shape[2] * q.shape[3] == model.config.num_attention_heads * model.config.attention_head_dim
        assert q.shape[1] > 7


def test_pixart_cross_attention_with_its_mask_runs_the_stock_processor_and_says_so(monkeypatch):
    pipe = optimize(C.pipeline("pixart-sigma"))
    model = denoiser(pipe)
    evals = count_forwards(model)
    with OpSpy(monkeypatch) as spy:
        run(pipe, "pixart-sigma", steps=2)
    rows = report(pipe)
    self_attn = [r for r in rows if r.name.endswith("attn1")]
    cross = [r for r in rows if r.name.endswith("attn2")]
    assert len(self_attn) == len(cross) == 2 and evals[0] == 2
    assert spy.counts == {"attention": len(self_attn) * evals[0]}
    assert all(r.calls == evals[0] and not r.fallbacks for r in self_attn)
    assert all(r.calls == 0 and r.fallbacks == {P.MASK_REASON: evals[0]} for r in cross)
    text = format_report(pipe)
    assert text.splitlines()[0] == ("attention: 4/4 modules run diffusion_fast; 4 calls on diffusion_fast, "
                                    "4 on the stock processor so far")
    assert ("transformer.transformer_blocks.0.attn2  attention  AttnProcessor2_0 -> diffusion_fast  (but 2 calls "
            "ran AttnProcessor2_0: called with an attention_mask: diffusion_fast.ops.attention takes no mask)") in text


def test_pixart_self_attention_reads_views_of_the_projections(monkeypatch):
    pipe = optimize(C.pipeline("pixart-sigma"))
    with OpSpy(monkeypatch) as spy:
        run(pipe, "pixart-sigma", steps=1)
    assert spy.attention
    for q, k, v in spy.attention:
        for t in (q, k, v):
            assert t._base is not None and t.stride(1) == t.shape[2] * t.shape[3] and t.stride(-1) == 1


def test_flux_with_fused_qkv_projections_matches_stock():
    pipe = C.pipeline("flux")
    pipe.transformer.fuse_qkv_projections()
    attns = [m for m in pipe.transformer.modules() if isinstance(m, diffusers.models.attention.AttentionModuleMixin)]
    assert attns and all(m.fused_projections for m in attns)
    stock = run(pipe, "flux", steps=2)
    optimize(pipe)
    assert {type(p) for p in pipe.transformer.attn_processors.values()} == {P.FastFluxAttnProcessor}
    assert rel_err(run(pipe, "flux", steps=2), stock) <= 1e-5


def test_sd35_layout_qk_norms_and_dual_attention_match_stock(monkeypatch):
    """SD3.5's transformer: RMS norms on q/k (and the context's), a second self-attention (attn2) in block 0."""
    pipe = C.pipeline("sd3")
    torch.manual_seed(5)
    pipe.transformer = diffusers.SD3Transformer2DModel(**C.transformer_config("sd3"), qk_norm="rms_norm",
                                                       dual_attention_layers=(0,)).eval()
    stock = run(pipe, "sd3", steps=2)
    optimize(pipe)
    names = [r.name for r in report(pipe)]
    assert "transformer.transformer_blocks.0.attn2" in names and len(names) == 3
    with OpSpy(monkeypatch) as spy:
        out = run(pipe, "sd3", steps=2)
    assert spy.counts == {"attention": 3 * 2}
    assert rel_err(out, stock) <= 1e-5


@pytest.mark.parametrize("name, override", [
    ("flux", dict(attention_head_dim=12, axes_dims_rope=(4, 4, 4))),
    ("pixart-sigma", dict(attention_head_dim=12, cross_attention_dim=24)),
])
def test_transformer_heads_the_op_declines_keep_their_processor(name, override, monkeypatch):
    pipe = C.pipeline(name)
    cls = type(pipe.transformer)
    torch.manual_seed(6)
    pipe.transformer = cls(**{**C.transformer_config(name), **override}).eval()
    stock = run(pipe, name, steps=2)
    originals = {type(p) for p in pipe.transformer.attn_processors.values()}
    optimize(pipe)
    rows = report(pipe)
    assert rows and all(r.runs == r.original and r.reason == "head dim 12: diffusion_fast.ops.attention serves "
                        "multiples of 8 up to 256" for r in rows)
    assert {type(p) for p in pipe.transformer.attn_processors.values()} == originals
    with OpSpy(monkeypatch) as spy:
        out = run(pipe, name, steps=2)
    assert "attention" not in spy.counts
    assert torch.equal(out, stock)


def test_flux_attention_called_with_a_mask_runs_the_stock_processor():
    model = denoiser(C.pipeline("flux"))
    attn = model.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(0)
    h, ctx = torch.randn(2, 9, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    mask = torch.rand(2, 1, 1, 14, generator=g) > 0.3
    with torch.no_grad():
        stock = attn(h, ctx, attention_mask=mask)
        processor = P.FastFluxAttnProcessor(attn.processor)
        attn.set_processor(processor)
        ours = attn(h, ctx, attention_mask=mask)
        unmasked = attn(h, ctx)
    assert all(torch.equal(a, b) for a, b in zip(ours, stock))
    assert processor.fallbacks == {P.MASK_REASON: 1} and processor.calls == 1
    assert unmasked[0].shape == stock[0].shape


def test_processor_types_diffusion_fast_does_not_replace_are_named():
    model = denoiser(C.pipeline("sd3"))
    attn = model.transformer_blocks[0].attn
    attn.set_processor(diffusers.models.attention_processor.AttnProcessor())
    assert P.attention_reason(attn) == ("processor AttnProcessor is not one diffusion_fast replaces "
                                        "(AttnProcessor2_0, FluxAttnProcessor, FusedAttnProcessor2_0, "
                                        "JointAttnProcessor2_0)")


# ------------------------------------------------------------------------------------------------------------
# Full-size configs, built on the meta device (structure only, no memory)
# ------------------------------------------------------------------------------------------------------------


# (attention modules, ResNet blocks) of the published architectures; every one of them runs diffusion_fast.
FULL_SIZE = {"sd15": (32, 22), "sdxl": (140, 17), "flux": (57, 0), "sd3": (24, 0), "pixart-sigma": (56, 0)}


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_architectures_run_every_attention_and_resnet_on_diffusion_fast(name):
    pipe = optimize(meta_pipeline(name))
    rows = report(pipe)
    n_attn, n_res = FULL_SIZE[name]
    assert sum(r.kind == "attention" for r in rows) == n_attn
    assert sum(r.kind == "resnet" for r in rows) == n_res
    assert [r for r in rows if r.runs != "diffusion_fast"] == []


# ------------------------------------------------------------------------------------------------------------
# GPU: bf16, against a float32 stock run, with the stock bf16 pipeline's own error as the yardstick
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", DIT_PIPELINES)
def test_bf16_transformer_pipeline_error_is_within_twice_stock_bf16_error(name):
    errors = bf16_errors(name)
    assert within_twice_stock(*errors), errors


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["flux", "sd3", "pixart-sigma"])
def test_bf16_transformer_attention_runs_a_kernel_on_cuda(name, monkeypatch):
    """On CUDA, "auto" must pick a kernel (not the float32 reference) for these head dims and sequences."""
    pipe = optimize(C.pipeline(name, dtype=torch.bfloat16, device="cuda"))
    chosen = chosen_backends(monkeypatch, pipe, name, steps=1, dtype=torch.bfloat16, device="cuda")
    assert set(chosen) == {"attention"} and not any("reference" in m for m in chosen["attention"]), chosen
