"""The ops as torch custom ops: schema/fake-implementation checks and torch.compile(fullgraph=True) on CPU."""

from __future__ import annotations

import pytest
import torch

from diffusion_fast import ops
from diffusion_fast.ops import library
from diffusion_fast.ops.rows import coef_width


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    K = 2
    return dict(
        x=r(2, 32, 5, 7), w=r(32), b=r(32), t=r(2, 32),
        q=r(2, 9, 2, 16), k=r(2, 11, 2, 16), v=r(2, 11, 2, 16),
        coef=r(coef_width(K)), slots=torch.tensor([0, 1]), hist=r(K, 2, 32, 5, 7),
    )


def model(d, hist):
    """A toy step: GN+SiLU with a time embedding, attention, then an in-place sampler step with CFG."""
    h = ops.group_norm(d["x"], 8, d["w"], d["b"], 1e-5, "silu", add=d["t"])
    a = ops.attention(d["q"], d["k"], d["v"])
    net = torch.empty(4, 32, 5, 7)
    state = h.clone()
    s = ops.sampler_step(state, torch.cat([h, 2 * h]), d["coef"], d["slots"], hist, None, out=state,
                         net_input=net)
    return s, a, net, hist


def test_ops_are_registered():
    for name in ("group_norm", "attention", "sampler_step"):
        assert hasattr(torch.ops.diffusion_fast, name)


def test_custom_ops_equal_the_public_ops():
    d = inputs()
    assert torch.equal(library.group_norm(d["x"], 8, d["w"], d["b"], 1e-5, "silu", d["t"], "auto"),
                       ops.group_norm(d["x"], 8, d["w"], d["b"], activation="silu", add=d["t"]))
    assert torch.equal(library.attention(d["q"], d["k"], d["v"], 0.3, "auto"),
                       ops.attention(d["q"], d["k"], d["v"], 0.3))
    h1, h2 = d["hist"].clone(), d["hist"].clone()
    mo = torch.cat([d["x"], d["x"]])
    o1 = torch.empty_like(d["x"])
    library.sampler_step(d["x"], mo, d["coef"], d["slots"], h1, None, o1, None, "auto")
    o2 = ops.sampler_step(d["x"], mo, d["coef"], d["slots"], h2)
    assert torch.equal(o1, o2) and torch.equal(h1, h2)


def test_opcheck():
    # Schema, fake implementation (shapes, dtypes, strides, including channels_last), mutation declarations.
    d = inputs()
    x_cl = d["x"].to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.diffusion_fast.group_norm.default,
                          (x_cl, 8, d["w"], d["b"], 1e-5, "silu", d["t"], "torch"))
    torch.library.opcheck(torch.ops.diffusion_fast.attention.default, (d["q"], d["k"], d["v"], 0.25, "torch"))
    torch.library.opcheck(torch.ops.diffusion_fast.sampler_step.default,
                          (d["x"], torch.cat([d["x"], d["x"]]), d["coef"], d["slots"], d["hist"].clone(), None,
                           torch.empty_like(d["x"]), torch.empty(4, 32, 5, 7), "torch"))


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_compiles_without_graph_breaks(compiler):
    torch._dynamo.reset()
    d = inputs(1)
    want = model(d, d["hist"].clone())
    got = torch.compile(model, backend=compiler, fullgraph=True)(d, d["hist"].clone())
    for name, g, w in zip(("state", "attention", "net_input", "hist"), got, want):
        assert torch.equal(g, w), name
