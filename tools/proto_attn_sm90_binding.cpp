// Prototype binding of csrc/attn_int8_sm90.cu for tools/proto_attn_sm90.py (built with
// torch.utils.cpp_extension.load; the kernel file is compiled by nvcc without torch's
// headers, this file by the host compiler). The library build registers
// lx2v_C::attn_int8_sm90 instead (csrc/fp8_gemm_sm90_ops.cpp).
#include "attn_int8_sm90_params.h"

#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

void run(at::Tensor out, at::Tensor q8, at::Tensor qs, at::Tensor k8, at::Tensor ks, at::Tensor vt8,
         at::Tensor vmean, at::Tensor vscale, int64_t Lq, int64_t Lk, int64_t H, int64_t variant,
         c10::optional<at::Tensor> trace) {
  lx2v::AttnInt8Params p = lx2v::attn_int8_params(out, q8, qs, k8, ks, vt8, vmean, vscale, Lq, Lk, H);
  p.trace = trace.has_value() ? trace->data_ptr<int64_t>() : nullptr;
  const int BH = q8.size(0);
  cudaError_t e = lx2v::attn_int8_sm90(p, BH, out.scalar_type() == at::kHalf, variant,
                                       c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(e == cudaSuccess, "attn_int8_sm90: ", cudaGetErrorString(e));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("run", &run, pybind11::arg("out"), pybind11::arg("q8"), pybind11::arg("qs"),
        pybind11::arg("k8"), pybind11::arg("ks"), pybind11::arg("vt8"), pybind11::arg("vmean"),
        pybind11::arg("vscale"), pybind11::arg("Lq"), pybind11::arg("Lk"), pybind11::arg("H"),
        pybind11::arg("variant"), pybind11::arg("trace") = pybind11::none());
}
