"""UNet2DConditionModel.from_pretrained: diffusers folders written by save_pretrained, safetensors only."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion_fast.models import UNet2DConditionModel

diffusers = pytest.importorskip("diffusers")


def stock_unet(seed: int = 0, **over):
    """A tiny stock diffusers UNet of a layout ours implements, with norms and biases off their init values."""
    cfg = dict(sample_size=8, in_channels=3, out_channels=2, block_out_channels=(32, 48, 64),
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
               layers_per_block=2, cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8)
    cfg.update(over)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**cfg)
    with torch.no_grad():
        for v in unet.state_dict().values():
            v.add_(0.1 * torch.randn_like(v))
    return unet.eval()


def forward_pair(stock, ours):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 10, 6, generator=g)
    t = torch.tensor([3.5, 700.0])
    ctx = torch.randn(2, 5, 24, generator=g)
    with torch.no_grad():
        return ours(x, t, ctx), stock(x, t, ctx).sample


def test_loads_a_pipeline_folder_and_matches_diffusers_forward(tmp_path):
    stock = stock_unet()
    stock.save_pretrained(tmp_path / "unet")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    ours = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
    assert not ours.training and ours.conv_in.weight.dtype == torch.float32
    theirs = stock.state_dict()
    mine = ours.state_dict()
    assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    y, ref = forward_pair(stock, ours)
    assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_loads_sharded_and_variant_weights_and_casts(tmp_path):
    stock = stock_unet(seed=1)
    stock.save_pretrained(tmp_path, max_shard_size="1MB", variant="v2")
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.v2.json"
    assert index.is_file() and len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    ours = UNet2DConditionModel.from_pretrained(tmp_path, variant="v2", dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    theirs = stock.state_dict()
    assert all(torch.equal(v, theirs[k].to(torch.bfloat16)) for k, v in ours.state_dict().items())


def test_an_unsupported_layout_is_refused_naming_the_key(tmp_path):
    torch.manual_seed(0)
    sdxl_like = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=2, use_linear_projection=True)
    sdxl_like.save_pretrained(tmp_path)
    with pytest.raises(ValueError) as e:
        UNet2DConditionModel.from_pretrained(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'config.json'}: diffusers config use_linear_projection=True is not "
                            "supported (expected False)")


@pytest.mark.parametrize("key, value, message", [
    ("resnet_out_scale_factor", 2.0, "resnet_out_scale_factor=2.0 (supported: 1 or 1.0)"),
    ("timestep_post_act", "silu", "timestep_post_act='silu' (supported: None)"),
    ("some_new_option", 1, "some_new_option=1 (a key this UNet does not know)"),
])
def test_config_keys_the_unet_does_not_implement_are_named(tmp_path, key, value, message):
    stock_unet().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        UNet2DConditionModel.from_pretrained(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'config.json'}: diffusers config not supported by diffusion_fast's UNet: "
                            f"{message}")


def test_pickled_weights_are_never_loaded(tmp_path):
    stock_unet().save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(FileNotFoundError, match=r"has only pickled weights \(diffusion_pytorch_model.bin\); "
                                                "diffusion_fast reads safetensors only and never unpickles"):
        UNet2DConditionModel.from_pretrained(tmp_path)


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    stock_unet().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["cross_attention_dim"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"the weights do not fit the config: \d+ misshapen tensor\(s\): "
                                         r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.weight "
                                         r"\(32, 24\) \(expected \(32, 32\)\)"):
        UNet2DConditionModel.from_pretrained(tmp_path)


def test_missing_folders_and_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        UNet2DConditionModel.from_pretrained(tmp_path)
    stock_unet().save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no diffusion_pytorch_model.safetensors"):
        UNet2DConditionModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="holds a AutoencoderKL, not a UNet2DConditionModel"):
        UNet2DConditionModel.from_pretrained(tmp_path)
