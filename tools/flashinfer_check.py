"""flashinfer-fp8 on the GPU machine: does flashinfer-python's FP8 prefill load (its prebuilt
module, or a JIT build), is the backend right, and how fast is it beside ours.

    PYTHONPATH=/tmp/site:. python3 tools/flashinfer_check.py [--out DIR] [--backends a,b,...]

1. imports flashinfer (or, with --stub, its submodules without flashinfer/__init__.py) and
   says whether its single-prefill FP8 module is the prebuilt one (tools/flashinfer_bundle.sh);
2. loads the "flashinfer-fp8" backend of lightx2v.ops.attention and times its first call;
3. accuracy against fp32 exact attention (rel-L2 / cosine), for it and the other backends
   named: S = 4096 (batch 2, all rows; random and k with a per-channel offset), cross-attention
   4096 × 512, and S = 32760 (first 2048 query rows); batch 2 against two batch-1 calls; the
   self-check that "auto" runs; the wrapper's time at the benchmark's shape split into its
   torch quantisation and flashinfer's kernel alone;
4. speed: tools/bench_attention.py --quick --no-accuracy (S = 32760, H = 40, batch 1),
   restricted to the backends named.
Writes flashinfer_check.json and bench_attention.json under --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEV = "cuda"
DEFAULT_BACKENDS = "sdpa,lx2v-int8-int8,fa4,flashinfer-fp8"


def import_flashinfer_without_init() -> None:
    """Make `flashinfer` a bare package object, so that `import flashinfer.prefill` runs
    prefill.py and what it imports but not flashinfer/__init__.py (which imports every
    submodule: MoE, communication, CuTe DSL, ...). The kernels and their Python launchers are
    flashinfer's own, unchanged."""
    spec = importlib.util.find_spec("flashinfer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("flashinfer is not installed")
    pkg = types.ModuleType("flashinfer")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    pkg.__file__ = spec.origin
    sys.modules["flashinfer"] = pkg


def qkv(B, Lq, Lk, H, seed, k_offset=0.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, Lq, H, 128, device=DEV, generator=g)
    k = torch.randn(B, Lk, H, 128, device=DEV, generator=g)
    if k_offset:
        k += k_offset * torch.randn(128, device=DEV, generator=g)
    v = torch.randn(B, Lk, H, 128, device=DEV, generator=g)
    return [x.bfloat16() for x in (q, k, v)]


# (name, B, Lq, Lk, H, k offset, rows compared)
CASES = (
    ("S4096 B2 random", 2, 4096, 4096, 4, 0.0, None),
    ("S4096 B2 k-offset", 2, 4096, 4096, 4, 10.0, None),
    ("cross 4096x512 B2", 2, 4096, 512, 4, 0.0, None),
    ("S32760 random r2048", 1, 32760, 32760, 4, 0.0, 2048),
    ("S32760 k-offset r2048", 1, 32760, 32760, 4, 10.0, 2048),
)


def accuracy(A, fns: dict) -> dict:
    res: dict[str, dict] = {}
    for case, B, Lq, Lk, H, off, rows in CASES:
        q, k, v = qkv(B, Lq, Lk, H, seed=Lq + Lk + int(off), k_offset=off)
        r = slice(None) if rows is None else slice(0, rows)
        ref = A.attention_ref(q[:, r].float(), k.float(), v.float())
        for name, fn in fns.items():
            try:
                out = fn(q, k, v)[:, r]
                res[f"{name}/{case}"] = dict(
                    rel_l2=A.rel_l2(out, ref),
                    cosine=A.cosine(out, ref),
                    finite=bool(torch.isfinite(out).all()),
                )
            except Exception as e:
                res[f"{name}/{case}"] = dict(error=f"{type(e).__name__}: {e}"[:300])
            print(case, name, res[f"{name}/{case}"], flush=True)
        del q, k, v, ref
        torch.cuda.empty_cache()
    return res


def _median_ms(fn) -> float:
    from tools.bench_attention import time_ms  # ROOT is on sys.path

    return time_ms(fn, (), min_time_s=0.0, min_reps=10)  # the median of 10 after a warm-up


def split_timing(A, S=32760, H=40) -> dict:
    """The flashinfer-fp8 wrapper at the benchmark's shape, split: its torch quantisation
    (k smoothing, per-head amax, scale, cast: unfused) and flashinfer's kernel alone on
    already-quantised inputs (what a fused quantiser could bring it down to)."""
    from flashinfer.prefill import single_prefill_with_kv_cache

    q, k, v = qkv(1, S, S, H, seed=1)
    fi = A._BACKENDS["flashinfer-fp8"]

    def quantise():
        return [A._fp8_per_head(x) for x in (q, k - k.mean(dim=1, keepdim=True), v)]

    (q8, sq), (k8, sk), (v8, sv) = quantise()

    def kernel():
        return single_prefill_with_kv_cache(
            q8[0], k8[0], v8[0], scale_q=sq[0], scale_k=sk[0], scale_v=sv[0],
            o_dtype=torch.bfloat16, causal=False, kv_layout="NHD", sm_scale=128**-0.5,
            backend="fa3",
        )  # fmt: skip

    flops = 4 * S * S * 128 * H
    res = dict(S=S, H=H, wrapper_ms=_median_ms(lambda: fi(q, k, v)), quant_ms=_median_ms(quantise),
               kernel_ms=_median_ms(kernel))  # fmt: skip
    res.update(wrapper_tflops=flops / res["wrapper_ms"] / 1e9,
               kernel_tflops=flops / res["kernel_ms"] / 1e9)  # fmt: skip
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/fi_out")))
    ap.add_argument("--backends", default=DEFAULT_BACKENDS, help="comma-separated")
    ap.add_argument("--stub", action="store_true", help="skip flashinfer/__init__.py")
    ap.add_argument("--no-bench", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    keep = [b for b in args.backends.split(",") if b]
    report: dict[str, object] = dict(
        gpu=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda,
        torch_dlpack_c_api=hasattr(torch.Tensor, "__dlpack_c_exchange_api__"),
    )  # fmt: skip

    # 1. flashinfer, and whether its module is the prebuilt one
    t0 = time.perf_counter()
    try:
        if args.stub:
            import_flashinfer_without_init()
        import flashinfer.prefill  # noqa: F401
        import tvm_ffi
    except Exception:
        traceback.print_exc()
        print("flashinfer does not import" + ("" if args.stub else "; try --stub"), flush=True)
        return 1
    from flashinfer.jit import gen_single_prefill_module
    from flashinfer.version import __version__ as fi_version

    e4m3 = torch.float8_e4m3fn
    spec = gen_single_prefill_module("fa3", e4m3, e4m3, torch.bfloat16, 128, 128, 0, False, False,
                                     False)  # fmt: skip
    report.update(
        flashinfer=fi_version, flashinfer_path=str(Path(flashinfer.prefill.__file__).parent),
        tvm_ffi=tvm_ffi.__version__, import_s=round(time.perf_counter() - t0, 2),
        module=spec.name, prebuilt_module=str(spec.aot_path) if spec.is_aot else None,
    )  # fmt: skip
    print("#", report, flush=True)

    # 2. the backend, its first call (loading the module, or building it)
    from lightx2v.ops import attention as A

    if not A._try_load("flashinfer-fp8"):
        print("flashinfer-fp8 unavailable:", A._unavailable.get("flashinfer-fp8"), flush=True)
        return 1
    fi = A._BACKENDS["flashinfer-fp8"]
    q, k, v = qkv(1, 256, 256, 2, seed=0)
    t0 = time.perf_counter()
    fi(q, k, v)
    torch.cuda.synchronize()
    report["first_call_s"] = round(time.perf_counter() - t0, 2)
    report["jit_built_here"] = spec.jit_library_path.exists()
    print("# first call", report["first_call_s"], "s; JIT build:", report["jit_built_here"])

    # 3. accuracy; batch 2 against batch 1 (each batch element has its own scales); self-check
    fns = {}
    for name in dict.fromkeys(["flashinfer-fp8", *keep]):
        if A._try_load(name):
            fns[name] = A._BACKENDS[name]
        else:
            print(f"# {name}: unavailable ({A._unavailable.get(name)})", flush=True)
    acc = accuracy(A, fns)
    q, k, v = qkv(2, 1000, 777, 3, seed=5, k_offset=3.0)
    both = fi(q, k, v)
    one = torch.cat([fi(q[i : i + 1], k[i : i + 1], v[i : i + 1]) for i in range(2)])
    report["batch2_equals_two_batch1"] = bool(torch.equal(both, one))
    checks = {n: A.self_check(fn) for n, fn in fns.items()}
    report["self_check"] = {n: ("passed: " if ok else "rejected: ") + m for n, (ok, m) in
                            checks.items()}  # fmt: skip
    report["accuracy"] = acc
    (args.out / "flashinfer_check.json").write_text(json.dumps(report, indent=1))

    print("\naccuracy vs fp32 exact (rel-L2 / cosine); gate 3% / 0.999")
    for key, r in acc.items():
        if "error" in r:
            print(f"{key:<42} error {r['error'][:70]}")
        else:
            ok = r["rel_l2"] <= A.GATE_REL_L2 and r["cosine"] >= A.GATE_COSINE and r["finite"]
            print(f"{key:<42} {r['rel_l2']:.2e} / {r['cosine']:.6f}{'' if ok else '  FAILS'}")
    print("batch 2 == two batch-1 calls:", report["batch2_equals_two_batch1"])
    for n, m in report["self_check"].items():
        print(f"self-check {n:<16} {m}")
    sys.stdout.flush()
    del q, k, v, both, one
    torch.cuda.empty_cache()
    try:
        report["split_timing"] = split = split_timing(A)
        print(f"flashinfer-fp8 at S={split['S']} H={split['H']} B=1: wrapper "
              f"{split['wrapper_ms']:.2f} ms ({split['wrapper_tflops']:.0f} TFLOP/s) = torch "
              f"quantisation {split['quant_ms']:.2f} ms + kernel {split['kernel_ms']:.2f} ms "
              f"({split['kernel_tflops']:.0f} TFLOP/s)", flush=True)  # fmt: skip
    except Exception as e:
        report["split_timing"] = dict(error=f"{type(e).__name__}: {e}"[:300])
        print("split timing failed:", report["split_timing"], flush=True)
    torch.cuda.empty_cache()
    (args.out / "flashinfer_check.json").write_text(json.dumps(report, indent=1))

    # 4. speed, through bench_attention itself, restricted to the backends named
    if args.no_bench:
        return 0
    spec_b = importlib.util.spec_from_file_location("bench_attention", ROOT / "tools" /
                                                    "bench_attention.py")  # fmt: skip
    bench = importlib.util.module_from_spec(spec_b)
    spec_b.loader.exec_module(bench)
    every = bench.backends
    bench.backends = lambda: {n: f for n, f in every().items() if n in keep}
    sys.argv = ["bench_attention.py", "--quick", "--no-accuracy",
                "--json", str(args.out / "bench_attention.json")]  # fmt: skip
    bench.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
