"""FP8 GEMM with fused epilogues: the per-token × per-channel scaled GEMM of FP8Linear with
what follows it in a Wan block folded into the GEMM's epilogue.

    fp8_linear(a, sa, w, sw, bias)               y = (a·sa) @ (w·sw)ᵀ + bias → bf16 [M, N]
    fp8_linear_gelu(a, sa, w, sw, bias)          gelu_tanh(y) → bf16 [M, N]   (FFN up)
    fp8_linear_residual_(res, a, sa, w, sw, bias, gate)
                                                 res += gate · y, fp32, in place (attention
                                                 output and FFN down projections)

Operands as FP8Linear holds them (lightx2v/quant/linear.py): a [M, K] float8_e4m3fn with a
per-token fp32 scale sa ([M] or [M, 1]); the weight w [N, K] float8_e4m3fn with a
per-output-channel fp32 scale sw [N]; bias [N] (any float dtype; used as bf16, as
torch._scaled_mm takes it). res is the fp32 residual stream [B, L, N] with M = B·L; gate is
[B, N] fp32 (one vector per batch row) or None.

Backends, chosen per call:
- "cuda": the CUTLASS kernels of csrc/fp8_gemm_*_sm90.cu in lightx2v._C_sm90 (torch.ops.lx2v_C
  .fp8_gemm*), on compute capability 9.0 (H100/H200) when that extension is built. The
  epilogue works on the fp32 accumulator: y is not rounded to bf16 before GELU or before it
  enters the residual (the unfused chain rounds it), so the fused ops are the more accurate.
- "unfused": torch._scaled_mm (bf16 y, use_fast_accum=True like FP8Linear) followed by the
  separate ops (GELU; the gated residual), on other GPUs of compute capability ≥ 8.9.
- "ref": the fp32 definitions below (`*_ref`), on the CPU and older GPUs.

`epilogue_backend(device)` says which one runs and why; `lx2v info` prints it. The kernel
backend ref or triton (LX2V_KERNELS, dispatch.set_kernel_backend) turns the CUDA kernels off
(there is no Triton version), leaving the unfused chain.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

import torch
import torch.nn.functional as F

from lightx2v.ops import dispatch

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn


# ---------------------------------------------------------------------------------------
# references: the definition of each op, fp32 inside


def fp8_gemm_fp32(
    a: torch.Tensor,  # [M, K] float8
    a_scale: torch.Tensor,  # [M] or [M, 1]
    w: torch.Tensor,  # [N, K] float8
    w_scale: torch.Tensor,  # [N]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:
    """(a · a_scale) @ (w · w_scale)ᵀ + bias in fp32: [M, N]. The bias is taken as bf16, as
    every backend takes it."""
    a32 = a.float() * a_scale.float().reshape(-1, 1)
    w32 = w.float() * w_scale.float().reshape(-1, 1)
    y = a32 @ w32.t()
    return y if bias is None else y + bias.to(torch.bfloat16).float()


def fp8_linear_ref(a, a_scale, w, w_scale, bias=None) -> torch.Tensor:
    return fp8_gemm_fp32(a, a_scale, w, w_scale, bias).to(torch.bfloat16)


def fp8_linear_gelu_ref(a, a_scale, w, w_scale, bias=None) -> torch.Tensor:
    """gelu_tanh of the fp32 GEMM, rounded to bf16 once."""
    y = fp8_gemm_fp32(a, a_scale, w, w_scale, bias)
    return F.gelu(y, approximate="tanh").to(torch.bfloat16)


def fp8_linear_residual_ref_(res, a, a_scale, w, w_scale, bias=None, gate=None) -> torch.Tensor:
    """res [B, L, N] += gate[:, None] · y (or += y), y the fp32 GEMM; returns res."""
    B, L, N = res.shape
    y = fp8_gemm_fp32(a, a_scale, w, w_scale, bias).view(B, L, N)
    if gate is not None:
        y = y * gate.float().reshape(-1, 1, N)
    return res.add_(y)


# ---------------------------------------------------------------------------------------
# which backend runs


def _sm90_module_status() -> tuple[bool, str]:
    """Whether lightx2v._C_sm90 loads (after lightx2v._C, which declares the ops)."""
    if importlib.util.find_spec("lightx2v._C_sm90") is None:
        return False, (
            "lightx2v._C_sm90 is not built (it needs TORCH_CUDA_ARCH_LIST with 9.0a and the "
            "CUTLASS headers: `pip install nvidia-cutlass` before building)"
        )
    try:
        dispatch.csrc()  # lightx2v._C: the op schemas
        importlib.import_module("lightx2v._C_sm90")  # their CUDA kernels
    except (ImportError, OSError) as e:
        return False, f"lightx2v._C_sm90 does not load ({e})"
    except RuntimeError as e:
        return False, dispatch.stale_extension(e)
    return True, "lightx2v._C_sm90 (CUTLASS, sm_90a)"


_STATUS: dict[int, tuple[str, str]] = {}  # device index → (backend, why)


def _probe(device_index: int) -> tuple[str, str]:
    cc = torch.cuda.get_device_capability(device_index)
    name = torch.cuda.get_device_name(device_index)
    unfused = "unfused" if cc >= (8, 9) and hasattr(torch, "_scaled_mm") else "ref"
    if cc != (9, 0):
        return unfused, f"{name} is compute capability {cc[0]}.{cc[1]}; the kernels are sm_90a"
    ok, why = _sm90_module_status()
    if not ok:
        log.warning("FP8 GEMM epilogues are not fused: %s", why)
        return unfused, why
    return "cuda", f"{why} on {name}"


def epilogue_backend(device: torch.device | str | None = None) -> tuple[str, str]:
    """("cuda" | "unfused" | "ref", why) for FP8 GEMMs on `device` (default: current).

    A device is probed (compute capability, lightx2v._C_sm90 loads) at its first eager call;
    quantize_dit asks for the model's device, so compiled graphs only read the answer. A
    device first seen inside a compiled region runs unfused there.
    """
    if device is None:
        if not torch.cuda.is_available():
            return "ref", "no CUDA device"
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        return "ref", f"{device.type} device"
    requested = dispatch.requested_backend()
    if requested in ("ref", "triton"):
        return "unfused", f"kernel backend {requested!r} requested (the fused GEMMs are CUDA)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STATUS:
        if torch.compiler.is_compiling():
            return "unfused", "device not probed before compilation"
        _STATUS[index] = _probe(index)
    return _STATUS[index]


def _aligned(t: torch.Tensor) -> bool:
    """16-byte aligned start (allocations are; a view's offset may not be). Inside a compiled
    graph the data pointer and storage offset cannot be read; there the inputs are fresh
    activations, weight buffers and the residual stream, and the op itself still checks."""
    if torch.compiler.is_compiling():
        return True
    return t.data_ptr() % 16 == 0


def _fits(a: torch.Tensor, w: torch.Tensor, n_multiple: int) -> bool:
    """Shapes and layouts the CUTLASS kernels take (other calls run unfused)."""
    K, N = a.shape[1], w.shape[0]
    return (
        a.dtype == FP8_DTYPE
        and w.dtype == FP8_DTYPE
        and K % 16 == 0
        and N % n_multiple == 0
        and a.is_contiguous()
        and w.is_contiguous()
        and _aligned(a)
        and _aligned(w)
    )


def _unfused(backend: str, a: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._scaled_mm takes the call (K and N multiples of 16), else the reference runs."""
    return backend in ("cuda", "unfused") and a.shape[1] % 16 == 0 and w.shape[0] % 16 == 0


def _vec(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1).to(dtype).contiguous()


def scaled_mm(a, a_scale, w, w_scale, bias=None, use_fast_accum=True) -> torch.Tensor:
    """torch._scaled_mm with rowwise scales → bf16 y [M, N]: FP8Linear's GEMM and the unfused
    path here. w [N, K] row-major is passed as its [K, N] column-major view (no copy), the
    scales as [M, 1] and [1, N] fp32, the bias as bf16 [N] (added in the fp32 epilogue)."""
    return torch._scaled_mm(
        a, w.t(), scale_a=a_scale.float().reshape(-1, 1).contiguous(),
        scale_b=w_scale.float().reshape(1, -1).contiguous(), bias=_vec(bias, torch.bfloat16),
        out_dtype=torch.bfloat16, use_fast_accum=use_fast_accum,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# the ops


def _bf16_out(op: str, a, a_scale, w, w_scale, bias) -> torch.Tensor:
    """torch.ops.lx2v_C.<op> (fp8_gemm or fp8_gemm_gelu) into a new bf16 [M, N]."""
    out = torch.empty(a.shape[0], w.shape[0], dtype=torch.bfloat16, device=a.device)
    getattr(torch.ops.lx2v_C, op)(
        out, a, _vec(a_scale, torch.float32), w, _vec(w_scale, torch.float32),
        _vec(bias, torch.bfloat16),
    )  # fmt: skip
    return out


def fp8_linear(a, a_scale, w, w_scale, bias=None) -> torch.Tensor:
    """y = (a·a_scale) @ (w·w_scale)ᵀ + bias → bf16 [M, N]."""
    backend = epilogue_backend(a.device)[0]
    if backend == "cuda" and _fits(a, w, 8):
        return _bf16_out("fp8_gemm", a, a_scale, w, w_scale, bias)
    if _unfused(backend, a, w):
        return scaled_mm(a, a_scale, w, w_scale, bias)
    return fp8_linear_ref(a, a_scale, w, w_scale, bias)


def fp8_linear_gelu(a, a_scale, w, w_scale, bias=None) -> torch.Tensor:
    """gelu_tanh((a·a_scale) @ (w·w_scale)ᵀ + bias) → bf16 [M, N] (the FFN up-projection)."""
    backend = epilogue_backend(a.device)[0]
    if backend == "cuda" and _fits(a, w, 8):
        return _bf16_out("fp8_gemm_gelu", a, a_scale, w, w_scale, bias)
    if _unfused(backend, a, w):
        return F.gelu(scaled_mm(a, a_scale, w, w_scale, bias), approximate="tanh")
    return fp8_linear_gelu_ref(a, a_scale, w, w_scale, bias)


def fp8_linear_residual_(res, a, a_scale, w, w_scale, bias=None, gate=None) -> torch.Tensor:
    """res [B, L, N] fp32 += gate · y (gate [B, N], [B, 1, N], [1, N] or None); returns res."""
    from lightx2v.ops.residual import residual_add_

    if res.dim() != 3 or res.shape[0] * res.shape[1] != a.shape[0] or res.shape[2] != w.shape[0]:
        raise ValueError(
            f"fp8_linear_residual_: res {tuple(res.shape)} does not hold the "
            f"[{a.shape[0]}, {w.shape[0]}] product of a {tuple(a.shape)} and w {tuple(w.shape)}"
        )
    B, L, N = res.shape
    if gate is not None:
        if gate.shape[-1] != N or gate.numel() not in (N, B * N):
            raise ValueError(
                f"fp8_linear_residual_: gate {tuple(gate.shape)} does not fit res {tuple(res.shape)}"
            )
        gate = gate.reshape(-1, N).expand(B, N).float()
    backend = epilogue_backend(a.device)[0]
    if (
        backend == "cuda"
        and _fits(a, w, 4)
        and res.dtype == torch.float32
        and res.is_contiguous()
        and _aligned(res)
    ):
        gate = None if gate is None else gate.contiguous()
        torch.ops.lx2v_C.fp8_gemm_residual(
            res, a, _vec(a_scale, torch.float32), w, _vec(w_scale, torch.float32),
            _vec(bias, torch.bfloat16), gate,
        )  # fmt: skip
        return res
    if _unfused(backend, a, w):
        y = scaled_mm(a, a_scale, w, w_scale, bias).view(B, L, N)
        return residual_add_(res, y, gate)
    return fp8_linear_residual_ref_(res, a, a_scale, w, w_scale, bias, gate)
