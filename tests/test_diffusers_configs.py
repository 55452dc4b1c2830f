"""The random-weight diffusers pipelines that tests and benchmarks build from configs (no hub)."""

from __future__ import annotations

import pytest
import torch

from diffusion_fast.integrations.diffusers import configs as C

pytest.importorskip("diffusers")


def call(pipe, name, steps=2, seed=0):
    kw = dict(num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(seed),
              height=16, width=16)
    if name.startswith(("sd15", "sdxl")):
        kw["prompt"] = "a red cat"
    else:
        kw.update(C.conditioning(name))
    if name.endswith("img2img"):
        kw["image"] = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        kw["strength"] = 0.6
    return pipe(**kw).images


@pytest.mark.parametrize("name", C.PIPELINES)
def test_tiny_pipeline_runs_and_is_deterministic(name):
    a, b = C.pipeline(name), C.pipeline(name)
    model = "unet" if hasattr(a, "unet") else "transformer"
    sa, sb = getattr(a, model).state_dict(), getattr(b, model).state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    other = getattr(C.pipeline(name, seed=1), model).state_dict()
    assert not all(torch.equal(sa[k], other[k]) for k in sa)
    out = call(a, name)
    assert torch.isfinite(out).all() and out.std() > 0
    assert torch.equal(out, call(b, name))


@pytest.mark.parametrize("name", ["sd15", "sdxl", "flux", "sd3", "pixart-sigma"])
def test_tiny_attention_head_dims_are_multiples_of_8(name):
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    model = getattr(C.pipeline(name), "unet" if name in ("sd15", "sdxl") else "transformer")
    dims = {m.inner_dim // m.heads for m in model.modules() if isinstance(m, (Attention, AttentionModuleMixin))}
    assert dims and all(d % 8 == 0 for d in dims), dims


def test_word_tokenizer_takes_any_text():
    tok = C.word_tokenizer()
    ids = tok("a red cat, 7 ünïcode!", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and max(ids) < 514 and ids[0] == 512


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="name must be one of sd15"):
        C.pipeline("sd2")
    with pytest.raises(ValueError, match="size must be one of tiny, full"):
        C.pipeline("sd15", size="huge")
    with pytest.raises(ValueError, match="text_encoders=True is only available"):
        C.pipeline("flux", text_encoders=True)
