// adaLN (LayerNorm + modulation) quantized per token to float8_e4m3fn: the input of the FP8
// linears after each norm of a DiT block (lightx2v/ops/norm.py `adaln_fp8_ref` is the
// definition).
//
//   h = (x − mean) · rsqrt(var + eps) · (1 + scale[b]) + shift[b]    fp32, biased variance
//   amax = max(max_D |h|, 1e-12)
//   q = e4m3(clamp(h · (448 / amax), ±448))    s = amax / 448    (h ≈ q · s)
//
// One pass over memory: x read once (the fp32 residual stream: 4 bytes per value), q written
// once (1 byte per value), s once per row. The row stays in registers through the three
// reductions (Σx, Σ(x − mean)², max|h|): the two-pass variance costs one more reduction but
// no precision on rows with a large mean (the residual stream has them). shift and scale
// are re-read per token from L1/L2 (shared by the whole batch row) instead of being held in
// registers, which would cut the rows resident per SM.
//
// With args.affine the same kernel computes an affine LayerNorm quantized the same way,
// h = (x − mean) · rsqrt(var + eps) · weight + bias, with weight and bias passed as scale
// and shift (the norm before cross-attention).
//
// Tried and measured slower on an H200 (docs/BENCHMARKS.md): one reduction for both
// moments about a pivot (also wrong on rows whose first channel is an outlier), loads with
// an L2 prefetch hint, double-buffering the next row through shared memory (cp.async), a
// bulk L2 prefetch (cp.async.bulk.prefetch) of the CTA's next row or the one after it, a
// ring of two row buffers in shared memory filled by one bulk (TMA) copy per row, and
// loading the next row into registers before reducing the current one (96 registers).

#include "common.cuh"

namespace lx2v {
namespace {

constexpr float kFp8Max = 448.f;       // largest finite float8_e4m3fn
constexpr float kFp8MinAmax = 1e-12f;  // keeps an all-zero row's scale finite

// V values · mult → V e4m3 codes, in one 4- or 8-byte store.
template <int V>
__device__ __forceinline__ void store_e4m3(uint8_t* p, const float* h, float mult) {
  static_assert(V == 4 || V == 8, "chunks of 4 (fp32 input) or 8 (16-bit input) values");
  uint32_t w[V / 4];
#pragma unroll
  for (int i = 0; i < V / 4; ++i) {
    const float* g = h + 4 * i;
    w[i] = uint32_t(to_e4m3x2(__fmul_rn(g[0], mult), __fmul_rn(g[1], mult))) |
           (uint32_t(to_e4m3x2(__fmul_rn(g[2], mult), __fmul_rn(g[3], mult))) << 16);
  }
  if constexpr (V == 4) {
    *reinterpret_cast<uint32_t*>(p) = w[0];
  } else {
    *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) adaln_fp8_kernel(const AdaLNFp8Args args) {
  constexpr int V = Chunk<T>::kElems;
  constexpr int C = Chunk<T>::kPerThread;
  const int chunks = args.dim / V;
  const float dim = static_cast<float>(args.dim);

  __shared__ float scratch[2][32];
  BlockAllReduce block_reduce(scratch);

  const int64_t rows = args.batch * args.tokens;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / args.tokens;
    const int64_t l = row - b * args.tokens;
    const T* x = static_cast<const T*>(args.x.data) + b * args.x.stride_b + l * args.x.stride_l;

    // The row in fp32, transformed in place: x → x − mean → h. (Keeping the loaded chunks
    // packed and h apart costs more registers: 96 instead of 61 for fp32 input on sm_90a.)
    float v[C][V];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int chunk = threadIdx.x + c * blockDim.x;
      if (chunk < chunks) unpack_chunk<T>(load_chunk_streaming(x + chunk * V), v[c]);
    }

    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (threadIdx.x + c * blockDim.x < chunks) {
#pragma unroll
        for (int i = 0; i < V; ++i) sum += v[c][i];
      }
    }
    const float mean = __fdiv_rn(block_reduce(sum, SumOp{}), dim);

    float sum_sq = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (threadIdx.x + c * blockDim.x < chunks) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          v[c][i] = __fsub_rn(v[c][i], mean);
          sum_sq = fmaf(v[c][i], v[c][i], sum_sq);
        }
      }
    }
    const float rstd = rsqrtf(__fdiv_rn(block_reduce(sum_sq, SumOp{}), dim) + args.eps);

    // h with the reference's roundings (no FMA contraction), so that h, and with it each
    // FP8 code, differs from the reference's only through the statistics.
    const float* shift = args.shift + b * args.shift_stride_b;
    const float* scale = args.scale + b * args.scale_stride_b;
    float amax = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int chunk = threadIdx.x + c * blockDim.x;
      if (chunk >= chunks) continue;
      float sh[V], sc[V];
      load_table<V>(shift + chunk * V, sh);
      load_table<V>(scale + chunk * V, sc);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float n = __fmul_rn(v[c][i], rstd);
        const float factor = args.affine ? sc[i] : __fadd_rn(1.f, sc[i]);
        v[c][i] = __fadd_rn(__fmul_rn(n, factor), sh[i]);
        amax = MaxOp{}(amax, fabsf(v[c][i]));
      }
    }
    amax = MaxOp{}(block_reduce(amax, MaxOp{}), kFp8MinAmax);  // clamp(min) keeping NaN

    // As torch evaluates the reference: `448 / amax` is reciprocal(amax) · 448, and
    // `amax / 448` a multiplication by fp32(1/448).
    const float mult = __fmul_rn(__frcp_rn(amax), kFp8Max);
    uint8_t* q = args.out + row * args.dim;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int chunk = threadIdx.x + c * blockDim.x;
      if (chunk < chunks) store_e4m3<V>(q + chunk * V, v[c], mult);
    }
    if (threadIdx.x == 0) args.out_scale[row] = __fmul_rn(amax, 1.f / kFp8Max);
  }
}

}  // namespace

cudaError_t adaln_fp8(const AdaLNFp8Args& args, cudaStream_t stream) {
  const int64_t rows = args.batch * args.tokens;
  if (rows == 0) return cudaSuccess;
  return with_type(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = adaln_fp8_kernel<T>;
    const int threads = row_threads(args.dim / Chunk<T>::kElems, Chunk<T>::kPerThread);
    kernel<<<resident_ctas(kernel, threads, rows), threads, 0, stream>>>(args);
    return cudaGetLastError();
  });
}

}  // namespace lx2v
