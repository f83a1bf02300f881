// The INT8 attention kernel's parameters from the op's tensors (host only: torch headers),
// shared by the library op (csrc/fp8_gemm_sm90_ops.cpp, after its checks) and the prototype
// binding (tools/proto_attn_sm90_binding.cpp). Shapes as in attn_int8_sm90.h; Lq_pad and
// Lk_pad are q8's and k8's second dimension. No trace (prototypes set it afterwards).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "attn_int8_sm90.h"

namespace lx2v {

inline AttnInt8Params attn_int8_params(const at::Tensor& out, const at::Tensor& q8,
                                       const at::Tensor& qs, const at::Tensor& k8,
                                       const at::Tensor& ks, const at::Tensor& vt8,
                                       const at::Tensor& vmean, const at::Tensor& vscale,
                                       int64_t Lq, int64_t Lk, int64_t H) {
  AttnInt8Params p{};
  p.q8 = q8.data_ptr<int8_t>();
  p.k8 = k8.data_ptr<int8_t>();
  p.vt8 = vt8.data_ptr<int8_t>();
  p.qs = qs.data_ptr<float>();
  p.ks = ks.data_ptr<float>();
  p.vmean = vmean.data_ptr<float>();
  p.vscale = vscale.data_ptr<float>();
  p.out = out.data_ptr();
  p.Lq = static_cast<int>(Lq);
  p.Lk = static_cast<int>(Lk);
  p.Lq_pad = static_cast<int>(q8.size(1));
  p.Lk_pad = static_cast<int>(k8.size(1));
  p.H = static_cast<int>(H);
  p.trace = nullptr;
  return p;
}

}  // namespace lx2v
