"""Which implementation runs the fused ops (norm, rope, residual): chosen once, at import.

Backends, best first: "triton" (kernels/, installed as lightx2v.kernels; needs a CUDA device
and the triton package) → "ref" (the PyTorch references beside each op, which
torch.compile fuses on its own). csrc ops will slot in ahead of Triton when they exist.

`LX2V_KERNELS` (auto | triton | ref, default auto) or `set_kernel_backend` choose. "auto"
takes the best available and says so once in the log when it falls back (a warning when a
CUDA device is present, since that costs speed; debug on a CPU-only machine, where there is
nothing to accelerate). Asking for a backend that is missing is an LX2VError.

Each op is a torch.library custom op (namespace `lx2v`) whose default implementation is
its reference and whose CUDA implementation launches the Triton kernel. The Python
wrappers call the op only when `use_kernels(x, op)`; otherwise they call the reference
directly, so a compiled graph sees plain aten ops that inductor can fuse.
"""

import importlib
import importlib.util
import logging
import os
from types import ModuleType

import torch

from lightx2v.errors import LX2VError

log = logging.getLogger(__name__)

BACKENDS = ("triton", "ref")
FUSED_OPS = (
    "adaln", "adaln_fp8", "affine_layer_norm", "rms_norm", "qk_norm_rope", "gated_residual_",
)  # fmt: skip


def kernels_package() -> ModuleType:
    """`lightx2v.kernels` (lightx2v/__init__.py maps it in a source checkout too)."""
    return importlib.import_module("lightx2v.kernels")


def kernel_module(name: str) -> ModuleType:
    """A Triton kernel module, e.g. kernel_module("norm") → lightx2v.kernels.norm."""
    kernels_package()
    return importlib.import_module(f"lightx2v.kernels.{name}")


def _triton_status() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if importlib.util.find_spec("triton") is None:
        return False, "the triton package is not installed"
    try:
        for name in ("norm", "rope", "residual"):
            kernel_module(name)
    except ImportError as e:
        return False, f"lightx2v.kernels does not import ({e})"
    import triton

    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


class _State:
    backend: str = "ref"
    requested: str = "auto"
    reason: str = ""


_state = _State()


def set_kernel_backend(name: str = "auto") -> str:
    """Choose the backend of the fused ops ("auto", "triton" or "ref"); returns the active one."""
    if name not in ("auto", *BACKENDS):
        raise LX2VError(f"kernel backend {name!r}: expected auto, {', '.join(BACKENDS)}")
    ok, why = _triton_status()
    if name == "triton" and not ok:
        raise LX2VError(f"kernel backend 'triton' was requested but is unavailable: {why}")
    _state.requested = name
    _state.backend = "triton" if (ok and name != "ref") else "ref"
    _state.reason = why if _state.backend == "triton" or name == "auto" else "requested"
    if name == "auto" and not ok:
        # loud where a GPU goes without its kernels; on a CPU-only machine they do not apply
        level = logging.WARNING if torch.cuda.is_available() else logging.DEBUG
        log.log(level, "fused ops use the PyTorch reference: %s", why)
    return _state.backend


def kernel_backend() -> str:
    return _state.backend


# Inside a compiled graph the fused ops trace as plain aten so inductor fuses them with
# their neighbours (bias adds, casts, the residual) instead: measured on an H200, 14B I2V
# 480P forward, regional compile: bf16 2.855 s with inductor fusing the references vs
# 2.923 s with our Triton kernels as opaque custom ops (FP8: 2.402 vs 2.490 s; see
# docs/BENCHMARKS.md). Eager runs use the Triton kernels (3.108 s vs 3.244 s diffusers).
compile_deferred: set[str] = set(FUSED_OPS)


def use_kernels(x: torch.Tensor, op: str) -> bool:
    """True when op's fused kernel should run for a tensor on x's device."""
    if _state.backend == "missing":
        raise LX2VError(_state.reason)
    if not (x.is_cuda and _state.backend == "triton"):
        return False
    return not (op in compile_deferred and torch.compiler.is_compiling())


def kernel_report() -> dict:
    """What `lx2v info` prints about the fused ops."""
    spec = importlib.util.find_spec("triton")
    triton_version = None
    if spec is not None:
        import triton

        triton_version = triton.__version__
    return {
        "backend": _state.backend,
        "requested": _state.requested,
        "reason": _state.reason,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "ops": {op: _state.backend for op in FUSED_OPS},
    }


def _initial_backend() -> None:
    requested = os.environ.get("LX2V_KERNELS", "auto")
    try:
        set_kernel_backend(requested)
    except LX2VError as e:
        # Import must not fail (`lx2v info` has to run); the error surfaces at the first op.
        _state.requested, _state.backend, _state.reason = requested, "missing", str(e)


_initial_backend()
