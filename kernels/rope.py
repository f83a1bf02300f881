"""Triton: RMSNorm over the full hidden dim (with weight), then Wan's rotary embedding.

One program per token row: the row ([N·Dh] = D values) is read once with contiguous
loads, normalized in fp32, each head's interleaved (real, imag) pairs are turned by that
token's angles, and the row is written once in the layout [B, L, N, Dh] that the attention
entry point takes. The cos/sin tables are [L, Dh/2] fp32.

Two ways to bring the angles to the pairs (the benchmark compares them):
- per-head tile (default when Dh/2 is a power of two, as at Dh = 128): the row is viewed
  as [heads, Dh/2, 2]; the token's Dh/2 table entries are loaded once and broadcast over
  the heads;
- gather: the row is viewed as [D/2, 2] and each pair loads its entry (pair mod Dh/2), so
  every program loads D/2 cos and D/2 sin values (from cache, but many instructions).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_rope_kernel(
    x_ptr, out_ptr, w_ptr, cos_ptr, sin_ptr,
    L, D, stride_xb, stride_xl, stride_ob, stride_ol, stride_cl, eps,
    HALF_DH: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ROPE: tl.constexpr,
    PER_HEAD_TABLE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    bi = row // L
    li = row % L
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + bi * stride_xb + li * stride_xl + cols, mask=mask, other=0.0)
    x = x.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    h = x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps) * w
    if HAS_ROPE:
        cos_row = cos_ptr + li * stride_cl
        sin_row = sin_ptr + li * stride_cl
        if PER_HEAD_TABLE:
            re, im = tl.split(tl.reshape(h, (BLOCK_D // (2 * HALF_DH), HALF_DH, 2)))
            j = tl.arange(0, HALF_DH)
            c = tl.load(cos_row + j)[None, :]
            s = tl.load(sin_row + j)[None, :]
        else:
            re, im = tl.split(tl.reshape(h, (BLOCK_D // 2, 2)))
            pairs = tl.arange(0, BLOCK_D // 2)
            pmask = pairs < D // 2
            j = pairs % HALF_DH
            c = tl.load(cos_row + j, mask=pmask, other=0.0)
            s = tl.load(sin_row + j, mask=pmask, other=0.0)
        h = tl.reshape(tl.join(re * c - im * s, re * s + im * c), (BLOCK_D,))
    out_row = out_ptr + bi * stride_ob + li * stride_ol
    tl.store(out_row + cols, h.to(out_ptr.dtype.element_ty), mask=mask)


def _num_warps(block_d: int) -> int:
    # 8 warps at D = 5120 (BLOCK 8192): best of 4/8/16 for rope on an H200 (2026-11-27).
    return max(1, min(8, block_d // 1024))


def rms_norm_rope(
    x: torch.Tensor,  # [B, L, D]
    out: torch.Tensor,  # [B, L, D] (a view of [B, L, N, Dh]), written
    weight: torch.Tensor,  # [D] contiguous
    eps: float,
    *,
    cos: torch.Tensor | None = None,  # [L, Dh/2] fp32, unit last stride
    sin: torch.Tensor | None = None,  # [L, Dh/2] fp32, same strides as cos
    per_head_table: bool | None = None,  # None: whenever Dh/2 is a power of two
    num_warps: int | None = None,
) -> None:
    """out = rope(x · rsqrt(mean(x²) + eps) · w), fp32 inside; no rope when cos is None."""
    B, L, D = x.shape
    block_d = triton.next_power_of_2(D)
    has_rope = cos is not None
    half_dh = cos.shape[-1] if has_rope else 1
    pow2 = half_dh & (half_dh - 1) == 0
    if per_head_table is None:
        per_head_table = pow2
    if per_head_table and not pow2:
        raise ValueError(f"per-head table needs Dh/2 a power of two, got {half_dh}")
    _rms_norm_rope_kernel[(B * L,)](
        x, out, weight, cos if has_rope else x, sin if has_rope else x,
        L, D, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        cos.stride(0) if has_rope else 0, eps,
        HALF_DH=half_dh, BLOCK_D=block_d, HAS_ROPE=has_rope, PER_HEAD_TABLE=per_head_table,
        num_warps=num_warps or _num_warps(block_d),
    )  # fmt: skip
