"""Attention: one entry point, backends chosen once.

`attention(q, k, v)` takes and returns [B, L, H, D] (the layout the projections produce, so
no transposes leak into the model). Non-causal, no mask: Wan attends over whole sequences.

Backends: "sdpa" (torch.nn.functional.scaled_dot_product_attention; cuDNN/flash on
Hopper, math on CPU) is always present. Faster ones are registered by name and picked
with `set_attention_backend`:

- "lx2v-int8": our Triton kernel (lightx2v.kernels.attention): INT8 Q·Kᵀ with per-block
  scales and K smoothing, bf16 P·V, fp32 online softmax. Passes the accuracy gate
  (rel-L2 ≤ 3%, cosine ≥ 0.999) on random normal inputs.
- "lx2v-int8-fp8": the same with FP8 P·V (3.9% rel-L2 on random normal q,k,v, FP8's own
  rounding of P and V, ≈2.5% each: see `attention_8bit_sim`; fails the rel-L2 part of the
  gate on such inputs, so "auto" rejects it).
- "lx2v-int8-int8": the same with INT8 P·V: P rounded to 0..127 against each key block's
  own row maximum, v to INT8 per channel (≈2.2% rel-L2 on random normal inputs: passes
  the gate; faster than bf16 P·V).
- "lx2v-int8-int8-ws": the same arithmetic as "lx2v-int8-int8" in a warp-specialised CUDA
  kernel (csrc/attn_int8_sm90.cu, lightx2v._C_sm90; H100/H200): a producer warpgroup streams
  K and V, two consumer warpgroups of 64 rows share them. Below WS_MIN_LK keys it runs the
  Triton kernel.
- "sage": sageattention (PyPI) when installed; "flash": flash-attn when installed;
  "fa4": flash-attn-4 (PyPI) when installed, bf16.
- "flashinfer-fp8": flashinfer-python's FP8 prefill (its FA3 kernel, Hopper only) when
  installed: k smoothed (its per-channel mean over tokens subtracted, as our kernels do), then
  q, k, v to FP8 e4m3 with one scale per batch element and head (amax/448), in the wrapper
  and so in its timings; one kernel call per batch element. Measured on an H200 (flashinfer
  0.7.2.post1): 5.3-5.6% rel-L2 against fp32 (cosine 0.9985), over the 3% gate, so it is
  not one of "auto"'s candidates (its self-check rejects it too); 759 TFLOP/s with its quantisation at S = 32760 (the kernel alone 865). The
  kernel is JIT-compiled by flashinfer at first use (minutes) unless its module is prebuilt
  (tools/flashinfer_check.sh).
- "auto": the fastest of those that pass a one-time self-check on this GPU (accuracy
  against `attention_ref` on random and offset-k inputs, odd lengths; then a timing).

`attention_backend_override(name)` runs a block of code with another backend (e.g. bf16
attention on the first/last sampling steps, a known quality guard for 8-bit attention).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from lightx2v.errors import LX2VError

log = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√D)·v in fp32, [B, Lq, H, D] × [B, Lk, H, D] → [B, Lq, H, D].

    The definition every backend is tested against.
    """
    scale = q.shape[-1] ** -0.5
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.float()).to(q.dtype)


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, as the kernels' INT8 quantisation does."""
    return torch.trunc(x + torch.where(x >= 0, 0.5, -0.5))


def _quant_int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [B, L, H, D] fp32 → INT8 values times their scale (one scale per `block` rows of
    each head, amax/127, round half away from zero), as the kernel's pre-pass does."""
    B, L, H, D = x.shape
    pad = -L % block
    xp = F.pad(x, (0, 0, 0, 0, 0, pad)).unflatten(1, (-1, block))  # [B, nb, block, H, D]
    scale = xp.abs().amax(dim=(2, 4), keepdim=True).clamp_min(1e-30) / 127.0
    return (_round_away(xp / scale).clamp(-127, 127) * scale).flatten(1, 2)[:, :L]


def attention_8bit_sim(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pv: str = "bf16",
    block_m: int = 128,
    block_n: int = 128,
) -> torch.Tensor:
    """What lx2v-int8 computes, in PyTorch (fp32, whole rows at once): the definition its
    GPU tests compare with, and the CPU tests' model of its quantisation error.

    q·D^-½·log2e → INT8 per block_m rows; k − mean_k(over tokens) → INT8 per block_n rows
    (softmax is unchanged by the shift); S in log2 units. P·V by `pv`:
    - "bf16": P = exp2(S − max + 8) rounded to v's 16-bit type, v as given;
    - "fp8": P = exp2(S − max + 8) → e4m3, v − `v_offset` → e4m3 with a per-channel scale
      (amax/448);
    - "int8": per key block of block_n and per row, P = 127·exp2(S − the block's row max)
      rounded to an integer (half up; the kernel rounds to nearest through fp16, which
      differs on ~1-2% of values, by one step) and weighted by exp2(block max − max)/127;
      v − `v_offset` → INT8 with a per-channel scale (amax/127).
    out = P·V / ΣP (+ the offset), ΣP from the unrounded P."""
    qf, kf, vf = q.float(), k.float(), v.float()
    D = q.shape[-1]
    qq = _quant_int8_blocks(qf * (D**-0.5 * math.log2(math.e)), block_m)
    kq = _quant_int8_blocks(kf - kf.mean(1, keepdim=True), block_n)
    s = torch.einsum("bqhd,bkhd->bhqk", qq, kq)
    if pv == "bf16":
        p = torch.exp2(s - s.amax(-1, keepdim=True) + 8.0)  # as the kernel: max P = 256
        pq = p.to(v.dtype).float() if v.dtype in (torch.bfloat16, torch.float16) else p
        return torch.einsum("bhqk,bkhd->bqhd", pq / p.sum(-1, keepdim=True), vf).to(q.dtype)
    mu = v_offset(vf.mean(1), vf.amax(1), vf.amin(1)).unsqueeze(1)  # [B, 1, H, D]
    vc = vf - mu
    amax = vc.abs().amax(1, keepdim=True).clamp_min(1e-30)
    if pv == "fp8":
        p = torch.exp2(s - s.amax(-1, keepdim=True) + 8.0)
        vq = (vc / (amax / 448.0)).to(torch.float8_e4m3fn).float() * (amax / 448.0)
        pq = p.to(torch.float8_e4m3fn).float()
        out = torch.einsum("bhqk,bkhd->bqhd", pq / p.sum(-1, keepdim=True), vq)
        return (out + mu).to(q.dtype)
    if pv != "int8":
        raise ValueError(f"pv must be bf16, fp8 or int8, got {pv!r}")
    vq = _round_away(vc / (amax / 127.0)) * (amax / 127.0)
    Lk = s.shape[-1]
    sb = F.pad(s, (0, -Lk % block_n), value=float("-inf")).unflatten(-1, (-1, block_n))
    m_blk = sb.amax(-1, keepdim=True)  # [B, H, Lq, nblk, 1]
    p = torch.exp2(sb - m_blk)  # ∈ [0, 1], 1 at each block's row maximum
    blk_w = torch.exp2(m_blk - m_blk.amax(-2, keepdim=True))  # the block's weight in the row
    denom = (p * blk_w).sum((-1, -2), keepdim=True)
    w = (torch.floor(p * 127.0 + 0.5) / 127.0 * blk_w / denom).flatten(-2)[..., :Lk]
    return (torch.einsum("bhqk,bkhd->bqhd", w, vq) + mu).to(q.dtype)


def v_offset(v_mean: torch.Tensor, v_max: torch.Tensor, v_min: torch.Tensor) -> torch.Tensor:
    """Per-channel offset taken out of v before FP8: its mean where that mean is large
    against the channel's magnitude, else 0. Subtracting a mean smaller than FP8's step
    turns the rounding error into a bias of one sign across tokens that no longer
    averages out in P·V (on random normal v it doubled the error)."""
    amax = torch.maximum(v_max.abs(), v_min.abs())
    return torch.where(v_mean.abs() >= 0.125 * amax, v_mean, torch.zeros_like(v_mean))


# ---------------------------------------------------------------------------------------
# The Triton kernel as a custom op (opaque to torch.compile, with a fake kernel), so a
# compiled block keeps one graph.


@torch.library.custom_op("lightx2v::attention_int8", mutates_args=(), device_types="cuda")
def _attention_int8_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv: str) -> torch.Tensor:
    from lightx2v.kernels.attention import attention_int8

    return attention_int8(q, k, v, pv=pv)


@_attention_int8_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv: str) -> torch.Tensor:
    return q.new_empty(q.shape)


def attention_lx2v_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _attention_int8_op(q, k, v, "bf16")


def attention_lx2v_int8_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _attention_int8_op(q, k, v, "fp8")


def attention_lx2v_int8_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _attention_int8_op(q, k, v, "int8")


# Below this many keys lx2v-int8-int8-ws runs the Triton kernel (same arithmetic): the CUDA
# kernel holds one 128-row CTA per multiprocessor, and with a few key blocks (the DiT's
# cross-attention to 512 text and 257 image tokens) its per-CTA start-up is not hidden, where
# the Triton kernel runs three programs per multiprocessor (docs/BENCHMARKS.md).
WS_MIN_LK = 16384


def attention_lx2v_int8_int8_ws(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _attention_int8_op(q, k, v, "int8-ws" if k.shape[1] >= WS_MIN_LK else "int8")


def _load_lx2v_ws() -> AttentionFn:
    """The CUDA kernel of lx2v-int8-int8 (csrc/attn_int8_sm90.cu): lightx2v._C_sm90 built,
    an sm_90 GPU."""
    fn = _load_lx2v(attention_lx2v_int8_int8_ws)()
    if torch.cuda.get_device_capability() != (9, 0):
        raise RuntimeError("the CUDA kernel is built for sm_90a (H100/H200) only")
    from lightx2v.ops.gemm import _sm90_module_status

    ok, why = _sm90_module_status()
    if not ok:
        raise RuntimeError(why)
    if not torch._C._dispatch_has_kernel_for_dispatch_key("lx2v_C::attn_int8_sm90", "CUDA"):
        raise RuntimeError("lightx2v._C_sm90 predates the attention kernel: rebuild it")
    return fn


def _load_lx2v(fn: AttentionFn) -> Callable[[], AttentionFn]:
    def load() -> AttentionFn:
        if not torch.cuda.is_available():
            raise RuntimeError("needs a CUDA GPU")
        if torch.cuda.get_device_capability() < (9, 0):
            raise RuntimeError("needs compute capability 9.0 (Hopper) or newer")
        import lightx2v.kernels.attention  # noqa: F401  (Triton present and importable)

        return fn

    return load


def _load_sage() -> AttentionFn:
    if not torch.cuda.is_available():
        raise RuntimeError("needs a CUDA GPU")
    from sageattention import sageattn

    def attention_sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # sageattention 1.0.6 smooths k in place (`k -= mean`), which would rewrite the
        # caller's tensor (the cross-attention k is cached across steps): smooth a copy here
        k = k - k.mean(dim=1, keepdim=True)
        return sageattn(q, k, v, tensor_layout="NHD", is_causal=False, smooth_k=False)

    return attention_sage


def _load_flash() -> AttentionFn:
    if not torch.cuda.is_available():
        raise RuntimeError("needs a CUDA GPU")
    from flash_attn import flash_attn_func

    def attention_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flash_attn_func(q, k, v)

    return attention_flash


@torch.library.custom_op("lightx2v::fa4_attention", mutates_args=())
def _fa4_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn.cute import flash_attn_func as fa4_func

    out = fa4_func(q, k, v)
    out = out[0] if isinstance(out, tuple) else out  # (out, lse) in some versions
    return out.contiguous()  # the fake kernel promises a contiguous [B, L, H, D]


@_fa4_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)  # contiguous


def _load_fa4() -> AttentionFn:
    """FlashAttention 4 (PyPI flash-attn-4: CuTe DSL kernels compiled at first use per
    shape; forward on compute capability 9.x and 10.x), bf16/fp16 in and out. Called through
    a custom op, because dynamo cannot trace the CuTe DSL launcher (a compiled block would
    break its graph)."""
    if not torch.cuda.is_available():
        raise RuntimeError("needs a CUDA GPU")
    major = torch.cuda.get_device_capability()[0]
    if major not in (9, 10):
        raise RuntimeError(f"flash-attn-4 runs on compute capability 9.x/10.x, not {major}.x")
    import flash_attn.cute  # noqa: F401  (ImportError here means: not installed)

    def attention_fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _fa4_attention_op(q, k, v)

    return attention_fa4


FP8_E4M3_MAX = 448.0


def _fp8_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] → (e4m3 codes [B, L, H, D], scales [B, H] fp32), x ≈ codes · scale with
    one scale per batch element and head: amax/448.

    The multiplier 448/amax is rounded down to x's dtype and the product taken in that dtype
    (no fp32 copy of the activations): rounded down, no product exceeds 448, the largest e4m3
    value (a larger one would not survive the cast). The scale returned is the reciprocal of
    the multiplier used, so codes · scale undoes exactly the scaling that was applied."""
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=(1, 3)).float()  # [B, H]
    mult = (FP8_E4M3_MAX / amax.clamp_min(1e-30)).clamp_max(torch.finfo(x.dtype).max)
    m = mult.to(x.dtype)
    m = torch.where(m.float() > mult, torch.nextafter(m, torch.zeros_like(m)), m)
    codes = (x * m[:, None, :, None]).to(torch.float8_e4m3fn)
    return codes, m.float().reciprocal()


@torch.library.custom_op("lightx2v::flashinfer_fp8_attention", mutates_args=())
def _flashinfer_fp8_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flashinfer.prefill import single_prefill_with_kv_cache

    k = k - k.mean(dim=1, keepdim=True)  # a copy: softmax is unchanged by the shift
    (q8, sq), (k8, sk), (v8, sv) = (_fp8_per_head(x) for x in (q, k, v))
    kw = dict(o_dtype=q.dtype, causal=False, kv_layout="NHD", sm_scale=q.shape[-1] ** -0.5)
    outs = [
        single_prefill_with_kv_cache(
            q8[b], k8[b], v8[b], scale_q=sq[b], scale_k=sk[b], scale_v=sv[b], backend="fa3", **kw
        )
        for b in range(q.shape[0])
    ]
    out = outs[0].unsqueeze(0) if len(outs) == 1 else torch.stack(outs)
    return out.contiguous()  # the fake kernel promises a contiguous [B, Lq, H, D]


@_flashinfer_fp8_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)  # contiguous


def _flashinfer_module_missing() -> bool:
    """True when flashinfer has neither a prebuilt nor a JIT-built FA3 FP8 prefill module for
    head dim 128, bf16 out, and no nvcc to build one: then the first call would fail deep
    inside flashinfer. False where it cannot tell (another flashinfer version)."""
    import os
    import shutil

    try:
        from flashinfer.jit import gen_single_prefill_module

        e4m3 = torch.float8_e4m3fn
        spec = gen_single_prefill_module(
            "fa3", e4m3, e4m3, torch.bfloat16, 128, 128, 0, False, False, False
        )
        built = spec.is_aot or spec.jit_library_path.exists()
    except Exception:  # noqa: BLE001  (an API this check does not know: let the call decide)
        return False
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = shutil.which("nvcc") or os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    return not built and not nvcc


def _load_flashinfer_fp8() -> AttentionFn:
    """flashinfer-python's single-request FP8 prefill with its FA3 backend (sm_90a kernels:
    compute capability 9.x), [L, H, D] e4m3 q, k, v with per-head scales, bf16/fp16 out.
    Called through a custom op, as fa4 is, so that dynamo does not trace flashinfer's
    launcher and a compiled block keeps one graph."""
    if not torch.cuda.is_available():
        raise RuntimeError("needs a CUDA GPU")
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        raise RuntimeError(
            f"flashinfer's FP8 prefill (FA3) runs on compute capability 9.x, not {major}.{minor}"
        )
    try:
        import flashinfer.prefill  # noqa: F401
    except ImportError as e:
        raise ImportError(f"flashinfer-python is not installed ({e})") from e
    if _flashinfer_module_missing():
        raise RuntimeError(
            "flashinfer's FP8 prefill module is neither prebuilt nor built, and there is no "
            "nvcc to build it (tools/flashinfer_bundle.sh prebuilds it)"
        )

    def attention_flashinfer_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _flashinfer_fp8_op(q, k, v)

    return attention_flashinfer_fp8


_BACKENDS: dict[str, AttentionFn] = {"sdpa": attention_sdpa, "ref": attention_ref}
# Optional backends, loaded on first request; the loader raises with the reason if missing.
_LOADERS: dict[str, Callable[[], AttentionFn]] = {
    "lx2v-int8": _load_lx2v(attention_lx2v_int8),
    "lx2v-int8-fp8": _load_lx2v(attention_lx2v_int8_fp8),
    "lx2v-int8-int8": _load_lx2v(attention_lx2v_int8_int8),
    "lx2v-int8-int8-ws": _load_lx2v_ws,
    "sage": _load_sage,
    "flash": _load_flash,
    "fa4": _load_fa4,
    "flashinfer-fp8": _load_flashinfer_fp8,
}
# "auto" tries these, fastest first by expectation; the self-check times them anyway.
# flashinfer-fp8 is not among them: measured over the accuracy gate (5.4% on random inputs,
# docs/BENCHMARKS.md), and trying it could start a JIT build of minutes.
AUTO_CANDIDATES = (
    "lx2v-int8-int8-ws",
    "lx2v-int8-int8",
    "lx2v-int8-fp8",
    "lx2v-int8",
    "fa4",
    "sage",
    "flash",
    "sdpa",
)
ATTENTION_CHOICES = (
    "auto",
    "sdpa",
    "lx2v-int8",
    "lx2v-int8-fp8",
    "lx2v-int8-int8",
    "lx2v-int8-int8-ws",
    "sage",
    "flash",
    "fa4",
    "flashinfer-fp8",
)
_active: list[str] = ["sdpa"]
_auto_chosen: list[bool] = [False]  # the active backend is "auto"'s choice, not the user's
_unavailable: dict[str, str] = {}
_auto_report: dict[str, object] = {}


def register_attention_backend(name: str, fn: AttentionFn) -> None:
    _BACKENDS[name] = fn


def _try_load(name: str) -> bool:
    if name in _BACKENDS:
        return True
    if name not in _LOADERS or name in _unavailable:
        return False
    try:
        _BACKENDS[name] = _LOADERS[name]()
    except Exception as e:  # ImportError, no GPU, old GPU: the backend is just absent
        _unavailable[name] = f"{type(e).__name__}: {e}"
        return False
    return True


def available_attention_backends() -> list[str]:
    for name in _LOADERS:
        _try_load(name)
    return sorted(_BACKENDS)


def unavailable_attention_backends() -> dict[str, str]:
    """Optional backends that could not load here, with the reason (for `lx2v info`)."""
    available_attention_backends()
    return dict(_unavailable)


def set_attention_backend(name: str) -> None:
    """Make `name` the active backend; "auto" runs the one-time self-check. An explicitly
    requested backend that is missing is an error."""
    _auto_chosen[0] = name == "auto"
    if name == "auto":
        name = auto_attention_backend()
    elif not _try_load(name):
        why = f": {_unavailable[name]}" if name in _unavailable else ""
        raise LX2VError(
            f"attention backend {name!r} is not available here{why} "
            f"(available: {', '.join(available_attention_backends())})"
        )
    _active[0] = name


def backend_limitation(name: str, head_dim: int, dtype: torch.dtype) -> str | None:
    """Why backend `name` cannot run attention with this head dim and dtype, or None. Our
    kernels (the lx2v backends) are written for Wan's head dim, 128, in bf16 or fp16;
    flashinfer's FP8 prefill (FA3) has kernels for head dims 64, 128 and 256."""
    if name.startswith("lx2v-"):
        dims: tuple[int, ...] = (128,)
    elif name == "flashinfer-fp8":
        dims = (64, 128, 256)
    else:
        return None
    if head_dim not in dims:
        *rest, last = map(str, dims)
        want = f"{', '.join(rest)} or {last}" if rest else last
        return f"takes head dim {want}, and this model's heads are {head_dim} wide"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"takes bf16 or fp16 activations, not {str(dtype).replace('torch.', '')}"
    return None


def fit_attention_backend(head_dim: int, dtype: torch.dtype) -> str:
    """Check the active backend against a model's attention before it runs: a backend that
    "auto" chose and that cannot run it is replaced by sdpa, with one log line; one the user
    named is an error. Returns the backend that will run."""
    name = _active[0]
    why = backend_limitation(name, head_dim, dtype)
    if why is None:
        return name
    if _auto_chosen[0]:
        log.warning("attention auto: %s %s; using sdpa for this model", name, why)
        _active[0] = "sdpa"
        return "sdpa"
    raise LX2VError(f"attention backend {name!r} {why}; use --attention auto or sdpa")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


# The accuracy gate of every 8-bit backend against fp32 exact attention.
GATE_REL_L2 = 0.03
GATE_COSINE = 0.999


def self_check(fn: AttentionFn, device: str | torch.device = "cuda") -> tuple[bool, str]:
    """Accuracy of `fn` against fp32 `attention_ref` on small bf16 problems: random normal
    q,k,v (odd lengths, cross-attention, batch 2) and k with a large per-channel offset.
    A backend that writes into q, k or v fails it."""
    g = torch.Generator(device="cpu").manual_seed(1234)
    worst = (0.0, 1.0)
    for B, Lq, Lk, H, off in (
        (2, 1000, 1000, 2, 0.0),
        (1, 777, 257, 3, 0.0),
        (1, 600, 600, 2, 8.0),
        (1, 200, WS_MIN_LK + 77, 1, 0.0),  # long enough for lx2v-int8-int8-ws's CUDA kernel
    ):
        q = torch.randn(B, Lq, H, 128, generator=g)
        k = torch.randn(B, Lk, H, 128, generator=g) + off * torch.randn(128, generator=g)
        v = torch.randn(B, Lk, H, 128, generator=g)
        q, k, v = (x.to(device, torch.bfloat16) for x in (q, k, v))
        inputs = [x.clone() for x in (q, k, v)]
        try:
            out = fn(q, k, v)
        except Exception as e:
            return False, f"failed: {type(e).__name__}: {e}"
        if not all(torch.equal(a, b) for a, b in zip(inputs, (q, k, v), strict=True)):
            return False, "writes into its inputs"  # the model reuses cached k and v
        ref = attention_ref(q.float(), k.float(), v.float())
        if out.shape != ref.shape or not torch.isfinite(out).all():
            return False, "wrong shape or non-finite output"
        r, c = rel_l2(out, ref), cosine(out, ref)
        worst = (max(worst[0], r), min(worst[1], c))
    ok = worst[0] <= GATE_REL_L2 and worst[1] >= GATE_COSINE
    return ok, f"rel-L2 {worst[0]:.2e}, cosine {worst[1]:.6f}"


# The problem "auto" times the candidates on: the 480P sequence (32 760 tokens) with 20 of
# the 14B model's 40 heads (500 MB of q, k, v). At the 8192 × 8 used before, the GPU work
# per call (~0.4 ms) was shorter than the 8-bit kernels' host-side launch work, so the timing
# ranked host overhead: on an H200 with flash-attn-4 installed auto chose fa4 (0.39 ms
# against 1.06 for lx2v-int8-int8), which is 10–16% slower than lx2v-int8-int8 at the
# model's shapes (docs/BENCHMARKS.md). 20 heads rather than the 16 used next: the CUDA kernel runs one
# 128-row CTA per multiprocessor, and 16 heads make 4 096 CTAs, 31.03 waves on 132 SMs, whose
# last, nearly empty wave cost it ~3% there (it timed 1.4% slower than lx2v-int8-int8 at 16
# heads and 2-5% faster at the model's 40 heads, batch 1 and 2, H200); 20 heads (38.8 waves)
# have a last wave as full as the 480P model's (77.6 waves at batch 1, 155.2 at 2).
AUTO_TIMING_SHAPE = (1, 32760, 20, 128)


def _time_ms(fn: AttentionFn, device: str | torch.device) -> float:
    q, k, v = (
        torch.randn(*AUTO_TIMING_SHAPE, device=device, dtype=torch.bfloat16) for _ in range(3)
    )
    for _ in range(3):
        fn(q, k, v)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(10):
        fn(q, k, v)
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 10


def auto_attention_backend() -> str:
    """The fastest available backend that passes `self_check` on this GPU; computed once,
    logged, and kept in `auto_attention_report()`. On CPU: "sdpa"."""
    if "choice" in _auto_report:
        return str(_auto_report["choice"])
    if not torch.cuda.is_available():
        _auto_report.update(choice="sdpa", checks={"sdpa": "CPU: no self-check"})
        return "sdpa"
    checks: dict[str, str] = {}
    times: dict[str, float] = {}
    for name in AUTO_CANDIDATES:
        if not _try_load(name):
            checks[name] = f"unavailable ({_unavailable.get(name, '?')})"
            continue
        ok, msg = self_check(_BACKENDS[name])
        if ok:
            times[name] = _time_ms(_BACKENDS[name], "cuda")
            msg += f", {times[name]:.3f} ms"
        checks[name] = ("passed: " if ok else "rejected: ") + msg
    choice = min(times, key=times.__getitem__) if times else "sdpa"
    _auto_report.update(choice=choice, checks=checks)
    log.warning(
        "attention auto: using %s (%s)", choice, "; ".join(f"{k} {v}" for k, v in checks.items())
    )
    return choice


def auto_attention_report() -> dict[str, object]:
    return dict(_auto_report)


@contextlib.contextmanager
def attention_backend_override(name: str) -> Iterator[None]:
    """Run the enclosed code with backend `name` (e.g. "sdpa" on the first/last N sampling
    steps), then restore the previous one. Compiled code reads the active backend at trace
    time, so expect one extra graph per backend used."""
    prev = _active[0]
    set_attention_backend(name)
    try:
        yield
    finally:
        _active[0] = prev


def attention_backend() -> str:
    return _active[0]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention over [B, L, H, D] tensors with the active backend."""
    return _BACKENDS[_active[0]](q, k, v)
