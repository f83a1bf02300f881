"""Triton: per-token FP8 quantization of a matrix, x [M, K] → (q e4m3 [M, K], s fp32 [M]).

s = max(amax_row |x|, 1e-12) · fp32(1/448) and q = clamp(x / s, ±448) rounded to e4m3, exactly
lightx2v.quant.fp8.quantize_rows_fp8 (the reference): one program per row, the whole row in
registers (K ≤ 16384), so x is read once and q written once; the division is IEEE
round-to-nearest (div_rn) like PyTorch's. Eager PyTorch needs five passes over x, torch.compile
two; at M=32760, K=5120 this is the difference between ~0.6 ms and ~0.15 ms on an H100/H200,
next to a ~1.1 ms FP8 GEMM.
"""

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
FP8_MIN_AMAX = 1e-12
MAX_K = 16384


@triton.jit
def _per_token_fp8_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    s = tl.maximum(amax, 1e-12) * (1.0 / 448.0)  # FP8_MIN_AMAX, FP8_MAX; as the reference
    q = tl.clamp(tl.math.div_rn(x, s), -448.0, 448.0)
    tl.store(q_ptr + row * K + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, s)


def per_token_fp8(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> None:
    """Fill q [M, K] (float8_e4m3fn, contiguous) and s [M] (fp32) from x [M, K] (unit last stride)."""
    m, k = x.shape
    block = triton.next_power_of_2(k)
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    if m:
        _per_token_fp8_kernel[(m,)](x, q, s, k, x.stride(0), BLOCK_K=block, num_warps=warps)
