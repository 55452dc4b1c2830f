// Runtime queries: device count, compute capability, and a probe that the kernels of this build can run
// on a device (its architecture has a kernel image in the module).
#include "common.cuh"

namespace df {
namespace {

// Never launched: its attributes tell whether this build holds code for the current device.
__global__ void probe_kernel(int* p) {
  if (p) *p = 0;
}

}  // namespace

int device_count(std::string* error) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear, so later calls are not poisoned by this query
    if (error) *error = cuda_error_text(e);
    return 0;
  }
  if (error) error->clear();
  return n;
}

int compute_capability(int device) {
  int major = 0, minor = 0;
  throw_if(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "compute_capability");
  throw_if(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "compute_capability");
  return major * 10 + minor;
}

std::string probe(int device) {
  std::string err;
  const int n = device_count(&err);
  if (n == 0) return "no CUDA device" + (err.empty() ? std::string() : " (" + err + ")");
  if (device < 0 || device >= n)
    return "device " + std::to_string(device) + " does not exist (" + std::to_string(n) + " devices)";
  try {
    DeviceGuard guard(device, "cudaSetDevice");
    cudaFuncAttributes attr;
    cudaError_t e = cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(probe_kernel));
    if (e != cudaSuccess) {
      cudaGetLastError();
      return "the CUDA kernels cannot run on device " + std::to_string(device) + " (sm_" +
             std::to_string(compute_capability(device)) + "): " + cuda_error_text(e);
    }
  } catch (const KernelError& ex) {
    return ex.what();
  }
  return "";
}

}  // namespace df
