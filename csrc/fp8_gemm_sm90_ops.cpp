// CUDA implementations of lx2v_C::fp8_gemm, fp8_gemm_gelu, fp8_gemm_residual and
// attn_int8_sm90 (schemas in registry.cpp) and the Python module lightx2v._C_sm90 that
// registers them on import. This
// library is built for sm_90a only (its kernels are Hopper TMA/WGMMA code), so every op
// first checks that the tensors are on a compute capability 9.0 device.

#include <Python.h>

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <mutex>
#include <utility>
#include <vector>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "attn_int8_sm90.h"
#include "attn_int8_sm90_params.h"
#include "check.h"
#include "fp8_gemm.h"

namespace lx2v {
namespace {

struct DeviceInfo {
  int major = 0, minor = 0, sms = 0;
};

// Compute capability and SM count of a device, asked once per device.
DeviceInfo device_info(int device) {
  static std::mutex mutex;
  static std::vector<std::pair<int, DeviceInfo>> known;
  const std::lock_guard<std::mutex> lock(mutex);
  for (const auto& [d, info] : known) {
    if (d == device) return info;
  }
  DeviceInfo info;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.minor, cudaDevAttrComputeCapabilityMinor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device));
  known.emplace_back(device, info);
  return info;
}

// One fp32 vector of n values, unit stride ([n] or [n, 1]), on x's device.
const float* f32_vector(const at::Tensor& t, const at::Tensor& x, int64_t n, const char* what) {
  check_device(t, x, what);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "lx2v_C: ", what, " must be float32, got ",
              name(t.scalar_type()));
  TORCH_CHECK(t.numel() == n && (t.dim() == 1 || (t.dim() == 2 && t.size(1) == 1)),
              "lx2v_C: ", what, " must be [", num(n), "] or [", num(n), ", 1], got ",
              dims(t.sizes()));
  TORCH_CHECK(n <= 1 || t.stride(0) == 1, "lx2v_C: ", what, " must be contiguous, got strides ",
              dims(t.strides()));
  return t.data_ptr<float>();
}

// a [M, K] and b [N, K] float8_e4m3fn, row-major, K a multiple of 16 (TMA rows are 16-byte
// multiples); the scales and the bias; fills everything of args but the output.
Fp8GemmArgs check_operands(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                           const at::Tensor& b_scale, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(a.is_cuda(), "lx2v_C: a must be a CUDA tensor, got ", where(a.device()));
  const int device = a.device().index();
  const DeviceInfo info = device_info(device);
  const int major = info.major, minor = info.minor, sms = info.sms;
  TORCH_CHECK(major == 9 && minor == 0, "lx2v_C: the FP8 GEMM kernels are built for sm_90a "
              "(H100/H200) only; this GPU has compute capability ", num(major), ".", num(minor));
  for (const auto* t : {&a, &b}) {
    const char* what = t == &a ? "a" : "b";
    check_device(*t, a, what);
    TORCH_CHECK(t->scalar_type() == at::kFloat8_e4m3fn, "lx2v_C: ", what,
                " must be float8_e4m3fn, got ", name(t->scalar_type()));
    TORCH_CHECK(t->dim() == 2 && t->is_contiguous() && aligned16(t->data_ptr()), "lx2v_C: ",
                what, " must be a contiguous, 16-byte aligned matrix, got ", dims(t->sizes()),
                " with strides ", dims(t->strides()));
  }
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  TORCH_CHECK(b.size(1) == K, "lx2v_C: a ", dims(a.sizes()), " and b ", dims(b.sizes()),
              " must share K (b is [N, K])");
  TORCH_CHECK(K > 0 && K % 16 == 0, "lx2v_C: K=", num(K), " must be a positive multiple of 16");
  TORCH_CHECK(M < (int64_t(1) << 31) && N < (int64_t(1) << 31) && K < (int64_t(1) << 31),
              "lx2v_C: GEMM sizes must be below 2^31");
  Fp8GemmArgs args{};
  args.a = a.data_ptr();
  args.b = b.data_ptr();
  args.a_scale = f32_vector(a_scale, a, M, "a_scale");
  args.b_scale = f32_vector(b_scale, a, N, "b_scale");
  if (bias.has_value()) {
    check_device(*bias, a, "bias");
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->dim() == 1 &&
                    bias->size(0) == N && bias->is_contiguous(),
                "lx2v_C: bias must be a contiguous bfloat16 [", num(N), "], got ",
                name(bias->scalar_type()), " ", dims(bias->sizes()));
    args.bias = bias->data_ptr();
  }
  args.m = M;
  args.n = N;
  args.k = K;
  args.device = device;
  args.sm_count = sms;
  return args;
}

// The kernel configuration and tile order: the defaults measured best at Wan's shapes, or
// LX2V_FP8_GEMM_TUNE="config,swizzle,raster" (tools/bench_gemm_epilogue.py --tune).
// Measured on an H200 at M = 32760 (tools/bench_gemm_epilogue.py --tune, 2026-11-27): for
// K = 13824 the cooperative 128×256 tile (config 1) with raster along N wins (the down
// projection);
// for K = 5120 ping-pong 128×128, with a wider swizzle for the epilogues that read or
// compute more (GELU 4, residual 8).
void choose_config(Fp8GemmArgs& args) {
  const bool long_k = args.k >= 8192;
  auto use = [&](int config, int swizzle, int raster) {
    args.config = config;
    args.swizzle = swizzle;
    args.raster = raster;
  };
  switch (args.epilogue) {
    case Fp8Epilogue::kBias:
      long_k ? use(1, 4, 2) : use(0, 1, 0);
      break;
    case Fp8Epilogue::kGelu:
      long_k ? use(1, 4, 2) : use(0, 4, 0);
      break;
    case Fp8Epilogue::kResidual:
      long_k ? use(1, 2, 2) : use(0, 8, 0);
      break;
  }
  const char* tune = std::getenv("LX2V_FP8_GEMM_TUNE");
  if (tune == nullptr || *tune == '\0') return;
  int config = -1, swizzle = -1, raster = -1;
  const bool ok = std::sscanf(tune, "%d,%d,%d", &config, &swizzle, &raster) == 3 &&
                  config >= 0 && config <= 1 && raster >= 0 && raster <= 2 &&
                  (swizzle == 1 || swizzle == 2 || swizzle == 4 || swizzle == 8);
  TORCH_CHECK(ok, "lx2v_C: LX2V_FP8_GEMM_TUNE=", tune, " is not \"config,swizzle,raster\" "
              "with config 0-1, swizzle 1/2/4/8 and raster 0-2");
  use(config, swizzle, raster);
}

void launch(Fp8GemmArgs& args, const at::Tensor& like) {
  choose_config(args);
  size_t (*workspace_bytes)(const Fp8GemmArgs&) = nullptr;
  const char* (*kernel)(const Fp8GemmArgs&, cudaStream_t) = nullptr;
  switch (args.epilogue) {
    case Fp8Epilogue::kBias:
      workspace_bytes = fp8_gemm_bias_sm90_workspace;
      kernel = fp8_gemm_bias_sm90;
      break;
    case Fp8Epilogue::kGelu:
      workspace_bytes = fp8_gemm_gelu_sm90_workspace;
      kernel = fp8_gemm_gelu_sm90;
      break;
    case Fp8Epilogue::kResidual:
      workspace_bytes = fp8_gemm_residual_sm90_workspace;
      kernel = fp8_gemm_residual_sm90;
      break;
  }
  const size_t bytes = workspace_bytes(args);
  at::Tensor workspace;
  if (bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
    args.workspace = workspace.data_ptr();
    args.workspace_bytes = bytes;
  }
  const char* failed = kernel(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(failed == nullptr, "lx2v_C: FP8 GEMM [", num(args.m), ", ", num(args.k), "] x [",
              num(args.k), ", ", num(args.n), "] (kernel config ", num(args.config), ") failed: ",
              failed);
}

// out [M, N] bf16 = y (kBias) or gelu_tanh(y) (kGelu).
void gemm_bf16_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& a_scale,
                   const at::Tensor& b, const at::Tensor& b_scale,
                   const c10::optional<at::Tensor>& bias, Fp8Epilogue epilogue) {
  Fp8GemmArgs args = check_operands(a, a_scale, b, b_scale, bias);
  const c10::cuda::CUDAGuard guard(a.device());
  check_device(out, a, "out");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.dim() == 2 && out.size(0) == args.m &&
                  out.size(1) == args.n && out.is_contiguous() && aligned16(out.data_ptr()),
              "lx2v_C: out must be a contiguous, 16-byte aligned bfloat16 [", num(args.m), ", ",
              num(args.n), "], got ", name(out.scalar_type()), " ", dims(out.sizes()));
  TORCH_CHECK(args.n % 8 == 0, "lx2v_C: N=", num(args.n),
              " must be a multiple of 8 (16-byte bf16 output rows)");
  args.out = out.data_ptr();
  args.epilogue = epilogue;
  launch(args, a);
}

void fp8_gemm_cuda(at::Tensor& out, const at::Tensor& a, const at::Tensor& a_scale,
                   const at::Tensor& b, const at::Tensor& b_scale,
                   const c10::optional<at::Tensor>& bias) {
  gemm_bf16_out(out, a, a_scale, b, b_scale, bias, Fp8Epilogue::kBias);
}

void fp8_gemm_gelu_cuda(at::Tensor& out, const at::Tensor& a, const at::Tensor& a_scale,
                        const at::Tensor& b, const at::Tensor& b_scale,
                        const c10::optional<at::Tensor>& bias) {
  gemm_bf16_out(out, a, a_scale, b, b_scale, bias, Fp8Epilogue::kGelu);
}

// res [B, L, N] fp32 += gate[b] · y, y of a [B·L, K]; one launch per batch row when gated
// (each has its own gate vector), one in all otherwise.
void fp8_gemm_residual_cuda(at::Tensor& res, const at::Tensor& a, const at::Tensor& a_scale,
                            const at::Tensor& b, const at::Tensor& b_scale,
                            const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& gate) {
  Fp8GemmArgs args = check_operands(a, a_scale, b, b_scale, bias);
  const c10::cuda::CUDAGuard guard(a.device());
  check_device(res, a, "res");
  TORCH_CHECK(res.scalar_type() == at::kFloat && res.dim() == 3 && res.is_contiguous() &&
                  aligned16(res.data_ptr()),
              "lx2v_C: res must be a contiguous, 16-byte aligned float32 [B, L, N], got ",
              name(res.scalar_type()), " ", dims(res.sizes()));
  const int64_t B = res.size(0), L = res.size(1);
  TORCH_CHECK(B * L == args.m && res.size(2) == args.n, "lx2v_C: res ", dims(res.sizes()),
              " does not hold the [", num(args.m), ", ", num(args.n), "] product");
  TORCH_CHECK(args.n % 4 == 0, "lx2v_C: N=", num(args.n),
              " must be a multiple of 4 (16-byte fp32 rows)");
  args.epilogue = Fp8Epilogue::kResidual;
  args.out = res.data_ptr();
  if (!gate.has_value() || B * L == 0) {
    launch(args, a);
    return;
  }
  check_device(*gate, a, "gate");
  TORCH_CHECK(gate->scalar_type() == at::kFloat && gate->dim() == 2 && gate->size(0) == B &&
                  gate->size(1) == args.n && gate->stride(1) == 1,
              "lx2v_C: gate must be float32 [B, N] = [", num(B), ", ", num(args.n),
              "] with a unit last stride, got ", name(gate->scalar_type()), " ",
              dims(gate->sizes()));
  const auto* a0 = static_cast<const uint8_t*>(args.a);
  const float* s0 = args.a_scale;
  auto* r0 = static_cast<float*>(args.out);
  args.m = L;
  for (int64_t i = 0; i < B; ++i) {
    args.a = a0 + i * L * args.k;
    args.a_scale = s0 + i * L;
    args.out = r0 + i * L * args.n;
    args.gate = gate->data_ptr<float>() + i * gate->stride(0);
    launch(args, a);
  }
}

// One int8 or fp32 operand of attn_int8_sm90: on out's device, contiguous, 16-byte aligned,
// of the given shape.
void check_attn_operand(const at::Tensor& t, const at::Tensor& out, at::ScalarType type,
                        std::initializer_list<int64_t> shape, const char* what) {
  check_device(t, out, what);
  const std::vector<int64_t> want(shape);
  TORCH_CHECK(t.scalar_type() == type && t.sizes().vec() == want && t.is_contiguous() &&
                  aligned16(t.data_ptr()),
              "lx2v_C: attn_int8_sm90: ", what, " must be a contiguous, 16-byte aligned ",
              name(type), " ", dims(want), ", got ", name(t.scalar_type()), " ",
              dims(t.sizes()));
}

// out [B, Lq, H, 128] bf16/fp16 = softmax(q·kᵀ/√128)·v from the pre-pass's operands:
// q8 [B·H, Lq_pad, 128], k8 [B·H, Lk_pad, 128] and vt8 [B·H, 128, Lk_pad] int8 (the "sm90"
// layout), qs [B·H, Lq_pad/64], ks [B·H, Lk_pad/128], vmean and vscale [B·H, 128] fp32.
void attn_int8_sm90_cuda(at::Tensor& out, const at::Tensor& q8, const at::Tensor& qs,
                         const at::Tensor& k8, const at::Tensor& ks, const at::Tensor& vt8,
                         const at::Tensor& vmean, const at::Tensor& vscale, int64_t Lk) {
  TORCH_CHECK(out.is_cuda(), "lx2v_C: attn_int8_sm90: out must be a CUDA tensor, got ",
              where(out.device()));
  const c10::cuda::CUDAGuard guard(out.device());
  const DeviceInfo info = device_info(out.device().index());
  TORCH_CHECK(info.major == 9 && info.minor == 0, "lx2v_C: attn_int8_sm90 is built for sm_90a "
              "(H100/H200) only; this GPU has compute capability ", num(info.major), ".",
              num(info.minor));
  const bool fp16 = out.scalar_type() == at::kHalf;
  TORCH_CHECK((fp16 || out.scalar_type() == at::kBFloat16) && out.dim() == 4 &&
                  out.size(3) == 128 && out.is_contiguous() && aligned16(out.data_ptr()),
              "lx2v_C: attn_int8_sm90: out must be a contiguous bfloat16 or float16 "
              "[B, Lq, H, 128], got ", name(out.scalar_type()), " ", dims(out.sizes()));
  const int64_t B = out.size(0), Lq = out.size(1), H = out.size(2), BH = B * H;
  const int64_t Lq_pad = q8.dim() == 3 ? q8.size(1) : -1, Lk_pad = k8.dim() == 3 ? k8.size(1) : -1;
  TORCH_CHECK(Lq >= 1 && Lk >= 1 && Lq_pad % 128 == 0 && Lq_pad >= Lq && Lk_pad % 128 == 0 &&
                  Lk_pad >= Lk && Lq_pad < (int64_t(1) << 30) && Lk_pad < (int64_t(1) << 30),
              "lx2v_C: attn_int8_sm90: needs 1 <= Lq <= Lq_pad and 1 <= Lk <= Lk_pad, both "
              "padded to multiples of 128 below 2^30; got Lq=", num(Lq), " Lq_pad=",
              num(Lq_pad), " Lk=", num(Lk), " Lk_pad=", num(Lk_pad));
  TORCH_CHECK(BH >= 1 && BH <= 65535, "lx2v_C: attn_int8_sm90: batch × heads must be 1..65535, "
              "got ", num(BH));
  check_attn_operand(q8, out, at::kChar, {BH, Lq_pad, 128}, "q8");
  check_attn_operand(k8, out, at::kChar, {BH, Lk_pad, 128}, "k8");
  check_attn_operand(vt8, out, at::kChar, {BH, 128, Lk_pad}, "vt8");
  check_attn_operand(qs, out, at::kFloat, {BH, Lq_pad / 64}, "qs");
  check_attn_operand(ks, out, at::kFloat, {BH, Lk_pad / 128}, "ks");
  check_attn_operand(vmean, out, at::kFloat, {BH, 128}, "vmean");
  check_attn_operand(vscale, out, at::kFloat, {BH, 128}, "vscale");
  const AttnInt8Params p = attn_int8_params(out, q8, qs, k8, ks, vt8, vmean, vscale, Lq, Lk, H);
  C10_CUDA_CHECK(attn_int8_sm90(p, static_cast<int>(BH), fp16, kAttnSm90Variant,
                                c10::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace lx2v

TORCH_LIBRARY_IMPL(lx2v_C, CUDA, m) {
  m.impl("attn_int8_sm90", &lx2v::attn_int8_sm90_cuda);
  m.impl("fp8_gemm", &lx2v::fp8_gemm_cuda);
  m.impl("fp8_gemm_gelu", &lx2v::fp8_gemm_gelu_cuda);
  m.impl("fp8_gemm_residual", &lx2v::fp8_gemm_residual_cuda);
}

namespace {

PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "lightx2v._C_sm90",
    "Hopper (sm_90a) CUDA kernels of lightx2v: the FP8 GEMMs with fused epilogues "
    "(torch.ops.lx2v_C.fp8_gemm*) and the warp-specialised INT8 attention "
    "(torch.ops.lx2v_C.attn_int8_sm90), registered when this module is imported after "
    "lightx2v._C.",
    -1,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C_sm90() { return PyModule_Create(&module); }
