// 8-bit attention for Hopper (sm_90a) as a warp-specialised CUDA kernel: INT8 Q·Kᵀ and INT8
// P·V on the tensor cores (WGMMA), fp32 online softmax; the arithmetic of the Triton kernel
// `lx2v-int8-int8` (kernels/attention.py), organised as FlashAttention-3 does on Hopper.
//
// One CTA = 128 query rows of one (batch, head): three warpgroups. Warpgroup 0 is the
// producer: one thread streams Q once and then K and Vᵀ key blocks (128 keys, 16 KB each)
// into a ring of shared-memory stages with bulk copies (cp.async.bulk, completion counted
// on mbarriers); it gives its registers away (setmaxnreg 24). Warpgroups 1 and 2 each own
// 64 query rows and take 240 registers; both read the same K and V tiles, so a key block
// leaves L2 once per 128 query rows (the Triton kernel: once per 64).
//
// Per key block j a consumer warpgroup computes the softmax of S_j = Q·K_jᵀ, issues
// O_j = P_j·V_j and, behind it, S_{j+1}, both asynchronous, and adds O_j into its fp32
// accumulator while S_{j+1} runs. The two consumer warpgroups drift apart, so that one's
// softmax runs while the other's products keep the tensor cores busy.
//
// Numerics (as the Triton kernel's INT8 P·V path): S = q8·k8ᵀ exact in int32, with one
// scale s = scale_q·scale_k per (64 rows, 128 keys) block, rounded to 22 significant bits;
// p = exp2((S − S_max)·s) ∈ (0, 1] against the block's own row maximum, exactly 1 at the
// maximum; P8 = round(127·p) through fp16; O_block = P8·V8 exact in int32, added as
// acc = acc·exp2(m_old − m_new) + O_block·exp2(m_blk − m_new)/127. Row sums in fp32.
//
// The pre-pass (kernels/attention.py, layout "sm90") writes the operands the way the tensor
// cores read them from shared memory, so every load is one contiguous bulk copy:
// - q8 [B·H, Lq_pad, 128] and k8 [B·H, Lk_pad, 128] int8, the 16-byte chunk c of row r
//   stored at chunk c ^ (r mod 8) (the 128-byte swizzle);
// - vt8 [B·H, Lk_pad/128, 128 channels, 128 keys] int8: v transposed per key block, the keys
//   of each 32 in the order `kSwapKeys` below, chunks swizzled by channel mod 8.
// The key order makes the S accumulator's registers the P·V product's A operand without
// any exchange between threads: in the accumulator a thread holds keys 2t, 2t+1, 2t+8,
// 2t+9 (+16) of each 32 (t = lane mod 4); as an A operand it must hold positions
// 4t..4t+3 (+16). Position 4t+e holds key 2t+e for e < 2 and key 2t+6+e otherwise.

// Status (2026-11-28, H200, tools/proto_attn_sm90.py; docs/BENCHMARKS.md, "The CUDA kernel
// lands"): correct (≤ 4.4e-4 from the Triton kernel). The library's variant 10031 (3 stages,
// turn passed on issue, each block's P·V product added into fp32 during the next block's
// softmax) runs the main kernel at 789-802 TFLOP/s against the Triton kernel's 753-758;
// 750-787 with the pre-pass, against 730-746. Its timeline (10932): 2 623 cycles per key
// block, 1 316 of them in the softmax. Variants 210031 / 410031 / 810031 compute every
// 2nd / 4th / 8th exponential on the FMA pipe (ex2_poly; in the SASS the main loop grows
// from 703 instructions to 934 / 816 / 765 and the longest run of back-to-back MUFU.EX2
// drops from 41 to 1 / 26 / 22): all slower, 692 / 685 / 750 TFLOP/s against 791 for 10031
// in the same run (S = 32760, B = 1; 2026-11-28, sixth session). The softmax warpgroups
// are not waiting on the MUFU unit; the extra FMA-pipe instructions cost more than they
// free. The variants stay for the record (tools/proto_attn_sm90.py builds them).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "attn_int8_sm90.h"

namespace lx2v {
namespace attn_sm90 {

constexpr int kD = 128;             // head dim
constexpr int kBlockN = 128;        // keys per block
constexpr int kBlockM = 128;        // query rows per CTA
constexpr int kRowsWG = 64;         // query rows per consumer warpgroup
constexpr int kThreads = 384;       // producer + two consumer warpgroups
constexpr int kTile = kBlockN * kD; // bytes of one K or Vᵀ tile (int8)
constexpr int kMagicI = 0x4B400000; // bit pattern of 1.5·2²³
constexpr float kMagicF = 12582912.0f;

using Params = AttnInt8Params;

// clock64 after the given registers are computed (prototype timeline, variant 9xx)
__device__ __forceinline__ long long stamp(uint32_t a, uint32_t b) {
  long long t;
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(t) : "r"(a), "r"(b) : "memory");
  return t;
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}

__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// One contiguous global → shared copy by the bulk-copy engine; its bytes count on bar.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Named barriers 1 and 2 order the two consumer warpgroups' matrix products (ping-pong):
// a warpgroup waits for its turn (bar.sync on its own barrier, completed by the other
// warpgroup's bar.arrive), issues its products, then passes the turn on.
__device__ __forceinline__ void turn_wait(int cw) {
  asm volatile("bar.sync %0, 256;" ::"r"(1 + cw) : "memory");
}
__device__ __forceinline__ void turn_pass(int cw) {
  asm volatile("bar.arrive %0, 256;" ::"r"(2 - cw) : "memory");
}

// Keeps the compiler from moving reads or writes of a WGMMA accumulator across the
// asynchronous instructions that own it (it cannot see that they are asynchronous).
__device__ __forceinline__ void pin(int (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

// Shared-memory matrix descriptor: K-major operand, rows of 128 bytes, 128-byte swizzle,
// 8-row groups 1024 bytes apart (the tile base must be 1024-byte aligned).
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// exp2(x) for x ≤ 0 on the FMA and integer pipes instead of the MUFU unit (prototype
// variants with kPoly): x = j + f with j = round(x) (the 1.5·2²³ trick) and f ∈ [−½, ½];
// 2^f by a cubic with the constant term 1 (fitted here for relative error on [−½, ½]:
// at most 1.01e-4, exactly 1 at x = 0, as MUFU.EX2 is), then j added to the exponent field
// (the magic's bits vanish in the shift: 0x4B400000 << 23 = 0 in 32 bits). 8 instructions
// against one MUFU.EX2, which holds the unit for 8 cycles per warp; P is rounded to 1/127.
__device__ __forceinline__ float ex2_poly(float x) {
  x = fmaxf(x, -126.f);
  const float t = x + kMagicF;
  const float f = x - (t - kMagicF);
  const float p = fmaf(fmaf(fmaf(5.500869080e-02f, f, 2.422106266e-01f), f, 6.932829022e-01f),
                       f, 1.0f);
  return __uint_as_float(__float_as_uint(p) + (__float_as_uint(t) << 23));  // unsigned: no UB
}

// round(127·p) of four p ∈ [0, 1] as bytes 0..3 (the Triton kernel's _ROUND_I8X4).
__device__ __forceinline__ uint32_t round_i8x4(float p0, float p1, float p2, float p3) {
  uint32_t r;
  asm("{\n.reg .b32 h0, h1, k, c;\n"
      "mov.b32 k, 0x57F057F0;\n"
      "mov.b32 c, 0x64006400;\n"
      "cvt.rn.f16x2.f32 h0, %2, %1;\n"
      "cvt.rn.f16x2.f32 h1, %4, %3;\n"
      "fma.rn.f16x2 h0, h0, k, c;\n"
      "fma.rn.f16x2 h1, h1, k, c;\n"
      "prmt.b32 %0, h0, h1, 0x6420;\n}\n"
      : "=r"(r)
      : "f"(p0), "f"(p1), "f"(p2), "f"(p3));
  return r;
}

// s rounded to 22 significant bits, so that 1.5·2²³·s is exact in fp32.
__device__ __forceinline__ float round22(float s) {
  return __int_as_float((__float_as_int(s) + 2) & -4);
}

__device__ __forceinline__ void wgmma_ss(int (&d)[64], uint64_t da, uint64_t db, int acc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "l"(da), "l"(db), "r"(acc));
}

__device__ __forceinline__ void wgmma_rs(int (&d)[64], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint64_t db, int acc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(db), "r"(acc));
}

// Online softmax of one key block. S holds the block's int32 logits of two rows (r and
// r + 8 of this thread's quad) and leaves holding p as fp32 bits; m, l are the running
// maximum and this thread's share of the row sums; alpha and rs the factors that put this
// block's product on the running scale (acc = acc·alpha + O_block·rs).
// kChain > 0 (prototype variants x000): the exponentials go in groups of kChain values, and
// the first input of each group waits for the last exponential of the group before it (an
// FMA with 0·p, exact for finite p), so that ptxas cannot issue all 64 MUFU.EX2 back to back
// (it does otherwise, and the warp then issues nothing else for ~512 cycles).
// kExp = kChain + 100·kPoly; kPoly > 0 (prototype variants x00000): every kPoly-th
// exponential by ex2_poly on the FMA pipe, the rest on the MUFU unit.
template <bool kMasked, int kExp = 0>
__device__ __forceinline__ void softmax_block(int (&S)[64], float sc, int col0, int Lk,
                                              float (&m)[2], float (&l)[2], float (&alpha)[2],
                                              float (&rs)[2]) {
  constexpr int kChain = kExp % 100, kPoly = kExp / 100;
  if (kMasked) {
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      if (col0 + 8 * (i >> 2) + (i & 1) >= Lk) S[i] = -(1 << 30);
    }
  }
  int mx[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    int a = max(S[2 * r], S[2 * r + 1]), b = max(S[4 + 2 * r], S[5 + 2 * r]);
#pragma unroll
    for (int g = 2; g < 16; g += 2) {
      a = __vimax3_s32(a, S[4 * g + 2 * r], S[4 * g + 2 * r + 1]);
      b = __vimax3_s32(b, S[4 * g + 4 + 2 * r], S[4 * g + 5 + 2 * r]);
    }
    a = max(a, b);
    a = max(a, __shfl_xor_sync(0xffffffffu, a, 1));
    mx[r] = max(a, __shfl_xor_sync(0xffffffffu, a, 2));
  }
  // p = exp2((S − S_max)·s): 1.5·2²³ + (S − S_max) read as a float (exact: |S − S_max| < 2²²)
  // and one FMA with the exact −1.5·2²³·s, so p is exactly 1 at the row maximum.
  const float nc = -kMagicF * sc;
  float sum[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
  float last = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    const int r = (i >> 1) & 1;
    float x = fmaf(__int_as_float(S[i] + (kMagicI - mx[r])), sc, nc);
    if constexpr (kChain > 0) {
      if (i % kChain == 0 && i > 0) x = fmaf(last, 0.f, x);
    }
    float pv;
    if constexpr (kPoly > 0) {
      pv = i % kPoly == kPoly - 1 ? ex2_poly(x) : ex2(x);
    } else {
      pv = ex2(x);
    }
    if constexpr (kChain > 0) {
      if (i % kChain == kChain - 1) last = pv;
    }
    if (kMasked && col0 + 8 * (i >> 2) + (i & 1) >= Lk) pv = 0.f;
    S[i] = __float_as_int(pv);
    sum[r][(i >> 2) & 1] += pv;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float mb = static_cast<float>(mx[r]) * sc;
    const float mn = fmaxf(m[r], mb);
    alpha[r] = ex2(m[r] - mn);
    const float w = ex2(mb - mn);
    l[r] = l[r] * alpha[r] + (sum[r][0] + sum[r][1]) * w;
    m[r] = mn;
    rs[r] = w * (1.0f / 127.0f);
  }
}

// acc = acc·alpha + O·rs for one block's exact int32 product O: 1.5·2²³ + O read as a float,
// then (x − 1.5·2²³)·rs as one FMA against −1.5·2²³·rs (as the Triton kernel).
__device__ __forceinline__ void add_block(float (&acc)[64], const int (&O)[64],
                                          const float (&alpha)[2], const float (&rs)[2]) {
  const float c0 = -kMagicF * rs[0], c1 = -kMagicF * rs[1];
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    const bool r = (i >> 1) & 1;
    const float x = __int_as_float(O[i] + kMagicI);
    acc[i] = fmaf(acc[i], r ? alpha[1] : alpha[0], fmaf(x, r ? rs[1] : rs[0], r ? c1 : c0));
  }
}

// p (fp32 bits in S) → round(127·p) in the A-operand registers of the P·V product: for key
// slice i (32 keys), registers 4i..4i+3 = (row r, positions 4t..4t+3), (row r + 8, the
// same), (row r, 16 + 4t..), (row r + 8, 16 + 4t..), with the key order of the header.
__device__ __forceinline__ void pack_p(const int (&S)[64], uint32_t (&P)[16]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int b = 16 * i;
#define LX2V_F(x) __int_as_float(S[b + (x)])
    P[4 * i + 0] = round_i8x4(LX2V_F(0), LX2V_F(1), LX2V_F(4), LX2V_F(5));
    P[4 * i + 1] = round_i8x4(LX2V_F(2), LX2V_F(3), LX2V_F(6), LX2V_F(7));
    P[4 * i + 2] = round_i8x4(LX2V_F(8), LX2V_F(9), LX2V_F(12), LX2V_F(13));
    P[4 * i + 3] = round_i8x4(LX2V_F(10), LX2V_F(11), LX2V_F(14), LX2V_F(15));
#undef LX2V_F
  }
}

__device__ __forceinline__ void pin16(uint32_t (&P)[16]) {
#pragma unroll
  for (int i = 0; i < 16; ++i) asm volatile("" : "+r"(P[i])::"memory");
}

struct Bars {
  uint32_t base;
  int stages;
  __device__ uint32_t q() const { return base; }
  __device__ uint32_t full_k(int s) const { return base + 8 * (1 + s); }
  __device__ uint32_t full_v(int s) const { return base + 8 * (1 + stages + s); }
  __device__ uint32_t empty_k(int s) const { return base + 8 * (1 + 2 * stages + s); }
  __device__ uint32_t empty_v(int s) const { return base + 8 * (1 + 3 * stages + s); }
};

__device__ __forceinline__ void qk_issue(int (&S)[64], uint64_t dq, uint32_t k_tile) {
  const uint64_t dk = smem_desc(k_tile);
#pragma unroll
  for (int i = 0; i < 4; ++i) wgmma_ss(S, dq + 2 * i, dk + 2 * i, i);
}

__device__ __forceinline__ void pv_issue(int (&O)[64], const uint32_t (&P)[16], uint32_t v_tile) {
  const uint64_t dv = smem_desc(v_tile);
#pragma unroll
  for (int i = 0; i < 4; ++i) wgmma_rs(O, P[4 * i], P[4 * i + 1], P[4 * i + 2], P[4 * i + 3], dv + 2 * i, i);
}

template <typename OutT>
__device__ __forceinline__ OutT to_out(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half to_out<__half>(float x) {
  return __float2half_rn(x);
}

template <typename OutT, int kStages, int kPingPong, int kAblate, int kChain, int kDefer>
__device__ __forceinline__ void consumer(const Params& p, const Bars& bars, int cw, int t,
                                         uint32_t sQ, uint32_t sK, uint32_t sV, int mblk, int bh,
                                         int nblk) {
  const int warp = t / 32, lane = t % 32, q4 = lane % 4;
  const float qsc = p.qs[static_cast<int64_t>(bh) * (p.Lq_pad / kRowsWG) + mblk * 2 + cw];
  const float* ksp = p.ks + static_cast<int64_t>(bh) * (p.Lk_pad / kBlockN);
  const uint64_t dq = smem_desc(sQ + cw * kRowsWG * kD);
  const bool partial = (p.Lk % kBlockN) != 0;
  int S[64], O[64];
  uint32_t P[16];
  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, alpha[2] = {0.f, 0.f}, rs[2] = {0.f, 0.f};

  mbar_wait(bars.q(), 0);
  mbar_wait(bars.full_k(0), 0);
  if (kPingPong) {
    if (cw == 1) turn_pass(cw);  // warpgroup 0 goes first
    turn_wait(cw);
  }
  wg_fence();
  qk_issue(S, dq, sK);
  wg_commit();
  if (kPingPong == 1) turn_pass(cw);
  wg_wait<0>();
  pin(S);
  if (kPingPong == 2) turn_pass(cw);
  if (lane == 0) mbar_arrive(bars.empty_k(0));

  // every block but the last: its softmax, then O_j and S_{j+1} in flight together
  const bool tr = kAblate == 9 && t == 0 && blockIdx.x == 7 && blockIdx.y == 0;
  int64_t* trc = tr ? p.trace + static_cast<int64_t>(cw) * nblk * 8 : nullptr;
  // Both loops below: once V_j and K_{j+1} are in and the turn is ours, issue P_j·V_j and
  // Q·K_{j+1} as two commit groups; the turn passes here when it passes on issue. (P_j comes
  // in as an argument: the lambda is defined before the loops first write P.)
  auto issue_pv_qk = [&](const int j, const int s, const int s1, const uint32_t (&Pj)[16]) {
    mbar_wait(bars.full_v(s), (j / kStages) & 1);
    mbar_wait(bars.full_k(s1), ((j + 1) / kStages) & 1);
    if (tr) trc[8 * j + 2] = stamp(Pj[0], Pj[15]);
    if (kPingPong) turn_wait(cw);
    if (tr) trc[8 * j + 3] = stamp(Pj[0], Pj[15]);
    wg_fence();
    pv_issue(O, Pj, sV + s * kTile);
    wg_commit();
    qk_issue(S, dq, sK + s1 * kTile);
    wg_commit();
    if (tr) trc[8 * j + 4] = stamp(Pj[0], Pj[15]);
    if (kPingPong == 1) turn_pass(cw);
  };
  // kDefer: O_{j-1} is added into the accumulator during block j's softmax (filling the
  // gaps between its exponentials), not between issuing O_j and waiting for S_{j+1}. The
  // first block has no O pending: peeled off, so that the loop body is one basic block and
  // ptxas can interleave the two.
  auto defer_step = [&](const int j, auto first_tag) {
    constexpr bool kFirst = decltype(first_tag)::value;
    const int s = j % kStages, s1 = (j + 1) % kStages;
    if (tr) trc[8 * j + 0] = stamp(S[0], S[63]);
    const float ap[2] = {alpha[0], alpha[1]}, rp[2] = {rs[0], rs[1]};
    softmax_block<false, kChain>(S, round22(qsc * ksp[j]), 0, 0, m, l, alpha, rs);
    if constexpr (!kFirst) add_block(acc, O, ap, rp);
    pack_p(S, P);
    if (tr) trc[8 * j + 1] = stamp(P[0], __float_as_uint(acc[63]));
    issue_pv_qk(j, s, s1, P);
    wg_wait<1>();
    pin(O);
    if (tr) trc[8 * j + 5] = stamp(O[0], O[63]);
    if (tr) trc[8 * j + 6] = trc[8 * j + 5];
    wg_wait<0>();
    pin(S);
    pin16(P);
    if (tr) trc[8 * j + 7] = stamp(S[0], S[63]);
    if (kPingPong == 2) turn_pass(cw);
    if (lane == 0) {
      mbar_arrive(bars.empty_v(s));
      mbar_arrive(bars.empty_k(s1));
    }
  };
  if (kDefer && nblk > 1) {
    defer_step(0, std::true_type{});
    for (int j = 1; j < nblk - 1; ++j) defer_step(j, std::false_type{});
  }
  for (int j = 0; j < nblk - 1 && !kDefer; ++j) {
    const int s = j % kStages, s1 = (j + 1) % kStages;
    if (tr) trc[8 * j + 0] = stamp(S[0], S[63]);
    if (kAblate != 1) {
      softmax_block<false, kChain>(S, round22(qsc * ksp[j]), 0, 0, m, l, alpha, rs);
      pack_p(S, P);
    }
    if (tr) trc[8 * j + 1] = stamp(P[0], P[15]);
    issue_pv_qk(j, s, s1, P);
    wg_wait<1>();
    pin(O);
    pin16(P);
    if (tr) trc[8 * j + 5] = stamp(O[0], O[63]);
    if (lane == 0) mbar_arrive(bars.empty_v(s));
    if (kAblate != 2) add_block(acc, O, alpha, rs);
    if (tr) trc[8 * j + 6] = stamp(__float_as_uint(acc[0]), __float_as_uint(acc[63]));
    wg_wait<0>();
    pin(S);
    if (tr) trc[8 * j + 7] = stamp(S[0], S[63]);
    if (kPingPong == 2) turn_pass(cw);
    if (lane == 0) mbar_arrive(bars.empty_k(s1));
  }
  {  // the last block, whose keys past Lk are masked
    const int j = nblk - 1, s = j % kStages;
    const float sc = round22(qsc * ksp[j]);
    const float ap[2] = {alpha[0], alpha[1]}, rp[2] = {rs[0], rs[1]};
    if (partial) {
      softmax_block<true, kChain>(S, sc, kBlockN * j + 2 * q4, p.Lk, m, l, alpha, rs);
    } else {
      softmax_block<false, kChain>(S, sc, 0, 0, m, l, alpha, rs);
    }
    if (kDefer && nblk > 1) add_block(acc, O, ap, rp);
    pack_p(S, P);
    mbar_wait(bars.full_v(s), (j / kStages) & 1);
    if (kPingPong) turn_wait(cw);
    wg_fence();
    pv_issue(O, P, sV + s * kTile);
    wg_commit();
    if (kPingPong == 1 && cw == 0) turn_pass(cw);  // warpgroup 1 issues last
    wg_wait<0>();
    pin(O);
    pin16(P);
    if (kPingPong == 2 && cw == 0) turn_pass(cw);
    add_block(acc, O, alpha, rs);
  }

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float x = l[r];
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    inv[r] = 1.0f / x;
  }
  const int b = bh / p.H, h = bh % p.H;
  const int row0 = mblk * kBlockM + cw * kRowsWG + 16 * warp + lane / 4;
  const float* vs = p.vscale + static_cast<int64_t>(bh) * kD;
  const float* vm = p.vmean + static_cast<int64_t>(bh) * kD;
  OutT* out = static_cast<OutT*>(p.out);
#pragma unroll
  for (int g = 0; g < 16; ++g) {
    const int col = 8 * g + 2 * q4;
    const float vs0 = vs[col], vs1 = vs[col + 1], vm0 = vm[col], vm1 = vm[col + 1];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + 8 * r;
      if (row < p.Lq) {
        const float o0 = fmaf(acc[4 * g + 2 * r] * inv[r], vs0, vm0);
        const float o1 = fmaf(acc[4 * g + 2 * r + 1] * inv[r], vs1, vm1);
        OutT pair[2] = {to_out<OutT>(o0), to_out<OutT>(o1)};
        OutT* dst = out + ((static_cast<int64_t>(b) * p.Lq + row) * p.H + h) * kD + col;
        *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<uint32_t*>(pair);
      }
    }
  }
}

template <typename OutT, int kStages, int kPingPong, int kAblate, int kChain, int kDefer>
__global__ void __launch_bounds__(kThreads, 1) attn_int8_kernel(const __grid_constant__ Params p) {
  extern __shared__ uint8_t smem_raw[];
  __shared__ __align__(8) uint64_t bar_mem[1 + 4 * kStages];
  const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;
  const uint32_t sQ = base, sK = base + kBlockM * kD, sV = sK + kStages * kTile;
  const Bars bars{smem_u32(bar_mem), kStages};
  const int tid = threadIdx.x, wg = tid / 128;
  const int mblk = blockIdx.x, bh = blockIdx.y;
  const int nblk = (p.Lk + kBlockN - 1) / kBlockN;
  if (tid == 0) {
    mbar_init(bars.q(), 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(bars.full_k(s), 1);
      mbar_init(bars.full_v(s), 1);
      mbar_init(bars.empty_k(s), 8);  // lane 0 of each consumer warp
      mbar_init(bars.empty_v(s), 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
    if (tid == 0) {
      mbar_expect_tx(bars.q(), kBlockM * kD);
      bulk_load(sQ, p.q8 + (static_cast<int64_t>(bh) * p.Lq_pad + mblk * kBlockM) * kD,
                kBlockM * kD, bars.q());
      const int8_t* kp = p.k8 + static_cast<int64_t>(bh) * p.Lk_pad * kD;
      const int8_t* vp = p.vt8 + static_cast<int64_t>(bh) * p.Lk_pad * kD;
      for (int j = 0; j < nblk; ++j) {
        const int s = j % kStages;
        const int round = j / kStages;
        if (round > 0) mbar_wait(bars.empty_k(s), (round - 1) & 1);
        mbar_expect_tx(bars.full_k(s), kTile);
        bulk_load(sK + s * kTile, kp + static_cast<int64_t>(j) * kTile, kTile, bars.full_k(s));
        if (round > 0) mbar_wait(bars.empty_v(s), (round - 1) & 1);
        mbar_expect_tx(bars.full_v(s), kTile);
        bulk_load(sV + s * kTile, vp + static_cast<int64_t>(j) * kTile, kTile, bars.full_v(s));
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    consumer<OutT, kStages, kPingPong, kAblate, kChain, kDefer>(p, bars, wg - 1, tid % 128, sQ, sK, sV, mblk, bh, nblk);
  }
}

constexpr size_t smem_bytes(int stages) {
  return static_cast<size_t>(kBlockM) * kD + static_cast<size_t>(stages) * 2 * kTile + 1024;
}

template <typename OutT, int kStages, int kPingPong, int kAblate = 0, int kChain = 0, int kDefer = 0>
cudaError_t launch_t(const Params& p, int BH, cudaStream_t stream) {
  auto kernel = attn_int8_kernel<OutT, kStages, kPingPong, kAblate, kChain, kDefer>;
  const size_t smem = smem_bytes(kStages);
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(p.Lq_pad / kBlockM, BH);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace attn_sm90

// out [B, Lq, H, 128] (bf16 if !fp16, else fp16) from the pre-pass's operands. variant:
// 100000·kPoly (every kPoly-th exponential on the FMA pipe, 0 = none) + 10000·kDefer (O_j
// added during the next block's softmax) + 1000·exponential group (kChain, 0 = none) +
// 100·ablation (prototypes: 1 no softmax, 2 no accumulation, 9 timeline) + 10·stages +
// ping-pong (0: none; 1: the turn passes when a warpgroup has issued its products; 2: when
// they have completed). The library builds kAttnSm90Variant (attn_int8_sm90.h); prototypes
// (LX2V_ATTN_STANDALONE) build the list below or LX2V_ATTN_VARIANTS.
#ifdef LX2V_ATTN_STANDALONE
#ifndef LX2V_ATTN_VARIANTS
#define LX2V_ATTN_VARIANTS \
  X(10031) X(210031) X(410031) X(810031) X(10032) X(10932) X(410932)
#endif
#else
#define LX2V_ATTN_VARIANTS X(kAttnSm90Variant)
#endif
cudaError_t attn_int8_sm90(const AttnInt8Params& p, int BH, bool fp16, int variant,
                           cudaStream_t stream) {
  using namespace attn_sm90;
#define LX2V_ARGS(V) \
  V / 10 % 10, V % 10, V / 100 % 10, V / 1000 % 10 + 100 * (V / 100000 % 10), V / 10000 % 10
#ifdef LX2V_ATTN_STANDALONE  // prototypes: bf16 only, for a shorter build
#define X(V) \
  case V:    \
    return fp16 ? cudaErrorInvalidValue : launch_t<__nv_bfloat16, LX2V_ARGS(V)>(p, BH, stream);
#else
#define X(V) \
  case V:    \
    return fp16 ? launch_t<__half, LX2V_ARGS(V)>(p, BH, stream) : launch_t<__nv_bfloat16, LX2V_ARGS(V)>(p, BH, stream);
#endif
  switch (variant) {
    LX2V_ATTN_VARIANTS
    default:
      return cudaErrorInvalidValue;
  }
#undef X
#undef LX2V_ARGS
}

}  // namespace lx2v
