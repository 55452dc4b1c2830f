// GroupNorm(+SiLU) with an optional per-(sample, channel) pre-add, NCHW and channels_last.
//
//   h = x + add[n, c];  y = (h - mean_g) * rstd_g * w[c] + b[c];  y = silu(y) if asked
//
// Statistics are float32 Chan/Welford merges (no E[x^2] - E[x]^2). Each block reduces a chunk of the data
// to a partial (count, mean, M2); partials merge in a fixed order, so results are bitwise reproducible.
//
// Grids: the data of each (sample, group) [NCHW] or of each sample [channels_last] is split into `splits`
// chunks, one block each, so that batch 1 still fills the GPU. With splits > 1 there are two launches:
//   MODE kStats: grid N*G*splits (NCHW) or N*splits (NHWC): partial statistics -> workspace [.., splits, 3]
//   MODE kApply: same grid: merge the partials of its group(s), normalise its chunk.
// With splits == 1, one launch (kFused) reduces and then normalises the whole group or sample (the second
// read is served by L2 at the sizes where this is chosen).
// Bytes moved: the split path reads x twice and writes y once (3 * numel * sizeof(T)); the fused path
// likewise, with the second read from L2.
//
// NCHW: a group is one contiguous range of Cg*HW elements; threads stride over VEC-element vectors.
// channels_last ([N, HW, C] in memory): a block takes a range of rows (spatial positions) of one sample;
// thread t owns vector column t % (C/VEC) of rows t / (C/VEC), t / (C/VEC) + rows_per_pass, ...; per-channel
// Welford statistics per thread merge into per-channel and then per-group statistics through shared memory.
#include "common.cuh"

namespace df {
namespace {

constexpr int kThreads = 256;          // NCHW block; channels_last: 256, or C/VEC rounded up to 32 when larger
constexpr int kMaxNhwcThreads = 512;   // (so C/VEC <= 512 on channels_last; 128 registers per thread)
constexpr int kMaxSplits = 64;
constexpr int kMinElemsPerBlock = 4096;
constexpr int kUnroll = 4;          // independent vector loads in flight per thread

enum Mode : int { kStats = 0, kFused = 1, kApply = 2 };

struct GnParams {
  const void* x;       // [N, C, HW] or [N, HW, C], dtype T
  void* out;           // same shape and strides as x
  const void* w;       // [C] (stride w_stride), param_dtype, or null
  const void* b;       // [C] (stride b_stride), param_dtype, or null
  const void* add;     // [N, C] (strides add_sn, add_sc), add_dtype, or null
  float* ws;           // [N, G, splits, 3] partial (count, mean, M2), split path only
  std::int64_t N, C, HW;
  std::int64_t w_stride, b_stride, add_sn, add_sc;
  int G, Cg, splits, param_dtype, add_dtype;
  float eps;
  bool silu;
};

struct Stat {
  float n, mean, m2;
};

__device__ __forceinline__ Stat merge(Stat a, Stat b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float wb = __fdividef(b.n, n);
  const float delta = b.mean - a.mean;
  return Stat{n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

// Tree reduction over the warp; lane 0 holds the result (fixed order: deterministic).
__device__ __forceinline__ Stat warp_reduce(Stat s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Stat o;
    o.n = __shfl_down_sync(0xffffffffu, s.n, off);
    o.mean = __shfl_down_sync(0xffffffffu, s.mean, off);
    o.m2 = __shfl_down_sync(0xffffffffu, s.m2, off);
    if ((threadIdx.x & 31) + off < 32) s = merge(s, o);
  }
  return s;
}

// Block reduction; every thread gets the result. `sh` holds at least 32 entries.
__device__ __forceinline__ Stat block_reduce(Stat s, Stat* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  s = warp_reduce(s);
  if (lane == 0) sh[warp] = s;
  __syncthreads();
  if (warp == 0) {
    Stat t = lane < nwarps ? sh[lane] : Stat{0.f, 0.f, 0.f};
    t = warp_reduce(t);
    if (lane == 0) sh[32] = t;
  }
  __syncthreads();
  return sh[32];
}

// Statistics of one VEC-vector of values (exact two-pass inside the vector).
template <int VEC>
__device__ __forceinline__ Stat vec_stat(const float (&h)[VEC]) {
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < VEC; ++j) s += h[j];
  const float mean = s * (1.f / VEC);
  float m2 = 0.f;
#pragma unroll
  for (int j = 0; j < VEC; ++j) m2 += (h[j] - mean) * (h[j] - mean);
  return Stat{float(VEC), mean, m2};
}

__device__ __forceinline__ float silu(float y) { return y / (1.f + __expf(-y)); }

__device__ __forceinline__ float rstd_of(const Stat& s, float eps) {
  return 1.f / sqrtf(s.m2 / s.n + eps);
}

// Merge the `splits` partials of group `ng` from the workspace, inside one warp (lane 0 holds it).
__device__ __forceinline__ Stat merge_partials(const float* ws, std::int64_t ng, int splits) {
  const int lane = threadIdx.x & 31;
  Stat acc{0.f, 0.f, 0.f};
  for (int i = lane; i < splits; i += 32) {
    const float* p = ws + (ng * splits + i) * 3;
    acc = merge(acc, Stat{p[0], p[1], p[2]});
  }
  return warp_reduce(acc);
}

// ---------------------------------------------------------------------------------------------------------
// NCHW. grid: N*G*splits blocks of kThreads; block (ng, s) owns vectors [lo, hi) of group ng.
template <typename T, int VEC, int MODE>
__global__ void __launch_bounds__(kThreads, 2) gn_nchw_kernel(const GnParams p) {
  __shared__ Stat sh[33];
  __shared__ float s_mean, s_rstd;
  const std::int64_t ng = blockIdx.x / p.splits;
  const int split = blockIdx.x % p.splits;
  const std::int64_t n = ng / p.G;
  const int g = int(ng % p.G);
  const int HW = int(p.HW);
  const int nvec = int(std::int64_t(p.Cg) * p.HW / VEC);
  const int chunk = (nvec + p.splits - 1) / p.splits;
  const int lo = split * chunk;
  const int hi = min(nvec, lo + chunk);
  const std::int64_t base = (n * p.C + std::int64_t(g) * p.Cg) * p.HW;
  const T* xb = static_cast<const T*>(p.x) + base;
  T* ob = static_cast<T*>(p.out) + base;
  const int c0 = g * p.Cg;  // first channel of the group
  const bool has_add = p.add != nullptr;

  if (MODE != kApply) {
    Stat st{0.f, 0.f, 0.f};
    for (int v0 = lo + int(threadIdx.x); v0 < hi; v0 += kUnroll * kThreads) {
      float vals[kUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int v = v0 + u * kThreads;
        if (v < hi) load_vec<T, VEC>(xb + std::int64_t(v) * VEC, vals[u]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int v = v0 + u * kThreads;
        if (v < hi) {
          if (has_add) {
            const int c = c0 + v * VEC / HW;  // a vector never straddles channels (HW % VEC == 0)
            const float a = load_any(p.add, p.add_dtype, n * p.add_sn + c * p.add_sc);
#pragma unroll
            for (int j = 0; j < VEC; ++j) vals[u][j] += a;
          }
          st = merge(st, vec_stat<VEC>(vals[u]));
        }
      }
    }
    st = block_reduce(st, sh);
    if (MODE == kStats) {
      if (threadIdx.x == 0) {
        float* w = p.ws + (ng * p.splits + split) * 3;
        w[0] = st.n;
        w[1] = st.mean;
        w[2] = st.m2;
      }
      return;
    }
    if (threadIdx.x == 0) {
      s_mean = st.mean;
      s_rstd = rstd_of(st, p.eps);
    }
  } else if (threadIdx.x < 32) {
    const Stat st = merge_partials(p.ws, ng, p.splits);
    if (threadIdx.x == 0) {
      s_mean = st.mean;
      s_rstd = rstd_of(st, p.eps);
    }
  }
  __syncthreads();
  const float mean = s_mean, rstd = s_rstd;

  for (int v0 = lo + int(threadIdx.x); v0 < hi; v0 += kUnroll * kThreads) {
    float vals[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = v0 + u * kThreads;
      if (v < hi) load_vec<T, VEC>(xb + std::int64_t(v) * VEC, vals[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = v0 + u * kThreads;
      if (v < hi) {
        const int c = c0 + v * VEC / HW;
        const float a = has_add ? load_any(p.add, p.add_dtype, n * p.add_sn + c * p.add_sc) : 0.f;
        const float d = a - mean;
        const float scale = p.w ? rstd * load_any(p.w, p.param_dtype, c * p.w_stride) : rstd;
        const float bias = p.b ? load_any(p.b, p.param_dtype, c * p.b_stride) : 0.f;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          float y = (vals[u][j] + d) * scale + bias;
          vals[u][j] = p.silu ? silu(y) : y;
        }
        store_vec<T, VEC>(ob + std::int64_t(v) * VEC, vals[u]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// channels_last. grid: N*splits blocks of blockDim threads (256, or C/VEC rounded up to 32, at most 512);
// block (n, s) owns rows [r0, r1) of sample n. Dynamic shared memory: 2*rpp*C floats of per-thread
// statistics (kStats, kFused) + 2*G floats of group mean / rstd (kFused, kApply).
template <typename T, int VEC, int MODE>
__global__ void __launch_bounds__(kMaxNhwcThreads) gn_nhwc_kernel(const GnParams p) {
  extern __shared__ float smem[];
  const int cols = int(p.C / VEC);
  const int rpp = max(1, int(blockDim.x) / cols);  // rows per pass
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const int col = tid % cols, rsub = tid / cols;
  const bool active = rsub < rpp;
  const std::int64_t n = blockIdx.x / p.splits;
  const int split = blockIdx.x % p.splits;
  const int HW = int(p.HW), C = int(p.C);
  const int chunk = (HW + p.splits - 1) / p.splits;
  // Clamp both ends: with a rounded-up chunk the last splits can start past HW, and a negative row count
  // would corrupt the merged statistics (seen on an H200 for [1, 1280, 8, 8] channels_last, 20 splits).
  const int r0 = min(HW, split * chunk);
  const int r1 = min(HW, r0 + chunk);
  const T* xb = static_cast<const T*>(p.x) + n * p.HW * p.C + col * VEC;
  T* ob = static_cast<T*>(p.out) + n * p.HW * p.C + col * VEC;
  const bool has_add = p.add != nullptr;
  float* s_stat = smem;                                           // [2][rpp][C]
  float* s_group = smem + (MODE == kApply ? 0 : 2 * rpp * C);     // [2][G]

  float a[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j)
    a[j] = (has_add && active) ? load_any(p.add, p.add_dtype, n * p.add_sn + (col * VEC + j) * p.add_sc) : 0.f;

  if (MODE != kApply) {
    float mean[VEC], m2[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) mean[j] = m2[j] = 0.f;
    float cnt = 0.f;
    if (active) {
      for (int rr = r0 + rsub; rr < r1; rr += kUnroll * rpp) {
        float vals[kUnroll][VEC];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int r = rr + u * rpp;
          if (r < r1) load_vec<T, VEC>(xb + std::int64_t(r) * C, vals[u]);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (rr + u * rpp < r1) {
            cnt += 1.f;
            const float inv = __fdividef(1.f, cnt);
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              const float h = vals[u][j] + a[j];
              const float d = h - mean[j];
              mean[j] += d * inv;
              m2[j] += d * (h - mean[j]);
            }
          }
        }
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        s_stat[rsub * C + col * VEC + j] = mean[j];
        s_stat[(rpp + rsub) * C + col * VEC + j] = m2[j];
      }
    }
    __syncthreads();
    // Per channel: merge the rpp row-interleaved partials (fixed order), in place into row 0.
    for (int c = tid; c < C; c += blockDim.x) {
      Stat acc{0.f, 0.f, 0.f};
      for (int r = 0; r < rpp; ++r) {
        const int rows = r1 - r0 > r ? (r1 - r0 - r + rpp - 1) / rpp : 0;
        acc = merge(acc, Stat{float(rows), s_stat[r * C + c], s_stat[(rpp + r) * C + c]});
      }
      s_stat[c] = acc.mean;
      s_stat[rpp * C + c] = acc.m2;
    }
    __syncthreads();
    // Per group: one warp merges the group's channels (equal counts r1 - r0).
    const float rows = float(r1 - r0);
    for (int g = warp; g < p.G; g += nwarps) {
      Stat acc{0.f, 0.f, 0.f};
      for (int c = g * p.Cg + lane; c < (g + 1) * p.Cg; c += 32)
        acc = merge(acc, Stat{rows, s_stat[c], s_stat[rpp * C + c]});
      acc = warp_reduce(acc);
      if (lane == 0) {
        if (MODE == kStats) {
          float* w = p.ws + ((n * p.G + g) * p.splits + split) * 3;
          w[0] = acc.n;
          w[1] = acc.mean;
          w[2] = acc.m2;
        } else {
          s_group[g] = acc.mean;
          s_group[p.G + g] = rstd_of(acc, p.eps);
        }
      }
    }
    if (MODE == kStats) return;
  } else {
    for (int g = warp; g < p.G; g += nwarps) {
      const Stat st = merge_partials(p.ws, n * p.G + g, p.splits);
      if (lane == 0) {
        s_group[g] = st.mean;
        s_group[p.G + g] = rstd_of(st, p.eps);
      }
    }
  }
  __syncthreads();
  if (!active) return;

  float d[VEC], scale[VEC], bias[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const int c = col * VEC + j;
    const int g = c / p.Cg;
    const float rstd = s_group[p.G + g];
    d[j] = a[j] - s_group[g];
    scale[j] = p.w ? rstd * load_any(p.w, p.param_dtype, c * p.w_stride) : rstd;
    bias[j] = p.b ? load_any(p.b, p.param_dtype, c * p.b_stride) : 0.f;
  }
  for (int rr = r0 + rsub; rr < r1; rr += kUnroll * rpp) {
    float vals[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int r = rr + u * rpp;
      if (r < r1) load_vec<T, VEC>(xb + std::int64_t(r) * C, vals[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int r = rr + u * rpp;
      if (r < r1) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float y = (vals[u][j] + d[j]) * scale[j] + bias[j];
          vals[u][j] = p.silu ? silu(y) : y;
        }
        store_vec<T, VEC>(ob + std::int64_t(r) * C, vals[u]);
      }
    }
  }
}

int nhwc_threads(std::int64_t C, int vec) {
  const int cols = int(C / vec);
  return cols <= kThreads ? kThreads : (cols + 31) / 32 * 32;
}

template <typename T, int VEC>
void launch(const GnParams& p, bool channels_last, int device, cudaStream_t stream) {
  if (!channels_last) {
    const unsigned grid = unsigned(p.N * p.G * p.splits);
    if (p.splits == 1) {
      gn_nchw_kernel<T, VEC, kFused><<<grid, kThreads, 0, stream>>>(p);
      check_launch("gn_nchw_kernel<fused>");
    } else {
      gn_nchw_kernel<T, VEC, kStats><<<grid, kThreads, 0, stream>>>(p);
      check_launch("gn_nchw_kernel<stats>");
      gn_nchw_kernel<T, VEC, kApply><<<grid, kThreads, 0, stream>>>(p);
      check_launch("gn_nchw_kernel<apply>");
    }
    return;
  }
  const int threads = nhwc_threads(p.C, VEC);
  const int rpp = std::max(1, threads / int(p.C / VEC));
  const unsigned grid = unsigned(p.N * p.splits);
  const int stat_bytes = int(2 * rpp * p.C * sizeof(float));
  const int group_bytes = int(2 * p.G * sizeof(float));
  if (p.splits == 1) {
    const int smem = stat_bytes + group_bytes;
    ensure_smem(reinterpret_cast<const void*>(gn_nhwc_kernel<T, VEC, kFused>), smem, device,
                "gn_nhwc_kernel<fused>: cudaFuncSetAttribute");
    gn_nhwc_kernel<T, VEC, kFused><<<grid, threads, smem, stream>>>(p);
    check_launch("gn_nhwc_kernel<fused>");
  } else {
    ensure_smem(reinterpret_cast<const void*>(gn_nhwc_kernel<T, VEC, kStats>), stat_bytes, device,
                "gn_nhwc_kernel<stats>: cudaFuncSetAttribute");
    gn_nhwc_kernel<T, VEC, kStats><<<grid, threads, stat_bytes, stream>>>(p);
    check_launch("gn_nhwc_kernel<stats>");
    ensure_smem(reinterpret_cast<const void*>(gn_nhwc_kernel<T, VEC, kApply>), group_bytes, device,
                "gn_nhwc_kernel<apply>: cudaFuncSetAttribute");
    gn_nhwc_kernel<T, VEC, kApply><<<grid, threads, group_bytes, stream>>>(p);
    check_launch("gn_nhwc_kernel<apply>");
  }
}

template <typename T>
void launch_t(const GnParams& p, bool channels_last, int vec, int device, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (vec == kVec) {
    launch<T, kVec>(p, channels_last, device, stream);
  } else if (vec == 1) {
    launch<T, 1>(p, channels_last, device, stream);
  } else {
    throw KernelError("group_norm: unsupported vector width " + std::to_string(vec));
  }
}

}  // namespace

int group_norm_vec(std::uintptr_t x, std::uintptr_t out, int dtype, std::int64_t C, std::int64_t HW,
                   bool channels_last) {
  const int vec = 16 / dtype_size(dtype);
  const std::int64_t inner = channels_last ? C : HW;
  if (inner % vec == 0 && aligned(x, 16) && aligned(out, 16)) return vec;
  return 1;
}

bool group_norm_nhwc_fits(std::int64_t C, int vec) { return C / vec <= kMaxNhwcThreads; }

int group_norm_splits(std::int64_t N, std::int64_t C, std::int64_t HW, int G, bool channels_last, int vec,
                      int sm_count) {
  (void)vec;
  const std::int64_t want = 2 * std::int64_t(std::max(sm_count, 1));
  std::int64_t units, per_unit, max_rows;
  if (channels_last) {
    units = N;
    per_unit = HW * C;
    max_rows = HW;
  } else {
    units = N * G;
    per_unit = C / G * HW;
    max_rows = per_unit;
  }
  std::int64_t s = (want + units - 1) / units;
  s = std::min<std::int64_t>(s, std::max<std::int64_t>(1, per_unit / kMinElemsPerBlock));
  s = std::min<std::int64_t>(s, max_rows);
  s = std::min<std::int64_t>(s, kMaxSplits);
  s = std::max<std::int64_t>(1, s);
  if (channels_last) {  // no empty split: s blocks of ceil(HW / s) rows each must all start inside HW
    const std::int64_t chunk = (HW + s - 1) / s;
    s = (HW + chunk - 1) / chunk;
  }
  return int(s);
}

std::int64_t group_norm_workspace(std::int64_t N, int G, int splits) {
  return splits > 1 ? N * G * splits * 3 : 0;
}

void group_norm(std::uintptr_t x, std::uintptr_t out, std::uintptr_t weight, std::uintptr_t bias,
                std::int64_t w_stride, std::int64_t b_stride, std::uintptr_t add, std::int64_t add_sn,
                std::int64_t add_sc, std::uintptr_t ws, int dtype, int param_dtype, int add_dtype,
                std::int64_t N, std::int64_t C, std::int64_t HW, int G, bool channels_last, float eps,
                bool silu, int vec, int splits, int device, std::uintptr_t stream) {
  if (N < 1 || C < 1 || HW < 1 || G < 1 || C % G != 0)
    throw KernelError("group_norm: invalid sizes N=" + std::to_string(N) + " C=" + std::to_string(C) +
                      " HW=" + std::to_string(HW) + " G=" + std::to_string(G));
  if (C / G * HW > 0x7fffffffLL || HW > 0x7fffffffLL)
    throw KernelError("group_norm: a group has more than 2^31-1 elements");
  if (splits < 1 || splits > kMaxSplits || (splits > 1 && ws == 0))
    throw KernelError("group_norm: invalid split count " + std::to_string(splits));
  if (channels_last && !group_norm_nhwc_fits(C, vec))
    throw KernelError("group_norm: channels_last with C=" + std::to_string(C) + " is not supported");
  GnParams p;
  p.x = reinterpret_cast<const void*>(x);
  p.out = reinterpret_cast<void*>(out);
  p.w = reinterpret_cast<const void*>(weight);
  p.b = reinterpret_cast<const void*>(bias);
  p.add = reinterpret_cast<const void*>(add);
  p.ws = reinterpret_cast<float*>(ws);
  p.N = N;
  p.C = C;
  p.HW = HW;
  p.w_stride = w_stride;
  p.b_stride = b_stride;
  p.add_sn = add_sn;
  p.add_sc = add_sc;
  p.G = G;
  p.Cg = int(C / G);
  p.splits = splits;
  p.param_dtype = param_dtype;
  p.add_dtype = add_dtype;
  p.eps = eps;
  p.silu = silu;
  DeviceGuard guard(device, "group_norm: cudaSetDevice");
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kF32: launch_t<float>(p, channels_last, vec, device, s); break;
    case kF16: launch_t<__half>(p, channels_last, vec, device, s); break;
    case kBF16: launch_t<__nv_bfloat16>(p, channels_last, vec, device, s); break;
    default: throw KernelError("group_norm: unsupported dtype code " + std::to_string(dtype));
  }
}

}  // namespace df
