#!/usr/bin/env python3
"""Time one DiT forward at real shapes with random weights: ours vs diffusers, same run.

    python tools/bench_dit.py --arch i2v-14b --size 832x480 --frames 81 --impl ours,diffusers

Both models get the same random bf16 weights (ours maps the diffusers names onto its own),
the same inputs, batch 1. Prints s/forward, peak GPU memory and the relative L2 distance
between the two outputs; --json writes the rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

import torch

from lightx2v.bench import diffusers_dit, dit_inputs, randomize_
from lightx2v.bench import timed as _timed
from lightx2v.config import ARCH_PRESETS
from lightx2v.ops.attention import set_attention_backend
from lightx2v.ops.dispatch import set_kernel_backend


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="i2v-14b", choices=sorted(ARCH_PRESETS))
    p.add_argument("--size", default="832x480")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--impl", default="ours,diffusers")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument(
        "--compile", action="store_true", help="also time ours with regional torch.compile"
    )
    p.add_argument(
        "--attention",
        default="",
        help="comma list of extra attention backends to time ours with (compiled), e.g. lx2v-int8",
    )
    p.add_argument(
        "--fp8", action="store_true", help="then quantize ours to FP8 and time it (compiled)"
    )
    p.add_argument(
        "--kernels",
        default="auto",
        help="comma list of fused-op backends for the compiled rows: auto (Triton where it "
        "beats inductor), ref (PyTorch references, all fused by inductor)",
    )
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_dit needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    arch = ARCH_PRESETS[a.arch]
    width, height = map(int, a.size.split("x"))
    x, t, ctx, clip, y = dit_inputs(arch, a.frames, height, width, dev)
    tokens = x.shape[2] * x.shape[3] * x.shape[4] // 4
    ref = diffusers_dit(arch, dev)
    randomize_(ref, 0)
    state = dict(ref.state_dict())  # shared storage: ours reuses the same weights, no copy
    rows, outs = [], {}

    def record(name, fn):
        torch.cuda.reset_peak_memory_stats()
        try:
            sec, first, out = _timed(fn, a.repeat, dev)
        except Exception as e:  # a failing variant is reported in the table, the rest still run
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(f"{name:<22} FAILED {msg}", flush=True)
            rows.append({"impl": name, "error": msg})
            return
        peak = torch.cuda.max_memory_allocated() / 1e9
        outs[name] = out.float()
        rows.append({"impl": name, "s_per_forward": sec, "first_call_s": first, "peak_gb": peak})
        print(
            f"{name:<22} {sec:8.3f} s/forward  first {first:7.2f} s  peak {peak:6.1f} GB",
            flush=True,
        )

    with torch.no_grad():
        if "diffusers" not in a.impl:
            del ref
        else:
            ref.eval()
            hidden = torch.cat([x, y], 1) if y is not None else x
            hid, c, cl = (
                hidden.bfloat16(),
                ctx.bfloat16(),
                None if clip is None else clip.bfloat16(),
            )
            record(
                "diffusers-bf16-eager",
                lambda: ref(hid, t, c, encoder_hidden_states_image=cl, return_dict=False)[0],
            )
            del ref
            gc.collect()
            torch.cuda.empty_cache()
        if "ours" in a.impl:
            from lightx2v.models.wan.dit import WanDiT
            from lightx2v.models.wan.formats import diffusers_to_official

            with torch.device("meta"):
                ours = WanDiT(arch)
            ours.load_state_dict(
                {diffusers_to_official(k): v for k, v in state.items()}, assign=True
            )
            ours.cast(torch.bfloat16).eval()
            del state
            record("lx2v-bf16-eager", lambda: ours(x, t, ctx, clip, y))
            backends = ["sdpa"] + [b for b in a.attention.split(",") if b]

            def compiled_rows(prec: str) -> None:
                for kernels in a.kernels.split(","):
                    set_kernel_backend(kernels)
                    for backend in backends:
                        set_attention_backend(backend)
                        torch._dynamo.reset()
                        for blk in ours.blocks:  # regional: one graph reused by every block
                            blk.compile(fullgraph=True, dynamic=False)
                        name = f"lx2v-{prec}-{backend}-ops:{kernels}-compiled"
                        record(name, lambda: ours(x, t, ctx, clip, y))
                set_attention_backend("sdpa")
                set_kernel_backend("auto")

            if a.compile:
                compiled_rows("bf16")
            if a.fp8:
                from lightx2v.quant.linear import quantize_dit

                quantize_dit(ours, "fp8")
                gc.collect()
                torch.cuda.empty_cache()
                compiled_rows("fp8")
    if "diffusers-bf16-eager" in outs:
        ref_out = outs["diffusers-bf16-eager"]
        for row in rows:
            if row["impl"] not in outs:
                continue
            o = outs[row["impl"]]
            row["rel_l2_vs_diffusers"] = ((o - ref_out).norm() / ref_out.norm()).item()
    print(
        f"\n{a.arch} {width}x{height} {a.frames} frames = {tokens} tokens, {torch.cuda.get_device_name()}"
    )
    print("| impl | s/forward | first call s | peak GB | rel L2 vs diffusers |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | failed: {r['error']} | | | |")
            continue
        rel = r.get("rel_l2_vs_diffusers", float("nan"))
        print(
            f"| {r['impl']} | {r['s_per_forward']:.3f} | {r['first_call_s']:.2f} | {r['peak_gb']:.1f} | {rel:.2e} |"
        )
    if a.json:
        meta = {"arch": a.arch, "size": a.size, "frames": a.frames, "tokens": tokens,
                "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}  # fmt: skip
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
