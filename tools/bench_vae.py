#!/usr/bin/env python3
"""Wan2.1 VAE decode at real sizes, untiled and tiled: seconds, peak memory, tiled-vs-untiled
error, and the constants of `decode_peak_bytes` (lightx2v/models/wan/vae.py) fitted to the
measured peaks.

    PYTHONPATH=. python3 tools/bench_vae.py --out vae.json       # H100: about 2 minutes
    PYTHONPATH=. python3 tools/bench_vae.py --sizes 480p --max-vram 8
    PYTHONPATH=. python3 tools/bench_vae.py --device meta        # no GPU: tensor accounting only

The real Wan2.1 VAE architecture (diffusers AutoencoderKLWan's default config: base_dim 96,
z_dim 16) with random weights (conv weights N(0, 1/fan_in), norm gains 1 + N(0, 0.1^2), biases
N(0, 0.1^2): activations stay O(1) through the stack), in bf16 under inference mode, decodes
N(0, 1) normalised latents through `WanVAE.decode`, the call the pipeline makes:
480P 81 frames = latent [1, 16, 21, 60, 104], 720P = [1, 16, 21, 90, 160], untiled and at
each --tiles size/stride. A 5-frame untiled decode per size (latent T = 2) is added: its
activations weigh as much as the 81-frame one's but its video far less, which separates the
model's two constants.

Per row: seconds (CUDA-synchronized; after one untimed warm-up call of the same decode unless
--warmup 0), peak = torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus what
was allocated before the call (weights, latents; the decode's own output counts); relative L2
of the tiled video against the untiled one. With random weights tiles disagree near seams far
more than with trained ones, so the L2 shows the seams' share, not the quality of a real video.

On --device cpu / meta there is no allocator to ask: the peak is the most bytes held by live
tensors at any op (a dispatch mode that follows every storage), without allocator rounding or
workspaces; meta runs no arithmetic (no seconds, no L2), yet takes about 4 minutes for the
default rows (the accounting's Python overhead on every op of every tile).

Then the fit of `DecodeMemoryModel(act, out, out_tiled)` to the peaks (see `fit`), its worst
under- and over-estimate, and the line to paste into vae.py. --max-vram GB
shows what `vae_tiling auto` picks for each size under that budget (the fitted constants) and
runs that decode to check its peak stays within it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
import traceback
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightx2v.models.wan.vae import (
    DECODE_MEMORY,
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    DecodeMemoryModel,
    WanVAE,
    decode_peak_bytes,
    decode_peak_terms,
    plan_decode,
)

SIZES = {  # name: latent [T, h, w] at 81 frames
    "480p": (21, 60, 104),
    "720p": (21, 90, 160),
    "small": (3, 16, 24),  # 9 frames 128x192: a CPU dry run
}
GB = 1e9


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages over the ops run inside it (CPU / meta)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage id -> [bytes, tensors using it]
        self.now = self.peak = 0

    def _drop(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                entry = self.live.get(key)
                if entry is None:
                    entry = self.live[key] = [storage.nbytes(), 0]
                    self.now += entry[0]
                    self.peak = max(self.peak, self.now)
                entry[1] += 1
                weakref.finalize(t, self._drop, key)
        return out


def build_vae(device: torch.device, dtype: torch.dtype, seed: int = 0) -> WanVAE:
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        model = AutoencoderKLWan()  # the Wan2.1 VAE's own configuration
    if device.type != "meta":
        model.to_empty(device=device)
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=gen, device=device)
                if name.endswith("gamma"):
                    p.copy_(1.0 + 0.1 * noise)
                elif p.ndim > 1:
                    p.copy_(noise / p[0].numel() ** 0.5)
                else:
                    p.copy_(0.1 * noise)
    model = model.eval().requires_grad_(False)
    return WanVAE(model, WAN21_LATENTS_MEAN, WAN21_LATENTS_STD).to(device, dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(vae: WanVAE, z: torch.Tensor, tile, warmup: int) -> tuple[torch.Tensor, dict]:
    """One decode (after `warmup` untimed ones): (video, {seconds, warmup_s, peak_bytes})."""
    dev = vae.device
    kw = {"tiled": tile is not None}
    if tile is not None:
        kw.update(tile_size=tile[0], tile_stride=tile[1])
    first = None
    for _ in range(warmup if dev.type != "meta" else 0):
        sync(dev)
        t0 = time.perf_counter()
        video = vae.decode(z, **kw)
        sync(dev)
        first = time.perf_counter() - t0
        del video
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        t0 = time.perf_counter()
        video = vae.decode(z, **kw)
        sync(dev)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        tracker = LiveBytes()
        t0 = time.perf_counter()
        with tracker:
            video = vae.decode(z, **kw)
        seconds = time.perf_counter() - t0 if dev.type != "meta" else None
        peak = tracker.peak
    return video, {"seconds": seconds, "warmup_s": first, "peak_bytes": int(peak)}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if a.device.type == "meta":
        return None
    return ((a - b).float().norm() / b.float().norm()).item()


def _dtype(row: dict) -> torch.dtype:
    return getattr(torch, row["dtype"])


def _rel_errors(rows: list[dict], model: DecodeMemoryModel) -> list[float]:
    """Estimate / measured - 1 per row."""
    return [decode_peak_bytes(r["latent"], r["tile"], _dtype(r), model) / r["peak_bytes"] - 1
            for r in rows]  # fmt: skip


def fit(rows: list[dict], source: str) -> tuple[DecodeMemoryModel, float, float]:
    """The constants of DecodeMemoryModel fitted to the measured peaks; → (model, worst
    under-, worst over-estimate as fractions of the measured peak).

    act and out: least squares on the relative error of the decoding phase over the untiled
    rows (linear in both; the 5-frame rows separate them: without two frame counts only act is
    fitted). out_tiled: the value on a 0.05 grid that minimises the tiled rows' squared relative
    error of the whole max(decoding, assembling) model; kept when no tiled row depends on it.
    """
    ok = [r for r in rows if r.get("peak_bytes")]
    terms = {id(r): decode_peak_terms(r["latent"], r["tile"], _dtype(r)) for r in ok}
    untiled = [r for r in ok if not terms[id(r)]["tiled"]]
    tiled = [r for r in ok if terms[id(r)]["tiled"]]
    act, out, out_tiled = DECODE_MEMORY.act, DECODE_MEMORY.out, DECODE_MEMORY.out_tiled
    if untiled:
        x = torch.tensor([[terms[id(r)]["x_act"], terms[id(r)]["x_out"]] for r in untiled],
                         dtype=torch.float64)  # fmt: skip
        peak = torch.tensor([float(r["peak_bytes"]) for r in untiled], dtype=torch.float64)
        xw, yw = x / peak[:, None], torch.ones_like(peak)  # relative: each row weighs the same
        if len({r["latent"][2] for r in untiled}) >= 2:
            sol = torch.linalg.lstsq(xw, yw[:, None]).solution[:, 0]
            act, out = float(sol[0]), max(float(sol[1]), 0.0)
            if out == 0.0:  # refit act alone
                act = float((xw[:, 0] * yw).sum() / (xw[:, 0] ** 2).sum())
        else:
            act = float((xw[:, 0] * (yw - out * xw[:, 1])).sum() / (xw[:, 0] ** 2).sum())
    if tiled:
        grid = [k / 20 for k in range(0, 121)]
        cost = []
        for c in grid:
            m = DecodeMemoryModel(act, out, c, source)
            cost.append(sum(e * e for e in _rel_errors(tiled, m)))
        if max(cost) - min(cost) > 1e-12:
            out_tiled = grid[cost.index(min(cost))]
    model = DecodeMemoryModel(round(act, 1), round(out, 2), round(out_tiled, 2), source)
    errs = _rel_errors(ok, model)
    return model, min(errs, default=0.0), max(errs, default=0.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="480p,720p", help="comma list of 480p, 720p, small")
    p.add_argument("--tiles", default="256/192,384/320,512/448", help="size/stride px, comma list")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, cpu or meta")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before each timed one")
    p.add_argument("--no-calibration", action="store_true", help="skip the 5-frame rows")
    p.add_argument("--max-vram", type=float, metavar="GB", help="show and run auto's choice")
    p.add_argument("--out", help="write rows, fitted constants and auto choices as JSON here")
    a = p.parse_args()

    dev = torch.device(a.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    tiles = [tuple(int(v) for v in t.split("/")) for t in a.tiles.split(",") if t]
    sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            p.error(f"unknown size {s!r} (known: {', '.join(SIZES)})")
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    print(f"bench_vae: {card}, {a.dtype}, torch {torch.__version__}", file=sys.stderr)
    t_start = time.perf_counter()
    vae = build_vae(dev, dtype)
    rows: list[dict] = []

    def run(name: str, latent: tuple[int, ...], tile, ref: torch.Tensor | None):
        z = torch.randn(latent, generator=torch.Generator().manual_seed(0)).to(dev)
        row = {"size": name, "latent": list(latent), "tile": list(tile) if tile else None,
               "dtype": str(dtype).removeprefix("torch."),
               "estimate_bytes": decode_peak_bytes(latent, tile, dtype)}  # fmt: skip
        video = None
        try:
            video, stats = measure(vae, z, tile, a.warmup)
            row.update(stats)
            if ref is not None:
                row["rel_l2_vs_untiled"] = rel_l2(video, ref)
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as e:  # keep the other rows
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
        rows.append(row)
        shown = {k: row.get(k) for k in ("seconds", "peak_bytes", "rel_l2_vs_untiled", "error")}
        print(f"  {name} {tile or 'untiled'}: {shown}", file=sys.stderr)
        return video

    for name in sizes:
        t, h, w = SIZES[name]
        latent = (1, 16, t, h, w)
        if not a.no_calibration:
            run(f"{name}-5f", (1, 16, 2, h, w), None, None)
        ref = run(name, latent, None, None)
        for tile in tiles:
            video = run(name, latent, tile, ref)
            del video
        del ref
        gc.collect()

    model, under, over = fit(rows, f"{card} {a.dtype}, tools/bench_vae.py")
    auto = []
    if a.max_vram is not None:
        for name in sizes:
            t, h, w = SIZES[name]
            latent = (1, 16, t, h, w)
            held = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
            budget = int(a.max_vram * GB) - held
            plan = plan_decode(latent, "auto", budget, dtype, model)
            tile = (plan.tile_size, plan.tile_stride) if plan.tiled else None
            print(f"  --max-vram {a.max_vram:g}: {name}: {plan.describe()}", file=sys.stderr)
            video = run(f"{name}-auto@{a.max_vram:g}GB", latent, tile, None)
            del video
            peak = rows[-1].get("peak_bytes")
            auto.append({"size": name, "max_vram_gb": a.max_vram, "budget_bytes": budget,
                         "plan": plan.describe(), "tile": list(tile) if tile else None,
                         "peak_bytes": peak,
                         "within_budget": None if peak is None else peak <= budget})  # fmt: skip

    print()
    print(f"Wan2.1 VAE decode, {card}, {a.dtype}, random weights, warm-up {a.warmup}")
    print()
    print(
        "| size | latent | tiling | s | peak GB | est. now GB | est. fitted GB | rel. L2 vs untiled |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tiling = f"{r['tile'][0]}/{r['tile'][1]}" if r["tile"] else "untiled"
        fitted = decode_peak_bytes(r["latent"], r["tile"], dtype, model)
        sec = r.get("seconds")
        l2 = r.get("rel_l2_vs_untiled")
        peak = r.get("peak_bytes")
        print(f"| {r['size']} | {'x'.join(map(str, r['latent']))} | {tiling} | "
              f"{'-' if sec is None else f'{sec:.2f}'} | "
              f"{r.get('error') or ('-' if peak is None else f'{peak / GB:.2f}')} | "
              f"{r['estimate_bytes'] / GB:.2f} | {fitted / GB:.2f} | "
              f"{'-' if l2 is None else f'{l2:.2e}'} |")  # fmt: skip
    print()
    print(
        f"fitted (worst under-estimate {under:+.1%}, over-estimate {over:+.1%}); paste into "
        "lightx2v/models/wan/vae.py:"
    )
    print(f"DECODE_MEMORY = {model!r}")
    total = time.perf_counter() - t_start
    print(f"bench_vae: {total:.0f} s in all", file=sys.stderr)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": card, "dtype": a.dtype, "torch": torch.__version__,
                       "warmup": a.warmup, "rows": rows, "fitted": dataclasses.asdict(model),
                       "fit_under": under, "fit_over": over,
                       "current": dataclasses.asdict(DECODE_MEMORY), "auto": auto,
                       "seconds_total": total}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
