#!/usr/bin/env python3
"""One DiT forward, quantized vs high precision, same random weights and inputs.

    python tools/fp8_quality.py                              # tiny model, CPU: FP8 vs fp32
    python tools/fp8_quality.py --arch i2v-14b --size 832x480 --frames 81   # GPU: FP8 vs bf16

Prints relative L2 and cosine similarity of the outputs, the per-layer weight-error summary
(and the output error it predicts, see lightx2v/quant/report.py) and, on GPU, the time of
each forward (median of --repeat after a warm-up) and the peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightx2v.config import ARCH_PRESETS, WanArch  # noqa: E402
from lightx2v.models.wan.dit import WanDiT  # noqa: E402
from lightx2v.quant.linear import quantize_dit  # noqa: E402
from lightx2v.quant.report import model_weight_errors, summarize  # noqa: E402

TINY = WanArch("i2v", dim=256, ffn_dim=704, num_heads=2, num_layers=4, in_dim=36,
               text_dim=64, image_dim=96)  # fmt: skip


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Matrices ~ N(0, 1/fan_in), norm weights 1, modulation N(0, 1/dim), other vectors small."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "modulation" in name:
            p.normal_(0, p.shape[-1] ** -0.5, generator=g)
        elif p.dim() >= 2:
            p.normal_(0, p[0].numel() ** -0.5, generator=g)
        elif "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.normal_(0, 0.02, generator=g)


def make_inputs(arch: WanArch, width: int, height: int, frames: int, batch: int, device, seed=1):
    g = torch.Generator(device=device).manual_seed(seed)
    f, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
    x = torch.randn(batch, 16, f, h, w, device=device, generator=g)
    ctx = torch.randn(batch, arch.text_len, arch.text_dim, device=device, generator=g)
    ctx[:, 20:] = 0
    t = torch.full((batch,), 700.0, device=device)
    clip = y = None
    if arch.is_i2v:
        clip = torch.randn(batch, 257, arch.image_dim, device=device, generator=g)
        y = torch.randn(batch, 20, f, h, w, device=device, generator=g)
    return x, t, ctx, clip, y


def timed(model, inputs, repeat: int, cuda: bool):
    out = model(*inputs)  # warm-up (and the result)
    times = []
    for _ in range(repeat if cuda else 0):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(*inputs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, (statistics.median(times) if times else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--arch", default="tiny", help="tiny | " + " | ".join(ARCH_PRESETS))
    ap.add_argument("--size", default=None, help="WxH (default 832x480, tiny: 64x64)")
    ap.add_argument("--frames", type=int, default=None, help="default 81, tiny: 9")
    ap.add_argument("--scheme", default="fp8", choices=["fp8", "int8"])
    ap.add_argument("--backend", default=None, help="linear backend (default: fastest)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    arch = TINY if args.arch == "tiny" else ARCH_PRESETS[args.arch]
    size = args.size or ("64x64" if args.arch == "tiny" else "832x480")
    frames = args.frames or (9 if args.arch == "tiny" else 81)
    width, height = (int(v) for v in size.lower().split("x"))
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    # Reference precision: fp32 on CPU, bf16 on GPU (what the FP8 path replaces there).
    ref_dtype = torch.bfloat16 if cuda else torch.float32

    torch.set_default_dtype(ref_dtype)  # build a 14B model in bf16 directly (28 GB, not 56)
    with torch.device(device):
        model = WanDiT(arch)
    torch.set_default_dtype(torch.float32)
    randomize_(model, args.seed)
    model.cast(ref_dtype).eval().requires_grad_(False)
    errs = summarize(model_weight_errors(model, args.scheme), args.scheme)
    inputs = make_inputs(arch, width, height, frames, args.batch, device)
    tokens = inputs[0].shape[2] * inputs[0].shape[3] * inputs[0].shape[4] // 4
    print(f"# {args.arch} {size} {frames} frames ({tokens} tokens, batch {args.batch}) on "
          f"{torch.cuda.get_device_name(device) if cuda else 'cpu'}, torch {torch.__version__}")  # fmt: skip

    with torch.no_grad():
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        ref, t_ref = timed(model, inputs, args.repeat, cuda)
        ref = ref.float().cpu()
        mem_ref = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        quantize_dit(model, args.scheme, backend=args.backend)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        out, t_q = timed(model, inputs, args.repeat, cuda)
        out = out.float().cpu()
        mem_q = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    rel = ((out - ref).norm() / ref.norm()).item()
    cos = F.cosine_similarity(out.flatten().double(), ref.flatten().double(), dim=0).item()
    backend = next(m.backend for m in model.modules() if hasattr(m, "backend"))
    if cuda:
        print(f"reference {str(ref_dtype).removeprefix('torch.')}: {t_ref:.3f} s/forward, "
              f"peak {mem_ref:.1f} GiB")  # fmt: skip
        print(f"{args.scheme} ({backend}): {t_q:.3f} s/forward, peak {mem_q:.1f} GiB, "
              f"speed-up {t_ref / t_q:.2f}x")  # fmt: skip
    else:
        print(f"reference {str(ref_dtype).removeprefix('torch.')} vs {args.scheme} ({backend})")
    print(f"output: rel L2 {rel:.3e}, cosine {cos:.6f}")
    print(f"weights: mean rel err {errs['mean']:.3e}, max {errs['max']:.3e}; predicted output "
          f"rel L2 <= {errs['predicted_output_rel_l2']:.3e}")  # fmt: skip


if __name__ == "__main__":
    main()
