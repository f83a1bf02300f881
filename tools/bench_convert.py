#!/usr/bin/env python3
"""Converter throughput and peak memory on a synthetic checkpoint of real shape.

    python tools/bench_convert.py --arch i2v-14b --workdir /big/disk [--quant fp8] [--keep]

Writes a random official-layout DiT of the preset's shape (28 GB for 14B in bf16) unless
one is already there, converts it in a fresh subprocess, and prints the source size,
wall time, throughput (source bytes / s) and the converter process's peak RSS
(getrusage maxrss, so measured, not estimated) next to the target bound
"two largest tensors + 1 GiB". The page cache is not dropped: for a cold-cache figure, run
`sync; echo 3 > /proc/sys/vm/drop_caches` (root) between generation and conversion.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = """
import json, resource, sys, time
from lightx2v.quant.convert import convert
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], quant=sys.argv[3], force=True, progress=False,
        components=False)
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def main() -> None:
    import torch

    from lightx2v.config import ARCH_PRESETS
    from lightx2v.models.wan.dit import WanDiT
    from lightx2v.quant.synthetic import write_synthetic_official

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="i2v-14b", choices=sorted(ARCH_PRESETS))
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--quant", default="fp8", choices=["fp8", "int8", "bf16"])
    ap.add_argument("--keep", action="store_true", help="keep the synthetic source and output")
    args = ap.parse_args()
    arch = ARCH_PRESETS[args.arch]
    src = args.workdir / f"synthetic-{args.arch}"
    dst = args.workdir / f"synthetic-{args.arch}-{args.quant}"
    if not (src / "config.json").exists():
        t = time.perf_counter()
        write_synthetic_official(src, arch)
        print(f"wrote synthetic source in {time.perf_counter() - t:.1f} s")
    size = sum(p.stat().st_size for p in src.glob("diffusion_pytorch_model*.safetensors"))
    with torch.device("meta"):
        sizes = sorted((v.numel() * 2 for v in WanDiT(arch).state_dict().values()), reverse=True)
    bound = sizes[0] + sizes[1] + (1 << 30)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), args.quant],
                         capture_output=True, text=True, env=env, check=False)  # fmt: skip
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    peak = res["peak_rss_kb"] * 1024
    out_size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    print(f"{args.arch} {args.quant}: source {size / 1e9:.1f} GB → {out_size / 1e9:.1f} GB in "
          f"{res['seconds']:.1f} s ({size / res['seconds'] / 1e9:.2f} GB/s of source), "
          f"peak RSS {peak / 2**30:.2f} GiB (bound: two largest tensors + 1 GiB = "
          f"{bound / 2**30:.2f} GiB), {os.cpu_count()} CPUs")  # fmt: skip
    if not args.keep:
        shutil.rmtree(dst)
        shutil.rmtree(src)


if __name__ == "__main__":
    main()
