// RMSNorm over the full hidden dim (with weight), optionally followed by Wan's 3D rotary
// embedding: the q/k normalization of self-attention (lightx2v/ops/rope.py is the reference).
//
//   h = x · rsqrt(mean_D(x²) + eps) · w                      fp32, rounded as the reference
//   rope: each head's pair (h[2j], h[2j+1]) turned by the token's angle j:
//         (re·cos − im·sin, re·sin + im·cos), tables [L, Dh/2] fp32 shared by heads and batch
//   out = h in x's dtype, [B, L, D] contiguous (= [B, L, N, Dh])
//
// q and k go in one launch (blockIdx.y picks the tensor), so neither waits on the other's
// tail. Per row a CTA reads x once (128-bit, evict-first), reduces Σx² once and writes once;
// the weight and the token's rope angles come from L1/L2 (shared by every row). The weight
// is deliberately not held in registers across rows: that costs registers per row, and
// resident rows are what keeps enough bytes in flight to saturate HBM.

#include "common.cuh"

namespace lx2v {
namespace {

template <typename T, bool kRope>
__global__ void __launch_bounds__(kMaxThreads) rms_norm_rope_kernel(const RmsNormRopeArgs args) {
  constexpr int V = Chunk<T>::kElems;       // values per 16-byte chunk
  constexpr int C = Chunk<T>::kPerThread;  // chunks per thread
  const int which = blockIdx.y;            // 0: q (or the only tensor), 1: k
  const RowsIn in = args.x[which];
  const float* weight = args.weight[which];
  T* const out = static_cast<T*>(args.out[which]);
  const int chunks = args.dim / V;
  const float dim = static_cast<float>(args.dim);

  __shared__ float scratch[2][32];
  BlockAllReduce block_sum(scratch);

  const int64_t rows = args.batch * args.tokens;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / args.tokens;
    const int64_t l = row - b * args.tokens;
    const T* x = static_cast<const T*>(in.data) + b * in.stride_b + l * in.stride_l;

    // All loads first, so every one of them is in flight before the first use. Kept packed
    // until used (bf16 on sm_90a: 51/57 registers without/with rope, vs 56/62 unpacked).
    uint4 raw[C];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int chunk = threadIdx.x + c * blockDim.x;
      if (chunk < chunks) raw[c] = load_chunk_streaming(x + chunk * V);
    }
    float sum_sq = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (threadIdx.x + c * blockDim.x < chunks) {
        float v[V];
        unpack_chunk<T>(raw[c], v);
#pragma unroll
        for (int i = 0; i < V; ++i) sum_sq = fmaf(v[i], v[i], sum_sq);
      }
    }
    const float r = rsqrtf(__fdiv_rn(block_sum(sum_sq, SumOp{}), dim) + args.eps);

    T* y = out + row * args.dim;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int chunk = threadIdx.x + c * blockDim.x;
      if (chunk >= chunks) continue;
      // Explicit roundings (no FMA contraction): the same fp32 operations, in the same
      // order, as the PyTorch reference, so the two differ only through Σx².
      float v[V], h[V];
      unpack_chunk<T>(raw[c], v);
      load_table<V>(weight + chunk * V, h);
#pragma unroll
      for (int i = 0; i < V; ++i) h[i] = __fmul_rn(__fmul_rn(v[i], r), h[i]);
      if constexpr (kRope) {
        // A chunk never straddles two heads (registry.cpp checks Dh % V == 0): its pairs
        // are j0 … j0 + V/2 − 1 of one head.
        const int j0 = chunk * V % args.head_dim / 2;
        const int64_t t = l * args.table_stride + j0;
        float cs[V / 2], sn[V / 2];
        load_table<V / 2>(args.cos + t, cs);
        load_table<V / 2>(args.sin + t, sn);
#pragma unroll
        for (int p = 0; p < V / 2; ++p) {
          const float re = h[2 * p], im = h[2 * p + 1];
          h[2 * p] = __fsub_rn(__fmul_rn(re, cs[p]), __fmul_rn(im, sn[p]));
          h[2 * p + 1] = __fadd_rn(__fmul_rn(re, sn[p]), __fmul_rn(im, cs[p]));
        }
      }
      store_chunk<T>(y + chunk * V, h);
    }
  }
}

}  // namespace

cudaError_t rms_norm_rope(const RmsNormRopeArgs& args, cudaStream_t stream) {
  const int64_t rows = args.batch * args.tokens;
  if (rows == 0) return cudaSuccess;
  return with_type(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = args.cos != nullptr ? rms_norm_rope_kernel<T, true>
                                       : rms_norm_rope_kernel<T, false>;
    const int threads = row_threads(args.dim / Chunk<T>::kElems, Chunk<T>::kPerThread);
    // The resident CTAs are shared between the tensors (q and k).
    const int ctas = resident_ctas(kernel, threads, rows * args.num_tensors);
    const dim3 grid((ctas + args.num_tensors - 1) / args.num_tensors, args.num_tensors);
    kernel<<<grid, threads, 0, stream>>>(args);
    return cudaGetLastError();
  });
}

}  // namespace lx2v
