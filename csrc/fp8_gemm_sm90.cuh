// FP8 GEMM with fused epilogues for Hopper (sm_90a), built on CUTLASS 3.x collectives (the
// headers come from the `nvidia-cutlass` PyPI package; setup.py finds them).
//
//   y = (a · sa) @ (b · sb)ᵀ + bias          a [M, K] e4m3 row-major, sa [M] fp32 per token,
//                                              b [N, K] e4m3 row-major (K-major), sb [N] fp32
//                                              per channel, bias [N] bf16 (optional)
//   kBias      out = bf16(y)                                   [M, N] bf16
//   kGelu      out = bf16(gelu_tanh(y))                        [M, N] bf16 (FFN up-projection)
//   kResidual  res = res + gate · y   (fp32, in place)         [M, N] fp32 (attention output
//              and FFN down projections; gate [N] fp32, optional = 1)
//
// The definitions are in lightx2v/ops/gemm.py (`*_ref`). The epilogue works on the fp32
// accumulator: y is never rounded to bf16 before GELU or before it enters the residual.
//
// Kernel: TMA warp-specialized "ping-pong" schedule (two consumer warpgroups on alternate
// 128 × 128 tiles, so one's epilogue overlaps the other's MMAs), FP8 fast accumulation (the
// tensor-core accumulator without periodic fp32 promotion, as torch._scaled_mm with
// use_fast_accum=True, which is what FP8Linear calls), 2 × 1 thread-block clusters (the
// weight tile is multicast to both CTAs), persistent tile scheduler. The epilogue is an
// epilogue visitor tree (EVT): per-row and per-column vectors are broadcast from global
// memory, the residual is read with TMA (the "C" operand) and written back to the same place.
//
// Everything here compiles for sm_90a only: setup.py builds csrc/*_sm90.* into their own
// extension (lightx2v._C_sm90) with that single -gencode. One .cu per epilogue
// (fp8_gemm_{bias,gelu,residual}_sm90.cu), so that the three compile in parallel.

#pragma once

#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "fp8_gemm.h"

namespace lx2v {
namespace sm90 {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

using ElementAB = cutlass::float_e4m3_t;
using ElementAcc = float;
using BF16 = cutlass::bfloat16_t;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

// GELU with the tanh approximation, written as x · sigmoid(2u), u = √(2/π)(x + 0.044715x³):
// 0.5(1 + tanh(u)) = 1 / (1 + exp(−2u)) exactly, and this form does not cancel for negative
// x (1 + tanh(u) → 0 there, so tanh.approx's absolute error became a large relative one).
// __expf and __fdividef are fast-math (a few ulp); the output is rounded to bf16 anyway.
template <class T>
struct GeluTanh {
  CUTLASS_HOST_DEVICE float operator()(float x) const {
    constexpr float k0 = 0.7978845608028654f;  // √(2/π)
    constexpr float k1 = 0.044715f;
    const float u = k0 * fmaf(k1 * x, x * x, x);
#if defined(__CUDA_ARCH__)
    return __fdividef(x, 1.f + __expf(-2.f * u));
#else
    return x / (1.f + expf(-2.f * u));
#endif
  }
};

template <int N>
struct GeluTanh<cutlass::Array<float, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<float, N> operator()(
      cutlass::Array<float, N> const& x) const {
    cutlass::Array<float, N> y;
    GeluTanh<float> g;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = g(x[i]);
    return y;
  }
};

// The epilogue trees. Tile is the tile of one consumer warpgroup (the "CTA tile" of the
// visitor nodes).
template <class Tile, class Out>
struct Evt {
  using ScaleA = fusion::Sm90ColBroadcast<0, Tile, float, float, Stride<_1, _0, int64_t>>;
  using ScaleB = fusion::Sm90RowBroadcast<0, Tile, float, float, Stride<_0, _1, int64_t>>;
  using Bias = fusion::Sm90RowBroadcast<0, Tile, BF16, float, Stride<_0, _1, int64_t>>;
  using Gate = fusion::Sm90RowBroadcast<0, Tile, float, float, Stride<_0, _1, int64_t>>;

  // sb · acc
  using AccB = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>,
                               ScaleB, fusion::Sm90AccFetch>;
  // y = sa · (sb · acc) + bias, as Y_out
  template <class YOut>
  using Y = fusion::Sm90EVT<
      fusion::Sm90Compute<cutlass::homogeneous_multiply_add, YOut, float, kRound>, ScaleA, AccB,
      Bias>;

  using BiasTree = Y<Out>;
  using GeluTree =
      fusion::Sm90EVT<fusion::Sm90Compute<GeluTanh, Out, float, kRound>, Y<float>>;
  // res + gate · y
  using ResidualTree = fusion::Sm90EVT<
      fusion::Sm90Compute<cutlass::homogeneous_multiply_add, Out, float, kRound>, Gate, Y<float>,
      fusion::Sm90SrcFetch<float>>;
};

// Kernel configurations (Fp8GemmArgs::config). Tile is the tile of one consumer warpgroup
// for ping-pong and of the whole CTA (two warpgroups splitting it) for cooperative.
struct PingPong128x128 {  // config 0
  using Tile = Shape<_128, _128, _128>;
  using Cluster = Shape<_2, _1, _1>;
  using Mainloop = cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8FastAccum;
  using Epilogue = cutlass::epilogue::TmaWarpSpecialized;
};
// (A cooperative 256×128 tile, 2×1 cluster, was measured too and never won: 1–17% behind
// the best at each of the three Wan shapes, H200, 2026-11-27.)
struct Coop128x256 {  // config 1
  using Tile = Shape<_128, _256, _128>;
  using Cluster = Shape<_2, _1, _1>;
  using Mainloop = cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum;
  using Epilogue = cutlass::epilogue::TmaWarpSpecializedCooperative;
};

template <class Cfg, class ElementC, class ElementD, class Tree>
struct Gemm {
  using Tile = typename Cfg::Tile;
  using Cluster = typename Cfg::Cluster;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;  // b [N, K] row-major = [K, N] column-major
  using LayoutCD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16;  // 16 bytes of e4m3
  static constexpr int kAlignD = 16 / sizeof(ElementD);
  static constexpr int kAlignC = kAlignD;  // C, where present, has D's type

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float, ElementC, LayoutCD,
      kAlignC, ElementD, LayoutCD, kAlignD, typename Cfg::Epilogue, Tree>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, LayoutA, kAlignAB,
      ElementAB, LayoutB, kAlignAB, ElementAcc, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      typename Cfg::Mainloop>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop,
                                                      Epilogue, cutlass::gemm::PersistentScheduler>;
  using Adapter = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
  using StrideC = typename Kernel::StrideC;
  using StrideD = typename Kernel::StrideD;
};

// Runs one GEMM with the visitor arguments `tree_args`. ElementC void: no source operand.
// Returns nullptr, or what failed (a static string).
template <class G, class TreeArgs>
const char* run(const Fp8GemmArgs& p, const TreeArgs& tree_args, const void* c, void* d,
                cudaStream_t stream) {
  const int M = static_cast<int>(p.m), N = static_cast<int>(p.n), K = static_cast<int>(p.k);
  auto sa = cutlass::make_cute_packed_stride(typename G::StrideA{}, make_shape(M, K, 1));
  auto sb = cutlass::make_cute_packed_stride(typename G::StrideB{}, make_shape(N, K, 1));
  auto sc = cutlass::make_cute_packed_stride(typename G::StrideC{}, make_shape(M, N, 1));
  auto sd = cutlass::make_cute_packed_stride(typename G::StrideD{}, make_shape(M, N, 1));

  using ElementC = typename G::Kernel::ElementC;
  using ElementD = typename G::Kernel::ElementD;
  typename G::Adapter::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {static_cast<const ElementAB*>(p.a), sa, static_cast<const ElementAB*>(p.b), sb},
      {tree_args, static_cast<const ElementC*>(c), sc, static_cast<ElementD*>(d), sd}};
  args.hw_info.device_id = p.device;
  args.hw_info.sm_count = p.sm_count;
  using Raster = typename G::Kernel::TileScheduler::RasterOrderOptions;
  args.scheduler.max_swizzle_size = p.swizzle;
  args.scheduler.raster_order =
      p.raster == 1 ? Raster::AlongM : (p.raster == 2 ? Raster::AlongN : Raster::Heuristic);

  typename G::Adapter gemm;
  cutlass::Status status = gemm.can_implement(args);
  if (status != cutlass::Status::kSuccess) return cutlassGetStatusString(status);
  if (G::Adapter::get_workspace_size(args) > p.workspace_bytes) return "workspace too small";
  status = gemm.initialize(args, p.workspace, stream);
  if (status != cutlass::Status::kSuccess) return cutlassGetStatusString(status);
  status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess) return cutlassGetStatusString(status);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <class E, class YOut>
auto y_args(const Fp8GemmArgs& p) {
  using Y = typename E::template Y<YOut>;
  typename E::ScaleA::Arguments scale_a{p.a_scale, 0.f, {_1{}, _0{}, int64_t(0)}};
  typename E::ScaleB::Arguments scale_b{p.b_scale, 0.f, {_0{}, _1{}, int64_t(0)}};
  typename E::Bias::Arguments bias{static_cast<const BF16*>(p.bias), BF16(0.f),
                                   {_0{}, _1{}, int64_t(0)}};
  return typename Y::Arguments{scale_a, {scale_b, {}, {}}, bias, {}};
}

template <class G>
size_t workspace_of(const Fp8GemmArgs& p) {
  typename G::Adapter::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {static_cast<int>(p.m), static_cast<int>(p.n), static_cast<int>(p.k), 1};
  args.hw_info.device_id = p.device;
  args.hw_info.sm_count = p.sm_count;
  args.scheduler.max_swizzle_size = p.swizzle;
  return G::Adapter::get_workspace_size(args);
}

// Calls launch(Cfg{}) for the configuration p.config names.
template <class Launch>
auto with_config(const Fp8GemmArgs& p, Launch&& launch) {
  return p.config == 1 ? launch(Coop128x256{}) : launch(PingPong128x128{});
}

}  // namespace sm90
}  // namespace lx2v
