// Shared device helpers and host-side launch plumbing for the kernels in csrc/.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>

#include "launchers.h"

namespace df {

// ---- host: errors, device selection, launch checks -------------------------------------------------------

inline std::string cuda_error_text(cudaError_t e) {
  return std::string(cudaGetErrorString(e)) + " (" + cudaGetErrorName(e) + ")";
}

// Throw on a failed runtime call. The error is also cleared from the runtime's last-error slot, so that the
// launch check of a later, successful launch does not report it again.
inline void throw_if(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw KernelError(std::string(what) + ": " + cuda_error_text(e));
  }
}

// Check the launch that was just issued. Launch-time errors (bad configuration, no kernel image, too much
// shared memory) are reported here; faults inside the kernel surface at the next synchronisation.
inline void check_launch(const char* kernel) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw KernelError(std::string(kernel) + ": " + cuda_error_text(e));
}

// Makes `device` current for the calls in scope and restores the previous device. The runtime in this
// module is linked statically; it shares the driver's current context with torch's runtime, so restoring
// keeps torch's notion of the current device intact.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* what) {
    throw_if(cudaGetDevice(&prev_), what);
    if (prev_ != device) throw_if(cudaSetDevice(device), what);
  }
  ~DeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

constexpr int kMaxDevices = 64;

// Largest opt-in dynamic shared memory per block of `device` (cached).
inline int max_smem_optin(int device) {
  static std::atomic<int> cache[kMaxDevices] = {};
  int d = device < kMaxDevices ? device : 0;
  int v = cache[d].load();
  if (v == 0) {
    throw_if(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
    cache[d].store(v);
  }
  return v;
}

// Raise a kernel's dynamic shared-memory limit (needed above 48 KB), once per (kernel, device).
inline void ensure_smem(const void* kernel, int bytes, int device, const char* name) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::unordered_map<const void*, int> done[kMaxDevices];
  int d = device < kMaxDevices ? device : 0;
  std::lock_guard<std::mutex> lock(mu);
  auto it = done[d].find(kernel);
  if (it != done[d].end() && it->second >= bytes) return;
  throw_if(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), name);
  done[d][kernel] = bytes;
}

// ---- device: dtype conversion -----------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Load one element of a tensor whose dtype is known only at run time (used for small per-channel
// parameters and for optional operands; the branch is uniform across the warp).
__device__ __forceinline__ float load_any(const void* p, int dtype, std::int64_t i) {
  switch (dtype) {
    case kF16: return __half2float(static_cast<const __half*>(p)[i]);
    case kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// ---- device: vector loads and stores of VEC elements --------------------------------------------------------

template <int BYTES>
struct RawVec;
template <>
struct RawVec<16> { using type = uint4; };
template <>
struct RawVec<8> { using type = uint2; };
template <>
struct RawVec<4> { using type = unsigned int; };
template <>
struct RawVec<2> { using type = unsigned short; };

// Load VEC consecutive elements of T starting at p (p aligned to VEC*sizeof(T) when VEC > 1).
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    v[0] = to_f32<T>(*p);
  } else {
    using R = typename RawVec<VEC * sizeof(T)>::type;
    union {
      R raw;
      T e[VEC];
    } u;
    u.raw = *reinterpret_cast<const R*>(p);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = to_f32<T>(u.e[j]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    *p = from_f32<T>(v[0]);
  } else {
    using R = typename RawVec<VEC * sizeof(T)>::type;
    union {
      R raw;
      T e[VEC];
    } u;
#pragma unroll
    for (int j = 0; j < VEC; ++j) u.e[j] = from_f32<T>(v[j]);
    *reinterpret_cast<R*>(p) = u.raw;
  }
}

// Runtime-dtype variants for optional operands (noise, next network input).
template <int VEC>
__device__ __forceinline__ void load_vec_any(const void* p, int dtype, std::int64_t i, float (&v)[VEC]) {
  switch (dtype) {
    case kF16: load_vec<__half, VEC>(static_cast<const __half*>(p) + i, v); break;
    case kBF16: load_vec<__nv_bfloat16, VEC>(static_cast<const __nv_bfloat16*>(p) + i, v); break;
    default: load_vec<float, VEC>(static_cast<const float*>(p) + i, v); break;
  }
}

template <int VEC>
__device__ __forceinline__ void store_vec_any(void* p, int dtype, std::int64_t i, const float (&v)[VEC]) {
  switch (dtype) {
    case kF16: store_vec<__half, VEC>(static_cast<__half*>(p) + i, v); break;
    case kBF16: store_vec<__nv_bfloat16, VEC>(static_cast<__nv_bfloat16*>(p) + i, v); break;
    default: store_vec<float, VEC>(static_cast<float*>(p) + i, v); break;
  }
}

inline int dtype_size(int dtype) { return dtype == kF32 ? 4 : 2; }

inline bool aligned(std::uintptr_t p, std::int64_t bytes) { return bytes <= 1 || p % bytes == 0; }

}  // namespace df
