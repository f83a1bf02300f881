"""FP8 vs bf16 GEMM at the Wan2.1-14B shapes (GPU), activation quantization included.

    python tools/bench_fp8_gemm.py [--m 32760] [--k 5120] [--n 5120 13824] [--iters 50]

Rows: bf16 F.linear; FP8Linear (per-token FP8 quantization of x + torch._scaled_mm with
rowwise scales, bias in the epilogue) with fast accumulation on and off; and the two parts
alone (quantization; GEMM on pre-quantized x). TFLOP/s counts 2·M·N·K for every row, so
the FP8Linear rows' figures include the quantization time. Also relative L2 of each
against an fp32 product of the same bf16 inputs.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightx2v.quant.linear import (  # noqa: E402
    FP8Linear,
    _per_token_fp8_compiled,
    per_token_quant_fp8,
)


def bench(fn, iters: int, warmup: int = 5) -> float:
    """Median seconds per call, CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_shape(x: torch.Tensor, n: int, iters: int) -> None:
    m, k = x.shape
    dev = x.device
    lin = torch.nn.Linear(k, n, device=dev, dtype=torch.bfloat16)
    flop = 2 * m * n * k
    ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
    rows = []
    t_bf16 = bench(lambda: F.linear(x, lin.weight, lin.bias), iters)
    out = F.linear(x, lin.weight, lin.bias)
    rows.append(("bf16 F.linear (cuBLAS)", t_bf16, rel_l2(out, ref)))
    q = FP8Linear.from_linears([lin], backend="scaled_mm")
    for fast in (True, False):
        q.use_fast_accum = fast
        t = bench(lambda: q(x), iters)
        rows.append((f"FP8Linear: quant + scaled_mm, fast_acc={fast}", t, rel_l2(q(x), ref)))
    q.use_fast_accum = True
    t_q = bench(lambda: per_token_quant_fp8(x), iters)
    rows.append(("  per-token FP8 quant alone (Triton)", t_q, float("nan")))
    t_c = bench(lambda: _per_token_fp8_compiled()(x), iters)
    rows.append(("  per-token FP8 quant, torch.compile", t_c, float("nan")))
    xq, xs = per_token_quant_fp8(x)
    bias = lin.bias.detach()
    t_mm = bench(lambda: torch._scaled_mm(xq, q.weight.t(), xs, q.weight_scale.view(1, -1),
                                          bias=bias, out_dtype=torch.bfloat16,
                                          use_fast_accum=True), iters)  # fmt: skip
    rows.append(("  scaled_mm alone, fast_acc=True", t_mm, float("nan")))
    for what, t, err in rows:
        print(f"{n:>6} | {what:<44} | {t * 1e3:7.3f} | {flop / t / 1e12:8.1f} | "
              f"{t_bf16 / t:6.2f} | {err:.3e}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=32760)
    ap.add_argument("--k", type=int, default=5120)
    ap.add_argument("--n", type=int, nargs="+", default=[5120, 13824])
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    print(f"# {name}, torch {torch.__version__}, {datetime.date.today()}, "
          f"M={args.m} K={args.k}")  # fmt: skip
    g = torch.Generator(device=dev).manual_seed(0)
    m, k = args.m, args.k
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
    header = (
        f"{'N':>6} | {'what':<44} | {'ms':>7} | {'TFLOP/s':>8} | {'x bf16':>6} | rel L2 vs fp32"
    )
    print(header)
    print("-" * len(header))
    for n in args.n:
        bench_shape(x, n, args.iters)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
