"""Build lightx2v; compiles the CUDA extension lightx2v._C when a CUDA torch and nvcc exist.

Arches come from TORCH_CUDA_ARCH_LIST (e.g. "9.0a" for a fast developer build); without
it, every arch the installed nvcc supports among 8.0, 8.9, 9.0a, 10.0 and 12.0, with PTX
for the newest. LX2V_SKIP_CUDA_BUILD=1 builds the pure-Python package.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup

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


def cuda_extensions():
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.c[pu]*"))
    if os.environ.get("LX2V_SKIP_CUDA_BUILD") == "1" or not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        print("lightx2v: no CUDA torch or nvcc; building without lightx2v._C")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.9;9.0a;10.0;12.0+PTX")
    ext = CUDAExtension(
        "lightx2v._C",
        sources,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math"],
        },
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
