"""Attention backends side by side on one GPU: speed and accuracy.

    PYTHONPATH=. python3 tools/bench_attention.py [--json out.json] [--sweep] [--quick]

Speed: TFLOP/s = 4·S²·D·H·B / time (non-causal), quantisation pre-passes included, at
S = 32760 and 75600 (Wan2.1 480P / 720P), H = 40, D = 128, batch 1 and 2; bf16 inputs in the
model's [B, L, H, D] layout; median of CUDA-event timings after a warm-up.
Accuracy: against fp32 exact attention on the first 2048 query rows (rows are independent)
of a 4-head problem at full sequence length: (a) random normal q, k, v; (b) k with a
large per-channel offset (N(0,1) + 10·N(0,1) per channel). Gate: rel-L2 ≤ 3%, cosine ≥ 0.999.
--sweep times kernel configurations (block sizes, warps, stages) of lx2v-int8 first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightx2v.kernels.attention as K  # noqa: E402  (lightx2v maps kernels/ in a checkout)

from lightx2v.ops import attention as A  # noqa: E402

DEV = "cuda"


def time_ms(fn, args, min_time_s=1.0, min_reps=3) -> float:
    fn(*args)  # warm-up (compilation, autotune caches)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*args)
    torch.cuda.synchronize()
    once = time.perf_counter() - t0
    reps = max(min_reps, min(50, int(min_time_s / max(once, 1e-6))))
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(*args)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def make_qkv(B, S, H, seed, k_offset=0.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    out = []
    for i in range(3):
        x = torch.randn(B, S, H, 128, device=DEV, generator=g, dtype=torch.bfloat16)
        if i == 1 and k_offset:
            x += (k_offset * torch.randn(128, device=DEV, generator=g)).bfloat16()
        out.append(x)
    return out


def backends() -> dict[str, object]:
    names = ["sdpa", "lx2v-int8", "lx2v-int8-fp8", "sage", "flash"]
    found = {}
    for n in names:
        if A._try_load(n):
            found[n] = A._BACKENDS[n]
            if n == "lx2v-int8-fp8":  # the variant with one-level (tensor-core) accumulation
                found["lx2v-fp8-1lvl"] = lambda q, k, v: K.attention_int8(
                    q, k, v, True, None, False
                )
        else:
            print(f"# {n}: unavailable ({A._unavailable.get(n)})")
    return found


def accuracy(fns, S, rows=2048, H=4):
    res = {}
    for case, off in (("random", 0.0), ("k_offset", 10.0)):
        q, k, v = make_qkv(1, S, H, seed=S + int(off), k_offset=off)
        ref = A.attention_ref(q[:, :rows].float(), k.float(), v.float())
        for name, fn in fns.items():
            try:
                out = fn(q, k, v)[:, :rows]
                res[f"{name}/{case}"] = dict(
                    rel_l2=A.rel_l2(out, ref), cosine=A.cosine(out, ref),
                    nan=bool(torch.isnan(out).any()),
                )  # fmt: skip
            except Exception as e:  # a peer that fails is reported, not fatal
                res[f"{name}/{case}"] = dict(error=f"{type(e).__name__}: {e}"[:200])
        del q, k, v, ref
    return res


def sweep(S=32760, H=40):
    q, k, v = make_qkv(1, S, H, seed=0)
    flops = 4 * S * S * 128 * H
    rows = []
    # run 1 (H200, 2026-11-27) also tried (128,128,8,2|3), (128,64,8,3|4), (64,64,4,4):
    # all slower; (128,128,4,2) spills registers
    cfgs = {False: [(128, 128, 8, 4), (64, 128, 4, 2), (128, 256, 8, 2)],
            True: [(64, 128, 4, 3), (64, 128, 4, 2), (64, 256, 4, 2), (128, 256, 8, 2),
                   (128, 128, 8, 4)]}  # fmt: skip
    for pv_fp8 in (False, True):
        for cfg in cfgs[pv_fp8]:
            for two_level in (True, False) if pv_fp8 else (True,):
                try:
                    ms = time_ms(
                        lambda q, k, v, p=pv_fp8, c=cfg, t=two_level: K.attention_int8(q, k, v, p, c, t),
                        (q, k, v), min_time_s=0.3,
                    )  # fmt: skip
                    rows.append(dict(pv_fp8=pv_fp8, cfg=cfg, two_level=two_level, ms=ms,
                                     tflops=flops / ms / 1e9))  # fmt: skip
                except Exception as e:
                    rows.append(dict(pv_fp8=pv_fp8, cfg=cfg, two_level=two_level,
                                     error=f"{type(e).__name__}: {e}"[:200]))  # fmt: skip
                print("sweep", rows[-1], flush=True)
    # the pre-pass alone
    for pv_fp8 in (False, True):
        ms = time_ms(lambda q, k, v, p=pv_fp8: K.quantize_qkv(q, k, v, 128, 128, p), (q, k, v))
        rows.append(dict(prepass_only=True, pv_fp8=pv_fp8, ms=ms))
        print("sweep", rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--quick", action="store_true", help="S = 32760, batch 1 only")
    ap.add_argument("--no-accuracy", action="store_true")
    args = ap.parse_args()

    props = torch.cuda.get_device_properties(0)
    meta = dict(
        card=props.name, date=datetime.date.today().isoformat(), torch=torch.__version__,
        cuda=torch.version.cuda, command=" ".join(sys.argv),
    )  # fmt: skip
    import triton

    meta["triton"] = triton.__version__
    print("#", meta, flush=True)
    result: dict[str, object] = dict(meta=meta)
    if args.sweep:
        result["sweep"] = rows = sweep()
        for pv_fp8 in (False, True):  # the rest of this run uses the fastest configuration
            ok = [r for r in rows if r.get("pv_fp8") == pv_fp8 and "tflops" in r]
            if ok:
                best = max(ok, key=lambda r: r["tflops"])
                if pv_fp8:
                    K.FP8_CONFIG = best["cfg"]
                else:
                    K.BF16_CONFIG = best["cfg"]
                print(f"# best pv_fp8={pv_fp8}: {best}", flush=True)
                result[f"best_{'fp8' if pv_fp8 else 'bf16'}"] = best

    fns = backends()
    speed = []
    shapes = [(32760, 1)] if args.quick else [(32760, 1), (32760, 2), (75600, 1), (75600, 2)]
    for S, B in shapes:
        q, k, v = make_qkv(B, S, 40, seed=1)
        flops = 4 * S * S * 128 * 40 * B
        for name, fn in fns.items():
            try:
                ms = time_ms(fn, (q, k, v))
                speed.append(dict(backend=name, S=S, B=B, ms=ms, tflops=flops / ms / 1e9))
            except Exception as e:
                speed.append(dict(backend=name, S=S, B=B, error=f"{type(e).__name__}: {e}"[:200]))
            print("speed", speed[-1], flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    result["speed"] = speed

    acc = {}
    if not args.no_accuracy:
        for S in (32760,) if args.quick else (32760, 75600):
            acc[str(S)] = accuracy(fns, S)
            print("accuracy", S, acc[str(S)], flush=True)
    result["accuracy"] = acc
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))

    # the short table, last
    print(f"\n{meta['card']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}")
    print("TFLOP/s (4·S²·D·H·B / time, quantisation included)")
    cols = [f"S={S} B={B}" for S, B in shapes]
    print(f"{'backend':<15}" + "".join(f"{c:>16}" for c in cols))
    for name in fns:
        cells = []
        for S, B in shapes:
            r = next(x for x in speed if x["backend"] == name and x["S"] == S and x["B"] == B)
            cells.append(f"{r['tflops']:16.0f}" if "tflops" in r else f"{'error':>16}")
        print(f"{name:<15}" + "".join(cells))
    if acc:
        print("\naccuracy vs fp32 exact (rel-L2 / cosine), first 2048 query rows, H=4")
        for S, rs in acc.items():
            for key, r in rs.items():
                if "error" in r:
                    print(f"S={S:<6} {key:<24} error {r['error'][:60]}")
                else:
                    ok = r["rel_l2"] <= A.GATE_REL_L2 and r["cosine"] >= A.GATE_COSINE
                    ok = ok and not r["nan"]
                    print(f"S={S:<6} {key:<24} {r['rel_l2']:.2e} / {r['cosine']:.6f}"
                          f"{'' if ok else '  FAILS GATE'}")  # fmt: skip


if __name__ == "__main__":
    main()
