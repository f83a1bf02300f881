// Every op of lightx2v._C, declared once (namespace lx2v_C; the Python custom ops of
// lightx2v/ops are `lx2v`), with their CUDA implementations: check the tensors, take the
// current stream, call the launcher of csrc/*.cu.
//
// Out-variant schemas: the caller allocates every output and the schema marks it written
// (`Tensor(a!)`), so torch.compile functionalizes the call and nothing here allocates.
// Fake kernels (for torch.compile and opcheck) are in lightx2v/ops/_cuda.py.
//
// `import lightx2v._C` loads this library, which registers the ops with the dispatcher; the
// module itself only answers whether its kernels run on the current GPU.

#include <Python.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "check.h"
#include "ops.h"

namespace lx2v {
namespace {

DType dtype_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK(false, "lx2v_C: ", what, " must be float32, bfloat16 or float16, got ",
                  name(t.scalar_type()));
  }
  return DType::kFloat32;  // unreachable: TORCH_CHECK(false) throws
}

// x [B, L, D]: unit last stride, rows starting on 16-byte boundaries (128-bit loads), and a
// D the row kernels take. lightx2v/ops/_cuda.py copies inputs that fail the layout checks.
RowsIn check_rows(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.is_cuda(), "lx2v_C: ", what, " must be a CUDA tensor, got ", where(x.device()));
  TORCH_CHECK(x.dim() == 3, "lx2v_C: ", what, " must be [B, L, D], got ", dims(x.sizes()));
  TORCH_CHECK(x.stride(2) == 1, "lx2v_C: ", what,
              " must have a unit last stride, got strides ", dims(x.strides()));
  const int64_t es = x.element_size();
  const bool rows_aligned = aligned16(x.data_ptr()) &&
                            (x.size(0) == 1 || (x.stride(0) * es) % 16 == 0) &&
                            (x.size(1) == 1 || (x.stride(1) * es) % 16 == 0);
  TORCH_CHECK(rows_aligned, "lx2v_C: ", what,
              " rows must start on 16-byte boundaries (data pointer and batch/token strides "
              "in bytes divisible by 16), got strides ",
              dims(x.strides()), " of ", num(es), "-byte elements; pass a contiguous copy");
  const DType t = dtype_of(x, what);
  const int64_t D = x.size(2);
  TORCH_CHECK(D > 0 && D % chunk_elems(t) == 0 && D <= kMaxDim, "lx2v_C: ", what,
              " has D=", num(D), "; the row kernels take D a multiple of ", num(chunk_elems(t)),
              " (16 bytes of ", name(x.scalar_type()), ") up to ", num(kMaxDim));
  return RowsIn{x.data_ptr(), x.stride(0), x.stride(1)};
}

void check_out(const at::Tensor& out, const at::Tensor& x, at::ScalarType dtype,
               at::IntArrayRef sizes, const char* what) {
  check_device(out, x, what);
  TORCH_CHECK(out.scalar_type() == dtype, "lx2v_C: ", what, " must be ", name(dtype), ", got ",
              name(out.scalar_type()));
  TORCH_CHECK(out.sizes() == sizes, "lx2v_C: ", what, " must be ", dims(sizes), ", got ",
              dims(out.sizes()));
  TORCH_CHECK(out.is_contiguous(), "lx2v_C: ", what, " must be contiguous");
  TORCH_CHECK(aligned16(out.data_ptr()), "lx2v_C: ", what, " must be 16-byte aligned");
}

// An fp32 vector [D] (weight) or matrix [n, D] (modulation, rope table) read with 128-bit
// loads: unit last stride, 16-byte aligned rows.
void check_f32_table(const at::Tensor& t, const at::Tensor& x, int64_t cols,
                     const char* what) {
  check_device(t, x, what);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "lx2v_C: ", what, " must be float32, got ",
              name(t.scalar_type()));
  TORCH_CHECK(t.dim() >= 1 && t.dim() <= 2 && t.size(-1) == cols, "lx2v_C: ", what,
              " must be [", num(cols), "] or [n, ", num(cols), "], got ", dims(t.sizes()));
  TORCH_CHECK(t.stride(-1) == 1, "lx2v_C: ", what, " must have a unit last stride");
  TORCH_CHECK(aligned16(t.data_ptr()) && (t.dim() == 1 || t.size(0) == 1 ||
                                          (t.stride(0) * 4) % 16 == 0),
              "lx2v_C: ", what, " rows must be 16-byte aligned, got strides ", dims(t.strides()));
}

// out = x · rsqrt(mean(x²) + eps) · weight, fp32 inside, in x's dtype.
void rms_norm_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  const RowsIn rows = check_rows(x, "x");
  const int64_t D = x.size(2);
  check_out(out, x, x.scalar_type(), x.sizes(), "out");
  check_f32_table(weight, x, D, "weight");
  TORCH_CHECK(weight.dim() == 1, "lx2v_C: weight must be [D], got ", dims(weight.sizes()));

  const c10::cuda::CUDAGuard guard(x.device());
  RmsNormRopeArgs args{};
  args.x[0] = rows;
  args.out[0] = out.data_ptr();
  args.weight[0] = weight.data_ptr<float>();
  args.num_tensors = 1;
  args.dtype = dtype_of(x, "x");
  args.batch = x.size(0);
  args.tokens = x.size(1);
  args.dim = static_cast<int>(D);
  args.eps = static_cast<float>(eps);
  C10_CUDA_CHECK(lx2v::rms_norm_rope(args, c10::cuda::getCurrentCUDAStream()));
}

// (q_out, k_out) = rope(rms_norm(q, weight_q)), rope(rms_norm(k, weight_k)): [B, L, N, Dh].
void qk_norm_rope_cuda(at::Tensor& q_out, at::Tensor& k_out, const at::Tensor& q,
                       const at::Tensor& k, const at::Tensor& weight_q,
                       const at::Tensor& weight_k, const at::Tensor& cos, const at::Tensor& sin,
                       double eps) {
  const RowsIn q_rows = check_rows(q, "q");
  const RowsIn k_rows = check_rows(k, "k");
  check_device(k, q, "k");
  TORCH_CHECK(k.sizes() == q.sizes() && k.scalar_type() == q.scalar_type(),
              "lx2v_C: q and k must have one shape and dtype, got ", dims(q.sizes()), " ",
              name(q.scalar_type()), " and ", dims(k.sizes()), " ", name(k.scalar_type()));
  const int64_t B = q.size(0), L = q.size(1), D = q.size(2);
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == L, "lx2v_C: cos must be [L, Dh/2] with L=", num(L),
              ", got ", dims(cos.sizes()));
  const int64_t half = cos.size(1);
  const int64_t head_dim = 2 * half;
  const int elems = chunk_elems(dtype_of(q, "q"));
  TORCH_CHECK(half > 0 && D % head_dim == 0 && head_dim % elems == 0,
              "lx2v_C: head dim ", num(head_dim), " (from cos ", dims(cos.sizes()),
              ") must divide D=", num(D), " and be a multiple of ", num(elems), " (a 16-byte chunk must not straddle heads)");
  check_f32_table(cos, q, half, "cos");
  check_f32_table(sin, q, half, "sin");
  TORCH_CHECK(sin.sizes() == cos.sizes() && sin.strides() == cos.strides(),
              "lx2v_C: sin must have cos's shape and strides, got ", dims(sin.sizes()), " ",
              dims(sin.strides()), " vs ", dims(cos.sizes()), " ", dims(cos.strides()));
  check_f32_table(weight_q, q, D, "weight_q");
  check_f32_table(weight_k, q, D, "weight_k");
  TORCH_CHECK(weight_q.dim() == 1 && weight_k.dim() == 1, "lx2v_C: weights must be [D]");
  const std::vector<int64_t> out_sizes{B, L, D / head_dim, head_dim};
  check_out(q_out, q, q.scalar_type(), out_sizes, "q_out");
  check_out(k_out, q, k.scalar_type(), out_sizes, "k_out");

  const c10::cuda::CUDAGuard guard(q.device());
  RmsNormRopeArgs args{};
  args.x[0] = q_rows;
  args.x[1] = k_rows;
  args.out[0] = q_out.data_ptr();
  args.out[1] = k_out.data_ptr();
  args.weight[0] = weight_q.data_ptr<float>();
  args.weight[1] = weight_k.data_ptr<float>();
  args.num_tensors = 2;
  args.dtype = dtype_of(q, "q");
  args.batch = B;
  args.tokens = L;
  args.dim = static_cast<int>(D);
  args.eps = static_cast<float>(eps);
  args.cos = cos.data_ptr<float>();
  args.sin = sin.data_ptr<float>();
  args.table_stride = cos.stride(0);
  args.head_dim = static_cast<int>(head_dim);
  C10_CUDA_CHECK(lx2v::rms_norm_rope(args, c10::cuda::getCurrentCUDAStream()));
}

// (out, out_scale) = per-token e4m3 quantization of LN(x) · (1 + scale) + shift, or with
// affine of LN(x) · scale + shift (scale, shift = the LayerNorm's weight, bias).
void adaln_fp8_cuda(at::Tensor& out, at::Tensor& out_scale, const at::Tensor& x,
                    const at::Tensor& shift, const at::Tensor& scale, double eps, bool affine) {
  const RowsIn rows = check_rows(x, "x");
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  for (const auto* m : {&shift, &scale}) {
    const char* what = m == &shift ? (affine ? "shift (the bias)" : "shift")
                                   : (affine ? "scale (the weight)" : "scale");
    check_f32_table(*m, x, D, what);
    TORCH_CHECK(m->dim() == 2 && m->size(0) == B, "lx2v_C: ", what, " must be [B, D] = [",
                num(B), ", ", num(D), "], got ", dims(m->sizes()));
  }
  check_out(out, x, at::kFloat8_e4m3fn, x.sizes(), "out");
  check_out(out_scale, x, at::kFloat, {B, L, 1}, "out_scale");
  TORCH_CHECK(B * L <= INT32_MAX - 65536, "lx2v_C: adaln_fp8 takes at most 2^31 - 65536 rows "
              "(B·L), got ", num(B * L));

  const c10::cuda::CUDAGuard guard(x.device());
  AdaLNFp8Args args{};
  args.x = rows;
  args.shift = shift.data_ptr<float>();
  args.scale = scale.data_ptr<float>();
  args.shift_stride_b = B == 1 ? 0 : shift.stride(0);
  args.scale_stride_b = B == 1 ? 0 : scale.stride(0);
  args.out = static_cast<uint8_t*>(out.data_ptr());
  args.out_scale = out_scale.data_ptr<float>();
  args.dtype = dtype_of(x, "x");
  args.batch = B;
  args.tokens = L;
  args.dim = static_cast<int>(D);
  args.eps = static_cast<float>(eps);
  args.affine = affine;
  C10_CUDA_CHECK(lx2v::adaln_fp8(args, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace lx2v

TORCH_LIBRARY(lx2v_C, m) {
  // rms_norm_rope.cu
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def(
      "qk_norm_rope(Tensor(a!) q_out, Tensor(b!) k_out, Tensor q, Tensor k, Tensor weight_q, "
      "Tensor weight_k, Tensor cos, Tensor sin, float eps) -> ()");
  // adaln_fp8.cu
  m.def(
      "adaln_fp8(Tensor(a!) out, Tensor(b!) out_scale, Tensor x, Tensor shift, Tensor scale, "
      "float eps, bool affine=False) -> ()");
  // fp8_gemm_*_sm90.cu: y = (a · a_scale) @ (b · b_scale)ᵀ + bias with a fused epilogue. Their
  // CUDA kernels are in lightx2v._C_sm90 (built for sm_90a only, with CUTLASS), which
  // registers them when imported; without it these ops have no CUDA kernel.
  m.def(
      "fp8_gemm(Tensor(a!) out, Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, "
      "Tensor? bias) -> ()");
  m.def(
      "fp8_gemm_gelu(Tensor(a!) out, Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, "
      "Tensor? bias) -> ()");
  m.def(
      "fp8_gemm_residual(Tensor(a!) res, Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, "
      "Tensor? bias, Tensor? gate) -> ()");
  // attn_int8_sm90.cu: softmax(q·kᵀ)·v from the INT8 pre-pass of kernels/attention.py in its
  // "sm90" layout into out [B, Lq, H, 128]; its CUDA kernel is in lightx2v._C_sm90 too.
  m.def(
      "attn_int8_sm90(Tensor(a!) out, Tensor q8, Tensor qs, Tensor k8, Tensor ks, Tensor vt8, "
      "Tensor vmean, Tensor vscale, int Lk) -> ()");
}

TORCH_LIBRARY_IMPL(lx2v_C, CUDA, m) {
  m.impl("rms_norm", &lx2v::rms_norm_cuda);
  m.impl("qk_norm_rope", &lx2v::qk_norm_rope_cuda);
  m.impl("adaln_fp8", &lx2v::adaln_fp8_cuda);
}

// ---------------------------------------------------------------------------------------
// the Python module lightx2v._C

namespace {

PyObject* kernel_image_status(PyObject*, PyObject*) {
  char why[512] = "";
  const bool ok = lx2v::kernel_image_ok(why, sizeof(why));
  return PyUnicode_FromString(ok ? "" : why);
}

PyObject* compiled_arches(PyObject*, PyObject*) {
  return PyUnicode_FromString(lx2v::compiled_arches());
}

PyMethodDef methods[] = {
    {"kernel_image_status", kernel_image_status, METH_NOARGS,
     "'' when the kernels run on the current CUDA device, else why they cannot."},
    {"compiled_arches", compiled_arches, METH_NOARGS,
     "The CUDA architectures this library was compiled for, e.g. '8.0 9.0'."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "lightx2v._C",
    "CUDA ops of lightx2v (torch.ops.lx2v_C), registered when this module is imported.",
    -1,  // no per-module state
    methods,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
