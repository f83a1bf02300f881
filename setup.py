"""Build lightx2v; compiles the CUDA extension lightx2v._C when a CUDA torch and nvcc exist.

Arches come from TORCH_CUDA_ARCH_LIST (e.g. "9.0a" for a fast developer build); without
it, every arch the installed nvcc supports among 8.0, 8.9, 9.0a, 10.0 and 12.0, with PTX
for the newest. LX2V_SKIP_CUDA_BUILD=1 builds the pure-Python package.
When 9.0a is among the arches and CUTLASS's headers are found (`pip install nvidia-cutlass`,
or CUTLASS_DIR=/path/to/cutlass), the Hopper FP8 GEMMs with fused epilogues are built too,
into lightx2v._C_sm90 (sm_90a only; csrc/*_sm90.*).
LX2V_LOCAL_VERSION=cu130torch2.11 appends a local version label (0.1.0+cu130torch2.11);
tools/build_wheels.sh sets it from the installed torch.
"""

import os
import re
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.dist import Distribution as _Distribution

ROOT = Path(__file__).parent
PACKAGES = [
    "lightx2v",
    "lightx2v.models",
    "lightx2v.models.wan",
    "lightx2v.ops",
    "lightx2v.quant",
    "lightx2v.runtime",
    "lightx2v.schedule",
    "lightx2v.kernels",
]
# Triton kernels live in top-level kernels/ but install as lightx2v.kernels (never a
# top-level `kernels` module: that name belongs to another PyPI package).
PACKAGE_DIR = {"lightx2v.kernels": "kernels"}

# Wanted arches, oldest first: A100, L40/4090, H100/H200 (9.0a: the arch-specific variant,
# which runs only on 9.0 and so gains nothing from PTX), B200, RTX 50xx.
DEFAULT_ARCHES = ("8.0", "8.9", "9.0a", "10.0", "12.0")


def nvcc_arches(nvcc: str) -> set[str] | None:
    """The real arches nvcc compiles for, as "9.0", "12.0" (None if nvcc cannot say)."""
    try:
        out = subprocess.run(
            [nvcc, "--list-gpu-code"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {f"{int(m[:-1])}.{m[-1]}" for m in re.findall(r"sm_(\d+)", out)}


def default_arch_list(nvcc: str) -> str:
    """DEFAULT_ARCHES that nvcc supports, +PTX on the newest plain one (JIT for GPUs newer
    still)."""
    supported = nvcc_arches(nvcc)
    if supported is None:
        raise RuntimeError(
            f"{nvcc} --list-gpu-code failed (nvcc older than CUDA 11.1?); "
            "set TORCH_CUDA_ARCH_LIST, e.g. TORCH_CUDA_ARCH_LIST=9.0a"
        )
    arches = [a for a in DEFAULT_ARCHES if a.rstrip("a") in supported]
    if not arches:
        raise RuntimeError(f"{nvcc} supports none of {DEFAULT_ARCHES}; set TORCH_CUDA_ARCH_LIST")
    # PTX for GPUs newer than any listed: compute_90a-style (arch-specific) PTX cannot be
    # JIT-compiled for another arch, so the PTX goes with a plain arch
    newest = arches[-1]
    if newest.endswith("a"):
        arches.append(newest[:-1] + "+PTX")
    else:
        arches[-1] += "+PTX"
    return ";".join(arches)


def cutlass_include_dirs() -> list[str] | None:
    """CUTLASS's include and tools/util/include directories: from CUTLASS_DIR (a checkout),
    else from the nvidia-cutlass package (found without importing it); None if neither."""
    root = os.environ.get("CUTLASS_DIR")
    if not root:
        import importlib.util

        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            return None
        root = os.path.join(list(spec.submodule_search_locations)[0], "source")
    dirs = [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
    if not os.path.exists(os.path.join(dirs[0], "cutlass", "cutlass.h")):
        return None
    return dirs


def cuda_extensions():
    csrc = ROOT / "csrc"
    all_sources = [*csrc.glob("*.cu"), *csrc.glob("*.cpp")]
    sources = sorted(str(p.relative_to(ROOT)) for p in all_sources if "_sm90" not in p.stem)
    sm90_sources = sorted(str(p.relative_to(ROOT)) for p in all_sources if "_sm90" in p.stem)
    # Headers are not sources, but rebuild what includes them (and go into an sdist).
    headers = sorted(str(p.relative_to(ROOT)) for p in [*csrc.glob("*.h"), *csrc.glob("*.cuh")])
    if os.environ.get("LX2V_SKIP_CUDA_BUILD") == "1" or not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        # pip's build isolation hides the installed torch: `pip install --no-build-isolation`
        print("lightx2v: torch is not importable here; building without lightx2v._C")
        return [], {}
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if torch.version.cuda is None or nvcc is None or not os.path.exists(nvcc):
        print("lightx2v: no CUDA torch or nvcc; building without lightx2v._C")
        return [], {}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(nvcc)
    arches = os.environ["TORCH_CUDA_ARCH_LIST"]  # torch's build reads it from here
    print(f"lightx2v: building lightx2v._C for TORCH_CUDA_ARCH_LIST={arches}")
    ext = CUDAExtension(
        "lightx2v._C",
        sources,
        depends=headers,
        # No -std: torch's build adds the standard its own headers need (C++20 lately).
        # No --use_fast_math: the kernels choose their roundings explicitly (__fmul_rn, ...)
        # to match the PyTorch references; fast math would also flush denormals.
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--threads=4"],  # --threads: the -gencode targets in parallel
        },
        py_limited_api=False,
    )
    exts = [ext]
    cutlass = cutlass_include_dirs()
    if not any(a.startswith("9.0") for a in re.split(r"[;\s]+", arches)):
        print("lightx2v: no 9.0 in TORCH_CUDA_ARCH_LIST; building without lightx2v._C_sm90")
    elif cutlass is None:
        print(
            "lightx2v: CUTLASS headers not found (pip install nvidia-cutlass, or set "
            "CUTLASS_DIR); building without lightx2v._C_sm90 (the Hopper FP8 GEMM epilogues)"
        )
    else:
        print(f"lightx2v: building lightx2v._C_sm90 for sm_90a with CUTLASS from {cutlass[0]}")
        exts.append(
            CUDAExtension(
                "lightx2v._C_sm90",
                sm90_sources,
                depends=headers,
                include_dirs=cutlass,
                extra_compile_args={
                    "cxx": ["-O3", "-DNDEBUG"],
                    # An -arch/-gencode flag here replaces torch's TORCH_CUDA_ARCH_LIST flags.
                    # -DNDEBUG: CUTLASS's device asserts are calls, across which ptxas
                    # serializes the WGMMA pipeline.
                    "nvcc": ["-O3", "-DNDEBUG", "-gencode=arch=compute_90a,code=sm_90a"],
                },
                py_limited_api=False,
            )
        )
    return exts, {"build_ext": BuildExtension}


class Distribution(_Distribution):
    """Appends LX2V_LOCAL_VERSION to the version pyproject.toml resolves (lightx2v.__version__).

    setup(version=...) would not do: pyproject's dynamic version is applied after it.
    """

    def parse_config_files(self, *args, **kwargs):
        super().parse_config_files(*args, **kwargs)
        local = os.environ.get("LX2V_LOCAL_VERSION")
        version = self.metadata.version
        if local and version and "+" not in version:
            if not re.fullmatch(r"[a-z0-9]+(\.[a-z0-9]+)*", local):
                raise ValueError(f"LX2V_LOCAL_VERSION={local!r} is not a PEP 440 local label")
            self.metadata.version = f"{version}+{local}"


ext_modules, cmdclass = cuda_extensions()
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    distclass=Distribution,
)
