#!/usr/bin/env bash
# flashinfer-fp8 (flashinfer-python's FP8 prefill, FA3) on the GPU machine: correctness, then
# speed beside our kernels. Run from the repo root after installing the bundle that
# tools/flashinfer_bundle.sh builds (carry .whl_fi1):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl_fi1/*.whl && tar xJf .whl_fi1/flashinfer.tar.xz -C /tmp/site
#   bash tools/flashinfer_check.sh [--backends sdpa,lx2v-int8-int8,fa4,flashinfer-fp8] [--stub]
#
# Logs and JSON under $OUT (or /tmp/fi_out). Arguments go to tools/flashinfer_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=${SITE:-/tmp/site}
OUT=${OUT:-/tmp/fi_out}
mkdir -p "$OUT"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# only used if flashinfer's prebuilt module does not load and it falls back to building it
X="$SITE/flashinfer_jit_extra"
export FLASHINFER_EXTRA_CUDAFLAGS="-isystem $X/curand/include"
export FLASHINFER_EXTRA_LDFLAGS="-L$X/libcuda_stub"
export FLASHINFER_NVCC_THREADS=${FLASHINFER_NVCC_THREADS:-4}

nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
# `import flashinfer` imports every submodule; with another package's CuTe DSL on the path (the
# fa4 bundle) some of them take other code paths. Should that fail, import only what the
# prefill needs (--stub: flashinfer's own modules, without its __init__.py)
STUB=()
if ! python3 -c "import flashinfer.prefill" >"$OUT/import_flashinfer.log" 2>&1; then
    tail -3 "$OUT/import_flashinfer.log"
    echo "# the full import of flashinfer failed ($OUT/import_flashinfer.log): using --stub"
    STUB=(--stub)
fi
python3 tools/flashinfer_check.py --out "$OUT" "${STUB[@]}" "$@" 2>&1 | tee "$OUT/flashinfer_check.log"
rc=${PIPESTATUS[0]}
if [ -d "$HOME/.cache/flashinfer" ]; then  # a JIT build's log, if one ran
    find "$HOME/.cache/flashinfer" -name flashinfer_jit.log -exec cp {} "$OUT/" \; 2>/dev/null
fi
exit "$rc"
