"""The UNet: diffusers-compatible structure and numerics, backends, SD1.5 shapes.

CPU cost is kept small: SD1.5 itself is built on the "meta" device (structure, parameter names and shapes,
and a shape-only forward at the benchmark size); real forwards run on a reduced-width model of the same
structure (channels 64/128/256/256, same block types, heads and layer counts) and on tiny configs.
"""

from __future__ import annotations

import pytest
import torch

from diffusion_fast.models import UNet2DConditionModel, UNetConfig


def _diffusers():
    return pytest.importorskip("diffusers")  # a test dependency (CI installs it); the reference structure


def tiny_diffusers_config(**over) -> dict:
    cfg = dict(sample_size=8, in_channels=3, out_channels=2, block_out_channels=(32, 48, 64),
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
               layers_per_block=2, cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8)
    cfg.update(over)
    return cfg


def perturbed_pair(seed: int = 0, **over):
    """A diffusers UNet and ours with the same random weights (norm/bias parameters moved off 1/0)."""
    torch.manual_seed(seed)
    ref = _diffusers().UNet2DConditionModel(**tiny_diffusers_config(**over))
    sd = {k: v + 0.1 * torch.randn_like(v) for k, v in ref.state_dict().items()}
    ref.load_state_dict(sd)
    ours = UNet2DConditionModel(UNetConfig.from_diffusers(dict(ref.config)))
    ours.load_state_dict(sd, strict=True)
    return ref.eval(), ours.eval()


@pytest.mark.parametrize("hw", [(8, 8), (10, 6)])  # 10x6: odd sizes on the way down, resized on the way up
def test_matches_diffusers_numerics(hw):
    ref, ours = perturbed_pair()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, *hw, generator=g)
    t = torch.tensor([3.5, 700.0])
    ctx = torch.randn(2, 5, 24, generator=g)
    with torch.no_grad():
        exact = ref.double()(x.double(), t.double(), ctx.double()).sample
        theirs = ref.float()(x, t, ctx).sample
        err_ref = (theirs.double() - exact).abs().max().item()
        for gn, at in (("torch", "torch"), ("eager", "sdpa"), ("auto", "auto")):
            y = ours.set_backend(group_norm=gn, attention=at)(x, t, ctx)
            assert y.shape == (2, 2, *hw) and y.dtype == torch.float32
            err = (y.double() - exact).abs().max().item()
            # float32 vs a float64 run of the same network: within 2x diffusers' own float32 error + a floor.
            assert err <= 2 * err_ref + 1e-5, (gn, at, err, err_ref)


def test_state_dict_loads_both_ways_with_diffusers_names():
    ref, ours = perturbed_pair(seed=3)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict(), strict=True)


def test_sd15_structure_matches_diffusers():
    with torch.device("meta"):
        ref = _diffusers().UNet2DConditionModel(cross_attention_dim=768)  # diffusers' defaults are SD1.x's
    ours = UNet2DConditionModel(UNetConfig.sd15(), device="meta")
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964
    assert UNetConfig.from_diffusers(dict(ref.config)) == UNetConfig.sd15()
    cfg = UNetConfig.sd15()
    assert cfg.block_out_channels == (320, 640, 1280, 1280) and cfg.attention_heads == 8
    assert cfg.cross_attention_dim == 768 and cfg.in_channels == cfg.out_channels == 4


def test_sd15_benchmark_shapes_on_meta():
    """Batch 2, 64x64 latents, 77 tokens of 768, bf16: the benchmark's call, shapes only."""
    m = UNet2DConditionModel(UNetConfig.sd15(), device="meta", dtype=torch.bfloat16)
    x = torch.empty(2, 4, 64, 64, device="meta", dtype=torch.bfloat16)
    ctx = torch.empty(2, 77, 768, device="meta", dtype=torch.bfloat16)
    with torch.no_grad():
        y = m(x, torch.empty(2, device="meta"), ctx)
    assert y.shape == (2, 4, 64, 64) and y.dtype == torch.bfloat16


def reduced_sd15(**over) -> UNetConfig:
    """SD1.5's structure (block types, 2 layers per block, 8 heads, context 768) at a fifth of the width."""
    d = UNetConfig.sd15().to_dict()
    d.update(block_out_channels=[64, 128, 256, 256], **over)
    return UNetConfig.from_dict(d)


def test_reduced_sd15_forward_on_cpu():
    torch.manual_seed(0)
    m = UNet2DConditionModel(reduced_sd15()).eval()
    x = torch.randn(2, 4, 16, 16)
    ctx = torch.randn(2, 77, 768)
    with torch.no_grad():
        y = m(x, torch.tensor([1.0, 999.0]), ctx)
        y_eager = m.set_backend(group_norm="eager", attention="sdpa")(x, torch.tensor([1.0, 999.0]), ctx)
    assert y.shape == (2, 4, 16, 16) and torch.isfinite(y).all()
    torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-4)
    # The UNet is not constant in its inputs: timestep and context both change the output.
    with torch.no_grad():
        assert not torch.allclose(m(x, torch.tensor([500.0, 500.0]), ctx), y_eager, atol=1e-3)
        assert not torch.allclose(m(x, torch.tensor([1.0, 999.0]), torch.randn(2, 77, 768)), y_eager, atol=1e-3)


def test_bf16_model_takes_float32_input_and_returns_its_dtype():
    torch.manual_seed(0)
    m = UNet2DConditionModel(UNetConfig.digits(), dtype=torch.bfloat16).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        y = m(x, torch.tensor(5.0), torch.randn(3, 4, 64))  # 0-dim timestep broadcasts to the batch
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()


def test_set_backend_reaches_every_op_module_and_rejects_bad_names():
    from diffusion_fast.models.layers import Attention, GroupNorm

    m = UNet2DConditionModel(UNetConfig.digits())
    m.set_backend(group_norm="eager", attention="sdpa")
    gns = [x for x in m.modules() if isinstance(x, GroupNorm)]
    ats = [x for x in m.modules() if isinstance(x, Attention)]
    assert gns and ats
    assert {x.backend for x in gns} == {"eager"} and {x.backend for x in ats} == {"sdpa"}
    m.set_backend("torch")
    assert {x.backend for x in gns + ats} == {"torch"}
    m.set_backend("auto", attention="sdpa")
    assert {x.backend for x in gns} == {"auto"} and {x.backend for x in ats} == {"sdpa"}
    with pytest.raises(ValueError, match="group_norm must be one of"):
        m.set_backend(group_norm="sdpa")
    with pytest.raises(ValueError, match="attention must be one of"):
        m.set_backend(attention="eager")
    with pytest.raises(ValueError, match="backend must be one of"):
        m.set_backend("eager")  # a baseline names one op; "backend" sets both
    with pytest.raises(TypeError, match="backend must be a str"):
        m.set_backend(3)


def test_resnet_time_embedding_goes_through_fused_add(monkeypatch):
    """norm2(h + temb) is computed as group_norm(h, add=temb): the op sees `add` in every ResNet block."""
    import diffusion_fast.models.layers as layers

    seen = []
    real = layers.group_norm_op

    def spy(x, *a, add=None, **k):
        seen.append(add is not None)
        return real(x, *a, add=add, **k)

    monkeypatch.setattr(layers, "group_norm_op", spy)
    m = UNet2DConditionModel(UNetConfig.digits())
    with torch.no_grad():
        m(torch.randn(1, 1, 8, 8), torch.tensor([1.0]), torch.randn(1, 3, 64))
    n_resnets = sum(1 for x in m.modules() if type(x).__name__ == "ResnetBlock2D")
    assert sum(seen) == n_resnets


@pytest.mark.parametrize("bad, match", [
    (dict(block_out_channels=(32, 64), down_block_types=("DownBlock2D",)), "one per block_out_channels"),
    (dict(down_block_types=("DownBlock2D", "Foo") * 2), "unknown block type 'Foo'"),
    (dict(norm_num_groups=7), "norm_num_groups=7 must divide"),
    (dict(attention_heads=3), "head dim"),
    (dict(layers_per_block=0), "layers_per_block must be an int >= 1"),
])
def test_config_errors_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**bad)


def test_config_round_trip_and_unknown_keys():
    cfg = UNetConfig.digits()
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown UNetConfig keys"):
        UNetConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="use_linear_projection"):
        UNetConfig.from_diffusers({"use_linear_projection": True})


def test_forward_input_errors():
    m = UNet2DConditionModel(UNetConfig.digits())
    ctx = torch.randn(2, 3, 64)
    with pytest.raises(ValueError, match=r"sample must be \[B, 1, H, W\]"):
        m(torch.randn(2, 3, 8, 8), torch.zeros(2), ctx)
    with pytest.raises(ValueError, match="timestep must be"):
        m(torch.randn(2, 1, 8, 8), torch.zeros(3), ctx)
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \[B, L, 64\]"):
        m(torch.randn(2, 1, 8, 8), torch.zeros(2), torch.randn(2, 3, 32))
