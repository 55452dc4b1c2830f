"""CUDA attention (mma.sync, fp16/bf16) against float64, flash-attention style.

Tolerance (``kernels/reference/oracle.py``): the kernel's max error against the float64 oracle must be at most
twice that of the same computation done by PyTorch in the low precision (matmuls in fp16/bf16, softmax rounded
to it), plus half an ulp of the output's magnitude (the rounding any fp16/bf16 output carries). Every served
head dim, both paths (short Sk <= 128, flash), odd Sq/Sk, strided q/k/v views, NaN-poisoned outputs,
determinism, CUDA graphs.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_fast import ops
from diffusion_fast.kernels.cuda import attention as cuda_attn
from diffusion_fast.kernels.reference import oracle

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [40, 64, 80, 128, 160]
# (B, Sq, Sk, H): cross-attention with 77 text tokens; Sk at the short path's limit; one key; the flash
# path with a ragged last tile; Sq not a multiple of any block; a long self-attention.
SIZES = [(2, 37, 77, 3), (1, 130, 128, 2), (2, 5, 1, 1), (1, 70, 129, 2), (1, 257, 300, 1), (1, 1000, 1000, 2)]


def assert_attention_close(out, q, k, v, scale, what):
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous(), what
    oracle.assert_close(out, oracle.attention(q, k, v, scale), oracle.attention_lowp(q, k, v, scale), what=what)


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(cuda_attn, "_empty_output", oracle.poisoned(cuda_attn._empty_output))


def qkv(B, Sq, Sk, H, D, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Sq, H, D, generator=g, device="cuda").to(dtype)
    k = torch.randn(B, Sk, H, D, generator=g, device="cuda").to(dtype)
    v = torch.randn(B, Sk, H, D, generator=g, device="cuda").to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("B,Sq,Sk,H", SIZES, ids=lambda s: str(s))
def test_attention_cuda_matches_float64(dtype, D, B, Sq, Sk, H, poison):
    q, k, v = qkv(B, Sq, Sk, H, D, dtype, seed=Sq * 7 + Sk + D)
    assert cuda_attn.supports(q, k, v, 0.1) is None
    # sm_80 / sm_90 parts have the shared memory for every short-path tile (up to 107 KB at D=160).
    big_smem = torch.cuda.get_device_capability()[1] == 0
    assert cuda_attn.path(q, k) == ("flash" if Sk > 128 else "short" if big_smem else cuda_attn.path(q, k))
    scale = 1 / math.sqrt(D)
    out = ops.attention(q, k, v, backend="cuda")
    assert_attention_close(out, q, k, v, scale, f"{dtype} D={D} B={B} Sq={Sq} Sk={Sk} H={H}")


@pytest.mark.parametrize("D", [40, 80, 160])
@pytest.mark.parametrize("Sk", [77, 333])
def test_attention_cuda_reads_strided_views(D, Sk, poison):
    # q from a fused QKV projection [B, S, 3, H, D] (self-attention); k/v from a [B, H, S, D] tensor
    # permuted to [B, S, H, D] (head-major rows), with a non-default scale of either sign.
    B, Sq, H = 2, 45, 3
    qkv_buf = torch.randn(B, Sq, 3, H, D, device="cuda", dtype=torch.float16)
    q = qkv_buf[:, :, 0]
    kv = torch.randn(2, B, H, Sk, D, device="cuda", dtype=torch.float16)
    k, v = kv[0].permute(0, 2, 1, 3), kv[1].permute(0, 2, 1, 3)
    assert not q.is_contiguous() and not k.is_contiguous()
    for scale in (0.3, -0.2):
        out = ops.attention(q, k, v, scale=scale, backend="cuda")
        assert_attention_close(out, q, k, v, scale, f"strided D={D} Sk={Sk} scale={scale}")
    q, k, v = qkv_buf.unbind(2)  # all three from the fused projection, Sk = Sq
    out = ops.attention(q, k, v, backend="cuda")
    assert_attention_close(out, q, k, v, 1 / math.sqrt(D), f"fused qkv D={D}")


@pytest.mark.parametrize("Sk", [77, 1000])
def test_attention_cuda_is_bitwise_deterministic(Sk):
    q, k, v = qkv(2, 1024, Sk, 8, 40, torch.bfloat16, seed=1)
    first = ops.attention(q, k, v, backend="cuda")
    for _ in range(10):
        assert torch.equal(ops.attention(q, k, v, backend="cuda"), first)


def test_attention_cuda_large_scores_stay_finite():
    # Scores around +-300 (exp would overflow without the max subtraction); a row's max moves tile to tile.
    q, k, v = qkv(1, 64, 500, 2, 64, torch.float16, seed=3)
    q = q * 4
    k = k * torch.linspace(0.5, 4, 500, device="cuda", dtype=torch.float16).view(1, 500, 1, 1)
    out = ops.attention(q, k, v, scale=1.0, backend="cuda")
    assert_attention_close(out, q, k, v, 1.0, "large scores")


def test_attention_cuda_declines_what_it_does_not_serve():
    q, k, v = qkv(1, 16, 16, 1, 64, torch.float16, seed=0)
    r = cuda_attn.supports(q.float(), k.float(), v.float(), 0.1)
    assert "float32" in r and "float16/bfloat16" in r
    with pytest.raises(ops.BackendUnavailable, match="float16/bfloat16"):
        ops.attention(q.float(), k.float(), v.float(), backend="cuda")
    q96, k96, v96 = qkv(1, 16, 16, 1, 96, torch.float16, seed=0)
    assert "D=96" in cuda_attn.supports(q96, k96, v96, 0.1) and "40, 64, 80, 128, 160" in \
        cuda_attn.supports(q96, k96, v96, 0.1)
    buf = torch.randn(16 * 64 + 1, device="cuda", dtype=torch.float16)
    q_unaligned = buf[1:].view(1, 16, 1, 64)
    assert "16-byte aligned" in cuda_attn.supports(q_unaligned, k, v, 0.1)
    # auto still serves these calls (through another backend).
    out = ops.attention(q_unaligned, k, v)
    assert_attention_close(out, q_unaligned, k, v, 1 / 8, "auto fallback")


def test_attention_cuda_on_a_side_stream_and_in_a_cuda_graph():
    q, k, v = qkv(2, 300, 77, 4, 80, torch.float16, seed=2)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out_s = ops.attention(q, k, v, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(out_s, ops.attention(q, k, v, backend="cuda"))

    sq, sk, sv = q.clone(), k.clone(), v.clone()
    ops.attention(sq, sk, sv, backend="cuda")  # warm-up (shared-memory limits are raised outside capture)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ops.attention(sq, sk, sv, backend="cuda")
    q2, k2, v2 = qkv(2, 300, 77, 4, 80, torch.float16, seed=9)
    sq.copy_(q2)
    sk.copy_(k2)
    sv.copy_(v2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, ops.attention(q2, k2, v2, backend="cuda"))
