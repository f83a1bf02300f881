#!/usr/bin/env bash
# GPU checks and benchmarks, in stages sized for one device call each (< 10 minutes on an
# H100/H200). Logs and JSON go to $OUT (default ./gpu_out); a short summary prints last.
#
#   tools/gpu_check.sh build      build lightx2v._C in place (TORCH_CUDA_ARCH_LIST, default 9.0a)
#   tools/gpu_check.sh kernels    build + GPU tests of the fused ops, csrc ops and attention;
#                                 csrc and one-block benchmarks
#   tools/gpu_check.sh csrc       build + the csrc GPU tests (a test that crashes is named)
#   tools/gpu_check.sh final      build + csrc, GEMM and fused-op GPU tests; csrc, GEMM and
#                                 one-block benchmarks; `lx2v run --preset fp8`
#                                 (GEMM_TUNE=1: the GEMM config sweep first)
#   tools/gpu_check.sh attention  build (the CUDA kernel is in lightx2v._C_sm90: nvidia-cutlass
#                                 installed) + attention GPU tests; the attention benchmark
#                                 with the kernel sweep and case (c) (~7 min on an H200)
#   tools/gpu_check.sh attn-proto the CUDA attention kernel's prototype variants against the
#                                 library's (tools/proto_attn_sm90.py; ~3 min), then its timeline
#   tools/gpu_check.sh profile    build + Nsight Compute (ncu) on the csrc adaLN → FP8 kernel
#                                 and the INT8 attention main kernel: where they wait
#                                 (needs a Firecracker machine; ncu cannot read counters on gVisor)
#   tools/gpu_check.sh wheel      a wheel for 9.0a, installed in a fresh venv and imported
#   tools/gpu_check.sh e2e        `lx2v run` on the embedded default with every preset,
#                                 and the VAE decode benchmark
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

step() {  # step NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.log, record status and time
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    printf '%-28s rc=%-3s %4ss\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$SUMMARY"
    return $rc
}

build() {  # incremental: a warm machine keeps build/ from an earlier call
    step build_ext 300 python3 setup.py build_ext --inplace
}

case "${1:-}" in
build) build ;;
final)
    build
    step info 60 python3 -m lightx2v.cli info
    step test_csrc 240 python3 -m pytest -q -m cuda tests/test_csrc_cuda.py -rs
    step test_gemm 300 python3 -m pytest -q -m cuda tests/test_gemm_cuda.py -rs
    step test_kernels 300 python3 -m pytest -q -m cuda tests/test_kernels_cuda.py -rs
    step bench_csrc 120 python3 tools/bench_csrc.py --out "$OUT/csrc.json"
    step bench_gemm 400 python3 tools/bench_gemm_epilogue.py --rep 200 ${GEMM_TUNE:+--tune} --json "$OUT/gemm.json"
    step bench_block 240 python3 tools/bench_block.py --json "$OUT/block.json"
    step run_fp8 300 python3 -m lightx2v.cli run --preset fp8 --output "$OUT/fp8.mp4"
    ;;
kernels)
    build
    step info 60 python3 -m lightx2v.cli info
    step test_csrc 240 python3 -m pytest -q -m cuda tests/test_csrc_cuda.py -rs
    step test_kernels 240 python3 -m pytest -q -m cuda tests/test_kernels_cuda.py -rs
    build
    step test_attention 280 python3 -m pytest -q -m cuda tests/test_attention_cuda.py -rs
    step bench_csrc 120 python3 tools/bench_csrc.py --out "$OUT/csrc.json"
    step bench_block 240 python3 tools/bench_block.py --json "$OUT/block.json"
    ;;
csrc)
    # a crashing test takes pytest down with it: note it, deselect it, go on (3 rounds at most)
    build
    desel=()
    for round in 1 2 3; do
        python3 -m pytest -v -p no:cacheprovider -m cuda tests/test_csrc_cuda.py -rs "${desel[@]}" \
            >"$OUT/csrc_round$round.log" 2>&1
        rc=$?
        echo "csrc tests round $round rc=$rc: $(grep -E '[0-9]+ (passed|failed)' "$OUT/csrc_round$round.log" | tail -1)" | tee -a "$SUMMARY"
        [ $rc -eq 139 ] || [ $rc -eq 134 ] || break
        crashed=$(grep -oE 'tests/test_csrc_cuda.py::[^ ]+' "$OUT/csrc_round$round.log" | tail -1)
        echo "  crashed in: $crashed" | tee -a "$SUMMARY"
        desel+=(--deselect "$crashed")
    done
    ;;
attention)
    # Peers: sageattention from .whl; flash-attn-4 needs its wheels installed with pip
    # --target first and the CUTLASS DSL libraries tarball unpacked over them afterwards
    # (pip --upgrade replaces the directory the tarball fills), plus
    # PYTHONPATH+=:<target>/nvidia_cutlass_dsl/dsl_packages (its .pth is not read there).
    build
    step test_attention 280 python3 -m pytest -q -m cuda tests/test_attention_cuda.py -rs
    step bench_attention 560 python3 tools/bench_attention.py --sweep --captured --json "$OUT/attention.json"
    ;;
attn-proto)
    export PROTO_BUILD="$OUT/proto_build"
    mkdir -p "$PROTO_BUILD"
    step proto_variants 420 python3 tools/proto_attn_sm90.py --seconds 2
    step proto_trace 120 python3 tools/proto_attn_sm90.py --trace 410932
    ;;
profile)
    build
    # --clock-control none: leave the clocks as they are (device METHOD.md); one launch each
    # after a warm-up, every section (--set full), the report kept in $OUT; then the details
    # page and the per-SASS-instruction page (stall samples, executed instructions) as text
    profile_one() {  # profile_one NAME KERNEL_REGEX TIMEOUT
        step "ncu_$1" "$3" ncu --clock-control none --kernel-name "regex:$2" --launch-skip 1 \
            --launch-count 1 --set full --import-source no -f -o "$OUT/ncu_$1" \
            python3 tools/ncu_targets.py "$1"
        step "ncu_$1_details" 120 ncu -i "$OUT/ncu_$1.ncu-rep" --page details
        step "ncu_$1_sass" 120 ncu -i "$OUT/ncu_$1.ncu-rep" --page source --csv --print-source sass
    }
    profile_one adaln adaln_fp8 240
    profile_one attention _attn_fwd_kernel 400
    ;;
wheel)
    rm -rf dist
    step build_wheel 400 bash tools/build_wheels.sh "$TORCH_CUDA_ARCH_LIST"
    ls -la dist | tee -a "$SUMMARY"
    # a fresh install target, used from /tmp with the checkout off the path: the wheel must
    # stand alone (torch first: the extension links against its libraries)
    rm -rf /tmp/lx2v_fresh
    step install 120 env -u PYTHONPATH python3 -m pip install --no-deps --no-index --target /tmp/lx2v_fresh dist/lightx2v-*.whl
    step wheel_import 120 bash -c "cd /tmp && env -u PYTHONPATH PYTHONPATH=/tmp/lx2v_fresh python3 -c 'import torch, lightx2v, lightx2v._C, lightx2v.kernels; from lightx2v.ops import dispatch; print(lightx2v.__file__); print(dispatch.kernel_report())' && env -u PYTHONPATH PYTHONPATH=/tmp/lx2v_fresh python3 -m lightx2v.cli info"
    ;;
e2e)
    build
    for p in bf16 fp8 fp8-teacache distill low-vram; do
        step "run_$p" 240 python3 -m lightx2v.cli run --preset "$p" --output "$OUT/demo_$p.mp4"
    done
    step run_offload_block 240 python3 -m lightx2v.cli run --quant fp8 --offload block --output "$OUT/demo_offload.mp4"
    step bench_vae 300 python3 tools/bench_vae.py --max-vram 8 --out "$OUT/vae.json"
    ;;
*)
    sed -n '2,22p' "$0"
    exit 2
    ;;
esac
echo "== summary ($OUT)"
cat "$SUMMARY"
for f in "$OUT"/*.log; do
    echo "== $(basename "$f") (tail)"
    tail -n 6 "$f"
done
