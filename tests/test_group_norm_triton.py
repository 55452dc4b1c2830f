"""Triton group_norm(+SiLU, +pre-add) against the reference: interpreter on CPU, compiled kernels on a GPU.

Tolerance (flash-attention style, ``kernels/reference/oracle.py``): the kernel's max error against the float64
oracle must be at most twice the error of PyTorch's own group_norm run in the same low precision, plus a floor
of half an output ulp (fp16/bf16) or 1e-5 (fp32), relative to the largest value. Outputs start as NaN.
"""

from __future__ import annotations

import pytest
import torch

from diffusion_fast import ops
from diffusion_fast.kernels.reference import oracle
from diffusion_fast.kernels.triton import _common
from diffusion_fast.kernels.triton import group_norm as tgn
from diffusion_fast.ops.registry import BackendUnavailable

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(shape, dtype, device, *, channels_last=False, affine=True, with_add=False, offset=0.0, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    N, C = shape[0], shape[1]
    x = (torch.randn(shape, generator=g) * 1.5 + offset).to(dtype)
    if channels_last:
        x = x.permute(0, *range(2, x.dim()), 1).contiguous().permute(0, x.dim() - 1, *range(1, x.dim() - 1))
    w = torch.randn(C, generator=g) if affine else None
    b = torch.randn(C, generator=g) if affine else None
    a = torch.randn(N, C, generator=g).to(dtype) if with_add else None
    mv = lambda t: None if t is None else t.to(device)
    return mv(x), mv(w), mv(b), mv(a)


def assert_close(out, x, G, w, b, eps, act, add, what=""):
    assert out.shape == x.shape and out.dtype == x.dtype
    oracle.assert_close(out, oracle.group_norm(x, G, w, b, eps, act, add),
                        oracle.group_norm_lowp(x, G, w, b, eps, act, add), what=what)


def run_poisoned(x, G, w, b, eps, act, add, **kw):
    """Run the Triton path into a NaN-filled output of x's layout."""
    out = oracle.nan_like(x)
    y = tgn._forward(x, G, w, b, eps, act, add, out=out, **kw)
    assert y is out
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("N", [1, 2])
def test_group_norm_silu_matches_reference(N, channels_last, dtype, device):
    # C=320, 32 groups of 10 channels, 7x9: no tile or chunk size divides anything. Batch 2 adds the
    # per-(sample, channel) pre-add; batch 1 runs with the split reduction (several chunks per group).
    x, w, b, a = make((N, 320, 7, 9), dtype, device, channels_last=channels_last, with_add=N == 2, seed=N)
    out = run_poisoned(x, 32, w, b, 1e-5, "silu", a)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert_close(out, x, 32, w, b, 1e-5, "silu", a, f"N={N} {dtype}")


def test_plan_splits_batch_one_and_not_batch_two():
    # What the test above relies on: under the interpreter's stand-in SM count, batch 1 is split.
    target = 4 * _common.INTERPRET_SM_COUNT
    assert tgn.plan(1, 32, 10, 63, target_programs=target, tile=256).split > 1
    # On an H100 (132 SMs) at SD1.5 64x64 latents the 32 groups of batch 1 are cut into enough chunks.
    p = tgn.plan(1, 32, 10, 64 * 64, target_programs=4 * 132, tile=4096)
    assert 1 * 32 * p.split >= 2 * 132  # every SM gets several programs (at most one chunk per tile)
    assert p.chunk_s % p.block_s == 0 and (p.split - 1) * p.chunk_s < 64 * 64 <= p.split * p.chunk_s


@pytest.mark.parametrize("target_programs", [1, 10_000], ids=["one-chunk", "chunk-per-tile"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_large_mean_survives_any_split(channels_last, target_programs, device):
    # Mean 1000, std 1.5: E[x^2] - E[x]^2 in fp32 would lose everything; the merged two-pass does not.
    x, w, b, _ = make((1, 48, 5, 11), torch.float32, device, channels_last=channels_last, offset=1000.0)
    out = run_poisoned(x, 6, w, b, 1e-6, None, None, target_programs=target_programs)
    assert_close(out, x, 6, w, b, 1e-6, None, None, f"split target {target_programs}")


def test_no_affine_no_activation(device):
    x, _, _, _ = make((2, 24, 3, 13), torch.float16, device, affine=False)
    out = run_poisoned(x, 4, None, None, 1e-5, None, None)
    assert_close(out, x, 4, None, None, 1e-5, None, None)


def test_group_wider_than_a_tile_takes_the_channel_loop(device):
    # 2 groups of 320 channels: the interpreter's tile holds 256 channels, so each group takes two
    # channel blocks, the second one partial.
    x, w, b, a = make((1, 640, 3, 5), torch.float32, device, channels_last=True, with_add=True)
    out = run_poisoned(x, 2, w, b, 1e-5, "silu", a)
    assert_close(out, x, 2, w, b, 1e-5, "silu", a)


@pytest.mark.parametrize("rank", [3, 5])
@pytest.mark.parametrize("channels_last", [False, True], ids=["channel-major", "channel-minor"])
def test_rank_3_and_5(rank, channels_last, device):
    shape = (2, 12, 17) if rank == 3 else (1, 12, 3, 4, 5)
    x, w, b, a = make(shape, torch.bfloat16, device, channels_last=channels_last, with_add=True)
    out = run_poisoned(x, 3, w, b, 1e-5, "silu", a)
    assert out.stride() == x.stride()
    assert_close(out, x, 3, w, b, 1e-5, "silu", a, f"rank {rank}")


def test_public_op_reaches_triton_and_keeps_format(device):
    x, w, b, a = make((2, 64, 6, 5), torch.float16, device, channels_last=True, with_add=True)
    y = ops.group_norm(x, 8, w.half(), b.half(), activation="silu", add=a, backend="triton")
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, x, 8, w.half(), b.half(), 1e-5, "silu", a)


def test_strided_weight_and_add(device):
    x, _, _, _ = make((2, 40, 4, 4), torch.float32, device)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(80, generator=g).to(device)[::2]
    b = torch.randn(80, generator=g).to(device)[1::2]
    a = torch.randn(40, 2, generator=g).to(device).t()  # [N, C] with strides (1, 2)
    out = run_poisoned(x, 5, w, b, 1e-5, "silu", a)
    assert_close(out, x, 5, w, b, 1e-5, "silu", a)


def test_unsupported_layout_gives_the_reason(device):
    x = torch.randn(2, 8, 6, 10, device=device)[..., ::2]
    reason = tgn.supports(x=x, num_groups=2)
    assert reason is not None and "neither contiguous nor channels_last" in reason
    with pytest.raises(BackendUnavailable, match="channels_last"):
        ops.group_norm(x, 2, backend="triton")


def test_cpu_tensor_without_interpreter_is_declined(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", False)
    reason = _common.device_reason(torch.randn(2))
    assert reason is not None and "TRITON_INTERPRET" in reason


# ----------------------------------------------------------------------------------------------- GPU ---
# SD1.5 ResNet blocks at 512x512 (CFG batch 2, and batch 1): 10/20/40 channels per group, and the decoder's
# concatenated 960 and 2560 channels. bf16 everywhere; fp32 and fp16 on one shape (each distinct channel count,
# layout, dtype and flag set is one more compilation).
SD15 = [(2, 320, 64, 64), (1, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 2560, 8, 8), (2, 960, 32, 32)]
GPU_CASES = [(s, torch.bfloat16) for s in SD15] + [(SD15[0], torch.float32), (SD15[0], torch.float16)]


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,dtype", GPU_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else str(v).replace("torch.", ""))
def test_gpu_sd15_shapes(shape, dtype, channels_last):
    x, w, b, a = make(shape, dtype, "cuda", channels_last=channels_last, with_add=shape[0] == 2)
    out = run_poisoned(x, 32, w, b, 1e-5, "silu", a)
    assert_close(out, x, 32, w, b, 1e-5, "silu", a, f"{shape} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gpu_repeated_calls_are_bitwise_equal(channels_last):
    x, w, b, a = make((1, 640, 64, 64), torch.bfloat16, "cuda", channels_last=channels_last, with_add=True)
    first = ops.group_norm(x, 32, w, b, activation="silu", add=a, backend="triton")
    for _ in range(20):
        assert torch.equal(ops.group_norm(x, 32, w, b, activation="silu", add=a, backend="triton"), first)


@pytest.mark.gpu
def test_gpu_auto_picks_triton_for_large_calls():
    # The measured crossover (ops/registry.py): triton above 2**24 elements, cuda below.
    x, w, b, _ = make((8, 512, 128, 128), torch.float16, "cuda")
    from diffusion_fast.ops import registry

    call = dict(x=x, num_groups=8, weight=w, bias=b, eps=1e-5, activation="silu", add=None)
    assert registry.resolve("group_norm", "auto", x.device, call) is tgn.forward
