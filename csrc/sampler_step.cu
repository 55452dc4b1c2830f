// The fused sampler step: CFG combine, raw-output -> denoised, update, history write, next network input,
// in one pass over the data. The coefficient row and the slots are read from device memory, so a CUDA
// graph replays the step with a new row copied into `coef`.
//
//   raw   = u + g*(c - u)              (CFG batch [uncond; cond]; else raw = model_output)
//   D     = P*x + Q*raw
//   x_new = AX*x + AD*D [+ AZ*z] + sum_k AH[k]*hist[k]
//   y     = BX*x + BD*D + sum_k BH[k]*hist[k]
//   hist[slot_D] = D; hist[slot_y] = y (slot_D wins if equal; -1 = no write); out = x_new
//   net[:n] (and net[n:2n]) = CIN * x_new in net's dtype
//
// Every product and sum is rounded separately (__fmul_rn / __fadd_rn, no FMA contraction) in the order of
// the float32 reference, so the kernel reproduces the reference's rounding.
// Grid: grid-stride over VEC-element vectors (VEC = 4: 16-byte fp32 accesses), at most 8 blocks per SM.
// Bytes: reads x, 1-2 model outputs, K history slots, noise; writes out, up to 2 slots, 1-2 net inputs.
#include "common.cuh"

namespace df {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxHist = 8;

// Row layout: twin of diffusion_fast/ops/rows.py (tests/test_rows.py checks that they agree):
// G, P, Q, AX, AD, AZ, BX, BD, CIN, AH[K], BH[K].
enum Row : int { kG = 0, kP, kQ, kAX, kAD, kAZ, kBX, kBD, kCIN, kAH };

struct StepParams {
  const float* x;      // [n] f32
  const void* mo;      // [n] or [2n] (cfg), dtype MT
  const float* coef;   // [9 + 2K] f32, stride coef_stride
  const void* slots;   // [2] int32/int64, stride slots_stride, or null
  float* hist;         // [K, n] f32 or null
  const void* noise;   // [n], noise_dtype, or null
  float* out;          // [n] f32 (may alias x)
  void* net;           // [n] or [2n] (net_cfg), net_dtype, or null
  std::int64_t n, coef_stride, slots_stride;
  int K, noise_dtype, net_dtype;
  bool cfg, net_cfg, slots64;
};

__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }

template <typename MT, int VEC>
__global__ void __launch_bounds__(kThreads) sampler_step_kernel(const StepParams p) {
  const std::int64_t cs = p.coef_stride;
  const float cg = p.coef[kG * cs], cp = p.coef[kP * cs], cq = p.coef[kQ * cs];
  const float cax = p.coef[kAX * cs], cad = p.coef[kAD * cs], caz = p.coef[kAZ * cs];
  const float cbx = p.coef[kBX * cs], cbd = p.coef[kBD * cs], ccin = p.coef[kCIN * cs];
  const int K = p.K;
  float cah[kMaxHist], cbh[kMaxHist];
#pragma unroll
  for (int k = 0; k < kMaxHist; ++k) {
    cah[k] = k < K ? p.coef[(kAH + k) * cs] : 0.f;
    cbh[k] = k < K ? p.coef[(kAH + K + k) * cs] : 0.f;
  }
  int slot_d = -1, slot_y = -1;
  if (p.slots != nullptr) {
    if (p.slots64) {
      const auto* s = static_cast<const long long*>(p.slots);
      slot_d = int(max(-1LL, min(s[0], 1LL * kMaxHist)));
      slot_y = int(max(-1LL, min(s[p.slots_stride], 1LL * kMaxHist)));
    } else {
      const auto* s = static_cast<const int*>(p.slots);
      slot_d = s[0];
      slot_y = s[p.slots_stride];
    }
  }
  const bool write_d = slot_d >= 0 && slot_d < K;
  const bool write_y = slot_y >= 0 && slot_y < K && slot_y != slot_d;
  const MT* mo = static_cast<const MT*>(p.mo);
  const std::int64_t n = p.n;
  const std::int64_t step = std::int64_t(gridDim.x) * kThreads * VEC;

  for (std::int64_t i = (std::int64_t(blockIdx.x) * kThreads + threadIdx.x) * VEC; i < n; i += step) {
    float x[VEC], u[VEC], c[VEC], z[VEC], h[kMaxHist][VEC];
    load_vec<float, VEC>(p.x + i, x);
    load_vec<MT, VEC>(mo + i, u);
    if (p.cfg) load_vec<MT, VEC>(mo + n + i, c);
    if (p.noise) load_vec_any<VEC>(p.noise, p.noise_dtype, i, z);
#pragma unroll
    for (int k = 0; k < kMaxHist; ++k)
      if (k < K) load_vec<float, VEC>(p.hist + k * n + i, h[k]);

    float xn[VEC], dd[VEC], yy[VEC], ni[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float raw = p.cfg ? add(u[j], mul(cg, add(c[j], -u[j]))) : u[j];
      const float d = add(mul(cp, x[j]), mul(cq, raw));
      float v = add(mul(cax, x[j]), mul(cad, d));
      if (p.noise) v = add(v, mul(caz, z[j]));
      float y = add(mul(cbx, x[j]), mul(cbd, d));
#pragma unroll
      for (int k = 0; k < kMaxHist; ++k) {
        if (k < K) {
          v = add(v, mul(cah[k], h[k][j]));
          y = add(y, mul(cbh[k], h[k][j]));
        }
      }
      xn[j] = v;
      dd[j] = d;
      yy[j] = y;
      ni[j] = mul(ccin, v);
    }
    store_vec<float, VEC>(p.out + i, xn);
    if (write_d) store_vec<float, VEC>(p.hist + slot_d * n + i, dd);
    if (write_y) store_vec<float, VEC>(p.hist + slot_y * n + i, yy);
    if (p.net) {
      store_vec_any<VEC>(p.net, p.net_dtype, i, ni);
      if (p.net_cfg) store_vec_any<VEC>(p.net, p.net_dtype, n + i, ni);
    }
  }
}

template <typename MT, int VEC>
void launch(const StepParams& p, int sm_count, cudaStream_t stream) {
  const std::int64_t vecs = (p.n + VEC - 1) / VEC;
  const std::int64_t blocks = std::min<std::int64_t>((vecs + kThreads - 1) / kThreads,
                                                     8LL * std::max(sm_count, 1));
  sampler_step_kernel<MT, VEC><<<unsigned(std::max<std::int64_t>(1, blocks)), kThreads, 0, stream>>>(p);
  check_launch(VEC == 1 ? "sampler_step_kernel<vec1>" : "sampler_step_kernel<vec4>");
}

template <typename MT>
void launch_t(const StepParams& p, bool vec4, int sm_count, cudaStream_t stream) {
  if (vec4) {
    launch<MT, 4>(p, sm_count, stream);
  } else {
    launch<MT, 1>(p, sm_count, stream);
  }
}

}  // namespace

void sampler_step(std::uintptr_t x, std::uintptr_t mo, int mo_dtype, bool cfg, std::uintptr_t coef,
                  std::int64_t coef_stride, std::uintptr_t slots, std::int64_t slots_stride, bool slots_int64,
                  std::uintptr_t hist, int K, std::uintptr_t noise, int noise_dtype, std::uintptr_t out,
                  std::uintptr_t net, int net_dtype, bool net_cfg, std::int64_t n, int sm_count, int device,
                  std::uintptr_t stream) {
  if (n < 1) throw KernelError("sampler_step: n must be >= 1, got " + std::to_string(n));
  if (K < 0 || K > kMaxHist) throw KernelError("sampler_step: K must be 0..8, got " + std::to_string(K));
  if (K > 0 && (hist == 0 || slots == 0)) throw KernelError("sampler_step: K > 0 needs hist and slots");
  StepParams p;
  p.x = reinterpret_cast<const float*>(x);
  p.mo = reinterpret_cast<const void*>(mo);
  p.coef = reinterpret_cast<const float*>(coef);
  p.slots = reinterpret_cast<const void*>(slots);
  p.hist = reinterpret_cast<float*>(hist);
  p.noise = reinterpret_cast<const void*>(noise);
  p.out = reinterpret_cast<float*>(out);
  p.net = reinterpret_cast<void*>(net);
  p.n = n;
  p.coef_stride = coef_stride;
  p.slots_stride = slots_stride;
  p.K = K;
  p.noise_dtype = noise_dtype;
  p.net_dtype = net_dtype;
  p.cfg = cfg;
  p.net_cfg = net_cfg;
  p.slots64 = slots_int64;
  // 16-byte fp32 accesses need every operand (and its second half / slot offsets) aligned to 4 elements.
  bool vec4 = n % 4 == 0 && aligned(x, 16) && aligned(out, 16) && aligned(mo, 4 * dtype_size(mo_dtype));
  if (hist) vec4 = vec4 && aligned(hist, 16);
  if (noise) vec4 = vec4 && aligned(noise, 4 * dtype_size(noise_dtype));
  if (net) vec4 = vec4 && aligned(net, 4 * dtype_size(net_dtype));
  DeviceGuard guard(device, "sampler_step: cudaSetDevice");
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (mo_dtype) {
    case kF32: launch_t<float>(p, vec4, sm_count, s); break;
    case kF16: launch_t<__half>(p, vec4, sm_count, s); break;
    case kBF16: launch_t<__nv_bfloat16>(p, vec4, sm_count, s); break;
    default: throw KernelError("sampler_step: unsupported model_output dtype code " + std::to_string(mo_dtype));
  }
}

}  // namespace df
