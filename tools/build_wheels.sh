#!/usr/bin/env bash
# Build lightx2v wheels that carry the CUDA extension lightx2v._C, one per arch list, into dist/.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: tools/build_wheels.sh [-h] [ARCH_LIST ...]

Builds a lightx2v wheel with lightx2v._C compiled for each ARCH_LIST (TORCH_CUDA_ARCH_LIST
syntax: "9.0a", "8.0;8.9;9.0a;10.0;12.0+PTX") into dist/. With no ARCH_LIST: one wheel for
$TORCH_CUDA_ARCH_LIST if set, else setup.py's default (every arch the installed nvcc
supports among 8.0, 8.9, 9.0a, 10.0 and 12.0, with PTX for the newest).

The version gets a local label naming the installed torch, e.g. 0.1.0+cu130torch2.11
(CUDA 13.0, torch 2.11): the extension links against that torch's C++ ABI and works with
no other. With several ARCH_LISTs each label also names its arches (+cu130torch2.11.sm90a)
so that the wheel files differ. build/ is removed before each build, so that no object
compiled for another arch list ends up in a wheel.

Environment: PYTHON (default python3) must have a CUDA build of torch, setuptools, wheel
and pip; nvcc is found as torch finds it (CUDA_HOME, else PATH); ninja makes it faster.
With nvidia-cutlass installed there too (pip install nvidia-cutlass), a wheel whose arch list
has 9.0a also carries lightx2v._C_sm90, the Hopper FP8 GEMMs with fused epilogues.

Example, H100/H200:
  TORCH_CUDA_ARCH_LIST=9.0a tools/build_wheels.sh
  python3 -m venv --system-site-packages /tmp/v && /tmp/v/bin/pip install --no-deps dist/lightx2v-*.whl
EOF
}

die() {
    echo "build_wheels: $*" >&2
    exit 1
}

case "${1:-}" in
-h | --help)
    usage
    exit 0
    ;;
-*) die "unknown option $1 (see --help)" ;;
esac

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || die "no $PY (set PYTHON)"

# torch must be a CUDA build, and nvcc where torch's build looks for it
"$PY" -c "import torch" 2>/dev/null || die "$PY cannot import torch"
cuda="$("$PY" -c "import torch; print(torch.version.cuda or '')")"
[ -n "$cuda" ] || die "torch $("$PY" -c "import torch; print(torch.__version__)") is a CPU build: the wheel needs a CUDA torch"
nvcc="$("$PY" -c "from torch.utils.cpp_extension import CUDA_HOME; print(f'{CUDA_HOME}/bin/nvcc' if CUDA_HOME else '')")"
[ -n "$nvcc" ] && [ -x "$nvcc" ] || die "no nvcc found (install the CUDA toolkit $cuda or set CUDA_HOME)"
echo "build_wheels: $("$nvcc" --version | tail -1) for torch CUDA $cuda"

# local label: cu130torch2.11 from torch.version.cuda = "13.0", torch.__version__ = "2.11.0+cu130"
label="$("$PY" -c "
import torch
major_minor = '.'.join(torch.__version__.split('+')[0].split('.')[:2])
print(f\"cu{torch.version.cuda.replace('.', '')}torch{major_minor}\")")"
base="$("$PY" -c "import re; print(re.search(r'__version__ = \"([^\"]+)\"', open('lightx2v/__init__.py').read()).group(1))")"

if [ $# -eq 0 ]; then
    set -- "${TORCH_CUDA_ARCH_LIST:-}"
    multi=0
else
    multi=$(($# > 1))
fi

mkdir -p dist
for arches in "$@"; do
    local_version="$label"
    if [ "$multi" = 1 ]; then
        # "8.0;9.0a+PTX" → ".sm80.sm90a"
        local_version+="$(echo "$arches" | tr ';, ' '\n\n\n' | sed -e '/^$/d' -e 's/+PTX//' -e 's/\.//' -e 's/^/.sm/' | tr -d '\n')"
    fi
    echo "build_wheels: lightx2v $base+$local_version, TORCH_CUDA_ARCH_LIST=${arches:-<setup.py default>}"
    rm -rf build lightx2v.egg-info
    rm -f dist/lightx2v-"$base+$local_version"-*.whl
    env LX2V_LOCAL_VERSION="$local_version" TORCH_CUDA_ARCH_LIST="$arches" LX2V_SKIP_CUDA_BUILD= \
        "$PY" -m pip wheel . --no-deps --no-build-isolation -w dist/ ||
        die "the build failed (see above)"
    wheel="$(ls dist/lightx2v-"$base+$local_version"-*.whl 2>/dev/null | head -1 || true)"
    [ -n "$wheel" ] || die "no dist/lightx2v-$base+$local_version-*.whl after the build"
    listing="$("$PY" -m zipfile -l "$wheel")"
    grep -q 'lightx2v/_C[^/]*\.so' <<<"$listing" || die "$wheel has no lightx2v/_C*.so"
    grep -q 'lightx2v/kernels/norm\.py' <<<"$listing" || die "$wheel has no lightx2v/kernels"
    echo "build_wheels: wrote $wheel"
done
