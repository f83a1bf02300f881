// The FP8 GEMM with the epilogue res += gate · y (fp32, in place); the kernel and the epilogue trees
// are in csrc/fp8_gemm_sm90.cuh.

#include "fp8_gemm_sm90.cuh"

namespace lx2v {
namespace {
using namespace sm90;
template <class Cfg>
using G = Gemm<Cfg, float, float, typename Evt<typename Cfg::Tile, float>::ResidualTree>;
}  // namespace

size_t fp8_gemm_residual_sm90_workspace(const Fp8GemmArgs& p) {
  return with_config(p, [&](auto cfg) { return workspace_of<G<decltype(cfg)>>(p); });
}

const char* fp8_gemm_residual_sm90(const Fp8GemmArgs& p, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return nullptr;
  return with_config(p, [&](auto cfg) {
    using Cfg = decltype(cfg);
    using E = Evt<typename Cfg::Tile, float>;
    typename E::Gate::Arguments gate{p.gate, 1.f, {_0{}, _1{}, int64_t(0)}};
    typename E::ResidualTree::Arguments tree{gate, y_args<E, float>(p), {}, {}};
    return run<G<Cfg>>(p, tree, p.out, p.out, stream);
  });
}

}  // namespace lx2v
