"""Launch one kernel of interest a few times at its real shape, for Nsight Compute (ncu).

    PYTHONPATH=. python3 tools/ncu_targets.py adaln|attention [--launches 3]

adaln: the csrc adaLN → FP8 kernel (lightx2v._C) at 32760 × 5120, fp32 in.
attention: lx2v-int8-int8 at S = 32760, H = 40, D = 128, batch 1 (its pre-pass kernels run
too; profile `_attn_fwd_kernel`).

`tools/gpu_check.sh profile` runs ncu over both with the sections that say where a kernel
waits (speed of light, occupancy, warp states, memory workload). The script only launches:
ncu does the measuring, and skips the first launch (warm-up and compilation).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def adaln(launches: int) -> None:
    from lightx2v.ops import dispatch

    dispatch.set_kernel_backend("cuda")  # loads lightx2v._C (torch.ops.lx2v_C), or says why not
    L, D = 32760, 5120
    x = torch.randn(1, L, D, device="cuda") * 2 + 1
    e = torch.randn(1, 2, D, device="cuda") * 0.5
    q = torch.empty(1, L, D, device="cuda", dtype=torch.float8_e4m3fn)
    s = torch.empty(1, L, 1, device="cuda")
    for _ in range(launches):
        torch.ops.lx2v_C.adaln_fp8(q, s, x, e[:, 0], e[:, 1], 1e-6)
    torch.cuda.synchronize()


def attention(launches: int) -> None:
    from lightx2v.kernels import attention as K

    q, k, v = (
        torch.randn(1, 32760, 40, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3)
    )
    for _ in range(launches):
        K.attention_int8(q, k, v, "int8")
    torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", choices=["adaln", "attention"])
    ap.add_argument("--launches", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("ncu_targets: needs a CUDA GPU", file=sys.stderr)
        return 2
    {"adaln": adaln, "attention": attention}[args.target](args.launches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
