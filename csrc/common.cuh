// Device helpers of the row kernels: 16-byte chunk loads/stores, fp32 conversions, block
// all-reductions, and the launch geometry they share.
//
// Written against torch's nvcc flags (-D__CUDA_NO_HALF_CONVERSIONS__ and friends): every
// conversion is an explicit intrinsic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

#include "ops.h"

namespace lx2v {

// ---------------------------------------------------------------------------------------
// conversions

template <typename T>
__device__ __forceinline__ float2 to_float2(uint32_t packed);

template <>
__device__ __forceinline__ float2 to_float2<__nv_bfloat16>(uint32_t packed) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&packed));
}

template <>
__device__ __forceinline__ float2 to_float2<__half>(uint32_t packed) {
  return __half22float2(*reinterpret_cast<const __half2*>(&packed));
}

// Two fp32 values rounded to nearest even into one packed pair (one cvt instruction).
template <typename T>
__device__ __forceinline__ uint32_t from_float2(float a, float b);

template <>
__device__ __forceinline__ uint32_t from_float2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t from_float2<__half>(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Two fp32 values → two float8_e4m3fn codes, round to nearest even. SATFINITE maps
// |v| > 448 (and ±inf) to ±448 like torch's clamp before the cast, and keeps NaN a NaN.
__device__ __forceinline__ uint16_t to_e4m3x2(float a, float b) {
  return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
}

// ---------------------------------------------------------------------------------------
// 16-byte chunks of a row

template <typename T>
struct Chunk {
  static constexpr int kElems = 16 / sizeof(T);                   // values per chunk
  static constexpr int kPerThread = kValuesPerThread / kElems;  // chunks per thread
};

// Loads one chunk of a row that is read exactly once: ld.global.cs (evict-first) keeps the
// streamed activations from evicting the small tables (weights, rope angles, modulation)
// that every CTA re-reads from L1. The chunk comes back packed, so a kernel can hold it so
// (8 bf16 in 4 registers, not 8) until used; which layout needs fewer registers in the end
// is ptxas's call, measured per kernel (see csrc/ops.h).
__device__ __forceinline__ uint4 load_chunk_streaming(const void* p) {
  return __ldcs(reinterpret_cast<const uint4*>(p));
}

// The kElems values of a loaded chunk, in fp32.
template <typename T>
__device__ __forceinline__ void unpack_chunk(const uint4& raw, float* out) {
  if constexpr (sizeof(T) == 4) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  } else {
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = to_float2<T>(w[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
}

// Stores one chunk (kElems values) rounded to T.
template <typename T>
__device__ __forceinline__ void store_chunk(T* p, const float* v) {
  uint4 raw;
  if constexpr (sizeof(T) == 4) {
    raw = make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                     __float_as_uint(v[3]));
  } else {
    raw = make_uint4(from_float2<T>(v[0], v[1]), from_float2<T>(v[2], v[3]),
                     from_float2<T>(v[4], v[5]), from_float2<T>(v[6], v[7]));
  }
  *reinterpret_cast<uint4*>(p) = raw;
}

// Loads N fp32 values of a small table that many CTAs share (read-only path, L1-cached).
// p must be aligned to min(16, 4·N) bytes.
template <int N>
__device__ __forceinline__ void load_table(const float* p, float* out) {
  static_assert(N == 2 || N % 4 == 0, "table loads come in float2 or float4");
  if constexpr (N == 2) {
    const float2 v = __ldg(reinterpret_cast<const float2*>(p));
    out[0] = v.x;
    out[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(p + i));
      out[i] = v.x;
      out[i + 1] = v.y;
      out[i + 2] = v.z;
      out[i + 3] = v.w;
    }
  }
}

// ---------------------------------------------------------------------------------------
// reductions

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// max that propagates NaN like torch.amax (fmaxf would drop it).
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const {
    return (a > b || a != a) ? a : b;
  }
};

// Butterfly over the warp: every lane ends with the same value, bit for bit.
template <typename Op>
__device__ __forceinline__ float warp_all_reduce(float v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// All-reduce over a CTA whose size is a multiple of 32: every thread gets the same result,
// after one __syncthreads. Idle lanes must pass 0 (the identity of a sum and of a max of
// absolute values). Two scratch rows are used in turn: a warp that runs ahead into the next
// reduction writes the other row, and cannot reach this row again before every warp has
// passed the next reduction's barrier, i.e. finished reading this one.
class BlockAllReduce {
 public:
  __device__ explicit BlockAllReduce(float (*scratch)[32]) : scratch_(scratch) {}

  template <typename Op>
  __device__ __forceinline__ float operator()(float v, Op op) {
    v = warp_all_reduce(v, op);
    const int warps = blockDim.x >> 5;
    if (warps == 1) return v;
    float* partial = scratch_[turn_];
    turn_ ^= 1;
    const int lane = threadIdx.x & 31;
    if (lane == 0) partial[threadIdx.x >> 5] = v;
    __syncthreads();
    return warp_all_reduce(lane < warps ? partial[lane] : 0.f, op);
  }

 private:
  float (*scratch_)[32];
  int turn_ = 0;
};

// ---------------------------------------------------------------------------------------
// launch geometry

// Threads for a row of `chunks` chunks at `per_thread` chunks each, a whole number of warps.
inline int row_threads(int64_t chunks, int per_thread) {
  const int64_t t = (chunks + per_thread - 1) / per_thread;
  return static_cast<int>((t + 31) / 32 * 32);
}

// CTAs to launch for `rows` rows: as many as the GPU keeps resident at once, never more than
// there are rows. Each CTA walks rows with a grid stride, so the whole op is one wave with
// no CTA launched or retired per row, and the tail is at most one row per CTA. The
// occupancy query is a driver call, so its answer is kept per (device, kernel, threads).
template <typename Kernel>
inline int resident_ctas(Kernel kernel, int threads, int64_t rows) {
  struct Entry {
    int device;
    const void* kernel;
    int threads;
    int64_t resident;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;
  int device = 0;
  cudaGetDevice(&device);
  const void* key = reinterpret_cast<const void*>(kernel);
  int64_t resident = 0;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    for (const Entry& e : cache) {
      if (e.device == device && e.kernel == key && e.threads == threads) resident = e.resident;
    }
  }
  if (resident == 0) {
    int sms = 1, per_sm = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0) !=
        cudaSuccess) {
      // e.g. no kernel image for this GPU: the launch fails the same way and reports it
      return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, sms)));
    }
    resident = static_cast<int64_t>(std::max(per_sm, 1)) * sms;
    const std::lock_guard<std::mutex> lock(mutex);
    cache.push_back({device, key, threads, resident});
  }
  return static_cast<int>(std::max<int64_t>(1, std::min(rows, resident)));
}

// Calls f(T{}) with the C++ type of `t`.
template <typename F>
inline cudaError_t with_type(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32:
      return f(float{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
    case DType::kFloat16:
      return f(__half{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace lx2v
