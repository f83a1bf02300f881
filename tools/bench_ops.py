"""Benchmark the fused memory-bound ops at one 14B block's shape (32760 tokens × 5120).

For each op: the fused kernel, the unfused PyTorch eager code it replaces (as dit.py
writes it), and that same code under torch.compile (inductor's own fusion: the honest
competitor). Achieved bandwidth counts the fewest bytes the op must move (each input read
once, each output written once) and is shown beside the device copy bandwidth measured in
the same run; the acceptance bar is 80% of copy.

    PYTHONPATH=. python tools/bench_ops.py [--tokens 32760] [--dim 5120] [--sweep]

Times are medians of triton.testing.do_bench (CUDA events). Tensors are ≥ 335 MB, far
beyond L2, so repeated calls do not measure the cache.
"""

import argparse
import json
from functools import partial

import torch
import triton
from triton.testing import do_bench

from lightx2v.models.wan.dit import RMSNorm, layer_norm
from lightx2v.ops import dispatch, norm, residual, rope  # noqa: F401 (registers the lx2v ops)

EPS = 1e-6


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    src = torch.empty(nbytes // 4, device="cuda").normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / ms(lambda: dst.copy_(src)) / 1e6  # GB/s: read + write


def cases(L: int, D: int, H: int):
    """(name, bytes moved, fused fn, unfused fn) at B=1."""
    dev = "cuda"
    x = torch.randn(1, L, D, device=dev) * 2 + 1
    e = torch.randn(1, 6, D, device=dev) * 0.5
    shift, scale, gate = e[:, 0], e[:, 1], e[:, 2]
    w, b = torch.randn(D, device=dev), torch.randn(D, device=dev)
    q = torch.randn(1, L, D, device=dev).bfloat16()
    k = torch.randn(1, L, D, device=dev).bfloat16()
    y = torch.randn(1, L, D, device=dev).bfloat16()
    ang = torch.rand(L, 1, D // H // 2, device=dev) * 100
    cos, sin = ang.cos(), ang.sin()
    nq, nk = RMSNorm(D, EPS).to(dev), RMSNorm(D, EPS).to(dev)
    ln3 = torch.nn.LayerNorm(D, eps=EPS).to(dev)
    n = L * D

    def adaln_unfused():
        h = layer_norm(x, EPS) * (1 + scale[:, None]) + shift[:, None]
        return h.to(torch.bfloat16)

    def adaln_fp8_unfused():
        return norm.quantize_fp8_per_token(
            layer_norm(x, EPS) * (1 + scale[:, None]) + shift[:, None]
        )

    def qk_unfused():  # RMSNorm module (bf16 out), then the rotation in fp32, bf16 out
        return (rope.rope_fp32(nq(q).float(), cos, sin).to(q.dtype),
                rope.rope_fp32(nk(k).float(), cos, sin).to(k.dtype))  # fmt: skip

    def residual_unfused():
        return x + y.float() * gate[:, None]

    xr = x.clone()
    return [
        ("adaln (bf16 out)", n * (4 + 2),
         lambda: torch.ops.lx2v.adaln(x, shift, scale, EPS, torch.bfloat16), adaln_unfused),
        ("adaln (fp8 out + scale)", n * (4 + 1) + L * 4,
         lambda: torch.ops.lx2v.adaln_fp8(x, shift, scale, EPS), adaln_fp8_unfused),
        ("affine LayerNorm", n * (4 + 2),
         lambda: torch.ops.lx2v.affine_layer_norm(x, w, b, EPS, torch.bfloat16),
         lambda: layer_norm(x, EPS, ln3).to(torch.bfloat16)),
        ("affine LayerNorm (fp8 out + scale)", n * (4 + 1) + L * 4,
         lambda: torch.ops.lx2v.affine_layer_norm_fp8(x, w, b, EPS),
         lambda: norm.quantize_fp8_per_token(layer_norm(x, EPS, ln3))),
        ("RMSNorm (cross-attn q)", n * (2 + 2),
         lambda: torch.ops.lx2v.rms_norm(q, w, EPS), lambda: nq(q)),
        ("q,k RMSNorm + RoPE", 2 * n * (2 + 2),
         lambda: torch.ops.lx2v.qk_norm_rope(q, k, w, b, cos, sin, H, EPS), qk_unfused),
        ("gated residual (in place)", n * (4 + 2 + 4),
         lambda: torch.ops.lx2v.gated_residual_(xr, y, gate), residual_unfused),
    ]  # fmt: skip


def sweep(L: int, D: int, H: int) -> list[str]:
    """Launch parameters of each kernel, timed at the same shape (for picking defaults)."""
    kn, kr, kres = (dispatch.kernel_module(m) for m in ("norm", "rope", "residual"))
    x = torch.randn(1, L, D, device="cuda")
    e = torch.randn(1, 2, D, device="cuda")
    q = torch.randn(1, L, D, device="cuda").bfloat16()
    w = torch.randn(D, device="cuda")
    ang = torch.rand(L, D // H // 2, device="cuda")
    cos, sin = ang.cos(), ang.sin()
    out = torch.empty(1, L, D, device="cuda", dtype=torch.bfloat16)
    q8 = torch.empty(1, L, D, device="cuda", dtype=torch.float8_e4m3fn)
    s8 = torch.empty(1, L, 1, device="cuda")
    runs = []  # (name, bytes per element, fn)
    for nw in (2, 4, 8):
        fn = partial(kn.layer_norm, x, out, EPS, shift=e[:, 0], scale=e[:, 1], num_warps=nw)
        runs.append((f"adaln num_warps={nw}", 6, fn))
    for nw in (2, 4, 8):
        fn = partial(kn.layer_norm, x, q8, EPS, shift=e[:, 0], scale=e[:, 1], out_scale=s8,
                     num_warps=nw)  # fmt: skip
        runs.append((f"adaln fp8 num_warps={nw}", 5, fn))
    for nw in (4, 8, 16):
        runs.append((f"rms_norm num_warps={nw}", 4,
                     partial(kr.rms_norm_rope, q, out, w, EPS, num_warps=nw)))  # fmt: skip
    for per_head in (False, True):
        for nw in (4, 8, 16):
            fn = partial(kr.rms_norm_rope, q, out, w, EPS, cos=cos, sin=sin,
                         per_head_table=per_head, num_warps=nw)  # fmt: skip
            runs.append((f"rope per_head_table={per_head} num_warps={nw}", 4, fn))
    for block, nw in ((1024, 4), (2048, 8)):
        fn = partial(kres.gated_residual_, x, q, e[:, 0], block=block, num_warps=nw)
        runs.append((f"residual block={block} num_warps={nw}", 10, fn))
    lines = []
    for name, per_elem, fn in runs:
        t = ms(fn)
        lines.append(f"{name}: {t * 1e3:.1f} us, {L * D * per_elem / t / 1e6:.0f} GB/s")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32760)
    ap.add_argument("--dim", type=int, default=5120)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--sweep", action="store_true", help="also time each kernel's launch options")
    ap.add_argument("--json", help="write the numbers here too")
    args = ap.parse_args()
    if dispatch.op_backend("adaln") != "triton":  # the Triton kernels are timed directly
        raise SystemExit(f"the Triton kernels are not active: {dispatch.kernel_report()}")
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    copy = copy_bandwidth()
    rows = []
    for name, nbytes, fused, unfused in cases(args.tokens, args.dim, args.heads):
        compiled = torch.compile(unfused)
        t_f, t_u, t_c = ms(fused), ms(unfused), ms(compiled)
        rows.append({"op": name, "bytes": nbytes, "fused_ms": t_f, "eager_ms": t_u,
                     "compiled_ms": t_c, "fused_GBps": nbytes / t_f / 1e6,
                     "compiled_GBps": nbytes / t_c / 1e6})  # fmt: skip
    extra = sweep(args.tokens, args.dim, args.heads) if args.sweep else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "copy_GBps": copy, "torch": torch.__version__,
                       "triton": triton.__version__, "shape": [args.tokens, args.dim],
                       "rows": rows, "sweep": extra}, f, indent=1)  # fmt: skip
    for line in extra:
        print(line)
    print(f"\n{dev}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{args.tokens}x{args.dim}; device copy {copy:.0f} GB/s (read+write)")  # fmt: skip
    head = f"{'op':28s} {'MB':>6s} {'fused ms':>9s} {'GB/s':>6s} {'%copy':>6s} " \
           f"{'eager ms':>9s} {'x':>5s} {'compiled ms':>11s} {'x':>5s}"  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['op']:28s} {r['bytes'] / 1e6:6.0f} {r['fused_ms']:9.3f} "
              f"{r['fused_GBps']:6.0f} {100 * r['fused_GBps'] / copy:5.0f}% "
              f"{r['eager_ms']:9.3f} {r['eager_ms'] / r['fused_ms']:5.2f} "
              f"{r['compiled_ms']:11.3f} {r['compiled_ms'] / r['fused_ms']:5.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
