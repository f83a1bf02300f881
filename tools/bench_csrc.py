"""Benchmark the csrc CUDA ops (lightx2v._C) against the Triton kernels and the PyTorch references.

At one 14B block's shape (32760 tokens × 5120, 40 heads of 128): q/k activations in bf16,
the adaLN input in fp32 (the residual stream, as in the model). Achieved bandwidth counts
the bytes each op must move, every input read once and every output written once (the
weight, rope and modulation tables included, though they are < 2% of it), and is shown as
a share of a device-to-device copy measured in the same run; the acceptance bar is 80%.

    PYTHONPATH=. python tools/bench_csrc.py [--tokens 32760] [--dim 5120] [--heads 40] \\
        [--out csrc.json]

"csrc" and "triton" time the kernels alone into preallocated outputs; "torch" times the
op's PyTorch reference (`*_ref` in lightx2v/ops: the unfused eager code, allocating its
outputs). Times are medians of triton.testing.do_bench (CUDA events); tensors are ≥ 300 MB,
far beyond L2, so repeated calls do not measure the cache. "err" is the csrc output's
relative L2 distance from the reference (a check that the timed kernel computes the op).
"""

import argparse
import json

import torch
import triton
from bench_ops import copy_bandwidth, ms  # tools/: same timing and copy measurement

from lightx2v.errors import LX2VError
from lightx2v.ops import dispatch, norm, rope

EPS = 1e-6
IMPLS = ("csrc", "triton", "torch")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def cases(L: int, D: int, H: int):
    """(name, bytes moved, {impl: fn}, error of the csrc output vs the reference), B = 1."""
    C, dev = torch.ops.lx2v_C, "cuda"
    kn, kr = dispatch.kernel_module("norm"), dispatch.kernel_module("rope")
    n, dh = L * D, D // H
    x = torch.randn(1, L, D, device=dev) * 2 + 1  # fp32 residual stream
    e = torch.randn(1, 6, D, device=dev) * 0.5
    shift, scale = e[:, 0], e[:, 1]
    q = torch.randn(1, L, D, device=dev).bfloat16()
    k = torch.randn(1, L, D, device=dev).bfloat16()
    wq, wk = torch.randn(D, device=dev), torch.randn(D, device=dev)
    ang = torch.rand(L, dh // 2, device=dev) * 100
    cos, sin = ang.cos(), ang.sin()
    out, out_k = torch.empty_like(q), torch.empty_like(k)
    q8 = torch.empty(1, L, D, device=dev, dtype=torch.float8_e4m3fn)
    s8 = torch.empty(1, L, 1, device=dev)
    qo, ko = out.view(1, L, H, dh), out_k.view(1, L, H, dh)

    C.rms_norm(out, q, wq, EPS)
    err_rms = rel_l2(out, rope.rms_norm_ref(q, wq, EPS))
    C.qk_norm_rope(qo, ko, q, k, wq, wk, cos, sin, EPS)
    q_ref, k_ref = rope.qk_norm_rope_ref(q, k, wq, wk, cos, sin, H, EPS)
    err_qk = max(rel_l2(qo, q_ref), rel_l2(ko, k_ref))
    C.adaln_fp8(q8, s8, x, shift, scale, EPS)
    q8_ref, s8_ref = norm.adaln_fp8_ref(x, shift, scale, EPS)
    err_fp8 = rel_l2(q8.float() * s8, q8_ref.float() * s8_ref)
    w3, b3 = torch.randn(D, device=dev) * 0.5 + 1, torch.randn(D, device=dev) * 0.2  # norm3

    def affine_ref():
        h = torch.nn.functional.layer_norm(x, (D,), w3, b3, EPS)
        return norm.quantize_fp8_per_token(h)

    C.adaln_fp8(q8, s8, x, b3[None], w3[None], EPS, affine=True)
    q8_ref, s8_ref = affine_ref()
    err_affine = rel_l2(q8.float() * s8, q8_ref.float() * s8_ref)

    table = L * (dh // 2) * 4  # one fp32 rope table
    return [
        ("RMSNorm (cross-attn q)", n * (2 + 2) + D * 4, {
            "csrc": lambda: C.rms_norm(out, q, wq, EPS),
            "triton": lambda: kr.rms_norm_rope(q, out, wq, EPS),
            "torch": lambda: rope.rms_norm_ref(q, wq, EPS),
        }, err_rms),
        ("q,k RMSNorm + RoPE", 2 * n * (2 + 2) + 2 * D * 4 + 2 * table, {
            "csrc": lambda: C.qk_norm_rope(qo, ko, q, k, wq, wk, cos, sin, EPS),
            "triton": lambda: (kr.rms_norm_rope(q, out, wq, EPS, cos=cos, sin=sin),
                               kr.rms_norm_rope(k, out_k, wk, EPS, cos=cos, sin=sin)),
            "torch": lambda: rope.qk_norm_rope_ref(q, k, wq, wk, cos, sin, H, EPS),
        }, err_qk),
        ("adaLN → FP8 + scale", n * (4 + 1) + L * 4 + 2 * D * 4, {
            "csrc": lambda: C.adaln_fp8(q8, s8, x, shift, scale, EPS),
            "triton": lambda: kn.layer_norm(x, q8, EPS, shift=shift, scale=scale, out_scale=s8),
            "torch": lambda: norm.adaln_fp8_ref(x, shift, scale, EPS),
        }, err_fp8),
        ("affine LN → FP8 + scale", n * (4 + 1) + L * 4 + 2 * D * 4, {
            "csrc": lambda: C.adaln_fp8(q8, s8, x, b3[None], w3[None], EPS, affine=True),
            "triton": lambda: kn.layer_norm(x, q8, EPS, weight=w3, bias=b3, out_scale=s8),
            "torch": affine_ref,
        }, err_affine),
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32760)
    ap.add_argument("--dim", type=int, default=5120)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--out", help="write the numbers here as JSON")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_csrc: needs a CUDA device")
    try:
        dispatch.set_kernel_backend("cuda")  # checks that lightx2v._C loads and runs here
    except LX2VError as e:
        raise SystemExit(f"bench_csrc: {e}") from e
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    copy = copy_bandwidth()
    rows = []
    for name, nbytes, fns, err in cases(args.tokens, args.dim, args.heads):
        row = {"op": name, "bytes": nbytes, "err_vs_ref": err}
        for impl in IMPLS:
            t = ms(fns[impl])
            row[f"{impl}_ms"] = t
            row[f"{impl}_GBps"] = nbytes / t / 1e6
            row[f"{impl}_pct_copy"] = 100 * nbytes / t / 1e6 / copy
        rows.append(row)
    meta = {"device": dev, "copy_GBps": copy, "torch": torch.__version__,
            "triton": triton.__version__, "csrc": dispatch.kernel_report()["csrc"],
            "shape": [args.tokens, args.dim], "heads": args.heads}  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)

    print(f"\n{dev}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{args.tokens}×{args.dim}; device copy {copy:.0f} GB/s (read+write)\n")  # fmt: skip
    cols = [f"{impl} ms | {impl} GB/s | {impl} %copy" for impl in IMPLS]
    print(f"| op | MB | {' | '.join(cols)} | csrc vs triton | err vs ref |")
    print("|---" * (4 + 3 * len(IMPLS)) + "|")
    for r in rows:
        cells = [f"{r[f'{i}_ms']:.3f} | {r[f'{i}_GBps']:.0f} | {r[f'{i}_pct_copy']:.0f}%" for i in IMPLS]  # fmt: skip
        speedup = r["triton_ms"] / r["csrc_ms"]
        print(f"| {r['op']} | {r['bytes'] / 1e6:.0f} | {' | '.join(cells)} | "
              f"{speedup:.2f}× | {r['err_vs_ref']:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
