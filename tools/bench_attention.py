"""Attention backends side by side on one GPU: speed and accuracy.

    PYTHONPATH=. python3 tools/bench_attention.py [--json out.json] [--sweep] [--quick]

Speed: TFLOP/s = 4·S²·D·H·B / time (non-causal), quantisation pre-passes included, at
S = 32760 and 75600 (Wan2.1 480P / 720P), H = 40, D = 128, batch 1 and 2; bf16 inputs in the
model's [B, L, H, D] layout; median of CUDA-event timings after a warm-up.
Accuracy: against fp32 exact attention on the first 2048 query rows (rows are independent)
of a 4-head problem at full sequence length: (a) random normal q, k, v; (b) k with a
large per-channel offset (N(0,1) + 10·N(0,1) per channel); with --captured, (c) q, k, v
captured from the self-attention of blocks 0, 20 and 39 of the 14B I2V DiT (random weights,
`lightx2v.bench.random_dit`) during one forward at 480P and 720P (81 frames), first 8 heads.
Gate: rel-L2 ≤ 3%, cosine ≥ 0.999.
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
    names = ["sdpa", "lx2v-int8", "lx2v-int8-fp8", "lx2v-int8-int8", "lx2v-int8-int8-ws"]
    names += ["sage", "flash", "fa4", "flashinfer-fp8"]
    found = {}
    for n in names:
        if A._try_load(n):
            found[n] = A._BACKENDS[n]
            if n == "lx2v-int8-fp8":  # the variant with one-level (tensor-core) accumulation
                found["lx2v-fp8-1lvl"] = lambda q, k, v: K.attention_int8(
                    q, k, v, "fp8", None, False
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


CAPTURE_BLOCKS = (0, 20, 39)


@torch.no_grad()
def capture_qkv(sizes=("480p", "720p"), heads=8) -> dict[str, tuple]:
    """q, k, v of the self-attention of CAPTURE_BLOCKS in one forward of the 14B I2V DiT with
    random weights at each size (81 frames), first `heads` heads; keyed "480p/b0"... ."""
    from lightx2v.bench import SIZES, dit_inputs, random_dit
    from lightx2v.config import ARCH_PRESETS

    arch = ARCH_PRESETS["i2v-14b"]
    model = random_dit(arch, DEV)
    got: dict[str, tuple] = {}
    calls = [0]
    size = [""]

    def spy(q, k, v):
        if q.shape[1] == k.shape[1]:  # self-attention (cross-attention keys are 512/257)
            blk = calls[0]
            calls[0] += 1
            if blk in CAPTURE_BLOCKS:
                got[f"{size[0]}/b{blk}"] = tuple(x[:, :, :heads].clone() for x in (q, k, v))
        return A.attention_sdpa(q, k, v)

    A.register_attention_backend("capture", spy)
    for sz in sizes:
        w, h = SIZES[sz]
        size[0], calls[0] = sz, 0
        x, t, ctx, clip, y = dit_inputs(arch, 81, h, w, DEV)
        with A.attention_backend_override("capture"):
            model(x, t, ctx, clip, y)
        print(f"# captured {sz}: {calls[0]} self-attention calls", flush=True)
    del model
    torch.cuda.empty_cache()
    return got


def accuracy_captured(fns, captured, rows=2048):
    res = {}
    for key, (q, k, v) in captured.items():
        ref = A.attention_ref(q[:, :rows].float(), k.float(), v.float())
        stats = dict(q_std=q.float().std().item(), k_chan_mean_abs=k.float().mean(1).abs().mean()
                     .item())  # fmt: skip
        for name, fn in fns.items():
            try:
                out = fn(q, k, v)[:, :rows]
                res[f"{name}/{key}"] = dict(
                    rel_l2=A.rel_l2(out, ref), cosine=A.cosine(out, ref),
                    nan=bool(torch.isnan(out).any()), **stats,
                )  # fmt: skip
            except Exception as e:
                res[f"{name}/{key}"] = dict(error=f"{type(e).__name__}: {e}"[:200])
    return res


def sweep(S=32760, H=40):
    q, k, v = make_qkv(1, S, H, seed=0)
    flops = 4 * S * S * 128 * H
    rows = []
    # run 1 (H200, 2026-11-27) also tried (128,128,8,2|3), (128,64,8,3|4), (64,64,4,4):
    # all slower; (128,128,4,2) spills registers. 2026-11-28: INT8 (128,128,8,2) 527,
    # (64,64,4,3) 486 against 596 for (64,128,4,3) (before the FMA and PTX changes)
    cfgs = {"bf16": [(128, 128, 8, 4), (64, 128, 4, 2), (128, 256, 8, 2)],
            "fp8": [(64, 128, 4, 3), (64, 128, 4, 2), (64, 256, 4, 2), (128, 256, 8, 2),
                    (128, 128, 8, 4), (64, 128, 4, 2, 168)],
            "int8": [(64, 128, 4, 2), (64, 128, 4, 3), (64, 128, 4, 4), (128, 128, 8, 3),
                     (64, 64, 4, 3), (64, 128, 4, 2, 168)]}  # fmt: skip
    # A 5th entry caps registers per thread. (64, 128, 4, 2, 168): 168 registers × 128
    # threads and 74 KB of shared memory let three programs share a multiprocessor instead
    # of two (INT8 otherwise uses 186 registers, FP8 175; 168 does not spill, 160 does:
    # ptxas -v on the Triton 3.6 PTX for sm_90a). H200, 2026-11-28: INT8 745, FP8 776
    # against 715 and 755 at (64, 128, 4, 3): now the default of both.
    # run 2 (same day) also tried a hand-pipelined key loop and Triton's warp_specialize:
    # no gain (see kernels/attention.py)
    for pv in K.PV_MODES:
        for cfg in cfgs[pv]:
            for two_level in (True, False) if pv == "fp8" else (True,):
                row = dict(pv=pv, cfg=cfg, two_level=two_level)
                try:
                    ms = time_ms(
                        lambda q, k, v, p=pv, c=cfg, t=two_level: K.attention_int8(
                            q, k, v, p, c, t),
                        (q, k, v), min_time_s=0.3,
                    )  # fmt: skip
                    row.update(ms=ms, tflops=flops / ms / 1e9)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:200]
                rows.append(row)
                print("sweep", rows[-1], flush=True)
    # the pre-pass alone
    for pv in K.PV_MODES:
        ms = time_ms(lambda q, k, v, p=pv: K.quantize_qkv(q, k, v, 128, 128, p), (q, k, v))
        rows.append(dict(prepass_only=True, pv=pv, ms=ms))
        print("sweep", rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--quick", action="store_true", help="S = 32760, batch 1 only")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument(
        "--captured", action="store_true",
        help="also case (c): q, k, v captured from a 14B DiT forward (needs ~35 GB of GPU memory)",
    )  # fmt: skip
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
        for pv in K.PV_MODES:  # the rest of this run uses the fastest config
            ok = [r for r in rows if r.get("pv") == pv and "tflops" in r]
            if ok:
                best = max(ok, key=lambda r: r["tflops"])
                K.CONFIGS[pv] = best["cfg"]
                print(f"# best pv={pv}: {best}", flush=True)
                result[f"best_{pv}"] = best

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
    if args.captured and not args.no_accuracy:
        captured = capture_qkv(("480p",) if args.quick else ("480p", "720p"))
        for key, r in accuracy_captured(fns, captured).items():
            S = str(captured[key.split("/", 1)[1]][0].shape[1])
            acc.setdefault(S, {})[key] = r
            print("accuracy", S, key, r, flush=True)
        del captured
    result["accuracy"] = acc
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))

    # the short table, last
    print(f"\n{meta['card']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}")
    print("TFLOP/s (4·S²·D·H·B / time, quantisation included)")
    cols = [f"S={S} B={B}" for S, B in shapes]
    print(f"{'backend':<18}" + "".join(f"{c:>16}" for c in cols))
    for name in fns:
        cells = []
        for S, B in shapes:
            r = next(x for x in speed if x["backend"] == name and x["S"] == S and x["B"] == B)
            cells.append(f"{r['tflops']:16.0f}" if "tflops" in r else f"{'error':>16}")
        print(f"{name:<18}" + "".join(cells))
    if acc:
        print("\naccuracy vs fp32 exact (rel-L2 / cosine), first 2048 query rows, H=4")
        for S, rs in acc.items():
            for key, r in rs.items():
                if "error" in r:
                    print(f"S={S:<6} {key:<27} error {r['error'][:60]}")
                else:
                    ok = r["rel_l2"] <= A.GATE_REL_L2 and r["cosine"] >= A.GATE_COSINE
                    ok = ok and not r["nan"]
                    print(f"S={S:<6} {key:<27} {r['rel_l2']:.2e} / {r['cosine']:.6f}"
                          f"{'' if ok else '  FAILS GATE'}")  # fmt: skip


if __name__ == "__main__":
    main()
