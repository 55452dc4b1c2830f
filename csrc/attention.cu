// Attention forward, flash style, on tensor cores through mma.sync (sm_80+), fp16 and bf16.
//
//   out[b, i, h, :] = sum_j softmax_j(scale * q[b, i, h, :] . k[b, j, h, :]) * v[b, j, h, :]
//
// Block: 4 warps; each warp owns 16*MT query rows (BM = 64*MT rows per block) and keeps its Q fragments in
// registers for the whole block. Grid: B*H*ceil(Sq/BM) blocks, the query blocks of one (b, h) adjacent so
// they share K/V in L2.
//
// Head dims run at their real size: the QK^T reduction over D takes D/16 m16n8k16 steps plus one m16n8k8
// step when D % 16 == 8 (D = 40: 2 + 1); PV produces D/8 n8 tiles (D = 40: 5). No padding of D to a power
// of two, so D = 40 does 40/64 of the work a padded kernel does.
//
// Two paths:
//  * flash (any Sk): K/V tiles of BN keys stream through shared memory (cp.async; the V tile of step j
//    loads while QK^T_j and the softmax run, the K tile of step j+1 while PV_j runs); online softmax in
//    fp32 with exp2 (scale folded into log2 space), rescaling the O accumulators when the row max grows.
//  * short (Sk <= 128, e.g. the 77 text tokens of cross-attention): all of K and V (Sk rounded up to 16
//    rows) resident in shared memory, loaded once; scores for all keys at once and a single-pass softmax
//    (no rescaling); key tiles past Sk are skipped.
// Shared-memory rows are padded to an odd number of 16-byte chunks, so ldmatrix's 8 row addresses fall in 8
// different bank groups. Out-of-range query/key rows are zero-filled by cp.async (src-size 0); scores of
// keys >= Sk are set to -inf; rows >= Sq are not stored. The output tile is staged through the warp's own
// rows of the Q buffer and written with 16-byte stores.
//
// FLOPs: 4 * B * H * Sq * Sk * D (two GEMMs). Bytes (minimum): (2*Sq + 2*Sk) * B * H * D * sizeof(T).
#include <cmath>
#include <type_traits>

#include "common.cuh"

namespace df {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kShortMaxSk = 128;

struct AttnParams {
  const void* q;  // [B, Sq, H, D] (strides q_sb, q_ss, q_sh, 1)
  const void* k;  // [B, Sk, H, D]
  const void* v;  // [B, Sk, H, D]
  void* o;        // [B, Sq, H, D]
  std::int64_t q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, o_sb, o_ss, o_sh;
  int H, Sq, Sk;
  int num_mb;       // query blocks per (b, h)
  int kv_rows;      // short path: K/V rows resident in shared memory (Sk rounded up to 16)
  float scale_log2; // scale * log2(e)
};

template <int D_, int MT_, int BN_, bool SHORT_>
struct Cfg {
  static constexpr int D = D_, MT = MT_, BN = BN_;
  static constexpr bool SHORT = SHORT_;
  static constexpr int BM = 16 * MT * kWarps;  // query rows per block
  static constexpr int CH = D / 8;             // 16-byte chunks per row
  static constexpr int DP = (CH | 1) * 8;      // padded shared-memory row, in elements
  static constexpr int KS = D / 16;            // m16n8k16 steps over D
  static constexpr bool KT8 = D % 16 == 8;     // plus one m16n8k8 step
  static constexpr int NTD = D / 8;            // n8 tiles of the output
  static constexpr int NTN = BN / 8;           // n8 tiles of the scores
  static_assert(D % 8 == 0 && BN % 16 == 0, "tile shape");
};

// ---- PTX wrappers ------------------------------------------------------------------------------------------

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy; zero-fills when !valid (no bytes are read from `src` then).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}
__device__ __forceinline__ void ldsm_x2(unsigned (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p))
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}
__device__ __forceinline__ void ldsm_x2_t(unsigned (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p))
               : "memory");
}

// D(16x8, f32) += A(16x16) * B(16x8)
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// D(16x8, f32) += A(16x8) * B(8x8)
template <typename T>
__device__ __forceinline__ void mma1688(float (&c)[4], const unsigned (&a)[2], unsigned b0) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b0));
  } else {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b0));
  }
}

// Two floats -> one register of two 16-bit values (first in the low half).
template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
  }
}

// ---- tile pieces -------------------------------------------------------------------------------------------

// rows [row0, row0 + nrows) of a [S, D] slice (row stride `stride`) -> shared [nrows, DP]; rows >= limit
// are zero-filled.
template <typename C, typename T>
__device__ __forceinline__ void load_rows(T* dst, const T* src, std::int64_t stride, int row0, int limit,
                                          int nrows) {
  for (int idx = threadIdx.x; idx < nrows * C::CH; idx += kThreads) {
    const int r = idx / C::CH, c = idx - r * C::CH;
    const int row = row0 + r;
    const bool valid = row < limit;
    cp_async16(dst + r * C::DP + c * 8, valid ? src + std::int64_t(row) * stride + c * 8 : src, valid);
  }
}

// s = Q K^T for this warp's rows and the key tile in sK (n16 = key tiles of 16 to compute; the rest stay 0).
template <typename C, typename T>
__device__ __forceinline__ void qk_tile(float (&s)[C::MT][C::NTN][4], const unsigned (&qf)[C::MT][C::KS][4],
                                        const unsigned (&qt)[C::MT][2], const T* sK, int lane, int n16) {
#pragma unroll
  for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < C::NTN; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
  for (int nt2 = 0; nt2 < C::NTN / 2; ++nt2) {
    if (C::SHORT && nt2 >= n16) break;
    // x4: (keys +0..7, d +0..7), (keys +0..7, d +8..15), (keys +8..15, d +0..7), (keys +8..15, d +8..15)
    const T* kp = sK + (nt2 * 16 + (lane & 7) + (lane >> 4) * 8) * C::DP + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int ks = 0; ks < C::KS; ++ks) {
      unsigned b[4];
      ldsm_x4(b, kp + ks * 16);
#pragma unroll
      for (int mt = 0; mt < C::MT; ++mt) {
        mma16816<T>(s[mt][2 * nt2], qf[mt][ks], b[0], b[1]);
        mma16816<T>(s[mt][2 * nt2 + 1], qf[mt][ks], b[2], b[3]);
      }
    }
    if constexpr (C::KT8) {
      // x2: (keys +0..7, d tail), (keys +8..15, d tail)
      unsigned b[2];
      ldsm_x2(b, sK + (nt2 * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * C::DP + C::KS * 16);
#pragma unroll
      for (int mt = 0; mt < C::MT; ++mt) {
        mma1688<T>(s[mt][2 * nt2], qt[mt], b[0]);
        mma1688<T>(s[mt][2 * nt2 + 1], qt[mt], b[1]);
      }
    }
  }
}

// Scores -> log2 space; keys >= Sk -> -inf (only where the tile reaches past Sk).
template <typename C>
__device__ __forceinline__ void scale_mask(float (&s)[C::MT][C::NTN][4], float scale_log2, int key0, int Sk,
                                           int lane) {
  const bool edge = key0 + C::BN > Sk;
#pragma unroll
  for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < C::NTN; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + nt * 8 + 2 * (lane & 3) + (e & 1);
        s[mt][nt][e] = (edge && key >= Sk) ? -INFINITY : s[mt][nt][e] * scale_log2;
      }
}

// o += P V for the key tile in sV (P from the scores, rounded to T; n16 as in qk_tile).
template <typename C, typename T>
__device__ __forceinline__ void pv_tile(float (&o)[C::MT][C::NTD][4], const float (&s)[C::MT][C::NTN][4],
                                        const T* sV, int lane, int n16) {
#pragma unroll
  for (int kk = 0; kk < C::NTN / 2; ++kk) {
    if (C::SHORT && kk >= n16) break;
    // The m16n8 accumulator layout of two adjacent key tiles is the m16k16 A-operand layout.
    unsigned pa[C::MT][4];
#pragma unroll
    for (int mt = 0; mt < C::MT; ++mt) {
      pa[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
      pa[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
      pa[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
      pa[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
    }
    // x4.trans: (keys +0..7, d +0..7), (keys +8..15, d +0..7), (keys +0..7, d +8..15), (keys +8..15, d +8..15)
    const T* vp = sV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * C::DP;
#pragma unroll
    for (int dt2 = 0; dt2 < C::NTD / 2; ++dt2) {
      unsigned b[4];
      ldsm_x4_t(b, vp + dt2 * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int mt = 0; mt < C::MT; ++mt) {
        mma16816<T>(o[mt][2 * dt2], pa[mt], b[0], b[1]);
        mma16816<T>(o[mt][2 * dt2 + 1], pa[mt], b[2], b[3]);
      }
    }
    if constexpr (C::NTD % 2 == 1) {
      unsigned b[2];
      ldsm_x2_t(b, vp + (C::NTD - 1) * 8);
#pragma unroll
      for (int mt = 0; mt < C::MT; ++mt) mma16816<T>(o[mt][C::NTD - 1], pa[mt], b[0], b[1]);
    }
  }
}

// 2^x on the special-function unit, denormal results flushed to zero (they are below anything a softmax
// weight can contribute); exp2f would add range-fixing instructions around the same MUFU.EX2.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Softmax step on a score tile: new row max, rescale of o and l by exp2(m_old - m_new) (flash path only),
// s -> exp2(s - m), l += row sums (per thread; the quad reduction happens once at the end).
template <typename C>
__device__ __forceinline__ void softmax_tile(float (&s)[C::MT][C::NTN][4], float (&o)[C::MT][C::NTD][4],
                                             float (&m)[C::MT][2], float (&l)[C::MT][2]) {
#pragma unroll
  for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m[mt][r];
#pragma unroll
      for (int nt = 0; nt < C::NTN; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
      mx = quad_max(mx);
      if constexpr (!C::SHORT) {
        const float alpha = fast_exp2(m[mt][r] - mx);  // m = -inf on the first tile: alpha = 0
        l[mt][r] *= alpha;
#pragma unroll
        for (int dt = 0; dt < C::NTD; ++dt) {
          o[mt][dt][2 * r] *= alpha;
          o[mt][dt][2 * r + 1] *= alpha;
        }
      }
      m[mt][r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < C::NTN; ++nt) {
        const float p0 = fast_exp2(s[mt][nt][2 * r] - mx), p1 = fast_exp2(s[mt][nt][2 * r + 1] - mx);
        s[mt][nt][2 * r] = p0;
        s[mt][nt][2 * r + 1] = p1;
        sum += p0 + p1;
      }
      l[mt][r] += sum;
    }
}

// ---- the kernel ------------------------------------------------------------------------------------------
// Dynamic shared memory: Q [BM, DP], K [R, DP], V [R, DP] of T, R = BN (flash) or kv_rows (short).
template <typename T, typename C>
__global__ void __launch_bounds__(kThreads) attention_kernel(const AttnParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + C::BM * C::DP;
  T* sV = sK + (C::SHORT ? p.kv_rows : C::BN) * C::DP;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int mb = blockIdx.x % p.num_mb;
  const int bh = blockIdx.x / p.num_mb;
  const int b = bh / p.H, h = bh % p.H;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  T* og = static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh;
  const int m0 = mb * C::BM;
  const int wrow = warp * 16 * C::MT;  // this warp's first row in the block

  load_rows<C>(sQ, qg, p.q_ss, m0, p.Sq, C::BM);
  if constexpr (C::SHORT) {
    load_rows<C>(sK, kg, p.k_ss, 0, p.Sk, p.kv_rows);
    load_rows<C>(sV, vg, p.v_ss, 0, p.Sk, p.kv_rows);
  } else {
    load_rows<C>(sK, kg, p.k_ss, 0, p.Sk, C::BN);
  }
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  // Q fragments (A operand, m16k16 via ldmatrix.x4; the m16k8 tail via .x2), kept for the whole block.
  unsigned qf[C::MT][C::KS][4];
  unsigned qt[C::MT][2];
#pragma unroll
  for (int mt = 0; mt < C::MT; ++mt) {
    const T* qp = sQ + (wrow + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * C::DP;
#pragma unroll
    for (int ks = 0; ks < C::KS; ++ks) ldsm_x4(qf[mt][ks], qp + ks * 16 + (lane >> 4) * 8);
    if constexpr (C::KT8) ldsm_x2(qt[mt], qp + C::KS * 16);
  }

  float o[C::MT][C::NTD][4];
  float m[C::MT][2], l[C::MT][2];
#pragma unroll
  for (int mt = 0; mt < C::MT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < C::NTD; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][dt][e] = 0.f;
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
  }
  float s[C::MT][C::NTN][4];

  if constexpr (C::SHORT) {
    const int n16 = p.kv_rows / 16;
    qk_tile<C>(s, qf, qt, sK, lane, n16);
    scale_mask<C>(s, p.scale_log2, 0, p.Sk, lane);
    softmax_tile<C>(s, o, m, l);
    pv_tile<C>(o, s, sV, lane, n16);
  } else {
    const int nblocks = (p.Sk + C::BN - 1) / C::BN;
    for (int j = 0; j < nblocks; ++j) {
      if (j > 0) {
        cp_async_wait_all();  // K_j
        __syncthreads();      // and every warp is done with V_{j-1}
      }
      load_rows<C>(sV, vg, p.v_ss, j * C::BN, p.Sk, C::BN);
      cp_async_commit();
      qk_tile<C>(s, qf, qt, sK, lane, C::NTN / 2);
      scale_mask<C>(s, p.scale_log2, j * C::BN, p.Sk, lane);
      softmax_tile<C>(s, o, m, l);
      cp_async_wait_all();  // V_j
      __syncthreads();      // and every warp is done with K_j
      if (j + 1 < nblocks) {
        load_rows<C>(sK, kg, p.k_ss, (j + 1) * C::BN, p.Sk, C::BN);
        cp_async_commit();
      }
      pv_tile<C>(o, s, sV, lane, C::NTN / 2);
    }
  }

  // Epilogue: normalise, stage through this warp's rows of sQ, 16-byte stores of the valid rows.
  // The warp read these rows with ldmatrix above; order those reads before the staging writes of other lanes.
  __syncwarp();
#pragma unroll
  for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float inv = 1.f / quad_sum(l[mt][r]);
      const int row = wrow + mt * 16 + (lane >> 2) + 8 * r;
#pragma unroll
      for (int dt = 0; dt < C::NTD; ++dt) {
        *reinterpret_cast<unsigned*>(sQ + row * C::DP + dt * 8 + 2 * (lane & 3)) =
            pack2<T>(o[mt][dt][2 * r] * inv, o[mt][dt][2 * r + 1] * inv);
      }
    }
  __syncwarp();
  for (int idx = lane; idx < 16 * C::MT * C::CH; idx += 32) {
    const int r = idx / C::CH, c = idx - r * C::CH;
    const int row = m0 + wrow + r;
    if (row < p.Sq)
      *reinterpret_cast<uint4*>(og + std::int64_t(row) * p.o_ss + c * 8) =
          *reinterpret_cast<const uint4*>(sQ + (wrow + r) * C::DP + c * 8);
  }
}

// ---- host side ---------------------------------------------------------------------------------------------

// Tile configuration per head dim: (query rows per warp / 16, keys per flash step).
template <int D>
struct Tiles;
template <>
struct Tiles<40> { static constexpr int MT = 2, BN = 64; };
template <>
struct Tiles<64> { static constexpr int MT = 2, BN = 64; };
template <>
struct Tiles<80> { static constexpr int MT = 2, BN = 64; };
template <>
struct Tiles<128> { static constexpr int MT = 1, BN = 64; };
template <>
struct Tiles<160> { static constexpr int MT = 1, BN = 64; };

template <int D>
using FlashCfg = Cfg<D, Tiles<D>::MT, Tiles<D>::BN, false>;
template <int D>
using ShortCfg = Cfg<D, 1, kShortMaxSk, true>;

template <typename C>
int smem_bytes(int kv_rows) {
  return (C::BM + 2 * (C::SHORT ? kv_rows : C::BN)) * C::DP * 2;
}

int round16(std::int64_t x) { return int((x + 15) / 16 * 16); }

template <int D>
bool use_short(std::int64_t Sk, int device) {
  return Sk <= kShortMaxSk && smem_bytes<ShortCfg<D>>(round16(Sk)) <= max_smem_optin(device);
}

template <typename T, typename C>
void launch_cfg(AttnParams p, std::int64_t BH, int device, cudaStream_t stream, const char* name) {
  p.num_mb = int((p.Sq + C::BM - 1) / C::BM);
  p.kv_rows = round16(p.Sk);
  const std::int64_t grid = BH * p.num_mb;
  if (grid > 0x7fffffffLL) throw KernelError(std::string(name) + ": grid too large");
  const int smem = smem_bytes<C>(p.kv_rows);
  const void* fn = reinterpret_cast<const void*>(attention_kernel<T, C>);
  ensure_smem(fn, smem, device, name);
  attention_kernel<T, C><<<unsigned(grid), kThreads, smem, stream>>>(p);
  check_launch(name);
}

template <typename T, int D>
void launch_d(const AttnParams& p, std::int64_t BH, int device, cudaStream_t stream) {
  if (use_short<D>(p.Sk, device)) {
    launch_cfg<T, ShortCfg<D>>(p, BH, device, stream, "attention_kernel<short>");
  } else {
    launch_cfg<T, FlashCfg<D>>(p, BH, device, stream, "attention_kernel<flash>");
  }
}

template <typename T>
void launch_t(const AttnParams& p, std::int64_t BH, int D, int device, cudaStream_t stream) {
  switch (D) {
    case 40: launch_d<T, 40>(p, BH, device, stream); break;
    case 64: launch_d<T, 64>(p, BH, device, stream); break;
    case 80: launch_d<T, 80>(p, BH, device, stream); break;
    case 128: launch_d<T, 128>(p, BH, device, stream); break;
    case 160: launch_d<T, 160>(p, BH, device, stream); break;
    default: throw KernelError("attention: head dim " + std::to_string(D) + " is not compiled");
  }
}

}  // namespace

bool attention_supports_head_dim(int D) {
  return D == 40 || D == 64 || D == 80 || D == 128 || D == 160;
}

std::string attention_path(std::int64_t Sk, int D, int device) {
  bool s = false;
  switch (D) {
    case 40: s = use_short<40>(Sk, device); break;
    case 64: s = use_short<64>(Sk, device); break;
    case 80: s = use_short<80>(Sk, device); break;
    case 128: s = use_short<128>(Sk, device); break;
    case 160: s = use_short<160>(Sk, device); break;
    default: throw KernelError("attention: head dim " + std::to_string(D) + " is not compiled");
  }
  return s ? "short" : "flash";
}

void attention(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out, int dtype,
               std::int64_t B, std::int64_t H, std::int64_t Sq, std::int64_t Sk, int D,
               std::int64_t q_sb, std::int64_t q_ss, std::int64_t q_sh, std::int64_t k_sb, std::int64_t k_ss,
               std::int64_t k_sh, std::int64_t v_sb, std::int64_t v_ss, std::int64_t v_sh,
               std::int64_t o_sb, std::int64_t o_ss, std::int64_t o_sh, float scale, int device,
               std::uintptr_t stream) {
  if (B < 1 || H < 1 || Sq < 1 || Sk < 1 || Sq > 0x7fffffffLL || Sk > 0x7fffffffLL)
    throw KernelError("attention: invalid sizes");
  if (!attention_supports_head_dim(D))
    throw KernelError("attention: head dim " + std::to_string(D) + " is not compiled");
  for (std::uintptr_t ptr : {q, k, v, out})
    if (!aligned(ptr, 16)) throw KernelError("attention: tensors must be 16-byte aligned");
  for (std::int64_t st : {q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, o_sb, o_ss, o_sh})
    if (st % 8 != 0) throw KernelError("attention: strides must be multiples of 8 elements");
  AttnParams p;
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.o = reinterpret_cast<void*>(out);
  p.q_sb = q_sb; p.q_ss = q_ss; p.q_sh = q_sh;
  p.k_sb = k_sb; p.k_ss = k_ss; p.k_sh = k_sh;
  p.v_sb = v_sb; p.v_ss = v_ss; p.v_sh = v_sh;
  p.o_sb = o_sb; p.o_ss = o_ss; p.o_sh = o_sh;
  p.H = int(H);
  p.Sq = int(Sq);
  p.Sk = int(Sk);
  p.num_mb = 0;
  p.kv_rows = 0;
  p.scale_log2 = scale * 1.4426950408889634f;
  DeviceGuard guard(device, "attention: cudaSetDevice");
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kF16: launch_t<__half>(p, B * H, D, device, s); break;
    case kBF16: launch_t<__nv_bfloat16>(p, B * H, D, device, s); break;
    default: throw KernelError("attention: dtype code " + std::to_string(dtype) + " is not fp16/bf16");
  }
}

}  // namespace df
