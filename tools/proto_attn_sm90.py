"""Prototype check of csrc/attn_int8_sm90.cu against the Triton INT8 P·V kernel (GPU only).

    python3 tools/proto_attn_sm90.py [--variants 10031,410031] [--seconds 4] [--trace 10932|410932]

Builds the .cu alone with torch.utils.cpp_extension.load, runs the Triton pre-pass in the
kernel's layout (checked against the torch relayout), checks outputs against the Triton
kernel and fp32, then times the main kernels at the benchmark shapes (the "+ pre-pass"
column adds the sm90-layout pre-pass's own time).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import attention as ka  # noqa: E402
from lightx2v.ops.attention import attention_ref, cosine, rel_l2  # noqa: E402


def build():
    from torch.utils.cpp_extension import load

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return load(
        name="lx2v_attn_sm90_proto",
        sources=[
            os.path.join(root, "csrc", "attn_int8_sm90.cu"),
            os.path.join(root, "tools", "proto_attn_sm90_binding.cpp"),
        ],
        extra_include_paths=[os.path.join(root, "csrc")],
        extra_cuda_cflags=[
            "-O3",
            "-DLX2V_ATTN_STANDALONE",
            "-gencode=arch=compute_90a,code=sm_90a",
        ],
        build_directory=os.environ.get("PROTO_BUILD", None),
        verbose=False,
    )


def operands(q, k, v):
    """(the plain pre-pass for the Triton kernel, then q8, k8, vt8 of the "sm90" pre-pass),
    the latter checked once against the torch relayout of the former."""
    qz = ka.quantize_qkv(q, k, v, 64, 128, "int8")
    z = ka.quantize_qkv(q, k, v, 64, 128, "int8", layout="sm90")
    want = ka.sm90_relayout(qz)
    assert all(torch.equal(z[n], want[n]) for n in ("q8", "k8", "vt8")), "sm90 pre-pass layout"
    return qz, z["q8"], z["k8"], z["vt8"]


def run_sm90(ext, q, k, v, ops, stages):
    qz, q8, k8, vt = ops
    B, Lq, H, D = q.shape
    out = torch.empty(B, Lq, H, D, device=q.device, dtype=q.dtype)
    ext.run(
        out, q8, qz["qs"], k8, qz["ks"], vt, qz["v_mean"], qz["v_scale"], Lq, k.shape[1], H, stages
    )
    return out


def triton_main(q, k, v, qz):
    """The Triton main kernel alone on precomputed operands (as attention_int8 calls it)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    block_m, block_n, warps, stages, maxnreg = ka.CONFIGS["int8"]
    out = torch.empty(B, Lq, H, D, device=q.device, dtype=q.dtype)
    dq = ka._desc(qz["q8"].view(-1, D), [block_m, D])
    dk = ka._desc(qz["k8"].view(-1, D), [block_n, D])
    dv = ka._desc(qz["vt8"].view(-1, qz["Lk_pad"]), [D, block_n])
    do = ka._desc(out, [1, block_m, 1, D])
    grid = (ka.triton.cdiv(Lq, block_m), B * H)
    ka._attn_fwd_kernel[grid](
        dq, qz["qs"], dk, qz["ks"], dv, qz["v_mean"], qz["v_scale"], do,
        Lk, qz["Lq_pad"], qz["Lk_pad"], H,
        D=D, BLOCK_M=block_m, BLOCK_N=block_n, PV=2, TWO_LEVEL=True,
        num_warps=warps, num_stages=stages, maxnreg=maxnreg,
    )  # fmt: skip
    return out


CLOCKS: list[str] = []


def timed(fn, seconds):
    import subprocess

    smi = None
    if os.environ.get("PROTO_CLOCKS"):
        logf = open("/tmp/proto_clk.csv", "w")  # noqa: SIM115
        smi = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
             "-lms", "100"],
            stdout=logf, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    fn()
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    e0 = torch.cuda.Event(enable_timing=True)
    e1 = torch.cuda.Event(enable_timing=True)
    e0.record()
    while True:
        fn()
        n += 1
        if n % 4 == 0:
            torch.cuda.synchronize()
            if time.perf_counter() - t0 > seconds:
                break
    e1.record()
    torch.cuda.synchronize()
    if smi is not None:
        smi.terminate()
        smi.wait()
        logf.close()
        lines = open("/tmp/proto_clk.csv").read().splitlines()[5:]  # noqa: SIM115
        vals = [[float(x) for x in ln.split(",")] for ln in lines if ln.count(",") == 1]
        if vals:
            mhz = sum(v[0] for v in vals) / len(vals)
            w = sum(v[1] for v in vals) / len(vals)
            CLOCKS.append(f"{mhz:.0f} MHz {w:.0f} W")
    return e0.elapsed_time(e1) / n


def speed_row(ext, S, B, stages, seconds, g):
    H, dev = 40, "cuda"
    q, k, v = (
        torch.randn(B, S, H, 128, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(3)
    )
    flop = 4 * S * S * 128 * H * B
    ops = operands(q, k, v)
    pre = timed(lambda: ka.quantize_qkv(q, k, v, 64, 128, "int8", layout="sm90"), 1.0)
    pre0 = timed(lambda: ka.quantize_qkv(q, k, v, 64, 128, "int8"), 1.0)
    full = timed(lambda: ka.attention_int8(q, k, v, pv="int8"), seconds)
    tri = timed(lambda: triton_main(q, k, v, ops[0]), seconds)
    res = {st: timed(lambda st=st: run_sm90(ext, q, k, v, ops, st), seconds) for st in stages}
    full2 = timed(lambda: ka.attention_int8(q, k, v, pv="int8"), seconds)
    best = min(res.values())
    print(
        f"S={S} B={B}: prepass {pre:.3f} ms (plain layout {pre0:.3f}); triton full {full:.3f}/{full2:.3f} ms "
        f"({flop / full / 1e9:.0f}/{flop / full2 / 1e9:.0f} TFLOP/s), triton main {tri:.3f} "
        f"({flop / tri / 1e9:.0f}); sm90 main "
        + ", ".join(f"st{st} {t:.3f} ({flop / t / 1e9:.0f})" for st, t in res.items())
        + f"; sm90 + prepass {flop / (best + pre) / 1e9:.0f} TFLOP/s",
        flush=True,
    )
    return S, B, pre, full, full2, tri, res, flop / (best + pre) / 1e9


def trace_run(ext, variant, g):
    """Mean cycles of each phase of the consumer loop, per warpgroup, for one CTA."""
    q, k, v = (
        torch.randn(1, 32760, 40, 128, device="cuda", generator=g, dtype=torch.bfloat16)
        for _ in range(3)
    )
    qz, q8, k8, vt = ops = operands(q, k, v)
    nblk = (32760 + 127) // 128
    trace = torch.zeros(2, nblk, 8, dtype=torch.int64, device="cuda")
    out = torch.empty_like(q)
    for _ in range(3):
        ext.run(
            out,
            q8,
            qz["qs"],
            k8,
            qz["ks"],
            vt,
            qz["v_mean"],
            qz["v_scale"],
            32760,
            32760,
            40,
            variant,
            trace,
        )
    torch.cuda.synchronize()
    t = trace[:, 20 : nblk - 20].double().cpu()  # steady state
    names = ["softmax", "data wait", "turn wait", "issue", "PV wait", "convert", "QK wait"]
    for cw in range(2):
        d = (t[cw, :, 1:] - t[cw, :, :-1]).mean(0)
        it = (t[cw, 1:, 0] - t[cw, :-1, 0]).mean()
        print(
            f"WG{cw}: iteration {it:.0f} cycles; "
            + ", ".join(f"{n} {x:.0f}" for n, x in zip(names, d.tolist(), strict=True))
        )
    off = (t[1, :, 0] - t[0, :, 0]).mean()
    print(f"WG1 softmax starts {off:.0f} cycles after WG0's")
    del ops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--variants",
        default="10031,210031,410031,810031,10032",
        help="see attn_int8_sm90 in csrc/attn_int8_sm90.cu",
    )
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--profile", type=int, default=0, help="one launch of this variant (ncu)")
    ap.add_argument("--trace", type=int, default=0, help="phase timeline of a 9xx variant")
    args = ap.parse_args()
    stages = [int(s) for s in args.variants.split(",")]
    t0 = time.time()
    ext = build()
    print(f"build {time.time() - t0:.1f} s", flush=True)
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    if args.trace:
        trace_run(ext, args.trace, g)
        return
    if args.profile:
        q, k, v = (
            torch.randn(1, 32760, 40, 128, device=dev, generator=g, dtype=torch.bfloat16)
            for _ in range(3)
        )
        ops = operands(q, k, v)
        for _ in range(2):
            run_sm90(ext, q, k, v, ops, args.profile)
        torch.cuda.synchronize()
        return
    ok = True
    for B, Lq, Lk, H in [
        (1, 77, 77, 2),
        (1, 1, 64, 1),
        (1, 4097, 4097, 3),
        (2, 300, 769, 3),
        (1, 256, 300, 2),
        (2, 32760, 32760, 2),
    ]:
        q, k, v = (
            torch.randn(B, L, H, 128, device=dev, generator=g, dtype=torch.bfloat16)
            for L in (Lq, Lk, Lk)
        )
        k = k + 3.0 * torch.randn(1, 1, H, 128, device=dev, generator=g, dtype=torch.bfloat16)
        ops = operands(q, k, v)
        ref_t = ka.attention_int8(q, k, v, pv="int8")
        rows = min(Lq, 1024)
        ref = attention_ref(q[:, :rows], k, v).float()
        for st in [x for x in stages if (x // 100) % 10 == 0]:  # not the ablations
            o = run_sm90(ext, q, k, v, ops, st)
            torch.cuda.synchronize()
            d_t = rel_l2(o.float(), ref_t.float())
            d_r = rel_l2(o[:, :rows].float(), ref)
            d_tr = rel_l2(ref_t[:, :rows].float(), ref)
            good = bool(torch.isfinite(o).all()) and d_t < 5e-3 and d_r < 1.2 * d_tr + 1e-3
            ok &= good
            print(
                f"B={B} Lq={Lq} Lk={Lk} H={H} stages={st}: vs triton {d_t:.2e}, vs fp32 "
                f"{d_r:.3e} (triton {d_tr:.3e}), cos {cosine(o[:, :rows].float(), ref):.6f} "
                f"{'ok' if good else 'FAIL'}",
                flush=True,
            )
    print("correct" if ok else "MISMATCH", flush=True)
    if args.skip_speed or not ok:
        return
    shapes = [(32760, 1), (32760, 2), (75600, 1), (75600, 2)]
    if os.environ.get("PROTO_SHAPES"):
        shapes = [
            tuple(int(x) for x in sb.split("x")) for sb in os.environ["PROTO_SHAPES"].split(",")
        ]
    rows = [speed_row(ext, S, B, stages, args.seconds, g) for S, B in shapes]
    print("\n| S | B | Triton full | Triton main | sm90 main (best) | sm90 + pre-pass |")
    print("|---|---|---|---|---|---|")
    for S, B, _pre, full, full2, tri, res, tf in rows:
        flop = 4 * S * S * 128 * 40 * B
        best = min(res.values())
        print(
            f"| {S} | {B} | {flop / min(full, full2) / 1e9:.0f} | {flop / tri / 1e9:.0f} | "
            f"{flop / best / 1e9:.0f} | {tf:.0f} |"
        )


if __name__ == "__main__":
    main()
