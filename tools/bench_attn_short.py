"""The Triton and the CUDA INT8 kernels across key lengths (GPU only): where the CUDA
kernel (one 128-row CTA per SM) stops paying, for lx2v-int8-int8-ws's WS_MIN_LK.

    PYTHONPATH=. python3 tools/bench_attn_short.py [--lq 32760]

TFLOP/s = 4·Lq·Lk·D·H / time, pre-pass included, H = 40, D = 128, batch 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightx2v.kernels.attention as K  # noqa: E402

from tools.bench_attention import time_ms  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lq", type=int, default=32760)
    args = ap.parse_args()
    H, D = 40, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, args.lq, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    print(f"Lq = {args.lq}, H = {H}: ms (TFLOP/s), pre-pass included")
    print(f"{'Lk':>6} {'triton':>16} {'cuda':>16}")
    for lk in (257, 512, 769, 1024, 2048, 4096, 8192, 12288, 16384, 24576, 32760):
        k, v = (
            torch.randn(1, lk, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
            for _ in range(2)
        )
        flop = 4 * args.lq * lk * D * H
        cells = []
        for pv in ("int8", "int8-ws"):
            ms = time_ms(lambda q, k, v, pv=pv: K.attention_int8(q, k, v, pv=pv), (q, k, v), 0.5)
            cells.append(f"{ms:8.3f} ({flop / ms / 1e9:4.0f})")
        print(f"{lk:>6} " + " ".join(f"{c:>16}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
