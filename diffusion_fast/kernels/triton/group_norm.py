"""GroupNorm(+SiLU, + optional per-(sample, channel) pre-add) in Triton: two launches, split reductions.

x is viewed as ``[N, C, S]`` (contiguous: channel-major) or ``[N, S, C]`` (channels_last: channel-minor)
with ``S`` the flattened spatial size; ranks 3 to 5 are all served this way. Each group ``g`` of ``CG = C/G``
channels is one reduction over ``CG * S`` values, cut along ``S`` into ``SPLIT`` chunks so that even batch 1
(``N * G = 32`` groups) gives several programs per multiprocessor.

1. ``_group_norm_stats_kernel`` — grid ``N * SPLIT * G`` (group index fastest, so the programs reading
   neighbouring channels of a channels_last row run together and share cache lines). Each program walks
   its chunk in ``[BLOCK_C, BLOCK_S]`` tiles, takes each tile's mean and centred sum of squares (two-pass
   inside the tile, fp32) and merges them into a running (count, mean, M2) with Chan's formula. It writes
   ``(mean, M2)`` of its chunk: 8 bytes. Reads ``CG * chunk`` elements.
2. ``_group_norm_apply_kernel`` — same grid, visited in reverse order so that the chunks the stats pass
   read last (still in L2) are normalised first. Each program merges the ``SPLIT`` partials of its group
   (Chan again, exact counts), folds rstd, weight, bias and the pre-add into a per-channel scale/shift,
   and writes ``silu((x - (mean - add)) * rstd * w + b)`` in x's dtype and memory format.

Bytes: 2 reads + 1 write of x (the second read partly served by L2); FLOPs are negligible. The ~1 KB of
partials lives in a scratch tensor allocated per call (capturable in a CUDA graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, bf16_staging, device_reason, next_pow2, numel_reason, sm_count
from ._common import available as _available

# Elements per [BLOCK_C, BLOCK_S] tile: 4096 keeps 16 values per thread at 8 warps in flight on a GPU. The
# interpreter uses small tiles so that tiny test shapes still take several tiles and several chunks.
_COMPILED_TILE = 4096
_TILE = 256 if INTERPRET else _COMPILED_TILE
_NUM_WARPS = 8
# Programs per multiprocessor the split aims for (memory-bound: a few resident programs hide latency).
_PROGRAMS_PER_SM = 4


@triton.jit
def _group_norm_stats_kernel(
    x_ptr,  # [N, C, S] or [N, S, C] (CHANNELS_LAST), x.dtype
    add_ptr,  # [N, C] pre-add with strides (add_sn, add_sc); read only when HAS_ADD
    part_ptr,  # [N, SPLIT, G, 2] fp32 out: (mean, M2) of each chunk of each group
    C,
    S,
    G,
    SPLIT,
    CHUNK_S,
    add_sn,
    add_sc,
    CG: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    HAS_ADD: tl.constexpr,
):
    pid = tl.program_id(0)
    g = pid % G
    rest = pid // G
    chunk = rest % SPLIT
    n = rest // SPLIT
    s_lo = chunk * CHUNK_S
    s_hi = tl.minimum(s_lo + CHUNK_S, S)
    x_base = x_ptr + n.to(tl.int64) * C * S
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for c0 in range(0, CG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CG
        ch = g * CG + offs_c
        if HAS_ADD:
            a = tl.load(add_ptr + n * add_sn + ch * add_sc, mask=mask_c, other=0.0).to(tl.float32)
        n_c = tl.minimum(CG - c0, BLOCK_C)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask = mask_c[:, None] & (offs_s < s_hi)[None, :]
            if CHANNELS_LAST:
                ptrs = x_base + offs_s[None, :] * C + ch[:, None]
            else:
                ptrs = x_base + ch[:, None] * S + offs_s[None, :]
            v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            if HAS_ADD:
                v = tl.where(mask, v + a[:, None], 0.0)
            cnt = (n_c * tl.minimum(s_hi - s0, BLOCK_S)).to(tl.float32)
            t_mean = tl.sum(v) / cnt
            dev = tl.where(mask, v - t_mean, 0.0)
            t_m2 = tl.sum(dev * dev)
            tot = count + cnt
            delta = t_mean - mean
            mean = mean + delta * (cnt / tot)
            m2 = m2 + t_m2 + delta * delta * (count * (cnt / tot))
            count = tot
    out = part_ptr + ((n * SPLIT + chunk) * G + g) * 2
    tl.store(out, mean)
    tl.store(out + 1, m2)


@triton.jit
def _group_norm_apply_kernel(
    x_ptr,  # [N, C, S] or [N, S, C] (CHANNELS_LAST), x.dtype
    y_ptr,  # same shape and layout as x, x.dtype
    w_ptr,  # [C] weight (stride w_s), fp32 or x.dtype; read only when HAS_AFFINE
    b_ptr,  # [C] bias (stride b_s)
    add_ptr,  # [N, C] pre-add (strides add_sn, add_sc); read only when HAS_ADD
    part_ptr,  # [N, SPLIT, G, 2] fp32 partial (mean, M2) written by the stats kernel
    C,
    S,
    G,
    SPLIT,
    CHUNK_S,
    eps,
    w_s,
    b_s,
    add_sn,
    add_sc,
    CG: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SPLIT_PAD: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    HAS_ADD: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    SILU: tl.constexpr,
):
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    g = pid % G
    rest = pid // G
    chunk = rest % SPLIT
    n = rest // SPLIT
    # Merge the SPLIT partials of group (n, g): every program of the group does it (a few dozen floats).
    offs_p = tl.arange(0, SPLIT_PAD)
    pmask = offs_p < SPLIT
    pptr = part_ptr + ((n * SPLIT + offs_p) * G + g) * 2
    p_mean = tl.load(pptr, mask=pmask, other=0.0)
    p_m2 = tl.load(pptr + 1, mask=pmask, other=0.0)
    p_cnt = tl.where(pmask, tl.minimum(CHUNK_S, S - offs_p * CHUNK_S), 0).to(tl.float32) * CG
    total = tl.sum(p_cnt, axis=0)
    mean = tl.sum(p_cnt * p_mean, axis=0) / total
    dm = p_mean - mean
    m2 = tl.sum(p_m2 + p_cnt * dm * dm, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)

    s_lo = chunk * CHUNK_S
    s_hi = tl.minimum(s_lo + CHUNK_S, S)
    base = n.to(tl.int64) * C * S
    for c0 in range(0, CG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CG
        ch = g * CG + offs_c
        # y = (x - (mean - add)) * (rstd * w) + b, per channel: one sub and one fma per element.
        centre = tl.full([BLOCK_C], 0.0, tl.float32) + mean
        if HAS_ADD:
            centre = centre - tl.load(add_ptr + n * add_sn + ch * add_sc, mask=mask_c, other=0.0).to(tl.float32)
        scale = tl.full([BLOCK_C], 0.0, tl.float32) + rstd
        shift = tl.full([BLOCK_C], 0.0, tl.float32)
        if HAS_AFFINE:
            scale = scale * tl.load(w_ptr + ch * w_s, mask=mask_c, other=0.0).to(tl.float32)
            shift = tl.load(b_ptr + ch * b_s, mask=mask_c, other=0.0).to(tl.float32)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask = mask_c[:, None] & (offs_s < s_hi)[None, :]
            if CHANNELS_LAST:
                offs = base + offs_s[None, :] * C + ch[:, None]
            else:
                offs = base + ch[:, None] * S + offs_s[None, :]
            v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = (v - centre[:, None]) * scale[:, None] + shift[:, None]
            if SILU:
                y = y / (1.0 + tl.exp(-y))
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Plan:
    """How one call is cut up: tile shape, spatial chunk per program, number of chunks per group."""

    block_c: int
    block_s: int
    chunk_s: int
    split: int
    num_warps: int

    @property
    def split_pad(self) -> int:
        return next_pow2(self.split)


def plan(N: int, G: int, CG: int, S: int, *, target_programs: int, tile: int = _TILE) -> Plan:
    """Tile a group as ``[BLOCK_C, BLOCK_S]`` and cut S into chunks so ``N*G*SPLIT >= target_programs``."""
    block_c = min(next_pow2(CG), tile)
    block_s = max(1, min(next_pow2(S), tile // block_c))
    tiles_s = triton.cdiv(S, block_s)
    want = max(1, triton.cdiv(target_programs, N * G))
    split = min(want, tiles_s)
    chunk_s = triton.cdiv(tiles_s, split) * block_s
    split = triton.cdiv(S, chunk_s)
    return Plan(block_c, block_s, chunk_s, split, _NUM_WARPS)


def _channels_last(x: torch.Tensor) -> bool | None:
    """False for [N, C, *S] contiguous, True for channels-last ([N, *S, C] contiguous), None otherwise."""
    if x.is_contiguous():
        return False
    if x.permute(0, *range(2, x.dim()), 1).is_contiguous():
        return True
    return None


def available() -> str | None:
    return _available()


def supports(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, add=None) -> str | None:
    reason = device_reason(x, weight, bias, add) or numel_reason(x=x)
    if reason:
        return reason
    if _channels_last(x) is None:
        return (f"x with shape {tuple(x.shape)} and strides {x.stride()} is neither contiguous nor "
                "channels_last; the Triton group_norm reads only these two dense layouts")
    return None


def forward(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, add=None):
    """x: [N, C, *spatial] contiguous or channels_last -> same shape, dtype and memory format."""
    return _forward(x, num_groups, weight, bias, eps, activation, add)


def _forward(x, num_groups, weight, bias, eps, activation, add, *, target_programs: int | None = None,
             out: torch.Tensor | None = None):
    """``forward`` with the planner's target program count and the output buffer exposed (for tests).

    ``out``, when given, must be laid out like x (same layout as ``_channels_last(x)`` says).
    """
    N, C = x.shape[0], x.shape[1]
    S = x.numel() // (N * C)
    G = num_groups
    CG = C // G
    cl = _channels_last(x)
    if out is None:
        # Dense strides of x's layout (x's own strides may be arbitrary on size-1 dims).
        perm = (0, *range(2, x.dim()), 1) if cl else tuple(range(x.dim()))
        dense = torch.empty([x.shape[p] for p in perm], dtype=x.dtype, device=x.device)
        y = dense.permute([perm.index(d) for d in range(x.dim())])
    else:
        if out.shape != x.shape or out.dtype != x.dtype or _channels_last(out) is not cl:
            raise ValueError("out must have x's shape, dtype and layout")
        y = out
    if target_programs is None:
        target_programs = _PROGRAMS_PER_SM * sm_count(x.device)
    p = plan(N, G, CG, S, target_programs=target_programs)
    part = torch.empty((N, p.split, G, 2), dtype=torch.float32, device=x.device)
    has_add = add is not None
    has_affine = weight is not None
    add_t = add if has_add else part
    add_sn, add_sc = (add.stride(0), add.stride(1)) if has_add else (0, 0)
    w_t = weight if has_affine else part
    b_t = bias if has_affine else part
    w_s = weight.stride(0) if has_affine else 0
    b_s = bias.stride(0) if has_affine else 0
    grid = (N * p.split * G,)
    y_k, finish = bf16_staging(y)
    _group_norm_stats_kernel[grid](
        x, add_t, part, C, S, G, p.split, p.chunk_s, add_sn, add_sc,
        CG=CG, BLOCK_C=p.block_c, BLOCK_S=p.block_s, CHANNELS_LAST=bool(cl), HAS_ADD=has_add,
        num_warps=p.num_warps,
    )
    _group_norm_apply_kernel[grid](
        x, y_k, w_t, b_t, add_t, part, C, S, G, p.split, p.chunk_s, float(eps), w_s, b_s, add_sn, add_sc,
        CG=CG, BLOCK_C=p.block_c, BLOCK_S=p.block_s, SPLIT_PAD=p.split_pad, CHANNELS_LAST=bool(cl),
        HAS_ADD=has_add, HAS_AFFINE=has_affine, SILU=activation == "silu",
        num_warps=p.num_warps,
    )
    finish()
    return y
