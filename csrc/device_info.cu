// What this build of lightx2v._C can run: the architectures nvcc compiled it for, and
// whether the current GPU finds a kernel image among them. lightx2v/ops/dispatch.py asks
// before choosing the CUDA backend, so a wheel built for 9.0a on an A100 falls back (or
// says why) instead of failing at the first launch.

#include <cstdio>
#include <string>

#include "ops.h"

#define LX2V_STR2(...) #__VA_ARGS__
#define LX2V_STR(...) LX2V_STR2(__VA_ARGS__)

namespace lx2v {
namespace {

// Compiled exactly like the real kernels (same -gencode list), so it has an image for a
// device if and only if they do.
__global__ void probe_kernel() {}

std::string arch_names() {
#ifdef __CUDA_ARCH_LIST__
  // e.g. "800,900" → "8.0 9.0"; nvcc lists virtual architectures, so 9.0a reads as 9.0
  const std::string list = LX2V_STR(__CUDA_ARCH_LIST__);
  std::string out, num;
  for (size_t i = 0; i <= list.size(); ++i) {
    if (i < list.size() && list[i] >= '0' && list[i] <= '9') {
      num += list[i];
      continue;
    }
    if (num.size() >= 2) {
      if (!out.empty()) out += ' ';
      out += num.substr(0, num.size() - 2) + "." + num.substr(num.size() - 2, 1);
    }
    num.clear();
  }
  return out;
#else
  return "unknown";
#endif
}

}  // namespace

const char* compiled_arches() {
  static const std::string names = arch_names();
  return names.c_str();
}

bool kernel_image_ok(char* why, size_t n) {
  int device = 0, major = 0, minor = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    cudaFuncAttributes attr;
    err = cudaFuncGetAttributes(&attr, probe_kernel);
  }
  if (err == cudaSuccess) return true;
  cudaGetLastError();  // leave no error behind for the next CUDA call of the process
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    std::snprintf(why, n,
                  "lightx2v._C has no kernel for this GPU (compute capability %d.%d; built "
                  "for %s): rebuild with TORCH_CUDA_ARCH_LIST=\"%d.%d\"",
                  major, minor, compiled_arches(), major, minor);
  } else {
    std::snprintf(why, n, "lightx2v._C cannot query the GPU: %s", cudaGetErrorString(err));
  }
  return false;
}

}  // namespace lx2v
