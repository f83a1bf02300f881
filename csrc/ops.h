// Launchers of the csrc kernels: plain C++ over raw pointers, sizes and a stream, no torch
// headers (the .cu files include this; csrc/registry.cpp checks tensors and calls it).
//
// Every kernel here works on token rows [B, L, D] (any batch and row strides, unit last
// stride): one CTA holds a whole row in registers, read with 128-bit loads in chunks of
// 16 bytes (8 bf16/fp16 or 4 fp32 values), reduced with warp shuffles + shared memory, and
// written once. The limits below are the one place where "which rows a kernel takes" is
// decided; registry.cpp and lightx2v/ops/_cuda.py state the same rules to the user.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace lx2v {

enum class DType { kFloat32, kBFloat16, kFloat16 };

inline int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// Elements per 16-byte chunk: D must be a multiple of this (4 for fp32, 8 for 16-bit types).
inline int chunk_elems(DType t) { return 16 / dtype_size(t); }

// Each thread holds 32 values of the row (4 chunks of bf16/fp16, 8 of fp32), so a CTA of
// D/32 threads (rounded up to whole warps) holds the row: 160 threads at D = 5120, 64 at
// D = 1536. Fewer, fuller threads than one chunk per thread, because every thread also pays
// ~25 registers of pointers, indices and statistics, and registers per row decide how many
// rows stay resident per SM (resident rows are the bytes in flight that saturate HBM).
// ptxas, sm_90a, registers per row at D = 5120 (threads × registers, allocated in 8s):
//   values/thread         16             32            64
//   rms_norm bf16    320 × 32 = 10240   160 × 56 = 8960   96 × 112 = 10752
//   rms+rope bf16    320 × 32 = 10240   160 × 64 = 10240  96 × 120 = 11520
//   adaln_fp8 fp32   320 × 40 = 12800   160 × 64 = 10240  96 × 104 = 9984
// (64 values saves nothing more and leaves fewer threads for the loads and reductions.)
constexpr int kValuesPerThread = 32;
constexpr int kMaxThreads = 512;  // __launch_bounds__: lets ptxas use up to 128 registers
constexpr int kMaxDim = kValuesPerThread * kMaxThreads;  // 16384

// [B, L, D] rows: element (b, l, d) at data + b * stride_b + l * stride_l + d.
struct RowsIn {
  const void* data;
  int64_t stride_b;  // in elements
  int64_t stride_l;  // in elements
};

// RMSNorm (weight over the full D) of up to two tensors of one shape and dtype (q and k),
// optionally followed by Wan's rotary embedding of each head's interleaved pairs.
struct RmsNormRopeArgs {
  RowsIn x[2];
  void* out[2];           // [B, L, D] contiguous, x's dtype
  const float* weight[2];  // [D] fp32, 16-byte aligned
  int num_tensors;         // 1 (rms_norm) or 2 (q and k in one launch)
  DType dtype;
  int64_t batch, tokens;
  int dim;
  float eps;
  // rotary tables [L, head_dim / 2] fp32, unit last stride; cos == nullptr: no rope
  const float* cos;
  const float* sin;
  int64_t table_stride;  // in elements, shared by cos and sin
  int head_dim;
};

cudaError_t rms_norm_rope(const RmsNormRopeArgs& args, cudaStream_t stream);

// adaLN quantized per token: h = LN(x)·(1 + scale[b]) + shift[b] (fp32, eps inside the root),
// amax = max(max_d |h|, 1e-12), out = e4m3(h · (448 / amax)) saturated, out_scale = amax / 448.
struct AdaLNFp8Args {
  RowsIn x;
  const float* shift;  // [B, D] fp32, unit last stride, 16-byte aligned rows
  const float* scale;  // [B, D] fp32, unit last stride, 16-byte aligned rows
  int64_t shift_stride_b, scale_stride_b;  // in elements; 0 broadcasts one vector
  uint8_t* out;     // [B, L, D] float8_e4m3fn, contiguous
  float* out_scale;  // [B·L] fp32
  DType dtype;
  int64_t batch, tokens;
  int dim;
  float eps;
  bool affine;  // h = LN(x) · scale + shift (an affine LayerNorm: weight, bias) instead
};

cudaError_t adaln_fp8(const AdaLNFp8Args& args, cudaStream_t stream);

// Whether this library holds a kernel image (cubin or PTX) that the current device runs.
// Returns true, or false with the reason written to `why` (NUL-terminated, ≤ n bytes).
bool kernel_image_ok(char* why, size_t n);

// The virtual architectures this library was compiled for, e.g. "8.0 9.0" (from nvcc).
const char* compiled_arches();

}  // namespace lx2v
