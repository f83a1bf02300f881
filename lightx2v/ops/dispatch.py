"""Which implementation runs the fused ops (norm, rope, residual): chosen once, at import.

Backends, best first, chosen per op:
- "cuda": the kernels of csrc/, compiled into lightx2v._C (torch.ops.lx2v_C); only the ops
  in CUDA_OPS have one, the others go on to Triton. Needs a CUDA device, the built
  extension, and a kernel image for the device's architecture.
- "triton": kernels/ (installed as lightx2v.kernels); needs a CUDA device and triton.
- "ref": the PyTorch references beside each op, which torch.compile fuses on its own.

`LX2V_KERNELS` (auto | cuda | triton | ref, default auto) or `set_kernel_backend` choose:
"cuda" = csrc where it exists, Triton for the rest; "triton" = Triton for all; "ref" = the
references, and the unfused chain where a fusion reaches into the FP8 linears (the norm
that quantizes for the next linear: WanBlock; the GEMM epilogues: gemm.py), so that "ref"
is the "before" of an A/B comparison. "auto" takes the best available for each op and says
so in one log line when it falls back (a warning when a CUDA device is present, since that
costs speed; debug on a CPU-only machine, where there is nothing to accelerate). Asking for
a backend that is missing is an LX2VError naming the reason.

Each op is a torch.library custom op (namespace `lx2v`) whose default implementation is
its reference and whose CUDA implementation runs the op's backend (`cuda_impl`). The Python
wrappers call the op only when `use_kernels(x, op)`; otherwise they call the reference
directly, so a compiled graph sees plain aten ops that inductor can fuse.
"""

import functools
import importlib
import importlib.util
import logging
import os
from types import ModuleType

import torch

from lightx2v.errors import LX2VError

log = logging.getLogger(__name__)

BACKENDS = ("cuda", "triton", "ref")
FUSED_OPS = (
    "adaln", "adaln_fp8", "affine_layer_norm", "affine_layer_norm_fp8", "rms_norm",
    "qk_norm_rope", "gated_residual_",
)  # fmt: skip
# The fused ops with a csrc kernel: those the Triton kernels leave furthest below copy
# bandwidth (H200, 32760 × 5120: rms_norm 79%, qk_norm_rope 68%, adaln_fp8 60%); the affine
# LayerNorm → FP8 is the adaln_fp8 kernel with weight and bias for the modulation.
CUDA_OPS = ("adaln_fp8", "affine_layer_norm_fp8", "qk_norm_rope", "rms_norm")


def kernels_package() -> ModuleType:
    """`lightx2v.kernels` (lightx2v/__init__.py maps it in a source checkout too)."""
    return importlib.import_module("lightx2v.kernels")


def kernel_module(name: str) -> ModuleType:
    """A Triton kernel module, e.g. kernel_module("norm") → lightx2v.kernels.norm."""
    kernels_package()
    return importlib.import_module(f"lightx2v.kernels.{name}")


def csrc() -> ModuleType:
    """lightx2v.ops._cuda: the Python side of lightx2v._C (imports the extension)."""
    return importlib.import_module("lightx2v.ops._cuda")


def stale_extension(e: RuntimeError) -> str:
    """Why `csrc()` raised RuntimeError: lightx2v.ops._cuda registers a fake kernel for an op
    that the built lightx2v._C lacks, i.e. it was built from an older checkout."""
    return (
        f"lightx2v._C is older than this checkout ({e}): rebuild it "
        "(python setup.py build_ext --inplace, or reinstall)"
    )


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


def _cuda_status() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if importlib.util.find_spec("lightx2v._C") is None:
        return False, (
            "lightx2v._C is not built (a pure-Python install: reinstall with "
            "`pip install --no-build-isolation .` so the build sees the CUDA torch, with nvcc "
            "present and LX2V_SKIP_CUDA_BUILD unset)"
        )
    try:
        ext = csrc()
    except (ImportError, OSError) as e:  # e.g. built against another torch: undefined symbols
        return False, f"lightx2v._C does not load ({e})"
    except RuntimeError as e:
        return False, stale_extension(e)
    schema = torch.ops.lx2v_C.adaln_fp8.default._schema
    if "affine" not in {a.name for a in schema.arguments}:
        return False, (
            "lightx2v._C is older than this checkout (lx2v_C.adaln_fp8 has no `affine`): "
            "rebuild it (python setup.py build_ext --inplace, or reinstall)"
        )
    device = torch.cuda.get_device_name()  # torch initializes CUDA before the raw query below
    why = ext.kernel_image_status()
    if why:
        return False, why
    return True, f"lightx2v._C built for {ext.compiled_arches()}, on {device}"


class _State:
    backend: str = "ref"  # the best backend any op uses, or "missing" (a failed request)
    requested: str = "auto"
    reason: str = ""
    ops: dict[str, str] = {}  # FUSED_OPS → backend
    csrc: str = "not probed"  # why lightx2v._C is (un)available
    triton_ok: bool = False  # Triton kernels usable (csrc ops fall back to them per shape)
    other_ops: str = "ref"  # backend of op names outside FUSED_OPS (Triton-only ops)


_state = _State()
_shape_fallbacks_logged: set[str] = set()


def set_kernel_backend(name: str = "auto") -> str:
    """Choose the backend of the fused ops (auto, cuda, triton or ref); returns the best active.

    A failed request raises LX2VError and changes nothing.
    """
    if name not in ("auto", *BACKENDS):
        raise LX2VError(f"kernel backend {name!r}: expected auto, {', '.join(BACKENDS)}")
    cuda_ok, cuda_why = _cuda_status() if name in ("auto", "cuda") else (False, "not requested")
    triton_ok, triton_why = _triton_status() if name != "ref" else (False, "not requested")
    if name == "cuda" and not cuda_ok:
        raise LX2VError(f"kernel backend 'cuda' was requested but is unavailable: {cuda_why}")
    if name == "triton" and not triton_ok:
        raise LX2VError(f"kernel backend 'triton' was requested but is unavailable: {triton_why}")

    ops = {}
    for op in FUSED_OPS:
        if op in CUDA_OPS and cuda_ok:
            ops[op] = "cuda"
        elif triton_ok:
            ops[op] = "triton"
        else:
            ops[op] = "ref"
    _state.requested, _state.ops = name, ops
    _state.triton_ok, _state.other_ops = triton_ok, "triton" if triton_ok else "ref"
    _state.csrc = cuda_why
    used = set(ops.values())
    _state.backend = next(b for b in BACKENDS if b in used)
    if name == "ref":
        _state.reason = "requested"
    elif len(used) > 1:  # "cuda for adaln_fp8, ... — lightx2v._C ...; triton for adaln, ... — ..."
        why = {"cuda": cuda_why, "triton": triton_why, "ref": triton_why}
        _state.reason = "; ".join(
            f"{b} for {', '.join(o for o in FUSED_OPS if ops[o] == b)} — {why[b]}"
            for b in BACKENDS
            if b in used
        )
    elif _state.backend == "triton":
        _state.reason = triton_why
        if name != "triton":
            _state.reason += f"; no CUDA kernels: {cuda_why}"
    else:  # auto, and neither kernel backend is available
        _state.reason = cuda_why if cuda_why == triton_why else f"{cuda_why}; {triton_why}"
    _log_fallback(name, cuda_ok, cuda_why, triton_ok, triton_why)
    return _state.backend


def _log_fallback(name, cuda_ok, cuda_why, triton_ok, triton_why) -> None:
    """One line when auto (or cuda, for its non-csrc ops) settles for less than the best."""
    # loud where a GPU goes without its kernels; on a CPU-only machine they do not apply
    level = logging.WARNING if torch.cuda.is_available() else logging.DEBUG
    if name == "auto" and not cuda_ok and not triton_ok:
        why = cuda_why if cuda_why == triton_why else f"{cuda_why}; {triton_why}"
        log.log(level, "fused ops use the PyTorch reference: %s", why)
    elif name == "auto" and not cuda_ok:
        ops = ", ".join(CUDA_OPS)
        log.log(level, "fused ops %s use Triton, not CUDA kernels: %s", ops, cuda_why)
    elif name in ("auto", "cuda") and not triton_ok:
        rest = [op for op in FUSED_OPS if op not in CUDA_OPS]
        log.log(level, "fused ops %s use the PyTorch reference: %s", ", ".join(rest), triton_why)


def requested_backend() -> str:
    """What was asked for: "auto", "cuda", "triton" or "ref"."""
    return _state.requested


def kernel_backend() -> str:
    """The best backend any fused op uses ("cuda", "triton" or "ref"); see op_backend."""
    return _state.backend


def op_backend(op: str) -> str:
    """The backend that runs op: its own for the fused ops, Triton (if present) for others."""
    return _state.ops.get(op, _state.other_ops)


# Inside a compiled graph the fused ops trace as plain aten so inductor fuses them with
# their neighbours (bias adds, casts, the residual) instead: measured on an H200, 14B I2V
# 480P forward, regional compile: bf16 2.855 s with inductor fusing the references vs
# 2.923 s with our Triton kernels as opaque custom ops (FP8: 2.402 vs 2.490 s; see
# docs/BENCHMARKS.md). Eager runs use the Triton kernels (3.108 s vs 3.244 s diffusers).
# The csrc kernels are the exception: kept in the graph as opaque ops they beat inductor's
# fusion of the references. One 14B I2V block at 480P, compiled, H100 (tools/bench_block.py,
# 2026-11-27): bf16 67.20 ms with them vs 69.07 ms all deferred, FP8 59.52 vs 60.34 ms.
# Not the two norm → FP8 ops: kept in the graph they cost an FP8 block 1.7 ms more than
# inductor's own one-pass fusion of their references (H200, 2026-11-28: 59.93 vs 58.23 ms;
# tools/profile_block.py --norm-in-graph shows a 1.2 ms copy kernel next to each opaque
# op), so under compile they trace as their references like the Triton ops.
compile_deferred: set[str] = set(FUSED_OPS)
csrc_in_graph: set[str] = {"qk_norm_rope", "rms_norm"}


def use_kernels(x: torch.Tensor, op: str) -> bool:
    """True when op's fused kernel should run for a tensor on x's device."""
    if _state.backend == "missing":
        raise LX2VError(_state.reason)
    backend = op_backend(op)
    if not x.is_cuda or backend == "ref":
        return False
    if not torch.compiler.is_compiling():
        return True
    if backend == "cuda" and op in csrc_in_graph:
        return True
    return op not in compile_deferred


def cuda_impl(op: str, x: torch.Tensor, **shape) -> str:
    """What the CUDA implementation of `lx2v::op` runs for input x: "cuda", "triton" or "ref".

    "cuda" when op's backend is csrc and its kernel takes this input (`shape` adds what the
    check needs beyond x, e.g. head_dim); otherwise Triton where present (as before csrc
    existed, also when the backend is "ref" and the op is called directly), else the
    reference. An input the csrc kernel refuses is logged once per op.
    """
    if op_backend(op) == "cuda":
        why = csrc().unsupported(op, x, **shape)
        if why is None:
            return "cuda"
        fallback = "triton" if _state.triton_ok else "ref"
        if op not in _shape_fallbacks_logged:
            _shape_fallbacks_logged.add(op)
            log.warning("lx2v_C.%s does not take %s; such calls use %s", op, why, fallback)
        return fallback
    # As before csrc existed, a direct call of the op on CUDA runs the Triton kernel, also
    # when the backend is "ref" (which does not probe Triton).
    return "triton" if _state.triton_ok or _triton_available() else "ref"


@functools.cache
def _triton_available() -> bool:
    return _triton_status()[0]


def kernel_report() -> dict:
    """What `lx2v info` prints about the fused ops: the backend per op and why."""
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
        "csrc": _state.csrc,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "ops": {op: _state.ops.get(op, _state.backend) for op in FUSED_OPS},
        "fp8_gemm_epilogues": _gemm_report(),
    }


def _gemm_report() -> str:
    """Which FP8 GEMM epilogue path runs on the current device, and why."""
    from lightx2v.ops import gemm  # imports this module

    backend, why = gemm.epilogue_backend()
    return f"{backend}: {why}"


def _initial_backend() -> None:
    requested = os.environ.get("LX2V_KERNELS", "auto")
    try:
        set_kernel_backend(requested)
    except LX2VError as e:
        # Import must not fail (`lx2v info` has to run); the error surfaces at the first op.
        _state.requested, _state.backend, _state.reason = requested, "missing", str(e)


_initial_backend()
