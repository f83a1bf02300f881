// The FP8 GEMM with the epilogue out = bf16(gelu_tanh(y)); the kernel and the epilogue trees
// are in csrc/fp8_gemm_sm90.cuh.

#include "fp8_gemm_sm90.cuh"

namespace lx2v {
namespace {
using namespace sm90;
template <class Cfg>
using G = Gemm<Cfg, void, BF16, typename Evt<typename Cfg::Tile, BF16>::GeluTree>;
}  // namespace

size_t fp8_gemm_gelu_sm90_workspace(const Fp8GemmArgs& p) {
  return with_config(p, [&](auto cfg) { return workspace_of<G<decltype(cfg)>>(p); });
}

const char* fp8_gemm_gelu_sm90(const Fp8GemmArgs& p, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return nullptr;
  return with_config(p, [&](auto cfg) {
    using Cfg = decltype(cfg);
    using E = Evt<typename Cfg::Tile, BF16>;
    typename E::GeluTree::Arguments tree{y_args<E, float>(p), {}};
    return run<G<Cfg>>(p, tree, nullptr, p.out, stream);
  });
}

}  // namespace lx2v
