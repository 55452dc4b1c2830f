"""Triton attention against the reference: interpreter on CPU (fp16, fp32), compiled kernels on a GPU (+bf16).

Tolerance (flash-attention style, ``kernels/reference/oracle.py``): the kernel's max error against the float64
oracle must be at most twice the error of a plain PyTorch attention computed in the same dtype (scores and
output products in that dtype, softmax rounded to it), plus a floor of half an output ulp (fp16/bf16) or 1e-5
(fp32), relative to the largest value. Outputs start as NaN wherever the test owns the buffer.
"""

from __future__ import annotations

import pytest
import torch

from diffusion_fast import ops
from diffusion_fast.kernels.reference import oracle
from diffusion_fast.kernels.triton import _autotune, _common
from diffusion_fast.kernels.triton import attention as ta
from diffusion_fast.ops.registry import BackendUnavailable

CPU_DTYPES = [torch.float16, torch.float32]  # the interpreter's tl.dot is wrong for bf16


def rand(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


def assert_close(out, q, k, v, scale, what=""):
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    oracle.assert_close(out, oracle.attention(q, k, v, scale), oracle.attention_lowp(q, k, v, scale), what=what)


def run_poisoned(q, k, v, scale, cfg):
    out = oracle.nan_like(torch.empty(q.shape, dtype=q.dtype, device=q.device))
    ta.launch(q, k, v, scale, out, cfg)
    return out


# ------------------------------------------------------------------------------------ planning (pure) ---
def test_split_head_dim_covers_every_head_dim_with_less_padding():
    for D in range(8, 257, 8):
        da, db = ta.split_head_dim(D)
        for part in (da, db):
            assert part == 0 or (part >= 16 and part & (part - 1) == 0)
        assert db == 0 or db >= ta.MIN_SPLIT
        assert da + db >= D and da + db <= max(16, 1 << (D - 1).bit_length())
    assert ta.split_head_dim(40) == (64, 0)
    assert ta.split_head_dim(80) == (64, 32)
    assert ta.split_head_dim(160) == (128, 32)
    assert ta.split_head_dim(64) == (64, 0)


def test_key_tiles_cover_every_key_once():
    for Sk in range(1, 300):
        for block_n in ([0] if Sk <= ta.SHORT_SK else []) + [32, 64, 128]:
            bn, tail, n_full, short = ta.key_tiles(Sk, block_n)
            assert short == (block_n == 0)
            assert n_full % max(bn, 1) == 0 and n_full <= Sk
            assert (Sk - n_full == 0) == (tail == 0)
            assert n_full + tail >= Sk and (tail <= 16 or tail < 2 * (Sk - n_full))  # tail: next_pow2, >= 16
    assert ta.key_tiles(77, 0) == (64, 16, 64, True)  # 80 key columns for CLIP's 77 tokens, not 128


def test_candidate_configs_exist_for_every_head_dim_and_family():
    for arch in (80, 90):
        for D in range(8, 257, 8):
            for Sk in (77, 4096):
                for dtype in (torch.float16, torch.bfloat16):
                    assert ta.candidate_configs(D, dtype, Sk, arch), (arch, D, Sk, dtype)
                d_eff = sum(ta.split_head_dim(D, split=ta.SPLIT_ON_GPU))
                assert (ta.candidate_configs(D, torch.float32, Sk, arch) != []) == (d_eff <= 64)


# --------------------------------------------------------------------------------- interpreter numerics ---
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_cross_attention_77_queries_1000_keys(dtype, device):
    q, k, v = (rand((1, S, 2, 40), dtype, device, i) for i, S in enumerate((77, 1000, 1000)))
    out = ops.attention(q, k, v, backend="triton")
    assert_close(out, q, k, v, 40**-0.5, f"77x1000 {dtype}")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("D", [8, 40, 72, 80, 160, 256])
@pytest.mark.parametrize("Sk", [77, 150])
def test_head_dims(D, Sk, dtype, device):
    # Sk=77: the loop-free path (fp16) or 32-wide tiles with a tail (fp32); Sk=150: two 64-key tiles and a
    # masked tail of 22 keys. Sq=33: a partial query block.
    q = rand((2, 33, 2, D), dtype, device, 1)
    k = rand((2, Sk, 2, D), dtype, device, 2)
    v = rand((2, Sk, 2, D), dtype, device, 3)
    out = ops.attention(q, k, v, backend="triton")
    assert_close(out, q, k, v, D**-0.5, f"D={D} Sk={Sk} {dtype}")


@pytest.mark.parametrize("D", [40, 80])
def test_strided_qkv_from_fused_projection(D, device):
    # Self-attention on slices of one [B, S, 3, H, D] projection, cross-attention with fused [B, Sk, 2, H, D]
    # keys/values: only the last dim is contiguous and nothing is copied.
    qkv = rand((2, 45, 3, 3, D), torch.float16, device, 4)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    assert_close(ops.attention(q, k, v, backend="triton"), q, k, v, D**-0.5, "fused qkv")
    kv = rand((2, 19, 2, 3, D), torch.float16, device, 5)
    k2, v2 = kv.unbind(2)
    assert_close(ops.attention(q, k2, v2, 0.3, backend="triton"), q, k2, v2, 0.3, "fused kv")


@pytest.mark.parametrize("cfg", [ta.Config(16, 16, 4, 1), ta.Config(32, 128, 4, 1), ta.Config(128, 0, 4, 1)],
                         ids=lambda c: f"M{c.block_m}N{c.block_n}")
def test_other_tile_shapes(cfg, device):
    # Configurations other than the interpreter's default, into a NaN-filled output.
    Sk = 100 if cfg.block_n == 0 else 170
    q, k, v = rand((1, 50, 2, 48), torch.float16, device, 6), rand((1, Sk, 2, 48), torch.float16, device, 7), \
        rand((1, Sk, 2, 48), torch.float16, device, 8)
    assert_close(run_poisoned(q, k, v, 0.2, cfg), q, k, v, 0.2, str(cfg))


def test_large_scores_do_not_overflow(device):
    # Scaled scores with a spread of ~100: exp of the raw scores would overflow fp32; the running max keeps
    # them finite, and several keys per row still matter.
    q = rand((1, 20, 1, 16), torch.float32, device, 9) * 10
    k = rand((1, 90, 1, 16), torch.float32, device, 10) * 10
    v = rand((1, 90, 1, 16), torch.float32, device, 11)
    assert_close(ops.attention(q, k, v, backend="triton"), q, k, v, 0.25, "large scores")


def test_non_contiguous_head_dim_gives_the_reason(device):
    q = rand((1, 8, 2, 32), torch.float16, device, 0)[..., ::2]
    k = v = rand((1, 8, 2, 16), torch.float16, device, 1)
    reason = ta.supports(q=q, k=k, v=v, scale=0.25)
    assert reason is not None and "last dim is contiguous" in reason
    with pytest.raises(BackendUnavailable, match="stride"):
        ops.attention(q, k, v, backend="triton")


@pytest.mark.skipif(not _common.INTERPRET, reason="the interpreter's bf16 limitation")
def test_bf16_is_declined_under_the_interpreter():
    q = torch.randn(1, 4, 1, 16, dtype=torch.bfloat16)
    assert "interpreter" in ta.supports(q=q, k=q, v=q, scale=0.25)


# ------------------------------------------------------------------------------------------ autotuner ---
def test_autotuner_times_candidates_and_caches_the_fastest(monkeypatch):
    import triton.testing

    monkeypatch.setattr(_autotune, "enabled", lambda: True)
    monkeypatch.setattr(_autotune, "is_capturing", lambda: False)
    speed = {"a": 3.0, "b": 1.0, "c": 2.0}
    launched = []

    def fake_bench(fn, **kw):
        fn()
        return [speed[launched[-1]]]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    tuner = _autotune.Autotuner("test")
    assert tuner.choose("key", ["a", "b", "c"], launched.append) == "b"
    assert launched == ["a", "b", "c"]
    assert tuner.choose("key", ["a", "b", "c"], launched.append) == "b" and len(launched) == 3


def test_autotuner_never_times_while_capturing(monkeypatch):
    import triton.testing

    monkeypatch.setattr(_autotune, "enabled", lambda: True)
    monkeypatch.setattr(_autotune, "is_capturing", lambda: True)
    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: pytest.fail("timed during a capture"))
    tuner = _autotune.Autotuner("test")
    assert tuner.choose("k1", ["default", "other"], lambda c: None) == "default"
    assert "k1" not in tuner.cache  # a later eager call may still tune this key
    tuner.cache["k2"] = "other"
    assert tuner.choose("k2", ["default", "other"], lambda c: None) == "other"  # cached choice is used


# ----------------------------------------------------------------------------------------------- GPU ---
# SD1.5 at 512x512: self-attention at 64x64 / 32x32 / 16x16 latents (D = 40 / 80 / 160 with 8 heads),
# cross-attention to 77 text tokens; CFG batch 2.
SD15 = [(2, 4096, 4096, 8, 40), (2, 1024, 1024, 8, 80), (2, 256, 256, 8, 160), (2, 4096, 77, 8, 40),
        (2, 1024, 77, 8, 80), (2, 256, 77, 8, 160), (1, 4096, 4096, 8, 64), (1, 1024, 1024, 8, 128)]
GPU_CASES = [(s, torch.bfloat16) for s in SD15] + [(s, torch.float16) for s in SD15[:2]]


@pytest.fixture
def no_autotune(monkeypatch):
    monkeypatch.setenv("DIFFUSION_FAST_AUTOTUNE", "0")


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", GPU_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else str(v).replace("torch.", ""))
def test_gpu_sd15_shapes(shape, dtype, no_autotune):
    B, Sq, Sk, H, D = shape
    q, k, v = rand((B, Sq, H, D), dtype, "cuda", 1), rand((B, Sk, H, D), dtype, "cuda", 2), \
        rand((B, Sk, H, D), dtype, "cuda", 3)
    assert_close(ops.attention(q, k, v, backend="triton"), q, k, v, D**-0.5, f"{shape} {dtype}")


@pytest.mark.gpu
def test_gpu_every_candidate_config():
    # Every configuration the autotuner may pick on this card, for one shape per head-dim class.
    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor
    failures = []
    for D, Sq, Sk in ((40, 200, 333), (40, 4096, 4096), (80, 200, 77), (80, 1024, 1024), (160, 200, 300),
                      (256, 200, 77), (64, 1024, 1024)):
        for dtype in (torch.bfloat16, torch.float32):
            for cfg in ta.candidate_configs(D, dtype, Sk, arch):
                q, k, v = rand((2, Sq, 2, D), dtype, "cuda", 4), rand((2, Sk, 2, D), dtype, "cuda", 5), \
                    rand((2, Sk, 2, D), dtype, "cuda", 6)
                try:
                    assert_close(run_poisoned(q, k, v, D**-0.5, cfg), q, k, v, D**-0.5, f"D={D} {dtype} {cfg}")
                except AssertionError as exc:  # collect all, so one run names every failing configuration
                    failures.append(f"Sq={Sq} Sk={Sk}: {str(exc).splitlines()[0]}")
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [40, 64])
def test_gpu_float32(D, no_autotune):
    q, k, v = (rand((2, S, 4, D), torch.float32, "cuda", i) for i, S in enumerate((500, 700, 700)))
    assert_close(ops.attention(q, k, v, backend="triton"), q, k, v, D**-0.5, f"fp32 D={D}")


@pytest.mark.gpu
def test_gpu_strided_fused_qkv():
    qkv = rand((2, 1024, 3, 8, 80), torch.bfloat16, "cuda", 7)
    q, k, v = qkv.unbind(2)
    assert_close(ops.attention(q, k, v, backend="triton"), q, k, v, 80**-0.5, "fused qkv")


@pytest.mark.gpu
def test_gpu_repeated_calls_are_bitwise_equal():
    q, k, v = (rand((2, 1024, 8, 80), torch.bfloat16, "cuda", i) for i in range(3))
    first = ops.attention(q, k, v, backend="triton")  # autotunes this key once, then keeps the choice
    for _ in range(20):
        assert torch.equal(ops.attention(q, k, v, backend="triton"), first)


@pytest.mark.gpu
def test_gpu_graph_capture_of_an_untuned_shape():
    # First call of a shape inside a capture: no timing (it would synchronise), default config, correct.
    q, k, v = (rand((1, 333, 8, 40), torch.float16, "cuda", i) for i in range(3))
    # Compile the default configuration's kernel outside the capture: same Sk and the same divisibility of
    # every integer argument, but another query-length bucket, so the captured call's key is still untuned.
    ops.attention(q[:, :77], k, v, backend="triton")
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.attention(q, k, v, backend="triton")
    g.replay()
    torch.cuda.synchronize()
    assert_close(out, q, k, v, 40**-0.5, "captured")


@pytest.mark.gpu
def test_gpu_auto_picks_triton_for_long_power_of_two_heads():
    from diffusion_fast.ops import registry

    # The measured crossover (ops/registry.py): triton for S=4096 self-attention at D=64/128.
    q = rand((1, 4096, 2, 64), torch.float16, "cuda", 0)
    call = dict(q=q, k=q, v=q, scale=0.1)
    assert registry.resolve("attention", "auto", q.device, call) is ta.forward


def test_views_spanning_more_than_int32_are_declined():
    # A q slice of a huge fused projection (meta tensor: no memory): 2**30 elements of its own, but offsets
    # reaching 3 * 2**30 through its strides.
    q = torch.empty((1, 2**21, 3, 8, 64), dtype=torch.float16, device="meta")[:, :, 0]
    assert q.numel() < 2**31
    assert "int32" in _common.numel_reason(q=q)
    assert _common.numel_reason(q=q[:, : 2**18]) is None
