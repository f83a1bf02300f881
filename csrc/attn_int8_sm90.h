// The warp-specialised INT8 attention kernel of attn_int8_sm90.cu (sm_90a): its arguments
// and launcher, called by the lx2v_C::attn_int8_sm90 op (fp8_gemm_sm90_ops.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lx2v {

struct AttnInt8Params {
  const int8_t* q8;     // [BH, Lq_pad, 128], swizzled
  const int8_t* k8;     // [BH, Lk_pad, 128], swizzled
  const int8_t* vt8;    // [BH, Lk_pad/128, 128, 128] (the op's [BH, 128, Lk_pad] tensor
                        // holds these bytes), permuted + swizzled
  const float* qs;      // [BH, Lq_pad/64]
  const float* ks;      // [BH, Lk_pad/128]
  const float* vmean;   // [BH, 128]
  const float* vscale;  // [BH, 128]
  void* out;            // [B, Lq, H, 128] bf16/fp16
  int Lq, Lk, Lq_pad, Lk_pad, H;
  int64_t* trace;       // prototypes only: phase timestamps of one CTA (variant 9xx)
};

// out [B, Lq, H, 128] (bf16, or fp16 if fp16) from the pre-pass's operands in the "sm90"
// layout (kernels/attention.py); BH = B·H; variant kAttnSm90Variant (see attn_int8_sm90.cu).
// The library's variant: O_j added during the next block's softmax, 3 stages, the turn
// passed on issue (791-801 TFLOP/s against 729-743 for 32, H200, docs/BENCHMARKS.md).
constexpr int kAttnSm90Variant = 10031;
cudaError_t attn_int8_sm90(const AttnInt8Params& p, int BH, bool fp16, int variant,
                           cudaStream_t stream);

}  // namespace lx2v
