"""q/k RMSNorm over the full hidden dim, then Wan's 3D rotary embedding, fused.

    rms_norm(x, w)                    = x · rsqrt(mean_D(x²) + eps) · w, cast to x's dtype
    qk_norm_rope(q, k, wq, wk, cos, sin, num_heads)
        = (rope(rms_norm(q, wq)), rope(rms_norm(k, wk))) as [B, L, N, Dh]

rope turns each head's interleaved pairs (x[2j], x[2j+1]) as complex numbers by the token's
angle j: (re·cos − im·sin, re·sin + im·cos). The angle tables cos/sin are [L, Dh/2] fp32
(or [L, 1, Dh/2], as WanDiT.rope builds them; j < 22 frame, then 21 height, 21 width pairs
at Dh = 128); they are shared by all heads and the batch.

Shapes: q, k [B, L, D] (D = N·Dh; any batch/row strides, so the slices of a fused qkv
projection pass without a copy); weights [D]. Outputs are new contiguous [B, L, N, Dh]
in q's dtype, the layout lightx2v.ops.attention takes. Everything is fp32 inside and
rounded once at the end (the unfused model rounds to bf16 between norm and rope too).
"""

import torch

from lightx2v.ops.dispatch import csrc, cuda_impl, kernel_module, use_kernels

# ---------------------------------------------------------------------------------------
# references: the definition of each op, fp32 inside


def rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def rms_norm_ref(x, weight, eps: float = 1e-6):
    return rms_norm_fp32(x, weight, eps).to(x.dtype)


def rope_fp32(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of h [B, L, D] (fp32) by cos/sin [L, Dh/2] → [B, L, N, Dh]."""
    half = cos.shape[-1]
    hp = h.unflatten(-1, (-1, half, 2))  # [B, L, N, Dh/2, 2]
    c, s = cos.reshape(-1, 1, half).float(), sin.reshape(-1, 1, half).float()  # [L, 1, Dh/2]
    re, im = hp[..., 0], hp[..., 1]
    return torch.stack([re * c - im * s, re * s + im * c], dim=-1).flatten(-2)


def qk_norm_rope_ref(q, k, weight_q, weight_k, cos, sin, num_heads: int, eps: float = 1e-6):
    del num_heads  # implied by cos: N = D / (2 · cos.shape[-1])
    q_out = rope_fp32(rms_norm_fp32(q, weight_q, eps), cos, sin).to(q.dtype)
    k_out = rope_fp32(rms_norm_fp32(k, weight_k, eps), cos, sin).to(k.dtype)
    return q_out, k_out


# ---------------------------------------------------------------------------------------
# custom ops: the reference by default; on CUDA the op's backend (dispatch.cuda_impl):
# the csrc kernel, else the Triton kernel, else the reference


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _table(t: torch.Tensor) -> torch.Tensor:
    """[L, Dh/2] or [L, 1, Dh/2] → fp32 [L, Dh/2] with unit last stride."""
    return _unit_last(t.reshape(t.shape[0], t.shape[-1]).float())


@torch.library.custom_op("lx2v::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_ref(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_rms_norm_op.register_kernel("cuda")
def _(x, weight, eps):
    impl = cuda_impl("rms_norm", x)
    if impl == "cuda":
        return csrc().rms_norm(x, weight, eps)
    if impl == "ref":
        return rms_norm_ref(x, weight, eps)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        kernel_module("rope").rms_norm_rope(_unit_last(x), out, weight.contiguous(), eps)
    return out


@torch.library.custom_op("lx2v::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(
    q: torch.Tensor,
    k: torch.Tensor,
    weight_q: torch.Tensor,
    weight_k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return qk_norm_rope_ref(q, k, weight_q, weight_k, cos, sin, num_heads, eps)


@_qk_norm_rope_op.register_fake
def _(q, k, weight_q, weight_k, cos, sin, num_heads, eps):
    B, L, D = q.shape
    shape = (B, L, num_heads, D // num_heads)
    return q.new_empty(shape), k.new_empty(shape)


@_qk_norm_rope_op.register_kernel("cuda")
def _(q, k, weight_q, weight_k, cos, sin, num_heads, eps):
    B, L, D = q.shape
    impl = cuda_impl("qk_norm_rope", q, k=k, head_dim=D // num_heads)
    if impl == "cuda":
        return csrc().qk_norm_rope(q, k, weight_q, weight_k, cos, sin, num_heads, eps)
    if impl == "ref":
        return qk_norm_rope_ref(q, k, weight_q, weight_k, cos, sin, num_heads, eps)
    shape = (B, L, num_heads, D // num_heads)
    q_out = torch.empty(shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(shape, dtype=k.dtype, device=k.device)
    if q_out.numel():
        kr = kernel_module("rope")
        cos, sin = _table(cos), _table(sin)
        if cos.stride() != sin.stride():
            sin = sin.contiguous()
            cos = cos.contiguous()
        for x, w, out in ((q, weight_q, q_out), (k, weight_k, k_out)):
            kr.rms_norm_rope(
                _unit_last(x), out.view(B, L, D), w.contiguous(), eps, cos=cos, sin=sin
            )
    return q_out, k_out


# ---------------------------------------------------------------------------------------
# the API the model calls


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x · rsqrt(mean(x²) + eps) · weight over the last dim, fp32 inside: [B, L, D] → same."""
    if x.dim() != 3 or weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: x {tuple(x.shape)} with weight {tuple(weight.shape)}")
    if use_kernels(x, "rms_norm"):
        return torch.ops.lx2v.rms_norm(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def qk_norm_rope(
    q: torch.Tensor,  # [B, L, D]
    k: torch.Tensor,  # [B, L, D]
    weight_q: torch.Tensor,  # [D]
    weight_k: torch.Tensor,  # [D]
    cos: torch.Tensor,  # [L, Dh/2] or [L, 1, Dh/2] fp32
    sin: torch.Tensor,  # same shape as cos
    num_heads: int,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm (full dim, weight) + rotary embedding of q and k → two [B, L, N, Dh] tensors."""
    if q.dim() != 3 or q.shape != k.shape:
        raise ValueError(f"qk_norm_rope: q {tuple(q.shape)} and k {tuple(k.shape)}")
    B, L, D = q.shape
    if D % num_heads or (D // num_heads) != 2 * cos.shape[-1]:
        raise ValueError(f"qk_norm_rope: D={D}, {num_heads} heads, cos {tuple(cos.shape)}")
    if cos.shape != sin.shape or cos.shape[0] != L or cos.numel() != L * cos.shape[-1]:
        raise ValueError(f"qk_norm_rope: cos {tuple(cos.shape)} / sin {tuple(sin.shape)}, L={L}")
    if weight_q.shape != (D,) or weight_k.shape != (D,):
        raise ValueError(f"qk_norm_rope: weights {tuple(weight_q.shape)}, D={D}")
    if use_kernels(q, "qk_norm_rope"):
        return torch.ops.lx2v.qk_norm_rope(q, k, weight_q, weight_k, cos, sin, num_heads, eps)
    return qk_norm_rope_ref(q, k, weight_q, weight_k, cos, sin, num_heads, eps)
