"""FP8 / INT8 quantization formats: the definitions, in plain PyTorch, fp32 inside.

Weights (converted ahead of time):
- FP8: float8_e4m3fn with one fp32 scale per output channel (row), scale = amax(row) / 448
  (as amax · fp32(1/448), see _row_scale),
  so the largest element of every row maps to e4m3's largest finite value. deq = q · scale.
- INT8: int8 in [-127, 127] (symmetric, -128 unused), scale = amax(row) / 127,
  q = round(w / scale).

Activations (at run time): the same recipes per token (per row of x [M, K]), computed
dynamically for every call.

Rows of zeros get a tiny positive scale so that nothing divides by zero and they
dequantize to exact zeros.

Every function here works on any device; the CUDA matmul paths in linear.py consume
exactly these tensors.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
INT8_MAX = 127.0
# smallest amax used for a scale: keeps all-zero rows finite (they quantize to 0 anyway)
_AMAX_FLOOR = 1e-12

SCHEMES = ("fp8", "int8", "bf16")


def _row_scale(x2d: torch.Tensor, qmax: float) -> torch.Tensor:
    """Per-row scale amax/qmax as fp32 [R, 1] (x2d is [R, C], any float dtype).

    Computed as amax · fp32(1/qmax): that is what PyTorch's CUDA kernels do for a division
    by a Python scalar, so CPU, CUDA eager, compiled and the Triton kernel agree bit for bit
    (an IEEE division would differ by one ulp in some rows).
    """
    amax = x2d.abs().amax(dim=1, keepdim=True).float()
    return amax.clamp(min=_AMAX_FLOOR) * (1.0 / qmax)


def quantize_rows_fp8(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] float → (q [R, C] float8_e4m3fn, scale [R] fp32), one scale per row."""
    scale = _row_scale(x2d, FP8_MAX)
    q = x2d.to(torch.float32, copy=True).div_(scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.squeeze(1)


def quantize_rows_int8(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] float → (q [R, C] int8 in [-127, 127], scale [R] fp32), one scale per row."""
    scale = _row_scale(x2d, INT8_MAX)
    q = x2d.to(torch.float32, copy=True).div_(scale).round_().clamp_(-INT8_MAX, INT8_MAX)
    q = q.to(torch.int8)
    return q, scale.squeeze(1)


def quantize_weight(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear weight [N, K] → (q [N, K], scale [N] fp32) per output channel."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D linear weight, got shape {tuple(w.shape)}")
    if scheme == "fp8":
        return quantize_rows_fp8(w)
    if scheme == "int8":
        return quantize_rows_int8(w)
    raise ValueError(f"unknown weight quantization scheme {scheme!r}")


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q [N, K], scale [N]) → fp32 [N, K]."""
    return q.float() * scale.float()[:, None]


def quantize_per_token(x2d: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: x [M, K] → (q [M, K], scale [M, 1] fp32)."""
    qfn = quantize_rows_fp8 if scheme == "fp8" else quantize_rows_int8
    q, s = qfn(x2d)
    return q, s[:, None]


def weight_error(w: torch.Tensor, scheme: str) -> float:
    """‖W − deq(q(W))‖_F / ‖W‖_F for one weight (0 for an all-zero W)."""
    w = w.float()
    q, s = quantize_weight(w, scheme)
    den = w.norm().item()
    return (w - dequantize_weight(q, s)).norm().item() / den if den > 0 else 0.0


def scaled_linear_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    scheme: str,
    quantize_activations: bool = True,
) -> torch.Tensor:
    """The definition of a W8A8 linear: y = deq(q(x)) · deq(W)ᵀ + b, fp32 inside.

    x [..., K] → [..., N] in x's dtype. With quantize_activations=False it is the
    weight-only (W8A16) product, used to separate the two error sources.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if quantize_activations:
        xq, xs = quantize_per_token(x2, scheme)
        xf = xq.float() * xs
    else:
        xf = x2.float()
    y = xf @ dequantize_weight(qweight, weight_scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])
