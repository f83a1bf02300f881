// Pieces of the argument checks of the op bindings (registry.cpp, fp8_gemm_sm90_ops.cpp).
//
// Error messages are assembled from strings only. On the GPU image an integer streamed into
// an ostream from our libraries crashed (SIGSEGV in std::num_put, 2026-11-27): the compiler
// there builds against libstdc++ headers that differ from the libstdc++ torch runs with, so
// the inlined num_put looked up a locale facet that the stream did not have. std::to_string
// and torch's own Device::str() never touch locale facets.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace lx2v {

inline std::string num(int64_t v) { return std::to_string(v); }

inline std::string dims(c10::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a[i]);
  }
  return s + "]";
}

inline std::string name(at::ScalarType t) { return c10::toString(t); }

inline std::string where(const at::Device& d) { return d.str(); }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline void check_device(const at::Tensor& t, const at::Tensor& x, const char* what) {
  TORCH_CHECK(t.device() == x.device(), "lx2v_C: ", what, " is on ", where(t.device()),
              ", expected ", where(x.device()));
}

}  // namespace lx2v
