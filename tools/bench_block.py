"""One 14B I2V DiT block at 480P (32760 tokens), before and after our kernels, same run.

    PYTHONPATH=. python3 tools/bench_block.py [--json out.json] [--size 480p|720p]

Rows (random weights, bf16 compute, batch 1, median CUDA-event time of repeated calls):
  before      plain PyTorch ops for norm/modulation/RoPE/residual (LX2V_KERNELS=ref), eager;
              FP8: the norms write bf16 and each FP8 linear quantizes its own input
  kernels     our fused ops (the best backend loaded: csrc CUDA → Triton), eager; FP8: the
              norms before qkv, cross-attention q and ffn.0 write FP8 for them (adaln_fp8,
              affine_layer_norm_fp8; eager only: compiled graphs keep the bf16 norms and
              inductor fuses them with the quantization, see dit.fp8_input; the row
              "other norm policy" swaps the two: bf16 norms in eager, pairs compiled)
  compiled    the block under torch.compile(fullgraph=True) (inductor fuses the references,
              see lightx2v/ops/dispatch.py on why our ops defer to it inside a graph)
              (the default policy: lightx2v._C's ops stay in the graph as custom ops)
  compiled, all deferred   the same with every fused op left to inductor
each for bf16 and FP8 linears (`quantize_dit`), with SDPA attention so the comparison is of
the memory-bound passes and the linears only; the FP8 rows are repeated with 8-bit
attention (lx2v-int8) for the full "after" picture. The block updates its residual input in
place, so repeated calls keep working on one buffer (values drift, timing does not).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_fp8_gemm import bench  # noqa: E402  (tools/ is this script's folder)

from lightx2v.bench import SIZES, dit_inputs, random_dit  # noqa: E402
from lightx2v.config import ARCH_PRESETS  # noqa: E402
from lightx2v.models.wan import dit  # noqa: E402
from lightx2v.ops import dispatch  # noqa: E402
from lightx2v.ops.attention import set_attention_backend  # noqa: E402

dit_fp8_input = dit.fp8_input


def time_ms(fn, reps=20, warm=3) -> float:
    """Median of `reps` CUDA-event timings after `warm` calls (tools/bench_fp8_gemm.py's)."""
    return 1e3 * bench(fn, reps, warm)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--size", default="480p", choices=sorted(SIZES))
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device("cuda")
    arch = dataclasses.replace(ARCH_PRESETS["i2v-14b"], num_layers=1)
    w, h = SIZES[args.size]
    model = random_dit(arch, dev)
    x, t, ctx, clip, y = dit_inputs(arch, 81, h, w, dev)
    tokens, grid = model.patchify(torch.cat([x, y], 1))
    cos, sin = model.rope(grid, dev)
    _, e = model.embed_time(t)
    meta = dict(
        card=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
        torch=torch.__version__, tokens=tokens.shape[1], command=" ".join(sys.argv),
        kernels_backend=None,
    )  # fmt: skip
    print("#", meta, flush=True)
    rows = []

    def measure(label, quant, attention, other_norm_policy=False):
        block = model.blocks[0]
        # other_norm_policy: the A/B of the norms writing FP8 pairs for the FP8 linears,
        # every other kernel the same. Default: pairs in eager, unfused chain under compile
        # (dit.fp8_input); the other policy: bf16 norms in eager, pairs under compile.
        dit.FP8_PAIRS_UNDER_COMPILE = other_norm_policy
        dit.fp8_input = (
            (lambda linear: torch.compiler.is_compiling() and dit_fp8_input(linear))
            if other_norm_policy
            else dit_fp8_input
        )
        ctx_, img_ = model.embed_context(ctx, clip)
        kv = block.cross_attn.kv(ctx_, img_)
        set_attention_backend(attention)
        buf = tokens.clone()
        r = dict(config=label, quant=quant, attention=attention)
        for mode in ("before", "kernels", "compiled", "compiled_deferred"):
            dispatch.set_kernel_backend("ref" if mode == "before" else "auto")
            in_graph = set(dispatch.csrc_in_graph)
            if mode == "compiled_deferred":  # every fused op left to inductor
                if dispatch.kernel_backend() != "cuda":
                    continue
                dispatch.csrc_in_graph = set()
            if mode == "kernels":
                meta["kernels_backend"] = dispatch.kernel_backend()
            fn = block
            if mode.startswith("compiled"):
                torch._dynamo.reset()
                fn = torch.compile(block, fullgraph=True, dynamic=False)
            try:
                r[mode] = time_ms(lambda f=fn: f(buf, e, cos, sin, kv), reps=args.reps)
            except Exception as ex:  # reported, the other rows go on
                r[mode + "_error"] = f"{type(ex).__name__}: {ex}"[:200]
            dispatch.csrc_in_graph = in_graph
            print(label, mode, r.get(mode, r.get(mode + "_error")), flush=True)
        dit.fp8_input, dit.FP8_PAIRS_UNDER_COMPILE = dit_fp8_input, False
        rows.append(r)

    measure("bf16 + sdpa", "bf16", "sdpa")
    from lightx2v.quant.linear import quantize_dit

    quantize_dit(model, "fp8")
    measure("fp8 + sdpa", "fp8", "sdpa")
    measure("fp8 + sdpa, other norm policy", "fp8", "sdpa", other_norm_policy=True)
    measure("fp8 + lx2v-int8", "fp8", "lx2v-int8")
    dispatch.set_kernel_backend("auto")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"\n{meta['card']}, {meta['date']}, torch {meta['torch']}, one 14B I2V block, "
          f"{meta['tokens']} tokens, fused ops: {meta['kernels_backend']}")  # fmt: skip
    print("| configuration | before (PyTorch ops) ms | our kernels ms | compiled ms | "
          "compiled, all deferred ms | speedup kernels | speedup compiled |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        b, k, c, cc = (r.get(m) for m in ("before", "kernels", "compiled", "compiled_deferred"))
        cells = [f"{v:.2f}" if v else "-" for v in (b, k, c, cc)]
        cells += [f"{b / v:.3f}×" if (b and v) else "-" for v in (k, c)]
        print(f"| {r['config']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
