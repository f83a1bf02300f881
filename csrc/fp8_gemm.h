// The FP8 GEMM with fused epilogues (csrc/fp8_gemm_sm90.cuh): its arguments, shared by the
// kernel files (built for sm_90a only, with CUTLASS) and the op bindings in
// fp8_gemm_sm90_ops.cpp (the schemas are in registry.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace lx2v {

enum class Fp8Epilogue : int {
  kBias = 0,      // out (bf16) = y
  kGelu = 1,      // out (bf16) = gelu_tanh(y)
  kResidual = 2,  // out (fp32, read and written) += gate · y
};

// y = (a · a_scale) @ (b · b_scale)ᵀ + bias. All pointers are device pointers; a [m, k] and
// b [n, k] row-major float8_e4m3fn with 16-byte aligned rows (k % 16 == 0), a_scale [m] and
// b_scale [n] fp32, bias [n] bf16 or null, gate [n] fp32 or null (= 1), out [m, n] row-major
// (n % 8 == 0 for bf16, n % 4 == 0 for fp32).
struct Fp8GemmArgs {
  const void* a = nullptr;
  const float* a_scale = nullptr;
  const void* b = nullptr;
  const float* b_scale = nullptr;
  const void* bias = nullptr;
  const float* gate = nullptr;
  void* out = nullptr;
  int64_t m = 0, n = 0, k = 0;
  Fp8Epilogue epilogue = Fp8Epilogue::kBias;
  int device = 0;    // CUDA device index of the tensors
  int sm_count = 0;  // its SMs
  // Kernel configuration (csrc/fp8_gemm_sm90.cuh: 0 ping-pong 128×128, 1 cooperative
  // 128×256) and tile order: swizzle width (1, 2, 4, 8) and raster (0 heuristic, 1 along M,
  // 2 along N).
  int config = 0;
  int swizzle = 1;
  int raster = 0;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// One kernel per epilogue (csrc/fp8_gemm_<epilogue>_sm90.cu); the workspace functions say
// how many bytes of device memory `workspace` must provide for these arguments.
size_t fp8_gemm_bias_sm90_workspace(const Fp8GemmArgs& args);
size_t fp8_gemm_gelu_sm90_workspace(const Fp8GemmArgs& args);
size_t fp8_gemm_residual_sm90_workspace(const Fp8GemmArgs& args);
// The kernels return nullptr, or what failed (a static string: CUTLASS's status, or the
// CUDA error of the launch).
const char* fp8_gemm_bias_sm90(const Fp8GemmArgs& args, cudaStream_t stream);
const char* fp8_gemm_gelu_sm90(const Fp8GemmArgs& args, cudaStream_t stream);
const char* fp8_gemm_residual_sm90(const Fp8GemmArgs& args, cudaStream_t stream);

}  // namespace lx2v
