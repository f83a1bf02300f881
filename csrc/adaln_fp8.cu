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
// What limits it (Nsight Compute, H200, 2026-11-28): instruction issue as much as memory.
// The generic kernel issued 30 instructions per value and kept the issue slots 62% busy;
// at D = 5120 the specialised kernel (no bounds checks, constant chunk offsets, no 64-bit
// division per row, a one-instruction NaN-propagating max, four partial sums per thread)
// runs at 82% of copy instead of 77% (as first profiled, before the partial sums and with
// registers capped at 64, it issued 37% fewer instructions).
//
// Tried and measured slower on an H200 (docs/BENCHMARKS.md): one reduction for both
// moments about a pivot (also wrong on rows whose first channel is an outlier), loads with
// an L2 prefetch hint, double-buffering the next row through shared memory (cp.async), a
// bulk L2 prefetch (cp.async.bulk.prefetch) of the CTA's next row or the one after it, a
// ring of two row buffers in shared memory filled by one bulk (TMA) copy per row, and
// loading the next row into registers before reducing the current one (96 registers);
// capping registers at 64 for six CTAs per SM (spills; 80%), and requesting the first
// chunk's shift and scale before the variance's barrier (no gain).

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

// |h| folded into a running max that propagates NaN like torch.amax: one FMNMX.NAN
// (max.NaN, sm_80+) where MaxOp takes a compare and a select.
__device__ __forceinline__ float max_abs_nan(float acc, float h) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(acc), "f"(fabsf(h)));
  return r;
#else
  return MaxOp{}(acc, fabsf(h));
#endif
}

// __launch_bounds__ of a kernel of kThreads threads (0: any up to kMaxThreads): at most 80
// registers per thread, five 160-thread CTAs per SM. (Capped at 64 for six CTAs, ptxas
// spills 12 bytes and the kernel ran at 80% of copy instead of 82% on an H200.)
constexpr int max_threads(int threads) { return threads > 0 ? threads : kMaxThreads; }
constexpr int min_ctas(int threads) { return threads > 0 ? 65536 / (80 * threads) : 1; }

// kThreads == 0: any D (a multiple of the chunk size), blockDim.x threads, chunks past the
// row's end skipped. kThreads > 0: D is exactly kThreads · 32 values (5120 at 160 threads,
// the 14B model's width), so no chunk is checked and every chunk's offset is a constant.
// The profile of the generic kernel at D = 5120 on an H200 (ncu, docs/BENCHMARKS.md)
// showed issue slots 62% busy at 30 instructions per value: bounds checks, per-chunk
// address arithmetic and a 64-bit division per row were a third of them.
template <typename T, int kThreads>
__global__ void __launch_bounds__(max_threads(kThreads), min_ctas(kThreads))
    adaln_fp8_kernel(const AdaLNFp8Args args) {
  constexpr int V = Chunk<T>::kElems;
  constexpr int C = Chunk<T>::kPerThread;
  const int threads = kThreads > 0 ? kThreads : static_cast<int>(blockDim.x);
  const int chunks = args.dim / V;
  const float dim = static_cast<float>(args.dim);
  auto active = [&](int c) { return kThreads > 0 || threadIdx.x + c * threads < chunks; };

  __shared__ float scratch[2][32];
  BlockAllReduce block_reduce(scratch);

  // (b, l) of the row, advanced by the grid stride split once into whole batch rows and a
  // remainder, instead of a 64-bit division per row. Row indices are 32-bit: the launcher
  // checks that B·L fits.
  const int rows = static_cast<int>(args.batch * args.tokens);
  const int tokens = static_cast<int>(args.tokens);
  const int step_b = static_cast<int>(gridDim.x) / tokens;
  const int step_l = static_cast<int>(gridDim.x) - step_b * tokens;
  int b = static_cast<int>(blockIdx.x) / tokens;
  int l = static_cast<int>(blockIdx.x) - b * tokens;
  for (int row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(args.x.data) + b * args.x.stride_b +
                 l * args.x.stride_l + threadIdx.x * V;

    // The row in fp32, transformed in place: x → x − mean → h. (Keeping the loaded chunks
    // packed and h apart cost more registers: 96 instead of 61 for the generic kernel with
    // fp32 input on sm_90a.)
    float v[C][V];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (active(c)) unpack_chunk<T>(load_chunk_streaming(x + c * threads * V), v[c]);
    }

    // Four partial sums per thread (value i of each chunk into part[i % 4]): dependency
    // chains of 8 additions instead of 32.
    float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (active(c)) {
#pragma unroll
        for (int i = 0; i < V; ++i) part[i % 4] += v[c][i];
      }
    }
    const float mean =
        __fdiv_rn(block_reduce((part[0] + part[1]) + (part[2] + part[3]), SumOp{}), dim);

#pragma unroll
    for (int i = 0; i < 4; ++i) part[i] = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (active(c)) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          v[c][i] = __fsub_rn(v[c][i], mean);
          part[i % 4] = fmaf(v[c][i], v[c][i], part[i % 4]);
        }
      }
    }
    const float sum_sq = (part[0] + part[1]) + (part[2] + part[3]);
    const float rstd = rsqrtf(__fdiv_rn(block_reduce(sum_sq, SumOp{}), dim) + args.eps);

    // h with the reference's roundings (no FMA contraction), so that h, and with it each
    // FP8 code, differs from the reference's only through the statistics.
    const float* shift = args.shift + b * args.shift_stride_b + threadIdx.x * V;
    const float* scale = args.scale + b * args.scale_stride_b + threadIdx.x * V;
    float amaxs[2] = {0.f, 0.f};
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (!active(c)) continue;
      float sh[V], sc[V];
      load_table<V>(shift + c * threads * V, sh);
      load_table<V>(scale + c * threads * V, sc);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float n = __fmul_rn(v[c][i], rstd);
        const float factor = args.affine ? sc[i] : __fadd_rn(1.f, sc[i]);
        v[c][i] = __fadd_rn(__fmul_rn(n, factor), sh[i]);
        amaxs[i % 2] = max_abs_nan(amaxs[i % 2], v[c][i]);
      }
    }
    float amax = MaxOp{}(amaxs[0], amaxs[1]);
    amax = MaxOp{}(block_reduce(amax, MaxOp{}), kFp8MinAmax);  // clamp(min) keeping NaN

    // As torch evaluates the reference: `448 / amax` is reciprocal(amax) · 448, and
    // `amax / 448` a multiplication by fp32(1/448).
    const float mult = __fmul_rn(__frcp_rn(amax), kFp8Max);
    uint8_t* q = args.out + static_cast<int64_t>(row) * args.dim + threadIdx.x * V;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (active(c)) store_e4m3<V>(q + c * threads * V, v[c], mult);
    }
    if (threadIdx.x == 0) args.out_scale[row] = __fmul_rn(amax, 1.f / kFp8Max);

    b += step_b;
    l += step_l;
    if (l >= tokens) {
      l -= tokens;
      ++b;
    }
  }
}

}  // namespace

cudaError_t adaln_fp8(const AdaLNFp8Args& args, cudaStream_t stream) {
  const int64_t rows = args.batch * args.tokens;
  if (rows == 0) return cudaSuccess;
  if (rows > INT32_MAX - 65536) return cudaErrorInvalidValue;  // the kernel counts rows in int
  return with_type(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kWide = 5120 / kValuesPerThread;  // the 14B model's rows: 160 threads
    auto* kernel = args.dim == kWide * kValuesPerThread ? adaln_fp8_kernel<T, kWide>
                                                        : adaln_fp8_kernel<T, 0>;
    const int threads = row_threads(args.dim / Chunk<T>::kElems, Chunk<T>::kPerThread);
    kernel<<<resident_ctas(kernel, threads, rows), threads, 0, stream>>>(args);
    return cudaGetLastError();
  });
}

}  // namespace lx2v
