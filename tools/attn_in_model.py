"""Why the 8-bit attention kernel is slower inside the DiT block than on its own (GPU only).

    PYTHONPATH=. python3 tools/attn_in_model.py [--attention NAME] [--seconds 3]

One 14B I2V FP8 block at 480P (random weights, as tools/profile_block.py) runs once in
eager with a spy that keeps its self-attention's q, k, v (all 40 heads). Then the attention
backend is timed (CUDA events, median) in these settings, with the SM clock and board power
sampled by nvidia-smi every 50 ms during each (after a warm-up call outside the sampling):
  random     random normal q, k, v of the same shape, back to back
  captured   the block's own q, k, v, back to back
  + GEMMs    the captured q, k, v, each call after ~15 ms of FP8 GEMMs at the FFN shapes
             (as in the block, where attention follows the projections)
  GEMMs      those FP8 GEMMs alone
  block      the whole compiled block in a loop (its attention share is in profile_block)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightx2v.bench import attention_8bit  # noqa: E402
from lightx2v.ops import attention as A  # noqa: E402
from tools.profile_block import fp8_block  # noqa: E402


class Sampler:
    """Median SM clock (MHz) and power (W) from nvidia-smi every 50 ms inside the `with`
    (the first three samples, taken before the work starts, are dropped)."""

    def __enter__(self):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".csv")
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
             "-lms", "50", "-i", str(torch.cuda.current_device())],
            stdout=self.log, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(0.3)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()
        self.log.seek(0)
        rows = [ln.split(",") for ln in self.log.read().splitlines() if ln.count(",") == 1]
        vals = [(float(a), float(b)) for a, b in rows if a.strip() and b.strip()][3:]
        self.clock = statistics.median(v[0] for v in vals) if vals else float("nan")
        self.power = statistics.median(v[1] for v in vals) if vals else float("nan")


def loop_ms(fn, seconds: float, before=None) -> float:
    """Median ms of fn (CUDA events) over `seconds`; `before` runs untimed before each call
    (the caller warms fn up first)."""
    times, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(times) < 5:
        if before is not None:
            before()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attention", default=None, help="backend (default: lx2v bench's 8-bit)")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    dev = torch.device("cuda")
    name = args.attention or attention_8bit()
    A.set_attention_backend(name)
    attn = A._BACKENDS[name]
    block, (tokens, e, cos, sin, kv) = fp8_block(dev)

    got = []

    def spy(q, k, v):
        if q.shape[1] == k.shape[1] and not got:
            got.append(tuple(z.clone() for z in (q, k, v)))
        return attn(q, k, v)

    A.register_attention_backend("spy", spy)
    with A.attention_backend_override("spy"):
        block(tokens.clone(), e, cos, sin, kv)
    q, k, v = got[0]
    B, S, H, D = q.shape
    flops = 4 * B * S * S * H * D
    g = torch.Generator(device=dev).manual_seed(0)
    rq, rk, rv = (torch.randn(q.shape, generator=g, device=dev, dtype=q.dtype) for _ in range(3))
    # FP8 GEMMs at the FFN shapes, ~15 ms on an H200: up (5120 → 13824) and down (13824 → 5120), twice
    a1 = torch.randn(S, 5120, device=dev).to(torch.float8_e4m3fn)
    w1 = torch.randn(13824, 5120, device=dev).to(torch.float8_e4m3fn)
    a2 = torch.randn(S, 13824, device=dev).to(torch.float8_e4m3fn)
    w2 = torch.randn(5120, 13824, device=dev).to(torch.float8_e4m3fn)
    one = torch.ones((), device=dev)

    def gemms():
        for _ in range(2):
            torch._scaled_mm(a1, w1.t(), one, one, out_dtype=torch.bfloat16)
            torch._scaled_mm(a2, w2.t(), one, one, out_dtype=torch.bfloat16)

    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    buf = tokens.clone()
    cases = [
        ("random q, k, v", lambda: attn(rq, rk, rv), None),
        ("captured q, k, v", lambda: attn(q, k, v), None),
        ("captured, after FP8 GEMMs", lambda: attn(q, k, v), gemms),
        ("FP8 GEMMs alone", gemms, None),
        ("compiled block", lambda: compiled(buf, e, cos, sin, kv), None),
    ]
    print(f"# {name}, B={B} S={S} H={H} D={D}, q std {q.float().std():.3f}, "
          f"k std {k.float().std():.3f}, v std {v.float().std():.3f}")  # fmt: skip
    print("| case | ms | TFLOP/s (attention) | SM clock MHz | power W |")
    print("|---|---|---|---|---|")
    for label, fn, before in cases:
        fn()  # warm-up (the compiled block compiles here), outside the sampling
        torch.cuda.synchronize()
        with Sampler() as smp:
            ms = loop_ms(fn, args.seconds, before)
        tf = (
            f"{flops / ms / 1e9:.0f}"
            if "GEMMs alone" not in label and "block" not in label
            else "—"
        )
        print(f"| {label} | {ms:.2f} | {tf} | {smp.clock:.0f} | {smp.power:.0f} |", flush=True)


if __name__ == "__main__":
    main()
