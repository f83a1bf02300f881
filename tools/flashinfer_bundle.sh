#!/usr/bin/env bash
# Build the folder .whl_fi1 that tools/flashinfer_check.sh installs on the GPU machine (no
# network there) to run flashinfer-python's FP8 prefill, the "flashinfer-fp8" attention
# backend, with its kernel module prebuilt here so that nothing is compiled there.
#
#   PY=/opt/venv/bin/python tools/flashinfer_bundle.sh path/to/flashinfer_python-*.whl
#
# Needs here: a python with torch (the CPU build will do), jinja2, filelock, packaging, numpy,
# requests and tqdm (flashinfer imports them); CUDA's nvcc at $CUDA_HOME (13.0, the GPU
# machine's version), gcc, ninja, pip access to PyPI. About 6 minutes on 2 cores.
#
# What goes in .whl_fi1 (about 14 MB, next to a 1 MB repo):
# - apache-tvm-ffi for CPython 3.12 (flashinfer's kernel modules are TVM-FFI modules);
# - flashinfer.tar.xz: flashinfer's Python files (all of them: `import flashinfer.prefill`
#   runs flashinfer/__init__.py, which imports ~330 of its modules; their third-party
#   imports beyond tvm_ffi are on the GPU machine's image: numpy, pynvml, requests, tqdm,
#   packaging, jinja2, filelock, cuda-pathfinder; the optional ones, cuDNN frontend, CuTe DSL,
#   cuda-tile, nccl4py, are guarded and not needed for this kernel), and of its data only
#   - data/aot/<uri>/<uri>.so: the single-prefill module for e4m3 q/k/v, bf16 out, head dim
#     128, FA3 (sm_90a), built here. flashinfer loads a module found at that path instead
#     of compiling it (flashinfer.jit.env.get_aot_path). The module is a TVM-FFI library:
#     it links libcudart.so.13 and libstdc++ only, not Python or torch, so a build made
#     with python 3.11 and a CPU torch loads under the GPU machine's 3.12 and torch 2.11;
#   - the sources, templates and headers that module is built from (data/csrc templates,
#     data/include, CUTLASS's and libcu++'s include trees), so that should the prebuilt
#     module fail to load there, flashinfer's own fallback (a JIT build, minutes) works;
#     plus, in flashinfer_jit_extra/, cuRAND's headers (CUTLASS's utilities include
#     curand_kernel.h) and an empty libcuda.so stub for its link line (-lcuda), which
#     tools/flashinfer_check.sh points that build at.
set -euo pipefail

WHEEL=${1:?usage: tools/flashinfer_bundle.sh path/to/flashinfer_python-VERSION-py3-none-any.whl}
WHEEL=$(realpath "$WHEEL")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}
WORK=${WORK:-/tmp/fi_bundle}
DEST=${DEST:-$ROOT/.whl_fi1}
TVM_FFI=${TVM_FFI:-0.1.15.post2}
CURAND=${CURAND:-10.4.0.35}  # cuRAND of CUDA 13.0
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

# a second run with the same wheel reuses the unpacked tree and the build (ninja: no-op)
STAMP="$WHEEL $(stat -c %s "$WHEEL") $TVM_FFI $CURAND $("$PY" -V)"
if [ "$(cat "$WORK/stamp" 2>/dev/null)" != "$STAMP" ]; then
    rm -rf "$WORK"
    mkdir -p "$WORK/dl" "$WORK/site" "$WORK/extra/libcuda_stub"
    echo "# unpacking $(basename "$WHEEL")"
    "$PY" -m zipfile -e "$WHEEL" "$WORK/wheel"

    echo "# build-time packages for $("$PY" -V)"
    "$PY" -m pip download -q --no-deps -d "$WORK/dl" "apache-tvm-ffi==$TVM_FFI" nvidia-ml-py \
        "nvidia-curand==$CURAND"
    "$PY" -m pip install -q --no-deps --no-compile --target "$WORK/site" \
        "$WORK"/dl/apache_tvm_ffi-"$TVM_FFI"-*.whl "$WORK"/dl/nvidia_ml_py-*.whl
    "$PY" -m zipfile -e "$WORK"/dl/nvidia_curand-"$CURAND"-*.whl "$WORK/dl/curand"
    mkdir -p "$WORK/extra/curand"
    cp -r "$WORK/dl/curand/nvidia/cu13/include" "$WORK/extra/curand/"
    echo "" >"$WORK/dl/stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$WORK/extra/libcuda_stub/libcuda.so" \
        "$WORK/dl/stub.c"
    echo "$STAMP" >"$WORK/stamp"
fi
rm -rf "$WORK/trim"
mkdir -p "$WORK/trim" "$DEST"

echo "# building the FP8 single-prefill module (sm_90a) with $("$CUDA_HOME/bin/nvcc" --version | tail -1)"
NAME=$(
    FLASHINFER_CUDA_ARCH_LIST=9.0a FLASHINFER_WORKSPACE_BASE="$WORK/ws" \
    FLASHINFER_EXTRA_CUDAFLAGS="-isystem $WORK/extra/curand/include" \
    FLASHINFER_EXTRA_LDFLAGS="-L$WORK/extra/libcuda_stub" \
    PYTHONPATH="$WORK/site:$WORK/wheel" "$PY" - <<'EOF'
import torch
from flashinfer.jit import gen_single_prefill_module

# the arguments single_prefill_with_kv_cache passes for e4m3 q, k, v, bf16 out, head dim 128,
# no RoPE, no sliding window, no soft cap, backend "fa3"
spec = gen_single_prefill_module(
    "fa3", torch.float8_e4m3fn, torch.float8_e4m3fn, torch.bfloat16, 128, 128, 0, False, False,
    False,
)
spec.build()
assert spec.jit_library_path.exists(), spec.jit_library_path
print(spec.name)
EOF
)
SO=$(find "$WORK/ws" -path "*/cached_ops/$NAME/$NAME.so")
echo "# built $SO ($(stat -c %s "$SO") bytes)"
readelf -d "$SO" | grep NEEDED
if readelf -d "$SO" | grep -q -E "libpython|libtorch"; then
    echo "error: the module links Python or torch" >&2
    exit 1
fi
LD_LIBRARY_PATH="$CUDA_HOME/lib64" PYTHONPATH="$WORK/site" "$PY" -c \
    "import sys, tvm_ffi; tvm_ffi.load_module(sys.argv[1]).run; print('# loads under tvm_ffi')" "$SO"

echo "# assembling the trimmed package"
(cd "$WORK/wheel" && tar --exclude=flashinfer/data -cf - flashinfer flashinfer_python-*.dist-info) |
    tar -C "$WORK/trim" -xf -
(
    cd "$WORK/wheel"
    find flashinfer/data/csrc -maxdepth 1 \( -name "*.jinja" -o -name "*.h" \
        -o -name "single_prefill*.cu" \) -print
    echo flashinfer/data/include
    echo flashinfer/data/cutlass/include
    echo flashinfer/data/cutlass/tools/util/include
    echo flashinfer/data/cccl/libcudacxx/include
) | tar -C "$WORK/wheel" -cf - -T - | tar -C "$WORK/trim" -xf -
mkdir -p "$WORK/trim/flashinfer/data/aot/$NAME"
cp "$SO" "$WORK/trim/flashinfer/data/aot/$NAME/"
cp -r "$WORK/extra" "$WORK/trim/flashinfer_jit_extra"

rm -f "$DEST"/flashinfer.tar.xz "$DEST"/apache_tvm_ffi-*.whl
tar -C "$WORK/trim" -cf - . | xz -9 -T0 >"$DEST/flashinfer.tar.xz"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 -d "$DEST" "apache-tvm-ffi==$TVM_FFI"

DEST=$(realpath "$DEST")
if [[ "$DEST" == "$ROOT"/* ]]; then  # kept out of git (and carried to the GPU machine by name)
    EXCLUDE=$(git -C "$ROOT" rev-parse --path-format=absolute --git-path info/exclude)  # a worktree's .git is a file
    mkdir -p "$(dirname "$EXCLUDE")"
    grep -qxF "${DEST#"$ROOT"}/" "$EXCLUDE" || echo "${DEST#"$ROOT"}/" >>"$EXCLUDE"
fi
echo "# $DEST:"
ls -l "$DEST"
du -sb "$DEST"
