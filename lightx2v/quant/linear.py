"""Quantized linear layers and `quantize_dit`, which puts them into a built WanDiT.

FP8Linear (W8A8, float8_e4m3fn) and Int8Linear (W8A8, int8) hold a quantized weight
[N, K] with one fp32 scale per output channel (see fp8.py for the recipes) and quantize
their input per token on every call. FP8Linear also takes an input the norm before it has
already quantized per token, a (q, s) pair (`takes_fp8_input`; WanBlock uses the fused
norm + FP8 ops then). Backends, chosen once when the module is built:

  FP8   "scaled_mm"  torch._scaled_mm with rowwise scales, CUDA compute capability >= 8.9
        "sgl"        sgl_kernel.fp8_scaled_mm, only if sgl_kernel imports (optional)
        "ref"        dequantize + fp32 matmul (fp8.scaled_linear_ref): CPU, older GPUs
  INT8  "int_mm"     torch._int_mm (int8 x int8 -> int32), then both scales in fp32
        "ref"        as above

An automatic choice that falls back to "ref" says so once in the log; a backend asked for
by name that is not available here is an LX2VError.

torch._scaled_mm contract used here (aten/src/ATen/native/cuda/RowwiseScaledMM.cu and
ScaledBlas.cpp): a [M, K] float8 row-major, b [K, N] float8 column-major (our weight is
[N, K] row-major, so b = weight.t() is a view, no copy), scale_a [M, 1] fp32 contiguous,
scale_b [1, N] fp32 contiguous, K and N multiples of 16, out_dtype bf16 and a bf16 bias
[N] (added in the fp32 epilogue). The result is (a·scale_a) @ (b·scale_b) + bias.

Fusion: self-attention q,k,v become one [3D, D] projection `self_attn.qkv`, cross-attention
k,v become `cross_attn.kv_proj` (and k_img,v_img `cross_attn.kv_img_proj` for I2V); the attention
modules are replaced by subclasses whose project_qkv / project_kv split the fused output.
With per-output-channel scales, quantizing the fused matrix equals quantizing each part.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from lightx2v.errors import LX2VError
from lightx2v.models.wan.dit import CrossAttention, FP8Tokens, SelfAttention, WanDiT
from lightx2v.ops import gemm
from lightx2v.ops.residual import residual_add_
from lightx2v.quant.fp8 import (
    FP8_DTYPE,
    dequantize_weight,
    quantize_per_token,
    quantize_rows_fp8,
    quantize_weight,
    scaled_linear_ref,
)

log = logging.getLogger("lightx2v.quant")

FP8_BACKENDS = ("scaled_mm", "sgl", "ref")
INT8_BACKENDS = ("int_mm", "ref")

# Block linears after fusion: our name → the official linears it is made of (row order).
# Everything else in a block (norms, modulation) and outside the blocks stays high precision.
FUSED_LINEARS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv": ("self_attn.q", "self_attn.k", "self_attn.v"),
    "self_attn.o": ("self_attn.o",),
    "cross_attn.q": ("cross_attn.q",),
    "cross_attn.kv_proj": ("cross_attn.k", "cross_attn.v"),
    "cross_attn.kv_img_proj": ("cross_attn.k_img", "cross_attn.v_img"),  # I2V only
    "cross_attn.o": ("cross_attn.o",),
    "ffn.0": ("ffn.0",),
    "ffn.2": ("ffn.2",),
}


def block_linears(is_i2v: bool) -> dict[str, tuple[str, ...]]:
    """FUSED_LINEARS for a model type (T2V has no image branch)."""
    return {k: v for k, v in FUSED_LINEARS.items() if is_i2v or "_img" not in k}


# ---------------------------------------------------------------------------------------
# backend availability


_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.warning(msg)


@functools.cache
def _sgl_fp8_mm():
    try:
        import sgl_kernel  # noqa: PLC0415  (optional, heavy, often built for another torch)

        return sgl_kernel.fp8_scaled_mm
    except Exception:  # ImportError, or an OSError/RuntimeError from a mismatched build
        return None


def _cuda_cc(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def available_backends(scheme: str, device: str | torch.device) -> list[str]:
    """Backends that can run `scheme` ("fp8"/"int8") on `device`, fastest first."""
    device = torch.device(device)
    cc = _cuda_cc(device)
    if scheme == "fp8":
        out = []
        if cc is not None and cc >= (8, 9) and hasattr(torch, "_scaled_mm"):
            out.append("scaled_mm")
        if cc is not None and cc >= (8, 9) and _sgl_fp8_mm() is not None:
            out.append("sgl")
        return out + ["ref"]
    if scheme == "int8":
        # torch._int_mm exists on CUDA (cc >= 7.5 in practice) and on CPU; on CPU it is an
        # exact int32 product, so it doubles as a numerics check of the CUDA path.
        ok = hasattr(torch, "_int_mm") and (cc is not None or device.type == "cpu")
        return (["int_mm"] if ok else []) + ["ref"]
    raise LX2VError(f"unknown quantization scheme {scheme!r} (expected fp8 or int8)")


def select_backend(scheme: str, device: str | torch.device, requested: str | None = None) -> str:
    """The backend to use, decided once. `requested` None means: the fastest available."""
    device = torch.device(device)
    avail = available_backends(scheme, device)
    if requested is not None:
        if requested not in avail:
            known = FP8_BACKENDS if scheme == "fp8" else INT8_BACKENDS
            if requested not in known:
                raise LX2VError(
                    f"unknown {scheme} linear backend {requested!r} (known: {', '.join(known)})"
                )
            raise LX2VError(
                f"{scheme} linear backend {requested!r} is not available on {device} "
                f"(available: {', '.join(avail)})"
            )
        return requested
    if scheme == "int8" and device.type == "cpu":
        return "ref"  # the definition; "int_mm" on CPU must be asked for
    choice = avail[0]
    if choice == "ref" and device.type != "meta":
        why = "no CUDA device" if device.type != "cuda" else "GPU lacks FP8 (needs cc >= 8.9)"
        if scheme == "int8":
            why = "torch._int_mm unavailable"
        _log_once(
            f"{scheme} linears on {device}: {why}; using the reference path "
            "(dequantize + fp32 matmul), correct but slow"
        )
    return choice


# ---------------------------------------------------------------------------------------
# the modules


def _per_token_fp8_eager(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = quantize_rows_fp8(x2d)
    return q, s[:, None]


@functools.cache
def _per_token_fp8_compiled():
    # two fused passes over x (row amax, then scale + cast) instead of five eager ones
    return torch.compile(_per_token_fp8_eager, dynamic=True, fullgraph=True)


@functools.cache
def _per_token_fp8_triton():
    """kernels/fp8_quant.py (one pass over x), or None where Triton or the kernel is missing."""
    try:
        from lightx2v.ops.dispatch import kernel_module

        return kernel_module("fp8_quant")
    except Exception as e:  # ImportError, or a Triton that fails to initialise
        _log_once(f"per-token FP8 quantization: Triton kernel unavailable ({e}); torch.compile")
        return None


def per_token_quant_fp8(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] → (float8 [M, K], fp32 scale [M, 1]) per token, as fp8.quantize_rows_fp8.

    CUDA: the Triton kernel (one pass over x), else torch.compile; inside a region being
    compiled, the eager definition (inductor fuses it there); elsewhere eager.
    """
    if x2d.is_cuda and not torch.compiler.is_compiling():
        kern = _per_token_fp8_triton()
        if kern is not None and x2d.shape[1] <= kern.MAX_K and x2d.stride(1) == 1:
            q = torch.empty(x2d.shape, dtype=FP8_DTYPE, device=x2d.device)
            s = torch.empty(x2d.shape[0], 1, dtype=torch.float32, device=x2d.device)
            kern.per_token_fp8(x2d, q, s)
            return q, s
        return _per_token_fp8_compiled()(x2d)
    return _per_token_fp8_eager(x2d)


class QuantLinear(nn.Module):
    """A W8A8 linear: weight [N, K] (8-bit), weight_scale [N] fp32, optional bias.

    Buffers, not parameters: nothing here is trained. `.to(dtype)` / `WanDiT.cast` move
    these buffers between devices but never change the weight's or the scale's dtype
    (only the bias follows the model's compute dtype).
    """

    scheme = ""
    qdtype: torch.dtype = torch.int8

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        backend: str = "ref",
        device=None,
        bias_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        self.use_fast_accum = True  # scaled_mm: FP8 accumulation w/o periodic fp32 promotion
        w = torch.empty(out_features, in_features, dtype=self.qdtype, device=device)
        self.register_buffer("weight", w)
        self.register_buffer("weight_scale", torch.empty(out_features, device=device))
        b = torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None
        self.register_buffer("bias", b)

    @classmethod
    def from_linears(cls, parts: list[nn.Linear], backend: str = "ref") -> QuantLinear:
        """Quantize the row-concatenation of `parts` (one part: a plain replacement).

        Parts on the meta device give an empty (meta) module of the right shape, which a
        loader then fills from a converted checkpoint.
        """
        k = parts[0].in_features
        n = sum(p.out_features for p in parts)
        has_bias = parts[0].bias is not None
        w0 = parts[0].weight
        m = cls(k, n, has_bias, backend=backend, device=w0.device,
                bias_dtype=parts[0].bias.dtype if has_bias else torch.float32)  # fmt: skip
        if w0.device.type != "meta":
            with torch.no_grad():
                w = torch.cat([p.weight for p in parts]) if len(parts) > 1 else w0
                q, s = quantize_weight(w, cls.scheme)
                m.weight.copy_(q)
                m.weight_scale.copy_(s)
                if has_bias:
                    m.bias.copy_(torch.cat([p.bias for p in parts]))
        return m

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, backend={self.backend}"
        )

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/WanDiT.cast move the 8-bit weight and its fp32 scales, never recast
        # them; only the bias follows a dtype change.
        for name, t in self._buffers.items():
            if t is None:
                continue
            out = fn(t)
            if name != "bias" and out.dtype != t.dtype:
                out = t.to(out.device)
            self._buffers[name] = out
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = self._matmul(x2)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def reference(self, x: torch.Tensor, quantize_activations: bool = True) -> torch.Tensor:
        """The fp32 definition of this layer's output (what every backend is tested against)."""
        return scaled_linear_ref(
            x, self.weight, self.weight_scale, self.bias, self.scheme, quantize_activations
        )


class FP8Linear(QuantLinear):
    """W8A8 FP8 linear. Its input x [..., K] is either a float tensor, quantized per token
    here, or a pair (q float8_e4m3fn [..., K], s fp32 [..., 1]) already quantized per token
    by the norm before it (lightx2v/ops/norm.py: adaln_fp8, affine_layer_norm_fp8), used
    as it is. The output of a pair has the bias's dtype (the model's compute dtype, see
    `_apply`), or bf16 without a bias."""

    scheme = "fp8"
    qdtype = FP8_DTYPE

    @property
    def takes_fp8_input(self) -> bool:
        """Whether WanBlock should hand this linear a (q, s) pair (forward, forward_gelu and
        forward_residual_ take one on every backend). Not "ref" on a GPU: that backend
        means no FP8 tensor cores (compute capability < 8.9), where the fused norm gains
        nothing and Triton cannot store float8_e4m3fn; on the CPU it tests the pair path."""
        return self.backend != "ref" or not self.weight.is_cuda

    def forward(self, x: torch.Tensor | FP8Tokens) -> torch.Tensor:
        if not isinstance(x, tuple):
            return super().forward(x)
        xq, xs, lead, dtype = self._quantized_input(x)
        return self.forward_quantized(xq, xs, dtype).reshape(*lead, self.out_features)

    def forward_quantized(self, xq: torch.Tensor, xs: torch.Tensor, out_dtype=torch.bfloat16):
        """The GEMM on an input already quantized per token (e.g. by a fused norm + FP8
        kernel): xq [M, K] float8_e4m3fn row-major, xs [M, 1] fp32 → [M, N] out_dtype."""
        return self._gemm(xq, xs).to(out_dtype)

    def _quantized_input(self, x: torch.Tensor | FP8Tokens):
        """x [..., K] or a (q, s) pair → (q [M, K], s [M, 1], x's leading shape, out dtype)."""
        if isinstance(x, tuple):
            xq, xs = x
            if (
                xq.dtype != FP8_DTYPE
                or xq.shape[-1] != self.in_features
                or xs.dtype != torch.float32
                or xs.shape != (*xq.shape[:-1], 1)
            ):
                raise ValueError(
                    f"expected (q float8_e4m3fn [..., {self.in_features}], s float32 [..., 1]),"
                    f" got q {tuple(xq.shape)} {xq.dtype}, s {tuple(xs.shape)} {xs.dtype}"
                )
            # the compute dtype: the bias follows it (_apply, WanDiT.cast); Wan's linears
            # all have one
            dtype = torch.bfloat16 if self.bias is None else self.bias.dtype
            q2 = xq.reshape(-1, xq.shape[-1]).contiguous()  # the GEMMs take row-major a
            return q2, xs.reshape(-1, 1).contiguous(), xq.shape[:-1], dtype
        xq, xs = per_token_quant_fp8(x.reshape(-1, x.shape[-1]).contiguous())
        return xq, xs, x.shape[:-1], x.dtype

    def _gemm(self, xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """(xq · xs) @ (weight · weight_scale)ᵀ + bias: [M, N], bf16 (fp32 on "ref")."""
        if self.backend == "scaled_mm":
            return gemm.scaled_mm(xq, xs, self.weight, self.weight_scale, self.bias,
                                  use_fast_accum=self.use_fast_accum)  # fmt: skip
        if self.backend == "sgl":
            bias = None if self.bias is None else self.bias.to(torch.bfloat16)
            return _sgl_fp8_mm()(xq, self.weight.t(), xs, self.weight_scale, torch.bfloat16, bias)
        if self.backend == "ref":  # scaled_linear_ref's product, on these operands
            y = (xq.float() * xs) @ dequantize_weight(self.weight, self.weight_scale).t()
            return y if self.bias is None else y + self.bias.float()
        raise LX2VError(f"unknown fp8 linear backend {self.backend!r}")

    # Epilogue fusion (lightx2v/ops/gemm.py): on the scaled_mm backend the GELU of the FFN
    # up-projection and the gated residual after the attention-output and FFN-down
    # projections run in the GEMM's epilogue where lightx2v._C_sm90 is built (H100/H200);
    # elsewhere, and on the other backends, these are the plain module call + the op.
    def _fuses_epilogues(self) -> bool:
        return self.backend == "scaled_mm" and self.use_fast_accum is True

    def forward_gelu(self, x: torch.Tensor | FP8Tokens) -> torch.Tensor:
        """gelu_tanh(self(x)), in self(x)'s dtype."""
        if not self._fuses_epilogues():
            return F.gelu(self(x), approximate="tanh")
        xq, xs, lead, dtype = self._quantized_input(x)
        y = gemm.fp8_linear_gelu(xq, xs, self.weight, self.weight_scale, self.bias)
        return y.to(dtype).reshape(*lead, self.out_features)

    def forward_residual_(
        self, res: torch.Tensor, x: torch.Tensor | FP8Tokens, gate: torch.Tensor | None = None
    ) -> torch.Tensor:
        """res += gate · self(x) (res the fp32 residual stream [B, L, N], gate [B, N] or
        None), in place; returns res."""
        if not self._fuses_epilogues():
            return residual_add_(res, self(x), gate)
        xq, xs, _, _ = self._quantized_input(x)
        return gemm.fp8_linear_residual_(
            res, xq, xs, self.weight, self.weight_scale, self.bias, gate
        )

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.backend == "ref":
            return scaled_linear_ref(x2, self.weight, self.weight_scale, self.bias, "fp8")
        xq, xs = per_token_quant_fp8(x2.contiguous())
        return self._gemm(xq, xs)


class Int8Linear(QuantLinear):
    scheme = "int8"
    qdtype = torch.int8

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.backend == "ref":
            return scaled_linear_ref(x2, self.weight, self.weight_scale, self.bias, "int8")
        if self.backend != "int_mm":
            raise LX2VError(f"unknown int8 linear backend {self.backend!r}")
        xq, xs = quantize_per_token(x2, "int8")
        m = xq.shape[0]
        if xq.is_cuda and m <= 16:  # cuBLASLt int8 path needs M > 16
            xq = torch.cat([xq, xq.new_zeros(17 - m, xq.shape[1])])
        acc = torch._int_mm(xq, self.weight.t())[:m]  # exact int32 sums
        y = acc.float() * xs * self.weight_scale[None, :]
        if self.bias is not None:
            y = y + self.bias.float()
        return y


QUANT_LINEAR = {"fp8": FP8Linear, "int8": Int8Linear}


# ---------------------------------------------------------------------------------------
# fused attention projections


def _fused_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear whose rows are the parts' rows, in order (meta parts → meta result)."""
    if len(parts) == 1:
        return parts[0]
    w0, b0 = parts[0].weight, parts[0].bias
    out = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=b0 is not None,
                    device=w0.device, dtype=w0.dtype)  # fmt: skip
    if w0.device.type != "meta":
        with torch.no_grad():
            out.weight.copy_(torch.cat([p.weight for p in parts]))
            if b0 is not None:
                out.bias.copy_(torch.cat([p.bias for p in parts]))
    return out.requires_grad_(w0.requires_grad)


class FusedSelfAttention(SelfAttention):
    """SelfAttention with q,k,v computed by one [3D, D] projection `qkv`."""

    def __init__(self, src: SelfAttention, qkv: nn.Module):
        nn.Module.__init__(self)
        self.num_heads = src.num_heads
        self.qkv = qkv
        self.o = src.o
        self.norm_q = src.norm_q
        self.norm_k = src.norm_k

    def project_qkv(self, x):
        return self.qkv(x).chunk(3, dim=-1)


class FusedCrossAttention(CrossAttention):
    """CrossAttention with k,v (and k_img,v_img) computed by one projection each."""

    # (`kv` itself is CrossAttention's method computing the cached text/image keys/values)
    def __init__(self, src: CrossAttention, kv: nn.Module, kv_img: nn.Module | None):
        nn.Module.__init__(self)
        self.num_heads = src.num_heads
        self.q = src.q
        self.kv_proj = kv
        self.o = src.o
        self.norm_q = src.norm_q
        self.norm_k = src.norm_k
        if kv_img is not None:
            self.kv_img_proj = kv_img
            self.norm_k_img = src.norm_k_img

    def project_kv(self, context):
        return self.kv_proj(context).chunk(2, dim=-1)

    def project_kv_img(self, context_img):
        return self.kv_img_proj(context_img).chunk(2, dim=-1)


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def quantize_dit(
    model: WanDiT,
    scheme: str,
    keep_blocks: list[int] | tuple[int, ...] = (),
    backend: str | None = None,
    device: str | torch.device | None = None,
) -> WanDiT:
    """Fuse the block projections of a built WanDiT and (fp8/int8) quantize its block linears.

    scheme "bf16" fuses only (the fused linears keep their dtype). Blocks in `keep_blocks`
    are fused but not quantized. Embeddings, time/text/image projections, modulation,
    norms and the head are untouched. `device` (default: the model's) picks the backend;
    a model on the meta device gives empty modules for a loader to fill. In place; returns
    the model.
    """
    if scheme not in ("fp8", "int8", "bf16"):
        raise LX2VError(f"unknown quantization scheme {scheme!r} (expected fp8, int8 or bf16)")
    n = len(model.blocks)
    bad = [i for i in keep_blocks if not 0 <= i < n]
    if bad:
        raise LX2VError(f"--keep-high-precision: block(s) {bad} out of range 0..{n - 1}")
    if device is None:
        device = next(model.parameters()).device
    qcls = QUANT_LINEAR.get(scheme)
    chosen = select_backend(scheme, device, backend) if qcls is not None else None
    if chosen == "scaled_mm":
        gemm.epilogue_backend(device)  # probe the fused GEMM epilogues here, outside compile
    keep = set(keep_blocks)
    for i, block in enumerate(model.blocks):
        new = {}
        for name, parts in block_linears(model.arch.is_i2v).items():
            linears = [_get(block, p) for p in parts]
            if qcls is None or i in keep:
                new[name] = _fused_linear(linears)
            else:
                new[name] = qcls.from_linears(linears, backend=chosen)
        sa, ca = block.self_attn, block.cross_attn
        block.self_attn = FusedSelfAttention(sa, new["self_attn.qkv"])
        block.self_attn.o = new["self_attn.o"]
        block.cross_attn = FusedCrossAttention(
            ca, new["cross_attn.kv_proj"], new.get("cross_attn.kv_img_proj")
        )
        block.cross_attn.q = new["cross_attn.q"]
        block.cross_attn.o = new["cross_attn.o"]
        block.ffn[0] = new["ffn.0"]
        block.ffn[2] = new["ffn.2"]
    model.quant_scheme = scheme
    model.quant_keep_blocks = sorted(keep)
    return model


def set_backend(model: nn.Module, backend: str) -> None:
    """Switch every quantized linear of a model to `backend` (checked once)."""
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not mods:
        return
    chosen = select_backend(mods[0].scheme, mods[0].weight.device, backend)
    for m in mods:
        m.backend = chosen
