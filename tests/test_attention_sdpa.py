"""The ``sdpa`` backend (torch's scaled_dot_product_attention) against the float64 oracle, under the same
flash-attention rule as the other attention backends: it must read the op's [B, S, H, D] layout, strided views
and a non-default scale, and return [B, Sq, H, D] contiguous in q's dtype."""

from __future__ import annotations

import pytest
import torch

from diffusion_fast import ops
from diffusion_fast.kernels.reference import oracle
from diffusion_fast.kernels.sdpa import attention as sdpa
from diffusion_fast.ops import registry

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rand(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


def check(out, q, k, v, scale, what):
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous(), what
    oracle.assert_close(out, oracle.attention(q, k, v, scale), oracle.attention_lowp(q, k, v, scale), what=what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Sq,Sk,H,D", [(1, 77, 1000, 2, 40), (2, 33, 77, 3, 80), (1, 5, 1, 1, 8),
                                         (1, 64, 64, 1, 256), (2, 9, 17, 2, 72)])
def test_sdpa_matches_the_oracle(dtype, B, Sq, Sk, H, D, device):
    q, k, v = rand((B, Sq, H, D), dtype, device, 1), rand((B, Sk, H, D), dtype, device, 2), \
        rand((B, Sk, H, D), dtype, device, 3)
    check(ops.attention(q, k, v, backend="sdpa"), q, k, v, D**-0.5, f"{dtype} {(B, Sq, Sk, H, D)}")


def test_sdpa_reads_strided_views_and_scale(device):
    # Self-attention on slices of one fused [B, S, 3, H, D] projection; k/v from a [B, H, S, D] tensor permuted
    # to [B, S, H, D]; a negative scale.
    qkv = rand((2, 45, 3, 3, 40), torch.float16, device, 4)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    check(ops.attention(q, k, v, scale=0.3, backend="sdpa"), q, k, v, 0.3, "fused qkv")
    kv = rand((2, 2, 3, 19, 40), torch.float16, device, 5)
    k2, v2 = kv[0].permute(0, 2, 1, 3), kv[1].permute(0, 2, 1, 3)
    check(ops.attention(q, k2, v2, scale=-0.2, backend="sdpa"), q, k2, v2, -0.2, "head-major k/v")


def test_sdpa_is_registered_and_auto_falls_back_to_it_on_cuda():
    assert registry.status("attention")["sdpa"] is None
    assert "sdpa" not in registry.status("group_norm")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        ops.group_norm(torch.randn(1, 4, 2, 2), 2, backend="sdpa")  # an attention backend only
    assert "sdpa" not in registry.BACKENDS and "sdpa" in registry.names("attention")
    meta = lambda *s: torch.empty(*s, device="meta")  # noqa: E731 - shapes only
    for q, k in ((meta(2, 4096, 8, 40), meta(2, 77, 8, 40)), (meta(2, 4096, 10, 64), meta(2, 4096, 10, 64))):
        order = registry.auto_order("attention", "cuda", {"q": q, "k": k})
        assert order[-2:] == ("sdpa", "torch")  # before the float32 reference, after our own kernels


def test_sdpa_forward_is_the_registry_dispatch():
    q = torch.randn(1, 3, 1, 8)
    assert registry.resolve("attention", "sdpa", q.device, dict(q=q, k=q, v=q, scale=0.1)) is sdpa.forward


# ----------------------------------------------------------------------------------------------- GPU ---
SD15 = [(2, 4096, 4096, 8, 40), (2, 1024, 1024, 8, 80), (2, 256, 256, 8, 160), (2, 4096, 77, 8, 40),
        (2, 1024, 77, 8, 80), (2, 256, 77, 8, 160)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SD15, ids=lambda s: "x".join(map(str, s)))
def test_gpu_sd15_shapes_bf16(shape):
    B, Sq, Sk, H, D = shape
    q, k, v = rand((B, Sq, H, D), torch.bfloat16, "cuda", 1), rand((B, Sk, H, D), torch.bfloat16, "cuda", 2), \
        rand((B, Sk, H, D), torch.bfloat16, "cuda", 3)
    check(ops.attention(q, k, v, backend="sdpa"), q, k, v, D**-0.5, f"{shape}")


@pytest.mark.gpu
def test_gpu_sdpa_replays_in_a_cuda_graph():
    q, k, v = (rand((2, 1024, 8, 80), torch.bfloat16, "cuda", i) for i in range(3))
    ops.attention(q, k, v, backend="sdpa")  # warm-up outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.attention(q, k, v, backend="sdpa")
    for i in range(3):
        q.copy_(rand((2, 1024, 8, 80), torch.bfloat16, "cuda", 10 + i))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ops.attention(q, k, v, backend="sdpa"))
