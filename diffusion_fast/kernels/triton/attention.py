"""Flash attention forward in Triton: online softmax in fp32, any D multiple of 8 up to 256, strided q/k/v.

``_attention_fwd_kernel`` — grid ``(cdiv(Sq, BLOCK_M), B * H)``; the query blocks of one head are
neighbouring programs, so they share that head's K/V in L2. One program holds a ``[BLOCK_M, D]`` query tile
and its fp32 accumulator in registers and streams K/V in ``[BLOCK_N, D]`` tiles:
``s = q k^T * scale * log2(e)`` (tensor cores, fp32 accumulate), running max and sum in fp32 with ``exp2``,
``acc = acc * alpha + p v`` with ``p`` cast to the input dtype (as flash attention does).

Head dims that are not powers of two can be split instead of padded: ``D = D_A + D_B`` with two power-of-two
parts, the second at least ``MIN_SPLIT`` = 32 wide (80 = 64 + 16→32, 160 = 128 + 32, 72 = 64 + 8→32), each its
own pair of dots; only the lanes of the last part beyond ``D`` are masked (useful MMA work 83% at D=80, 100% at
D=160, against 62.5% padded). The split path gave wrong results on an H200 with Triton 3.6, so compiled
kernels pad to the next power of two (``SPLIT_ON_GPU``); the interpreter runs the split path.

Keys: full ``BLOCK_N`` tiles without masks, then one masked tail tile of ``next_pow2(Sk % BLOCK_N)`` (at least
16) columns. Short Sk (<= 128, text tokens): no loop at all — one unmasked tile of ``prev_pow2(Sk)`` and a
tail (77 = 64 + 16: 80 key columns computed instead of 128) — wherever that tile fits the registers (see the
configuration lists). float32 uses exact fp32 dots (no TF32) and is served on a GPU for ``D_A + D_B <= 64``.

FLOPs: ``4 * B * H * Sq * Sk * D`` (two matmuls); bytes at least ``(2 * B * Sq + 2 * B * Sk) * H * D * itemsize``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _autotune
from ._common import INTERPRET, device_reason, next_pow2, numel_reason, prev_pow2

LOG2E = 1.4426950408889634
SHORT_SK = 128  # at most this many keys: the loop-free path


@triton.jit
def _attention_tile(
    acc_a, acc_b, l_i, m_i, q_a, q_b,
    k_base,  # [Sk, D] keys of this (batch, head), row stride sks, last dim contiguous
    v_base,  # [Sk, D] values of this (batch, head), row stride svs
    sks, svs, start_n, Sk, qk_scale, offs_da, offs_db,
    HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr, BLOCK: tl.constexpr,
    MASK_N: tl.constexpr, IEEE: tl.constexpr,
):
    """One key tile [start_n, start_n + BLOCK) of the online softmax; returns the updated state."""
    offs_n = start_n + tl.arange(0, BLOCK)
    mask_a = (offs_da < HEAD_DIM)[None, :]
    if MASK_N:
        mask_a = mask_a & (offs_n < Sk)[:, None]
    k_a = tl.load(k_base + offs_n[:, None] * sks + offs_da[None, :], mask=mask_a, other=0.0)
    if IEEE:
        s = tl.dot(q_a, tl.trans(k_a), input_precision="ieee")
    else:
        s = tl.dot(q_a, tl.trans(k_a))
    if D_B > 0:
        mask_b = (offs_db < HEAD_DIM)[None, :]
        if MASK_N:
            mask_b = mask_b & (offs_n < Sk)[:, None]
        k_b = tl.load(k_base + offs_n[:, None] * sks + offs_db[None, :], mask=mask_b, other=0.0)
        if IEEE:
            s = tl.dot(q_b, tl.trans(k_b), s, input_precision="ieee")
        else:
            s = tl.dot(q_b, tl.trans(k_b), s)
    s = s * qk_scale
    if MASK_N:
        s = tl.where((offs_n < Sk)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_a = tl.load(v_base + offs_n[:, None] * svs + offs_da[None, :], mask=mask_a, other=0.0)
    acc_a = acc_a * alpha[:, None]
    if IEEE:
        acc_a = tl.dot(p, v_a, acc_a, input_precision="ieee")
    else:
        acc_a = tl.dot(p.to(v_a.dtype), v_a, acc_a)
    if D_B > 0:
        v_b = tl.load(v_base + offs_n[:, None] * svs + offs_db[None, :], mask=mask_b, other=0.0)
        acc_b = acc_b * alpha[:, None]
        if IEEE:
            acc_b = tl.dot(p, v_b, acc_b, input_precision="ieee")
        else:
            acc_b = tl.dot(p.to(v_b.dtype), v_b, acc_b)
    return acc_a, acc_b, l_i, m_new


@triton.jit
def _attention_fwd_kernel(
    q_ptr,  # [B, Sq, H, D] strides (sqb, sqs, sqh, 1)
    k_ptr,  # [B, Sk, H, D] strides (skb, sks, skh, 1)
    v_ptr,  # [B, Sk, H, D] strides (svb, svs, svh, 1)
    o_ptr,  # [B, Sq, H, D] strides (sob, sos, soh, 1), q.dtype
    qk_scale,  # scale * log2(e)
    Sq, Sk, H,
    n_full,  # keys covered by unmasked BLOCK_N tiles; the tail tile starts here
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
    HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_TAIL: tl.constexpr,
    SHORT: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    o_base = o_ptr + b * sob + h * soh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = (offs_m < Sq)[:, None]
    offs_da = tl.arange(0, D_A)
    q_a = tl.load(q_base + offs_m[:, None] * sqs + offs_da[None, :],
                  mask=mask_m & (offs_da < HEAD_DIM)[None, :], other=0.0)
    acc_a = tl.zeros([BLOCK_M, D_A], dtype=tl.float32)
    if D_B > 0:
        offs_db = D_A + tl.arange(0, D_B)
        q_b = tl.load(q_base + offs_m[:, None] * sqs + offs_db[None, :],
                      mask=mask_m & (offs_db < HEAD_DIM)[None, :], other=0.0)
        acc_b = tl.zeros([BLOCK_M, D_B], dtype=tl.float32)
    else:  # placeholders, never read
        offs_db = offs_da
        q_b = q_a
        acc_b = acc_a
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    if SHORT:
        if BLOCK_N > 0:
            acc_a, acc_b, l_i, m_i = _attention_tile(
                acc_a, acc_b, l_i, m_i, q_a, q_b, k_base, v_base, sks, svs, 0, Sk, qk_scale, offs_da, offs_db,
                HEAD_DIM, D_A, D_B, BLOCK_N, False, IEEE)
    else:
        for start_n in range(0, n_full, BLOCK_N):
            acc_a, acc_b, l_i, m_i = _attention_tile(
                acc_a, acc_b, l_i, m_i, q_a, q_b, k_base, v_base, sks, svs, start_n, Sk, qk_scale, offs_da,
                offs_db, HEAD_DIM, D_A, D_B, BLOCK_N, False, IEEE)
    if BLOCK_TAIL > 0:
        acc_a, acc_b, l_i, m_i = _attention_tile(
            acc_a, acc_b, l_i, m_i, q_a, q_b, k_base, v_base, sks, svs, n_full, Sk, qk_scale, offs_da, offs_db,
            HEAD_DIM, D_A, D_B, BLOCK_TAIL, True, IEEE)

    inv_l = 1.0 / l_i
    o_ty = o_ptr.dtype.element_ty
    tl.store(o_base + offs_m[:, None] * sos + offs_da[None, :], (acc_a * inv_l[:, None]).to(o_ty),
             mask=mask_m & (offs_da < HEAD_DIM)[None, :])
    if D_B > 0:
        tl.store(o_base + offs_m[:, None] * sos + offs_db[None, :], (acc_b * inv_l[:, None]).to(o_ty),
                 mask=mask_m & (offs_db < HEAD_DIM)[None, :])


@dataclass(frozen=True)
class Config:
    """One launch configuration of the attention kernel (what the autotuner chooses between)."""

    block_m: int
    block_n: int  # key tile of the main loop; for the short path, derived from Sk (see key_tiles)
    num_warps: int
    num_stages: int


# Narrowest second part of a split head dim.
MIN_SPLIT = 32
# Whether compiled (GPU) kernels split head dims at all. On an H200 with Triton 3.6 the split kernels gave
# NaN (D=40 as 32 + 16, long path) and illegal addresses (D=80 as 64 + 32 and D=160 as 128 + 32, loop-free
# short path) in benchmarks/gpu_check.sh on 2026-11-26, while every padded head dim was right. Until a GPU
# run shows the split path right, compiled kernels pad D to the next power of two (as FlashAttention does);
# the interpreter keeps running the split path, so its indexing stays tested.
SPLIT_ON_GPU = False


def split_head_dim(D: int, split: bool | None = None) -> tuple[int, int]:
    """``(D_A, D_B)`` covering D: the next power of two (``D_B = 0``), or — when splitting, the default
    under the interpreter — two power-of-two parts (``D_B >= MIN_SPLIT``) with the least padding."""
    full = max(16, next_pow2(D))
    if split is None:
        split = INTERPRET or SPLIT_ON_GPU
    if not split:
        return full, 0
    da = max(16, prev_pow2(D))
    rem = D - da
    if rem <= 0:
        return full, 0
    db = max(MIN_SPLIT, next_pow2(rem))
    if da + db >= full:
        return full, 0
    return da, db


def key_tiles(Sk: int, block_n: int) -> tuple[int, int, int, bool]:
    """``(BLOCK_N, BLOCK_TAIL, n_full, SHORT)``: unmasked key tiles up to ``n_full``, then one masked tail.

    ``block_n == 0`` selects the loop-free short path (for Sk <= 128): one unmasked tile of
    ``prev_pow2(Sk)`` keys and a tail of ``next_pow2`` of the rest, or a single padded tile when that is
    no larger.
    """
    if block_n == 0:
        if Sk > SHORT_SK:
            raise ValueError(f"the loop-free path serves Sk <= {SHORT_SK}, got Sk={Sk}")
        main = prev_pow2(Sk)
        rem = Sk - main
        tail = max(16, next_pow2(rem)) if rem else 0
        if main < 16 or (tail and main + tail >= next_pow2(Sk)):  # one padded tile is no worse than two
            return 0, max(16, next_pow2(Sk)), 0, True
        return main, tail, main, True
    rem = Sk % block_n
    tail = max(16, next_pow2(rem)) if rem else 0
    return block_n, tail, Sk - rem, False


# Candidate configurations per target family, path and effective head dim (D_A + D_B rounded up to 64, 128,
# 192 or 256). The first of each list is the default when nothing is timed. Every entry compiles without
# register spills and within the shared memory of its target (tests/test_triton_aot.py checks all of them):
# the fp32 accumulator of BLOCK_M x D_eff plus the query tile held as an MMA operand bound BLOCK_M and the
# warp count, and Ampere's mma.sync layouts need more registers per thread than Hopper's wgmma.
_C = Config
_LOWP = {
    90: {
        "long": {
            64: [_C(128, 64, 4, 3), _C(128, 128, 8, 3), _C(64, 64, 4, 3), _C(128, 64, 8, 3)],
            128: [_C(128, 64, 8, 3), _C(128, 128, 8, 2), _C(64, 64, 4, 3), _C(128, 32, 4, 3)],
            192: [_C(128, 64, 8, 2), _C(128, 32, 8, 3), _C(64, 64, 8, 2), _C(64, 32, 4, 3)],
            256: [_C(128, 64, 8, 2), _C(128, 32, 8, 3), _C(64, 64, 8, 2), _C(64, 32, 4, 3)],
        },
        "short": {
            64: [_C(128, 0, 8, 1), _C(64, 0, 4, 1), _C(128, 0, 4, 1), _C(64, 0, 8, 1)],
            128: [_C(128, 0, 8, 1), _C(64, 0, 4, 1), _C(64, 0, 8, 1)],
            192: [_C(128, 0, 8, 1), _C(64, 0, 4, 1), _C(64, 0, 8, 1)],
            256: [_C(128, 0, 8, 1), _C(64, 0, 8, 1)],
        },
    },
    80: {
        "long": {
            64: [_C(128, 64, 8, 3), _C(128, 128, 8, 3), _C(64, 64, 4, 3)],
            # (64, 64, 8, 3) spills 8 B at D=80 padded to 128.
            128: [_C(128, 64, 8, 3), _C(128, 32, 8, 3), _C(64, 32, 8, 3)],
            192: [_C(128, 32, 8, 3), _C(64, 32, 4, 3), _C(64, 32, 8, 2)],
            256: [_C(32, 32, 4, 2), _C(32, 16, 4, 2)],
        },
        "short": {
            64: [_C(128, 0, 8, 1), _C(64, 0, 4, 1), _C(64, 0, 8, 1)],
            128: [_C(64, 0, 8, 1), _C(32, 0, 4, 1)],
            # Ampere's loop-free tiles of 144-192 wide heads spill at any M: 32-key tiles with a tail instead.
            192: [_C(128, 32, 8, 3), _C(64, 32, 4, 3)],
            # The loop-free 256-wide tile spills at D=160 padded to 256: 32-key tiles instead.
            256: [_C(32, 32, 4, 2), _C(32, 16, 4, 2)],
        },
    },
}
# float32 takes the FMA path of tl.dot (exact fp32 products): its operand layouts cost far more registers,
# and no tile of D_eff > 64 compiles without spills, so larger fp32 head dims are left to the other
# backends on a GPU. Key tiles of 32 (no loop-free path) for every Sk.
_F32_MAX_D_EFF = 64
_F32 = [_C(64, 32, 8, 2), _C(32, 32, 4, 2)]
# The interpreter runs one fixed, smallish configuration (speed there is meaningless).
_INTERPRET_CONFIG = Config(64, 64, 4, 1)
_INTERPRET_SHORT_CONFIG = Config(64, 0, 4, 1)


def _d_class(D: int) -> int:
    da, db = split_head_dim(D, split=SPLIT_ON_GPU)  # the configuration lists are for compiled kernels
    d_eff = da + db
    return next(c for c in (64, 128, 192, 256) if d_eff <= c)


def target_family(arch: int) -> int:
    """90 for Hopper and newer (wgmma), 80 for Ampere / Ada (mma.sync)."""
    return 90 if arch >= 90 else 80


def candidate_configs(D: int, dtype: torch.dtype, Sk: int, arch: int) -> list[Config]:
    """Every configuration the autotuner may pick for this head dim, dtype, key count and compute capability
    (``arch`` = 10 * major + minor, e.g. 90 for H100)."""
    if dtype == torch.float32:
        return list(_F32) if _d_class(D) <= _F32_MAX_D_EFF else []
    return list(_LOWP[target_family(arch)]["short" if Sk <= SHORT_SK else "long"][_d_class(D)])


_TUNER: _autotune.Autotuner[Config] = _autotune.Autotuner("attention")


def _bucket(n: int) -> int:
    return min(next_pow2(n), 1 << 14)


def available() -> str | None:
    from ._common import available as _available

    return _available()


def supports(q, k, v, scale) -> str | None:
    reason = device_reason(q, k, v) or numel_reason(q=q, k=k, v=v)
    if reason:
        return reason
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            return (f"{name} has stride {t.stride(-1)} in its last (head) dim; the Triton attention reads "
                    "views whose last dim is contiguous (stride 1)")
    if INTERPRET and q.dtype == torch.bfloat16:
        return "bfloat16 tl.dot is not computed correctly by the Triton interpreter; run bf16 on a GPU"
    D = q.shape[-1]
    if not INTERPRET and q.dtype == torch.float32 and _d_class(D) > _F32_MAX_D_EFF:
        return (f"float32 with head dim D={D}: every Triton tile spills registers beyond D={_F32_MAX_D_EFF} "
                "in fp32; use float16/bfloat16 or another backend")
    return None


def launch(q, k, v, scale: float, out: torch.Tensor, cfg: Config) -> None:
    """Run the kernel with configuration ``cfg`` into ``out`` ([B, Sq, H, D], any strides, last dim 1)."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    da, db = split_head_dim(D)
    block_n, tail, n_full, short = key_tiles(Sk, cfg.block_n)
    grid = (triton.cdiv(Sq, cfg.block_m), B * H)
    _attention_fwd_kernel[grid](
        q, k, v, out, float(scale) * LOG2E, Sq, Sk, H, n_full,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=D, D_A=da, D_B=db, BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_TAIL=tail, SHORT=short,
        IEEE=q.dtype == torch.float32, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def forward(q, k, v, scale):
    """q: [B, Sq, H, D], k/v: [B, Sk, H, D] (last dim contiguous) -> [B, Sq, H, D] contiguous, q.dtype."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    if INTERPRET:
        short = Sk <= SHORT_SK and q.dtype != torch.float32
        cfg = _INTERPRET_SHORT_CONFIG if short else _INTERPRET_CONFIG
    else:
        major, minor = torch.cuda.get_device_capability(q.device)
        arch = 10 * major + minor
        key = (q.device.index, _bucket(Sq), Sk if Sk <= SHORT_SK else _bucket(Sk), D, q.dtype)
        cands = candidate_configs(D, q.dtype, Sk, arch)
        cfg = _TUNER.choose(key, cands, lambda c: launch(q, k, v, scale, out, c))
    launch(q, k, v, scale, out, cfg)
    return out
