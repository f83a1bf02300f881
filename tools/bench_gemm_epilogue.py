"""FP8 GEMM with fused epilogues vs torch._scaled_mm + separate ops, at Wan2.1-14B shapes (GPU).

    python tools/bench_gemm_epilogue.py [--m 32760] [--batch 1] [--shapes out up down]
        [--rep 200] [--no-compile] [--json bench.json] [--tune]

Shapes (M tokens, K in → N out) and what follows each GEMM in a Wan block:
    out   5120 → 5120    attention output projection, then x += gate · y (fp32 residual)
    up    5120 → 13824   FFN up, then GELU(tanh), then per-token FP8 for the down projection
    down  13824 → 5120   FFN down, then x += gate · y

Rows per shape:
- baselines: torch._scaled_mm (rowwise scales, bf16 bias, bf16 out, fast accumulation: what
  FP8Linear runs) followed by the separate ops, (1) in PyTorch eager: the issue's baseline,
  "_scaled_mm + separate ops"; (2) with our Triton kernels for the separate ops (per-token
  FP8 quantization, gated residual); (3) the whole chain under torch.compile. The table
  gives our time against (1) and against the fastest of the three.
- `_scaled_mm` alone and our GEMM alone (bias epilogue): the plain GEMM, to show how much of
  a result is the GEMM and how much the fusion.
- ours fused: the CUTLASS kernel of lightx2v._C_sm90 with the epilogue (for "up", followed by
  the one-pass per-token FP8 quantization, so both sides end at the same FP8 tensor).
TFLOP/s counts 2·M·N·K for every row. Errors are relative L2 against the float64 product
(for "up", of the dequantized FP8 output against GELU of it; for out/down, of the residual
increment). Times are medians of triton.testing.do_bench (L2 flushed between calls).

--tune first times every kernel configuration × tile swizzle × raster order
(LX2V_FP8_GEMM_TUNE, csrc/fp8_gemm_sm90_ops.cpp) for the plain and the fused GEMM of each
shape and prints the best, to choose the defaults of `choose_config`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightx2v.ops import dispatch, gemm  # noqa: E402
from lightx2v.quant.fp8 import quantize_rows_fp8, quantize_weight  # noqa: E402
from lightx2v.quant.linear import per_token_quant_fp8  # noqa: E402

SHAPES = {"out": (5120, 5120, "residual"), "up": (5120, 13824, "gelu"),
          "down": (13824, 5120, "residual")}  # fmt: skip
TARGET = 1.15


def ms(fn, rep: int) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


scaled_mm = gemm.scaled_mm  # what FP8Linear runs


def up_eager(a, sa, w, sw, bias):
    q, s = quantize_rows_fp8(F.gelu(scaled_mm(a, sa, w, sw, bias), approximate="tanh"))
    return q, s[:, None]


def up_triton(a, sa, w, sw, bias):
    return per_token_quant_fp8(F.gelu(scaled_mm(a, sa, w, sw, bias), approximate="tanh"))


def up_fused(a, sa, w, sw, bias):
    return per_token_quant_fp8(gemm.fp8_linear_gelu(a, sa, w, sw, bias))


def res_eager(res, a, sa, w, sw, bias, gate):
    y = scaled_mm(a, sa, w, sw, bias)
    res.add_(y.view(res.shape).float() * gate[:, None])


def res_triton(res, a, sa, w, sw, bias, gate):
    y = scaled_mm(a, sa, w, sw, bias)
    dispatch.kernel_module("residual").gated_residual_(res, y.view(res.shape), gate)


def res_fused(res, a, sa, w, sw, bias, gate):
    gemm.fp8_linear_residual_(res, a, sa, w, sw, bias, gate)


def make_inputs(m: int, k: int, n: int, batch: int, seed: int = 0):
    g = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    a, sa = per_token_quant_fp8(x)
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    wq, sw = quantize_weight(w, "fp8")
    bias = (torch.randn(n, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    res = torch.randn(batch, m // batch, n, device="cuda", generator=g)
    gate = torch.randn(batch, n, device="cuda", generator=g) * 0.3
    return a, sa, wq, sw.contiguous(), bias, res, gate


def gemm64(a, sa, w, sw, bias) -> torch.Tensor:
    """The exact product (FP8 values and fp32 scales are exact in float64)."""
    y = (a.double() * sa.double().reshape(-1, 1)) @ (w.double() * sw.double()[:, None]).t()
    return y + bias.double()


def bench_shape(name: str, m: int, batch: int, rep: int, compile_baseline: bool) -> list[dict]:
    k, n, epi = SHAPES[name]
    a, sa, w, sw, bias, res, gate = make_inputs(m, k, n, batch)
    flop = 2 * m * n * k
    rows: list[dict] = []

    def row(group, what, t, err=float("nan")):
        rows.append({"shape": name, "M": m, "K": k, "N": n, "group": group, "what": what,
                     "ms": t, "tflops": flop / (t * 1e-3) / 1e12, "rel_l2_fp64": err})  # fmt: skip

    truth = gemm64(a, sa, w, sw, bias)
    y = scaled_mm(a, sa, w, sw, bias)
    row("gemm", "torch._scaled_mm alone", ms(lambda: scaled_mm(a, sa, w, sw, bias), rep),
        rel_l2(y, truth))  # fmt: skip
    y = gemm.fp8_linear(a, sa, w, sw, bias)
    row("gemm", "ours: CUTLASS GEMM alone (bias epilogue)",
        ms(lambda: gemm.fp8_linear(a, sa, w, sw, bias), rep), rel_l2(y, truth))  # fmt: skip
    del y

    if epi == "gelu":
        truth = F.gelu(truth, approximate="tanh")
        fns = [("baseline-eager", "scaled_mm + F.gelu + quantize_rows_fp8 (eager)", up_eager),
               ("baseline", "scaled_mm + F.gelu + Triton per-token quant", up_triton)]  # fmt: skip
        if compile_baseline:
            fns.append(("baseline", "the same chain under torch.compile",
                        torch.compile(up_eager, fullgraph=True, dynamic=False)))  # fmt: skip
        fns.append(("fused", "ours: GEMM+GELU epilogue, then one-pass quant", up_fused))
        for group, what, fn in fns:
            q, s = fn(a, sa, w, sw, bias)
            err = rel_l2(q.float() * s, truth)
            del q, s
            row(group, what, ms(lambda fn=fn: fn(a, sa, w, sw, bias), rep), err)
    else:
        truth = truth.view(res.shape) * gate.double()[:, None]  # the exact increment
        fns = [("baseline-eager", "scaled_mm + res += gate·y (eager)", res_eager),
               ("baseline", "scaled_mm + Triton gated residual", res_triton)]  # fmt: skip
        if compile_baseline:
            fns.append(("baseline", "the same chain under torch.compile",
                        torch.compile(res_eager, fullgraph=True, dynamic=False)))  # fmt: skip
        fns.append(("fused", "ours: GEMM + gated residual epilogue, in place", res_fused))
        res0 = res.clone()
        for group, what, fn in fns:
            r = res0.clone()
            fn(r, a, sa, w, sw, bias, gate)
            err = rel_l2(r - res0, truth)
            del r
            row(group, what, ms(lambda fn=fn: fn(res, a, sa, w, sw, bias, gate), rep), err)
    eager = next(r["ms"] for r in rows if r["group"] == "baseline-eager")
    best = min(r["ms"] for r in rows if r["group"].startswith("baseline"))
    for r in rows:
        r["x_eager_chain"] = eager / r["ms"]
        r["x_best_chain"] = best / r["ms"]
    return rows


SETTINGS = [(c, s, r) for c in range(2) for s in (1, 2, 4, 8) for r in (0, 1, 2)]


def tune_shape(name: str, m: int, batch: int, rep: int) -> list[dict]:
    import os

    k, n, epi = SHAPES[name]
    a, sa, w, sw, bias, res, gate = make_inputs(m, k, n, batch)
    ops = {"plain": lambda: gemm.fp8_linear(a, sa, w, sw, bias)}
    if epi == "gelu":
        ops[epi] = lambda: gemm.fp8_linear_gelu(a, sa, w, sw, bias)
    else:
        ops[epi] = lambda: gemm.fp8_linear_residual_(res, a, sa, w, sw, bias, gate)
    rows = []
    for op, fn in ops.items():
        for c, sz, r in SETTINGS:
            os.environ["LX2V_FP8_GEMM_TUNE"] = f"{c},{sz},{r}"
            t = ms(fn, rep)
            rows.append({"shape": name, "op": op, "config": c, "swizzle": sz, "raster": r,
                         "ms": t, "tflops": 2 * m * n * k / (t * 1e-3) / 1e12})  # fmt: skip
        os.environ.pop("LX2V_FP8_GEMM_TUNE")
        mine = [r for r in rows if r["op"] == op]
        best = min(mine, key=lambda r: r["ms"])
        worst = max(mine, key=lambda r: r["ms"])
        print(f"tune {name} {op}: best config {best['config']} swizzle {best['swizzle']} "
              f"raster {best['raster']} {best['ms']:.3f} ms ({best['tflops']:.0f} TFLOP/s); "
              f"slowest setting {worst['ms']:.3f} ms", flush=True)  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=32760, help="tokens (rows), B·L")
    ap.add_argument("--batch", type=int, default=1, help="B: rows of the gate")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rep", type=int, default=200, help="do_bench time budget per row, ms")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--tune", action="store_true", help="first sweep the kernel configurations")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gemm_epilogue: needs a CUDA GPU")
    backend, why = gemm.epilogue_backend()
    if backend != "cuda":
        sys.exit(f"bench_gemm_epilogue: the fused kernels are not available here: {why}")
    if args.m % args.batch:
        sys.exit(f"bench_gemm_epilogue: --m {args.m} is not a multiple of --batch {args.batch}")
    dev = torch.cuda.get_device_name()
    print(f"# {dev}, torch {torch.__version__}, {datetime.date.today()}, M={args.m}, "
          f"B={args.batch}; {why}")  # fmt: skip
    tuned = []
    for name in args.shapes if args.tune else []:
        tuned += tune_shape(name, args.m, args.batch, max(args.rep // 4, 20))
        torch.cuda.empty_cache()
    rows = []
    for name in args.shapes:
        rows += bench_shape(name, args.m, args.batch, args.rep, not args.no_compile)
        torch.cuda.empty_cache()
    print()
    print("| shape | what | ms | TFLOP/s | × eager chain | × best chain | rel L2 vs fp64 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} {r['K']}→{r['N']} | {r['what']} | {r['ms']:.3f} | "
              f"{r['tflops']:.0f} | {r['x_eager_chain']:.2f} | {r['x_best_chain']:.2f} | "
              f"{r['rel_l2_fp64']:.2e} |")  # fmt: skip
    print()
    for name in args.shapes:
        f = next(r for r in rows if r["shape"] == name and r["group"] == "fused")
        print(f"{name}: fused {f['ms']:.3f} ms = {f['x_eager_chain']:.2f}x the eager chain, "
              f"{f['x_best_chain']:.2f}x the best chain (target {TARGET}x)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": dev, "torch": torch.__version__,
                       "date": str(datetime.date.today()), "m": args.m, "batch": args.batch,
                       "rows": rows, "tune": tuned}, fh, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
