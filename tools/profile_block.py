"""Kernel-level profile of one compiled 14B I2V FP8 block at 480P: where the time goes.

    PYTHONPATH=. python3 tools/profile_block.py [--no-norm-fp8] [--deferred]
        [--pairs-compiled | --norm-in-graph] [--eager] [--attention NAME] [--batch 2]

Prints the CUDA kernels of 5 calls of the block under torch.compile(fullgraph=True), by
total time per call (torch.profiler), then the block's median time.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightx2v.bench import SIZES, attention_8bit, dit_inputs, random_dit  # noqa: E402
from lightx2v.config import ARCH_PRESETS  # noqa: E402
from lightx2v.models.wan import dit  # noqa: E402
from lightx2v.ops import dispatch  # noqa: E402
from lightx2v.ops.attention import _active as attention_active  # noqa: E402
from lightx2v.ops.attention import set_attention_backend  # noqa: E402
from lightx2v.quant.linear import quantize_dit  # noqa: E402


@torch.no_grad()
def fp8_block(dev: torch.device, batch: int = 1):
    """Block 0 of the 14B I2V DiT (random weights, FP8 linears) and its inputs at 480P, 81
    frames: (block, (tokens, e, cos, sin, cross-attention k/v))."""
    arch = dataclasses.replace(ARCH_PRESETS["i2v-14b"], num_layers=1)
    w, h = SIZES["480p"]
    model = random_dit(arch, dev)
    quantize_dit(model, "fp8")
    x, t, ctx, clip, y = dit_inputs(arch, 81, h, w, dev, batch=batch)
    tokens, grid = model.patchify(torch.cat([x, y], 1))
    cos, sin = model.rope(grid, dev)
    _, e = model.embed_time(t)
    block = model.blocks[0]
    return block, (tokens, e, cos, sin, block.cross_attn.kv(*model.embed_context(ctx, clip)))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-norm-fp8", action="store_true", help="norms write bf16 (before)")
    ap.add_argument("--deferred", action="store_true", help="every fused op left to inductor")
    ap.add_argument("--eager", action="store_true", help="no torch.compile")
    ap.add_argument(
        "--pairs-compiled",
        action="store_true",
        help="compiled graphs use the norm → FP8 pairs (as their references)",
    )
    ap.add_argument("--norm-in-graph", action="store_true",
                    help="the same with the csrc norm → FP8 ops kept in the graph as opaque ops")  # fmt: skip
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--attention", default=None,
                    help="attention backend (default: the FP8 rows' 8-bit kernel, as lx2v bench)")  # fmt: skip
    ap.add_argument("--batch", type=int, default=1, help="2: cond and uncond as one batch")
    args = ap.parse_args()
    set_attention_backend(args.attention or attention_8bit())
    block, (tokens, e, cos, sin, kv) = fp8_block(torch.device("cuda"), args.batch)
    if args.no_norm_fp8:
        dit.fp8_input = lambda linear: False
    if args.pairs_compiled or args.norm_in_graph:
        dit.FP8_PAIRS_UNDER_COMPILE = True
    if args.deferred:
        dispatch.csrc_in_graph = set()
    if args.norm_in_graph:
        dispatch.csrc_in_graph |= {"adaln_fp8", "affine_layer_norm_fp8"}
    fn = block if args.eager else torch.compile(block, fullgraph=True, dynamic=False)
    buf = tokens.clone()
    for _ in range(3):
        fn(buf, e, cos, sin, kv)
    torch.cuda.synchronize()
    reps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn(buf, e, cos, sin, kv)
        torch.cuda.synchronize()
    rows = [
        (ev.device_time_total / reps / 1e3, ev.count // reps, ev.key)
        for ev in prof.key_averages()
        if ev.device_time_total > 0
    ]
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"# {vars(args)}, attention {attention_active[0]}: CUDA kernels {total:.2f} ms per call")
    for ms, n, name in rows[: args.top]:
        print(f"{ms:8.3f} ms  x{n:<3} {name[:110]}")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        fn(buf, e, cos, sin, kv)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    print(f"# median {sorted(times)[5]:.2f} ms per call")


if __name__ == "__main__":
    main()
