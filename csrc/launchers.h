// Host-side entry points of the CUDA kernels, callable from plain C++ (no CUDA or torch headers here).
//
// Every pointer is a raw device address passed as an integer (Python: tensor.data_ptr()), every stream a
// cudaStream_t passed as an integer (Python: torch.cuda.current_stream().cuda_stream). Sizes and strides
// are in elements. A failed launch throws df::KernelError naming the kernel and the CUDA error.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace df {

// dtype codes shared with diffusion_fast/kernels/cuda/_ext.py
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kNone = -1 };

struct KernelError : std::runtime_error {
  explicit KernelError(const std::string& what) : std::runtime_error(what) {}
};

// ---- runtime queries --------------------------------------------------------------------------------------
// Number of CUDA devices the (statically linked) runtime sees; on failure 0 and `error` says why.
int device_count(std::string* error);
// "" when the kernels in this build can run on `device`, else the reason (e.g. no kernel image for its arch).
std::string probe(int device);
// Compute capability major*10+minor of `device`; throws KernelError on failure.
int compute_capability(int device);

// ---- group_norm --------------------------------------------------------------------------------------------
// Vector width (elements per 16-byte access, or 1 for the scalar path) the kernels use for this call.
int group_norm_vec(std::uintptr_t x, std::uintptr_t out, int dtype, std::int64_t C, std::int64_t HW,
                   bool channels_last);
// Number of blocks each (sample, group) [NCHW] or sample [NHWC] is split into, so that batch 1 fills
// `sm_count` multiprocessors. 1 means one fused launch (no workspace).
int group_norm_splits(std::int64_t N, std::int64_t C, std::int64_t HW, int G, bool channels_last, int vec,
                      int sm_count);
// Workspace (float32 elements) the split path needs: N*G*splits*3.
std::int64_t group_norm_workspace(std::int64_t N, int G, int splits);
// Whether the channels_last kernels can take this C at this vector width (C / vec <= 512 threads).
bool group_norm_nhwc_fits(std::int64_t C, int vec);

// x, out: [N, C, HW] (NCHW) or [N, HW, C] (channels_last), dense, same strides, dtype `dtype`.
// weight, bias: [C] (stride w_stride) of `param_dtype`, or 0. add: [N, C] (strides add_sn, add_sc) of
// `add_dtype`, or 0. ws: float32 workspace of group_norm_workspace() elements (unused when splits == 1).
void group_norm(std::uintptr_t x, std::uintptr_t out, std::uintptr_t weight, std::uintptr_t bias,
                std::int64_t w_stride, std::int64_t b_stride, std::uintptr_t add, std::int64_t add_sn,
                std::int64_t add_sc, std::uintptr_t ws, int dtype, int param_dtype, int add_dtype,
                std::int64_t N, std::int64_t C, std::int64_t HW, int G, bool channels_last, float eps,
                bool silu, int vec, int splits, int device, std::uintptr_t stream);

// ---- sampler_step ------------------------------------------------------------------------------------------
// All tensors contiguous. n = B * prod(S). x, out: [n] f32; mo: [n] or [2n] (cfg) of mo_dtype;
// coef: [9 + 2K] f32 (stride coef_stride); slots: [2] int32/int64 (stride slots_stride) or 0 when K == 0;
// hist: [K, n] f32 or 0; noise: [n] of noise_dtype or 0; net: [n] or [2n] (net_cfg) of net_dtype or 0.
void sampler_step(std::uintptr_t x, std::uintptr_t mo, int mo_dtype, bool cfg, std::uintptr_t coef,
                  std::int64_t coef_stride, std::uintptr_t slots, std::int64_t slots_stride, bool slots_int64,
                  std::uintptr_t hist, int K, std::uintptr_t noise, int noise_dtype, std::uintptr_t out,
                  std::uintptr_t net, int net_dtype, bool net_cfg, std::int64_t n, int sm_count, int device,
                  std::uintptr_t stream);

// ---- attention ---------------------------------------------------------------------------------------------
// Head dims the kernels are compiled for.
bool attention_supports_head_dim(int D);
// q: [B, Sq, H, D], k, v: [B, Sk, H, D], out: [B, Sq, H, D]; strides (b, s, h) in elements, last dim
// contiguous; dtype fp16 or bf16; every row 16-byte aligned.
void attention(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out, int dtype,
               std::int64_t B, std::int64_t H, std::int64_t Sq, std::int64_t Sk, int D,
               std::int64_t q_sb, std::int64_t q_ss, std::int64_t q_sh, std::int64_t k_sb, std::int64_t k_ss,
               std::int64_t k_sh, std::int64_t v_sb, std::int64_t v_ss, std::int64_t v_sh,
               std::int64_t o_sb, std::int64_t o_ss, std::int64_t o_sh, float scale, int device,
               std::uintptr_t stream);
// Which attention path a call takes: "short" (K, V resident in shared memory) or "flash".
std::string attention_path(std::int64_t Sk, int D, int device);

}  // namespace df
