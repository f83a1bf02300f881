"""8-bit attention in Triton for Hopper: INT8 Q·Kᵀ; P·V in INT8, FP8 or bf16; fp32 softmax.

Layout in and out is the model's [B, L, H, D] (D = 128), non-causal, any Lq and Lk.

Algorithm (the PyTorch simulation is `lightx2v.ops.attention.attention_8bit_sim`):

1. Statistics pre-pass (`_stats_kernel`, one read of k and v): per (batch, head, channel)
   mean of k, mean of v and the range of v, as per-chunk partials summed by torch.
2. Quantisation pre-pass (`_quant_qk_kernel` twice, `_quant_v_kernel`):
   q · (D^-½ · log2 e) → INT8 with one fp32 scale per BLOCK_M rows (so the softmax runs in
   base 2 with no extra multiply); k − mean_k → INT8 with one scale per BLOCK_N rows
   (subtracting a per-channel constant from every key adds the same number to every
   logit of a query row, which softmax ignores; it removes the large shared offsets that
   would otherwise eat the INT8 range). With INT8 or FP8 P·V: v − offset → INT8 (amax/127)
   or FP8 e4m3 (amax/448) with one scale per channel (offset = the channel's mean where
   that is large, see `v_offset`), written transposed ([B·H, D, Lk_pad]) because Hopper's
   8-bit tensor-core instructions want the reduction dimension contiguous for their B
   operand; the offset is added back at the end (softmax rows sum to 1). With bf16 P·V,
   v is read as given.
3. Main kernel (`_attn_fwd_kernel`): per (BLOCK_M query rows, batch·head), loop over key
   blocks: S = q8·k8ᵀ in int32 (exact: |S| ≤ 127²·128 < 2²²), converted to fp32 with the
   1.5·2²³ trick (an integer add and a reinterpretation instead of a conversion
   instruction, exact below 2²²) fused with the two scales and the running max into one
   FMA; P = exp2(S − m + 8) so P ∈ (0, 256] uses FP8's range (the factor 2⁸ cancels
   between numerator and denominator); O += P·V in bf16, or P8·V8 on FP8 tensor cores,
   where each tile's product is added to the fp32 accumulator in ordinary fp32 ("two
   levels", FP8_TWO_LEVEL) because Hopper's FP8 MMA accumulates with fewer bits than fp32.
   INT8 P·V (`_pv_int8_update`) instead rounds P = 127·exp2(S − m_block) against the key
   block's own row maximum, multiplies exactly in int32 and rescales each block's product
   by exp2(m_block − m)/127 into the fp32 accumulator: P in steps of 1/127 of the block's
   maximum and V in steps of 1/127 of the channel's range, where e4m3 keeps 3 mantissa
   bits of each value.
   The last, partial key block is peeled off and masked, so the main loop has no masks.
   q, k and v tiles move by TMA (tensor descriptors).

Padding: q and k rows are padded with zeros up to a multiple of 128 in the quantised
copies; the main loop never reads padded keys unmasked, and padded query rows are never
stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

LOG2E = 1.4426950408889634
MAGIC_I = 0x4B400000  # bit pattern of 12582912.0 = 1.5·2²³
MAGIC_F = 12582912.0
P_SHIFT = 8.0  # P is stored as 2⁸·exp2(s − m): max 256 < 448 (e4m3's largest finite)
PAD = 128  # quantised copies are padded to a multiple of this many rows
# tokens per program of the statistics pre-pass (H200, S = 32760, H = 40, k and v: 1024
# tokens, 16-row tiles and 4 warps 0.21 ms; 512 and 32-row tiles 0.23-0.41 ms)
STATS_CHUNK = 1024

# (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]) used unless the caller names one:
# the fastest of `tools/bench_attention.py --sweep` on an H200, S = 32760, H = 40. bf16 P·V:
# 614-629 TFLOP/s at (128, 128, 8, 4) (2026-11-27/28). FP8 and INT8 P·V: 64-row tiles on one
# warpgroup, 2 stages, registers capped at 168 per thread (ptxas: no spills; 160 spills), so
# that three programs share a multiprocessor (74 KB of shared memory each) and overlap one's
# softmax with the others' matrix products: INT8 745 and FP8 776 against 715 and 755 for
# two programs with 3 stages and no cap (same run, 2026-11-28). A 5th entry is the cap.
# None of these spills registers; pointer-tensor loads spilled 400-2800 bytes, hence the
# TMA descriptors.
CONFIGS = {"bf16": (128, 128, 8, 4), "fp8": (64, 128, 4, 2, 168), "int8": (64, 128, 4, 2, 168)}
# FP8 P·V: add each tile's product to the fp32 accumulator in ordinary fp32 (True), or let
# the tensor cores accumulate across the whole key loop (False). Hopper's FP8 MMA
# accumulates with fewer bits than fp32; at S = 75600 one level measured rel-L2 3.96e-2
# against two levels' 3.89e-2, and neither was reliably faster (H200, 2026-11-27).
FP8_TWO_LEVEL = True
# Tried and dropped (H200, 2026-11-27, S = 32760, bench_attention --sweep): issuing block
# j+1's Q·Kᵀ before block j's softmax by hand (software pipelining) was slower in every
# configuration (bf16 P·V 553 vs 624 TFLOP/s, FP8 P·V 720 vs 771), and Triton 3.6's
# tl.range(warp_specialize=True) changed nothing on Hopper (623 vs 624, 779 vs 771: noise).
# 2026-11-28, INT8 P·V at the capped config: moving the running maximum only when a block's
# maximum passes it by more than 8 (log2 units; one tile-wide decision), so most blocks add
# their product with one conversion and one FMA instead of rescaling: 750 and 716 against
# 756 and 707 in alternating runs, no gain (probably lost to the tile-wide decision's
# cross-warp reduction per block).


@triton.jit
def _stats_kernel(
    K, V, PART, L, H, nch, part_stride,
    skb, skl, skh, svb, svl, svh,
    CHUNK: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, WITH_V: tl.constexpr,
):  # fmt: skip
    """Partials over one chunk of tokens: Σk (and Σv, max v, min v) per channel. The loop
    accumulates whole [BT, D] tiles elementwise and reduces over tokens once at the end (a
    reduction per tile measured 0.80 ms for k and v at S = 32760, H = 40 on an H200)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    d = tl.arange(0, D)
    sk = tl.zeros([BT, D], dtype=tl.float32)
    sv = tl.zeros([BT, D], dtype=tl.float32)
    mx = tl.full([BT, D], float("-inf"), dtype=tl.float32)
    mn = tl.full([BT, D], float("inf"), dtype=tl.float32)
    kb = K + b * skb + h * skh
    vb = V + b * svb + h * svh
    for t0 in range(0, CHUNK, BT):
        t = c * CHUNK + t0 + tl.arange(0, BT)
        m = (t < L)[:, None]
        sk += tl.load(kb + t[:, None] * skl + d[None, :], mask=m, other=0.0).to(tl.float32)
        if WITH_V:
            vv = tl.load(vb + t[:, None] * svl + d[None, :], mask=m, other=0.0).to(tl.float32)
            sv += vv
            mx = tl.maximum(mx, tl.where(m, vv, float("-inf")))
            mn = tl.minimum(mn, tl.where(m, vv, float("inf")))
    base = PART + (bh * nch + c) * D + d
    tl.store(base, tl.sum(sk, 0))
    if WITH_V:
        tl.store(base + part_stride, tl.sum(sv, 0))
        tl.store(base + 2 * part_stride, tl.max(mx, 0))
        tl.store(base + 3 * part_stride, tl.min(mn, 0))


@triton.jit
def _quant_qk_kernel(
    X, MEAN, OUT, SCALE, L, L_pad, H, mult,
    sxb, sxl, sxh,
    BLK: tl.constexpr, D: tl.constexpr, SUB_MEAN: tl.constexpr, SWZ: tl.constexpr = False,
):  # fmt: skip
    """One block of BLK rows of one head: (x − mean)·mult → INT8, scale = amax/127. SWZ: the
    16-byte chunk c of row t stored at chunk c ^ (t mod 8) (the "sm90" layout)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    t = blk * BLK + tl.arange(0, BLK)
    d = tl.arange(0, D)
    m = t < L
    x = tl.load(X + b * sxb + h * sxh + t[:, None] * sxl + d[None, :], mask=m[:, None], other=0.0)
    x = x.to(tl.float32)
    if SUB_MEAN:
        mu = tl.load(MEAN + bh * D + d)
        x = tl.where(m[:, None], x - mu[None, :], 0.0)
    x = x * mult
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    amax = tl.maximum(amax, 1e-30)
    xs = x * (127.0 / amax)
    xq = (xs + tl.where(xs >= 0, 0.5, -0.5)).to(tl.int8)  # round half away from zero
    rows = (bh.to(tl.int64) * L_pad + t)[:, None]
    if SWZ:
        col = ((d // 16)[None, :] ^ (t % 8)[:, None]) * 16 + (d % 16)[None, :]
    else:
        col = d[None, :]
    tl.store(OUT + rows * D + col, xq)
    tl.store(SCALE + bh * (L_pad // BLK) + blk, amax / 127.0)


@triton.jit
def _quant_v_kernel(
    V, MEAN, INV, OUT, L, L_pad, H,
    svb, svl, svh,
    BT: tl.constexpr, D: tl.constexpr, INT8: tl.constexpr, SM90: tl.constexpr = False,
):  # fmt: skip
    """(v − mean)·inv_scale → FP8 e4m3 or INT8, stored transposed: OUT[b·h, d, t]; SM90
    (INT8 only, BT dividing 128): per 128-key block [d, key position] with the keys of each
    32 in the order of `SM90_KEY_ORDER` and 16-byte chunks swizzled by d mod 8."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    t = blk * BT + tl.arange(0, BT)
    d = tl.arange(0, D)
    if SM90:
        # output position t holds key t - t%16 + SM90_KEY_ORDER[t%16]: gather the keys on
        # load (whole rows, coalesced) so that the stores below stay contiguous
        a = (t % 16) // 4
        e = t % 4
        t = t - t % 16 + tl.where(e < 2, 2 * a + e, 2 * a + 6 + e)
    m = t < L
    v = tl.load(V + b * svb + h * svh + t[:, None] * svl + d[None, :], mask=m[:, None], other=0.0)
    mu = tl.load(MEAN + bh * D + d)
    inv = tl.load(INV + bh * D + d)
    x = tl.where(m[:, None], (v.to(tl.float32) - mu[None, :]) * inv[None, :], 0.0)
    if INT8:
        xq = (x + tl.where(x >= 0, 0.5, -0.5)).to(tl.int8)  # round half away from zero
    else:
        xq = x.to(tl.float8e4nv)
    base = OUT + bh.to(tl.int64) * D * L_pad
    if SM90:
        # [D, BT/16, 16] of this 128-key block: chunk c of channel row d at chunk c ^ (d % 8),
        # each 16-byte chunk one contiguous store
        p0 = blk * BT
        c = (p0 % 128) // 16 + tl.arange(0, BT // 16)
        j = tl.arange(0, 16)
        off = (p0 // 128) * (D * 128) + (d * 128)[:, None, None]
        off = off + ((c[None, :] ^ (d % 8)[:, None]) * 16)[:, :, None] + j[None, None, :]
        tl.store(base + off, tl.reshape(tl.trans(xq), [D, BT // 16, 16]))
    else:
        tl.store(base + d[:, None] * L_pad + t[None, :], tl.trans(xq))


# p ∈ [0, 1] → round(127·p) as int8, four values per asm call: through fp16, where
# 1024 + n holds n in the low bits of its mantissa (two f32→f16x2 conversions, two f16x2
# FMAs p·127 + 1024, one byte permute): 5 instructions per 4 values. cvt.f16x2 puts its
# first source in the upper half, so $1 is in the lower half and selector 0x6420 makes
# byte i = round(127·input i), little-endian, as Triton's pack=4 unpacks it. Rounding is
# to nearest even after an fp16 rounding of p: one step off a plain round on ~2% of
# values (near ties). Measured on an H200 (2026-11-28, the add form p + 1024 of
# p ∈ [0, 127]): 674 → 687 TFLOP/s against adding 1.5·2²³ in fp32 and truncating.
_ROUND_I8X4 = tl.constexpr("""{
    .reg .b32 h0, h1, k, c;
    mov.b32 k, 0x57F057F0;
    mov.b32 c, 0x64006400;
    cvt.rn.f16x2.f32 h0, $2, $1;
    cvt.rn.f16x2.f32 h1, $4, $3;
    fma.rn.f16x2 h0, h0, k, c;
    fma.rn.f16x2 h1, h1, k, c;
    prmt.b32 $0, h0, h1, 0x6420;
}""")


@triton.jit
def _round22(s):
    """s rounded to 22 significant bits, so that 1.5·2²³·s is exact in fp32."""
    return ((s.to(tl.int32, bitcast=True) + 2) & -4).to(tl.float32, bitcast=True)


@triton.jit
def _pv_int8_update(
    p, m_blk, m_i, l_i, acc, DV, bh, j, D: tl.constexpr, BLOCK_N: tl.constexpr
):  # fmt: skip
    """O += P·V with INT8 operands for one key block. p = exp2(S − m_blk) ∈ [0, 1] is
    relative to this block's own row maximum m_blk and rounded to 127·p, so every block
    uses the whole INT8 range; the row scale exp2(m_blk − m)/127, applied to the block's
    int32 product, puts it back on the running scale (it cancels in the softmax
    otherwise). p must not exceed 1 by more than fp16 rounding absorbs: 127.5 would wrap
    to −128 (`_softmax_pv_step` makes the row maximum's exponent exactly 0)."""
    m_new = tl.maximum(m_i, m_blk)
    alpha = tl.math.exp2(m_i - m_new)
    w = tl.math.exp2(m_blk - m_new)
    rs = w * (1.0 / 127.0)
    l_i = l_i * alpha + tl.sum(p, 1) * w
    p8 = tl.inline_asm_elementwise(
        asm=_ROUND_I8X4, constraints="=r,r,r,r,r", args=[p], dtype=tl.int8, is_pure=True, pack=4
    )
    vt = DV.load([bh * D, j * BLOCK_N])  # [D, BLOCK_N] int8
    pv = tl.dot(p8, tl.trans(vt))  # int32, exact: |pv| ≤ 127·127·128 < 2²²
    x = (pv + 0x4B400000).to(tl.float32, bitcast=True)  # = pv + 1.5·2²³ exactly
    # (x − 1.5·2²³)·rs as one FMA x·rs + c with c = −1.5·2²³·rs rounded to fp32: off by at
    # most 0.75·rs, the same for every channel of a row, ≈ 2⁻¹⁴ of a typical block product
    # (H200: 651 → 674 TFLOP/s against subtracting first)
    acc = acc * alpha[:, None] + (x * rs[:, None] + (-12582912.0 * rs)[:, None])
    return m_new, l_i, acc


@triton.jit
def _softmax_pv_step(
    qk, s, m_i, l_i, acc, DV, bh, b, h, j,
    D: tl.constexpr, BLOCK_N: tl.constexpr, PV: tl.constexpr, TWO_LEVEL: tl.constexpr,
):  # fmt: skip
    """One full key block: online softmax of the int32 logits qk (scale s) and O += P·V.
    PV: 0 = bf16, 1 = FP8, 2 = INT8."""
    if PV == 2:
        qk_max = tl.max(qk, 1)
        s = _round22(s)
        # 1.5·2²³ + (qk − qk_max) read as float (exact: |qk − qk_max| < 2²²), then one FMA
        # with the exact −1.5·2²³·s: the correctly rounded (qk − qk_max)·s, ≤ 0 and exactly
        # 0 at the row maximum, so p ≤ 1 there whatever the scale. (Folding m_blk into one
        # bias of size 1.5·2²³·s instead rounds every exponent of the row by up to half an
        # ulp of that bias: from s ≈ 1e-2, i.e. |q|·|k| maxima ≈ 1300, p at the maximum
        # reached 127.5 and wrapped to −128.)
        qkd = (qk + (0x4B400000 - qk_max)[:, None]).to(tl.float32, bitcast=True)
        p = tl.math.exp2(tl.fma(qkd, s, -12582912.0 * s))
        m_blk = qk_max.to(tl.float32) * s
        m_new, l_i, acc = _pv_int8_update(p, m_blk, m_i, l_i, acc, DV, bh, j, D, BLOCK_N)
    else:
        qkf = (qk + 0x4B400000).to(tl.float32, bitcast=True)
        m_new = tl.maximum(m_i, tl.max(qk, 1).to(tl.float32) * s)
        bias = m_new - 8.0 + 12582912.0 * s
        # (qk + 1.5·2²³ read as float) · s − bias = qk·s − m_new + 8, one FMA
        p = tl.math.exp2(qkf * s - bias[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if PV == 1:
            vt = DV.load([bh * D, j * BLOCK_N])  # [D, BLOCK_N]
            p8 = p.to(tl.float8e4nv)
            if TWO_LEVEL:
                acc = acc * alpha[:, None] + tl.dot(p8, tl.trans(vt))
            else:
                acc = tl.dot(p8, tl.trans(vt), acc * alpha[:, None])
        else:
            v = DV.load([b, j * BLOCK_N, h, 0]).reshape(BLOCK_N, D)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_kernel(
    DQ, QS, DK, KS, DV, VMEAN, VSCALE, DO,
    Lk, Lq_pad, Lk_pad, H,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PV: tl.constexpr, TWO_LEVEL: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M query rows of one (batch, head). All tiles move through the
    tensor-memory accelerator (descriptors), so no per-element pointers take registers.
    DQ [B·H·Lq_pad, D] i8, DK [B·H·Lk_pad, D] i8, DV either [B·H·D, Lk_pad] fp8/i8 (PV 1/2)
    or the caller's [B, Lk, H, D] (PV 0), DO the output [B, Lq, H, D] (rows past Lq are clipped
    by the store, keys past Lk of a 4-d V read as zeros)."""
    mblk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = tl.arange(0, BLOCK_N)

    q = DQ.load([bh * Lq_pad + mblk * BLOCK_M, 0])
    qs = tl.load(QS + bh * (Lq_pad // BLOCK_M) + mblk)
    k_row = bh * Lk_pad
    ks_ptr = KS + bh * (Lk_pad // BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    n_full = Lk // BLOCK_N
    for j in range(0, n_full):
        k = DK.load([k_row + j * BLOCK_N, 0])
        s = qs * tl.load(ks_ptr + j)
        qk = tl.dot(q, tl.trans(k))  # int32, exact
        m_i, l_i, acc = _softmax_pv_step(
            qk, s, m_i, l_i, acc, DV, bh, b, h, j, D, BLOCK_N, PV, TWO_LEVEL
        )

    if n_full * BLOCK_N < Lk:  # the last, partial key block
        j = n_full
        valid = (j * BLOCK_N + offs_n) < Lk
        k = DK.load([k_row + j * BLOCK_N, 0])
        s = qs * tl.load(ks_ptr + j)
        qk = tl.dot(q, tl.trans(k))  # int32
        if PV == 2:
            s = _round22(s)
            qk_max = tl.max(tl.where(valid[None, :], qk, -(2**30)), 1)
            d = (qk - qk_max[:, None]).to(tl.float32)  # exact; ≤ 0 on valid keys
            p = tl.where(valid[None, :], tl.math.exp2(d * s), 0.0)
            m_blk = qk_max.to(tl.float32) * s
            m_i, l_i, acc = _pv_int8_update(p, m_blk, m_i, l_i, acc, DV, bh, j, D, BLOCK_N)
        else:
            qk = tl.where(valid[None, :], qk.to(tl.float32) * s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - (m_new - 8.0)[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if PV == 1:
                vt = DV.load([bh * D, j * BLOCK_N])  # padded with zeros
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), tl.trans(vt))
            else:
                v = DV.load([b, j * BLOCK_N, h, 0]).reshape(BLOCK_N, D)  # zeros past Lk
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new

    out = acc * (1.0 / l_i)[:, None]
    if PV != 0:
        d = tl.arange(0, D)
        vscale = tl.load(VSCALE + bh * D + d)
        vmean = tl.load(VMEAN + bh * D + d)
        out = out * vscale[None, :] + vmean[None, :]
    DO.store([b, mblk * BLOCK_M, h, 0], out.to(DO.dtype).reshape(1, BLOCK_M, 1, D))


def _tma_ok(x: torch.Tensor) -> bool:
    e = x.element_size()
    return (
        x.stride(-1) == 1
        and all(st * e % 16 == 0 for st in x.stride()[:-1])
        and x.data_ptr() % 16 == 0
    )


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def v_offset(v_mean: torch.Tensor, v_max: torch.Tensor, v_min: torch.Tensor) -> torch.Tensor:
    """The per-channel offset taken out of v before FP8: its mean where that mean is large
    against the channel's range, else 0. (Subtracting a mean smaller than FP8's step makes
    the rounding error the same sign across tokens, so it no longer averages out in P·V;
    on random normal v that doubled the error.)"""
    amax = torch.maximum(v_max.abs(), v_min.abs())
    return torch.where(v_mean.abs() >= 0.125 * amax, v_mean, torch.zeros_like(v_mean))


PV_MODES = {"bf16": 0, "fp8": 1, "int8": 2}


def quantize_qkv(q, k, v, block_m: int, block_n: int, pv: str = "bf16", layout: str = "plain"):
    """The pre-pass: INT8 q and k with per-block scales; with pv "fp8" or "int8", v − offset
    in that type (transposed) with a per-channel scale. Returns a dict of the quantised
    tensors. layout "sm90" (INT8 P·V, blocks of 64 and 128) writes them as the CUDA kernel
    csrc/attn_int8_sm90.cu reads them (`sm90_relayout` is the reference)."""
    sm90 = layout == "sm90"
    if layout not in ("plain", "sm90") or (sm90 and (pv, block_m, block_n) != ("int8", 64, 128)):
        raise ValueError(
            f"quantize_qkv: layout {layout!r} with pv {pv!r}, blocks {block_m}, {block_n}"
        )
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    BH = B * H
    dev = q.device
    Lq_pad, Lk_pad = _round_up(Lq, PAD), _round_up(Lk, PAD)
    nch = triton.cdiv(Lk, STATS_CHUNK)
    v8 = pv != "bf16"
    part = torch.empty(4 if v8 else 1, BH, nch, D, device=dev, dtype=torch.float32)
    _stats_kernel[(nch, BH)](
        k, v, part, Lk, H, nch, BH * nch * D,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        CHUNK=STATS_CHUNK, BT=16, D=D, WITH_V=v8, num_warps=4,
    )  # fmt: skip
    k_mean = part[0].sum(1) / Lk

    q8 = torch.empty(BH, Lq_pad, D, device=dev, dtype=torch.int8)
    qs = torch.empty(BH, Lq_pad // block_m, device=dev, dtype=torch.float32)
    k8 = torch.empty(BH, Lk_pad, D, device=dev, dtype=torch.int8)
    ks = torch.empty(BH, Lk_pad // block_n, device=dev, dtype=torch.float32)
    mult = D**-0.5 * LOG2E
    _quant_qk_kernel[(Lq_pad // block_m, BH)](
        q, q, q8, qs, Lq, Lq_pad, H, mult, q.stride(0), q.stride(1), q.stride(2),
        BLK=block_m, D=D, SUB_MEAN=False, SWZ=sm90, num_warps=8,
    )  # fmt: skip
    _quant_qk_kernel[(Lk_pad // block_n, BH)](
        k, k_mean, k8, ks, Lk, Lk_pad, H, 1.0, k.stride(0), k.stride(1), k.stride(2),
        BLK=block_n, D=D, SUB_MEAN=True, SWZ=sm90, num_warps=8,
    )  # fmt: skip
    out = dict(q8=q8, qs=qs, k8=k8, ks=ks, Lq_pad=Lq_pad, Lk_pad=Lk_pad)
    if v8:
        int8 = pv == "int8"
        v_max, v_min = part[2].amax(1), part[3].amin(1)
        v_mean = v_offset(part[1].sum(1) / Lk, v_max, v_min)
        v_amax = torch.maximum(v_max - v_mean, v_mean - v_min)
        v_scale = v_amax.clamp_min(1e-30) / (127.0 if int8 else 448.0)
        dtype = torch.int8 if int8 else torch.float8_e4m3fn
        vt8 = torch.empty(BH, D, Lk_pad, device=dev, dtype=dtype)
        _quant_v_kernel[(Lk_pad // 64, BH)](
            v, v_mean, 1.0 / v_scale, vt8, Lk, Lk_pad, H,
            v.stride(0), v.stride(1), v.stride(2),
            BT=64, D=D, INT8=int8, SM90=sm90, num_warps=4,
        )  # fmt: skip
        out.update(vt8=vt8, v_mean=v_mean, v_scale=v_scale)
    return out


# The CUDA kernel's key order within each 32 keys (csrc/attn_int8_sm90.cu): position 4a + e
# of each 16 holds key 2a + e for e < 2 and key 2a + 6 + e otherwise.
SM90_KEY_ORDER = [16 * h + (2 * a + e if e < 2 else 2 * a + 6 + e)
                  for h in range(2) for a in range(4) for e in range(4)]  # fmt: skip


def _swizzle_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., R, 128] int8 → the 16-byte chunk c of row r at chunk c ^ (r mod 8)."""
    *lead, R, D = x.shape
    src = (
        torch.arange(8, device=x.device)[None, :] ^ (torch.arange(R, device=x.device) % 8)[:, None]
    )
    idx = src.view(*([1] * len(lead)), R, 8, 1).expand(*lead, R, 8, 16)
    return x.reshape(*lead, R, 8, 16).gather(-2, idx).reshape(*lead, R, D)


def sm90_relayout(z: dict) -> dict:
    """The "sm90" layout of `quantize_qkv`'s plain INT8 output, by torch ops (the reference
    the Triton pre-pass is tested against): q8, k8 with swizzled rows; vt8 as
    [B·H, Lk_pad/128, 128 channels, 128 keys], keys in SM90_KEY_ORDER per 32, swizzled."""
    BH, D, Lk_pad = z["vt8"].shape
    order = torch.tensor(SM90_KEY_ORDER, device=z["vt8"].device)
    order = (torch.arange(4, device=order.device)[:, None] * 32 + order[None, :]).flatten()
    vt = z["vt8"].view(BH, D, Lk_pad // 128, 128).permute(0, 2, 1, 3).index_select(3, order)
    return dict(z, q8=_swizzle_rows(z["q8"]), k8=_swizzle_rows(z["k8"]),
                vt8=_swizzle_rows(vt.contiguous()).reshape(BH, D, Lk_pad))  # fmt: skip


def _attention_int8_ws(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """INT8 Q·Kᵀ and P·V by the warp-specialised CUDA kernel (lightx2v._C_sm90, H100/H200):
    the pre-pass of `attention_int8(pv="int8")` in the "sm90" layout, then
    torch.ops.lx2v_C.attn_int8_sm90. Called by `attention_int8(pv="int8-ws")` once it has
    checked the shapes."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    from lightx2v.ops.gemm import _sm90_module_status  # imports lightx2v._C and _C_sm90

    ok, why = _sm90_module_status()
    if not ok:
        raise RuntimeError(f"lx2v-int8-int8-ws: {why}")
    # the pre-pass reads rows with a unit last stride (any other strides)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    z = quantize_qkv(q, k, v, 64, 128, "int8", layout="sm90")
    out = torch.empty(B, Lq, H, D, device=q.device, dtype=q.dtype)
    torch.ops.lx2v_C.attn_int8_sm90(
        out, z["q8"], z["qs"], z["k8"], z["ks"], z["vt8"], z["v_mean"], z["v_scale"], Lk
    )
    return out


def attention_int8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pv: str = "bf16",
    config: tuple[int, ...] | None = None,
    two_level: bool | None = None,
) -> torch.Tensor:
    """softmax(q·kᵀ/√D)·v over [B, L, H, D] tensors (bf16/fp16, D = 128); returns a new
    contiguous [B, Lq, H, D] tensor of q's dtype. Q·Kᵀ in INT8; P·V in `pv`: "bf16" (v's
    own 16-bit type), "fp8" or "int8" (or "int8-ws": INT8 by the CUDA kernel,
    `_attention_int8_ws`)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if pv not in PV_MODES and pv != "int8-ws":
        raise ValueError(f"lx2v-int8 attention: pv must be one of {sorted(PV_MODES)}, got {pv!r}")
    if D != 128 or k.shape[-1] != D or v.shape[-1] != D:
        raise ValueError(f"lx2v-int8 attention needs head dim 128, got {q.shape[-1]}")
    if Lk == 0 or Lq == 0:
        raise ValueError("lx2v-int8 attention needs non-empty q and k")
    if pv == "int8-ws":
        if config is not None or two_level is not None:
            raise ValueError("lx2v-int8 attention: pv 'int8-ws' (the CUDA kernel) takes no config")
        return _attention_int8_ws(q, k, v)
    # TMA needs a unit last stride and 16-byte aligned other strides and base
    q, k, v = (x if _tma_ok(x) else x.contiguous() for x in (q, k, v))
    # a 5th config entry, when given, caps registers per thread (ptxas .maxnreg)
    block_m, block_n, warps, stages, *maxnreg = config or CONFIGS[pv]
    opts = {"maxnreg": maxnreg[0]} if maxnreg else {}
    two_level = FP8_TWO_LEVEL if two_level is None else two_level
    qz = quantize_qkv(q, k, v, block_m, block_n, pv)
    out = torch.empty(B, Lq, H, D, device=q.device, dtype=q.dtype)
    grid = (triton.cdiv(Lq, block_m), B * H)
    dq = _desc(qz["q8"].view(-1, D), [block_m, D])
    dk = _desc(qz["k8"].view(-1, D), [block_n, D])
    if pv != "bf16":
        dv = _desc(qz["vt8"].view(-1, qz["Lk_pad"]), [D, block_n])
        vmean, vscale = qz["v_mean"], qz["v_scale"]
    else:
        dv = _desc(v, [1, block_n, 1, D])
        vmean = vscale = qz["qs"]  # unused
    do = _desc(out, [1, block_m, 1, D])
    _attn_fwd_kernel[grid](
        dq, qz["qs"], dk, qz["ks"], dv, vmean, vscale, do,
        Lk, qz["Lq_pad"], qz["Lk_pad"], H,
        D=D, BLOCK_M=block_m, BLOCK_N=block_n, PV=PV_MODES[pv], TWO_LEVEL=two_level,
        num_warps=warps, num_stages=stages, **opts,
    )  # fmt: skip
    return out


def _desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


def config(pv: str) -> tuple[int, ...]:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]) used by default for a P·V
    precision ("int8-ws", the CUDA kernel, quantises with the blocks of "int8")."""
    return CONFIGS["int8" if pv == "int8-ws" else pv]
