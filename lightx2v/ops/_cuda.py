"""The Python side of lightx2v._C (csrc/): fake kernels of the `lx2v_C` ops, and the calls
that the CUDA implementations of the `lx2v` custom ops make when the cuda backend is active.

Importing this module imports lightx2v._C, whose library registers torch.ops.lx2v_C.*;
lightx2v.ops.dispatch (through `dispatch.csrc()`) and lightx2v.ops.gemm import it only where
a CUDA device is.

    torch.ops.lx2v_C.rms_norm(out, x, weight, eps)
    torch.ops.lx2v_C.qk_norm_rope(q_out, k_out, q, k, weight_q, weight_k, cos, sin, eps)
    torch.ops.lx2v_C.adaln_fp8(out, out_scale, x, shift, scale, eps, affine=False)
    torch.ops.lx2v_C.fp8_gemm[_gelu](out, a, a_scale, b, b_scale, bias)    (lightx2v/ops/gemm.py;
    torch.ops.lx2v_C.fp8_gemm_residual(res, a, a_scale, b, b_scale, bias, gate)   kernels in
                                                                            lightx2v._C_sm90)
    torch.ops.lx2v_C.attn_int8_sm90(out, q8, qs, k8, ks, vt8, vmean, vscale, Lk)   (kernels/
                                                         attention.py; lightx2v._C_sm90)

Each writes its caller-allocated outputs (schemas mark them `Tensor(a!)`) and returns
nothing. Inputs: x, q, k [B, L, D] float32/bfloat16/float16 with a unit last stride and rows
that start on 16-byte boundaries (any batch and token strides: a slice of a fused qkv
projection passes as is); weights [D], shift/scale [B, D] and cos/sin [L, Dh/2] in fp32.
Outputs are contiguous: rms_norm [B, L, D] in x's dtype; q_out, k_out [B, L, N, Dh] in q's
dtype; out [B, L, D] float8_e4m3fn and out_scale [B, L, 1] fp32. The kernels take D a
multiple of 16 bytes of elements (8 for 16-bit, 4 for fp32) up to 16384, and for rope a head
dim that is such a multiple too; `unsupported` says when an input is outside that.
"""

import torch

import lightx2v._C as _C

MAX_DIM = 16384  # csrc/ops.h kMaxDim: 32 values per thread × 512 threads
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

kernel_image_status = _C.kernel_image_status  # "" when the kernels run on this GPU
compiled_arches = _C.compiled_arches


# ---------------------------------------------------------------------------------------
# fake kernels: the ops only write their outputs


@torch.library.register_fake("lx2v_C::rms_norm")
def _(out, x, weight, eps):
    return None


@torch.library.register_fake("lx2v_C::qk_norm_rope")
def _(q_out, k_out, q, k, weight_q, weight_k, cos, sin, eps):
    return None


@torch.library.register_fake("lx2v_C::adaln_fp8")
def _(out, out_scale, x, shift, scale, eps, affine=False):
    return None


# The warp-specialised INT8 attention (kernels/attention.py, _attention_int8_ws); its CUDA
# kernel comes with lightx2v._C_sm90.
@torch.library.register_fake("lx2v_C::attn_int8_sm90")
def _(out, q8, qs, k8, ks, vt8, vmean, vscale, Lk):
    return None


# The FP8 GEMMs (lightx2v/ops/gemm.py); their CUDA kernels come with lightx2v._C_sm90.
@torch.library.register_fake("lx2v_C::fp8_gemm")
def _(out, a, a_scale, b, b_scale, bias):
    return None


@torch.library.register_fake("lx2v_C::fp8_gemm_gelu")
def _(out, a, a_scale, b, b_scale, bias):
    return None


@torch.library.register_fake("lx2v_C::fp8_gemm_residual")
def _(res, a, a_scale, b, b_scale, bias, gate):
    return None


# ---------------------------------------------------------------------------------------
# which inputs the kernels take


def _chunk(dtype: torch.dtype) -> int:
    """Elements per 16-byte load."""
    return 16 // dtype.itemsize


def unsupported(
    op: str, x: torch.Tensor, *, k: torch.Tensor | None = None, head_dim: int | None = None
) -> str | None:
    """Why op's kernel does not take input x (k, head_dim: qk_norm_rope), or None if it does."""
    if x.dtype not in DTYPES:
        return f"{x.dtype} input"
    D, n = x.shape[-1], _chunk(x.dtype)
    if D % n or D > MAX_DIM:
        return f"D={D} ({x.dtype} rows need a multiple of {n}, at most {MAX_DIM})"
    if op == "qk_norm_rope":
        if k.dtype != x.dtype:
            return f"q {x.dtype} with k {k.dtype}"
        if head_dim % n:
            return f"head dim {head_dim} ({x.dtype} heads need a multiple of {n})"
    return None


# ---------------------------------------------------------------------------------------
# layouts: copies only where an input's layout is off


def _aligned(t: torch.Tensor, dims: int) -> bool:
    """Unit last stride, and each of the first `dims` dims steps in whole 16 bytes."""
    es = t.element_size()
    return (
        t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all(size == 1 or stride * es % 16 == 0 for size, stride in zip(t.shape[:dims], t.stride()[:dims], strict=True))
    )  # fmt: skip


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, L, D] as the kernels read it: as is when its rows are 16-byte aligned."""
    return x if _aligned(x, 2) else x.clone(memory_format=torch.contiguous_format)


def _table(t: torch.Tensor) -> torch.Tensor:
    """An fp32 vector [D] or matrix [n, D] with 16-byte aligned rows."""
    t = t.float()
    return t if _aligned(t, t.dim() - 1) else t.clone(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------
# the calls lightx2v.ops makes (inputs already validated there)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x · rsqrt(mean(x²) + eps) · weight, fp32 inside: [B, L, D] → contiguous, x's dtype."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        torch.ops.lx2v_C.rms_norm(out, _rows(x), _table(weight), eps)
    return out


def qk_norm_rope(
    q: torch.Tensor,  # [B, L, D]
    k: torch.Tensor,  # [B, L, D]
    weight_q: torch.Tensor,  # [D]
    weight_k: torch.Tensor,  # [D]
    cos: torch.Tensor,  # [L, Dh/2] or [L, 1, Dh/2]
    sin: torch.Tensor,  # same shape as cos
    num_heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rope(rms_norm(q)), rope(rms_norm(k)) in one launch → two [B, L, N, Dh] tensors."""
    B, L, D = q.shape
    shape = (B, L, num_heads, D // num_heads)
    q_out = torch.empty(shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(shape, dtype=k.dtype, device=k.device)
    if q_out.numel():
        half = cos.shape[-1]
        cos, sin = _table(cos.reshape(L, half)), _table(sin.reshape(L, half))
        if cos.stride() != sin.stride():  # the kernel walks both with one stride
            cos, sin = cos.contiguous(), sin.contiguous()
        torch.ops.lx2v_C.qk_norm_rope(
            q_out, k_out, _rows(q), _rows(k), _table(weight_q), _table(weight_k), cos, sin, eps
        )
    return q_out, k_out


def adaln_fp8(
    x: torch.Tensor,  # [B, L, D]
    shift: torch.Tensor,  # [B, D]
    scale: torch.Tensor,  # [B, D]
    eps: float,
    affine: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LN(x)·(1 + scale) + shift quantized per token: (q e4m3 [B, L, D], s fp32 [B, L, 1]);
    affine: LN(x)·scale + shift."""
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    out_scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    if out.numel():
        torch.ops.lx2v_C.adaln_fp8(
            out, out_scale, _rows(x), _table(shift), _table(scale), eps, affine=affine
        )
    return out, out_scale


def affine_layer_norm_fp8(
    x: torch.Tensor,  # [B, L, D]
    weight: torch.Tensor,  # [D]
    bias: torch.Tensor,  # [D]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LN(x)·weight + bias quantized per token: the adaLN kernel with one weight/bias table
    for the whole batch (stride 0)."""
    B, D = x.shape[0], x.shape[-1]
    w, b = _table(weight).expand(B, D), _table(bias).expand(B, D)  # fp32 first: no copy
    return adaln_fp8(x, b, w, eps, affine=True)
