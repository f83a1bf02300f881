"""LayerNorm for the DiT block: adaLN (LN + modulation) and the affine LayerNorm, fused.

    adaln(x, shift, scale)             = LN(x) · (1 + scale) + shift, cast to out_dtype
    adaln_fp8(x, shift, scale)         = the same, as float8_e4m3fn q and per-token scale s
                                         with h ≈ q · s, s = max(amax_row |h|, 1e-12) / 448,
                                         q = h · (448 / amax) rounded to nearest
    affine_layer_norm(x, weight, bias) = LN(x) · weight + bias, cast to out_dtype
    affine_layer_norm_fp8(x, w, b)     = the same, as q and s quantized like adaln_fp8

The FP8 variants feed an FP8 linear directly (FP8Linear takes the (q, s) pair): the norm
writes 1 byte per element instead of 2, and the linear skips its per-token quantization
(another read of the bf16 activation and write of its FP8 copy).

LN is affine-free: mean and variance over the last dim in fp32, eps inside the root.
Shapes: x [B, L, D] (the fp32 residual stream; any float dtype and any batch/row strides);
shift, scale [B, D] or [B, 1, D] (one vector per batch row; [1, D] broadcasts); weight,
bias [D]. Outputs are new contiguous [B, L, D] tensors; the FP8 scale is [B, L, 1] fp32 so
`q.float() * s` dequantizes and `s.view(-1, 1)` is the rowwise scale torch._scaled_mm takes.
"""

import torch
import torch.nn.functional as F

from lightx2v.ops.dispatch import csrc, cuda_impl, kernel_module, use_kernels

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_MIN_AMAX = 1e-12  # keeps an all-zero row's scale finite


# ---------------------------------------------------------------------------------------
# references: the definition of each op, fp32 inside


def adaln_fp32(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float):
    """LN(x) · (1 + scale) + shift in fp32, [B, L, D] with [B, D] modulation."""
    h = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return h * (1 + scale.float()[:, None]) + shift.float()[:, None]


def adaln_ref(x, shift, scale, eps: float = 1e-6, out_dtype: torch.dtype = torch.bfloat16):
    return adaln_fp32(x, shift, scale, eps).to(out_dtype)


def quantize_fp8_per_token(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h [..., D] → (q float8_e4m3fn [..., D], s fp32 [..., 1]) with h ≈ q · s.

    q = clamp(h · (448 / amax)) rounded to nearest even, s = amax / 448, amax ≥ 1e-12.
    """
    h = h.float()
    amax = h.abs().amax(-1, keepdim=True).clamp(min=FP8_MIN_AMAX)
    q = (h * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, amax / FP8_MAX


def adaln_fp8_ref(x, shift, scale, eps: float = 1e-6):
    return quantize_fp8_per_token(adaln_fp32(x, shift, scale, eps))


def affine_layer_norm_fp32(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """LN(x) · weight + bias in fp32, [B, L, D] with [D] weight and bias."""
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps)


def affine_layer_norm_ref(
    x, weight, bias, eps: float = 1e-6, out_dtype: torch.dtype = torch.bfloat16
):
    return affine_layer_norm_fp32(x, weight, bias, eps).to(out_dtype)


def affine_layer_norm_fp8_ref(x, weight, bias, eps: float = 1e-6):
    return quantize_fp8_per_token(affine_layer_norm_fp32(x, weight, bias, eps))


# ---------------------------------------------------------------------------------------
# custom ops: the reference by default; on CUDA the op's backend (dispatch.cuda_impl):
# the csrc kernel (where dispatch.CUDA_OPS lists the op), else the Triton kernel, else the
# reference


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _fp8_outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (q float8_e4m3fn [B, L, D], s fp32 [B, L, 1]) for a per-token FP8 norm of x."""
    return (
        x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
        x.new_empty((*x.shape[:-1], 1), dtype=torch.float32),
    )


def _triton_fp8(x: torch.Tensor, eps: float, **tables) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton norm kernel with FP8 output; tables: shift/scale or weight/bias."""
    out, out_scale = _fp8_outputs(x)
    if out.numel():
        kernel_module("norm").layer_norm(_unit_last(x), out, eps, out_scale=out_scale, **tables)
    return out, out_scale


@torch.library.custom_op("lx2v::adaln", mutates_args=())
def _adaln_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> torch.Tensor:
    return adaln_ref(x, shift, scale, eps, out_dtype)


@_adaln_op.register_fake
def _(x, shift, scale, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@_adaln_op.register_kernel("cuda")
def _(x, shift, scale, eps, out_dtype):
    if cuda_impl("adaln", x) == "ref":
        return adaln_ref(x, shift, scale, eps, out_dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if out.numel():
        kernel_module("norm").layer_norm(
            _unit_last(x), out, eps, shift=_unit_last(shift), scale=_unit_last(scale)
        )
    return out


@torch.library.custom_op("lx2v::adaln_fp8", mutates_args=())
def _adaln_fp8_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return adaln_fp8_ref(x, shift, scale, eps)


@_adaln_fp8_op.register_fake
def _(x, shift, scale, eps):
    return _fp8_outputs(x)


@_adaln_fp8_op.register_kernel("cuda")
def _(x, shift, scale, eps):
    impl = cuda_impl("adaln_fp8", x)
    if impl == "cuda":
        return csrc().adaln_fp8(x, shift, scale, eps)
    if impl == "ref":
        return adaln_fp8_ref(x, shift, scale, eps)
    return _triton_fp8(x, eps, shift=_unit_last(shift), scale=_unit_last(scale))


@torch.library.custom_op("lx2v::affine_layer_norm", mutates_args=())
def _affine_layer_norm_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> torch.Tensor:
    return affine_layer_norm_ref(x, weight, bias, eps, out_dtype)


@_affine_layer_norm_op.register_fake
def _(x, weight, bias, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@_affine_layer_norm_op.register_kernel("cuda")
def _(x, weight, bias, eps, out_dtype):
    if cuda_impl("affine_layer_norm", x) == "ref":
        return affine_layer_norm_ref(x, weight, bias, eps, out_dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if out.numel():
        kernel_module("norm").layer_norm(
            _unit_last(x), out, eps, weight=weight.contiguous(), bias=bias.contiguous()
        )
    return out


@torch.library.custom_op("lx2v::affine_layer_norm_fp8", mutates_args=())
def _affine_layer_norm_fp8_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return affine_layer_norm_fp8_ref(x, weight, bias, eps)


@_affine_layer_norm_fp8_op.register_fake
def _(x, weight, bias, eps):
    return _fp8_outputs(x)


@_affine_layer_norm_fp8_op.register_kernel("cuda")
def _(x, weight, bias, eps):
    impl = cuda_impl("affine_layer_norm_fp8", x)
    if impl == "cuda":
        return csrc().affine_layer_norm_fp8(x, weight, bias, eps)
    if impl == "ref":
        return affine_layer_norm_fp8_ref(x, weight, bias, eps)
    return _triton_fp8(x, eps, weight=weight.contiguous(), bias=bias.contiguous())


# ---------------------------------------------------------------------------------------
# the API the model calls


def _check_x(x: torch.Tensor) -> None:
    if x.dim() != 3 or not x.dtype.is_floating_point:
        raise ValueError(f"expected x [B, L, D] floating point, got {tuple(x.shape)} {x.dtype}")


def _check_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    _check_x(x)
    D = x.shape[-1]
    if weight.shape != (D,) or bias.shape != (D,):
        raise ValueError(f"weight/bias {tuple(weight.shape)}/{tuple(bias.shape)} do not fit D={D}")


def _modulation(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B, D], [B, 1, D] or [1, D] → [B, D] (a view; a batch of one broadcasts)."""
    B, _, D = x.shape
    if v.dim() == 3 and v.shape[1] == 1:
        v = v.squeeze(1)
    if v.dim() != 2 or v.shape[-1] != D or v.shape[0] not in (1, B):
        raise ValueError(f"modulation of shape {tuple(v.shape)} does not fit x {tuple(x.shape)}")
    return v.expand(B, D)


def adaln(
    x: torch.Tensor,  # [B, L, D]
    shift: torch.Tensor,  # [B, D]
    scale: torch.Tensor,  # [B, D]
    eps: float = 1e-6,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """LN(x) · (1 + scale) + shift, fp32 inside, cast to out_dtype: [B, L, D]."""
    _check_x(x)
    shift, scale = _modulation(shift, x), _modulation(scale, x)
    if use_kernels(x, "adaln"):
        return torch.ops.lx2v.adaln(x, shift, scale, eps, out_dtype)
    return adaln_ref(x, shift, scale, eps, out_dtype)


def adaln_fp8(
    x: torch.Tensor,  # [B, L, D]
    shift: torch.Tensor,  # [B, D]
    scale: torch.Tensor,  # [B, D]
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """adaLN quantized per token: (q float8_e4m3fn [B, L, D], s fp32 [B, L, 1]), h ≈ q · s."""
    _check_x(x)
    shift, scale = _modulation(shift, x), _modulation(scale, x)
    if use_kernels(x, "adaln_fp8"):
        return torch.ops.lx2v.adaln_fp8(x, shift, scale, eps)
    return adaln_fp8_ref(x, shift, scale, eps)


def affine_layer_norm(
    x: torch.Tensor,  # [B, L, D]
    weight: torch.Tensor,  # [D]
    bias: torch.Tensor,  # [D]
    eps: float = 1e-6,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """LN(x) · weight + bias, fp32 inside, cast to out_dtype: [B, L, D]."""
    _check_affine(x, weight, bias)
    if use_kernels(x, "affine_layer_norm"):
        return torch.ops.lx2v.affine_layer_norm(x, weight, bias, eps, out_dtype)
    return affine_layer_norm_ref(x, weight, bias, eps, out_dtype)


def affine_layer_norm_fp8(
    x: torch.Tensor,  # [B, L, D]
    weight: torch.Tensor,  # [D]
    bias: torch.Tensor,  # [D]
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine LayerNorm quantized per token: (q float8_e4m3fn [B, L, D], s fp32 [B, L, 1])."""
    _check_affine(x, weight, bias)
    if use_kernels(x, "affine_layer_norm_fp8"):
        return torch.ops.lx2v.affine_layer_norm_fp8(x, weight, bias, eps)
    return affine_layer_norm_fp8_ref(x, weight, bias, eps)
