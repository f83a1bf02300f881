#!/usr/bin/env python3
"""DiT block offload at real shapes: resident vs streamed, s/forward and peak GPU memory.

    PYTHONPATH=. python3 tools/bench_offload.py          # 14B I2V, 480P 81 frames, batch 1

Random weights at the real shapes, built on the GPU in bf16; the bf16 rows run first,
then the same model is quantized in place to FP8 (lightx2v.quant.linear.quantize_dit,
per-channel weights, torch._scaled_mm) for the FP8 rows. Each row: begin() (per-generation
cross k,v: streams every block once when offloaded), one warm-up forward, then --repeat
timed forwards (median). Peak = torch.cuda.max_memory_allocated over begin + forwards.
"stream s" is one pass over the streamed blocks with no compute (the copies alone): when
the offloaded forward costs less than resident + stream, the copies overlap compute.
Eager blocks unless --compile. The table is printed last; --json writes the rows.
Issue target (14B FP8 480P, block offload): peak <= 12 GB at <= 1.10x the resident time.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback

import torch

from lightx2v.bench import dit_inputs, random_dit
from lightx2v.config import ARCH_PRESETS, WanArch

DEFAULT_ROWS = "bf16:none,bf16:block,fp8:none,fp8:block,fp8:auto,fp8:disk"


def build(arch: WanArch, dev, seed=0):
    """Our WanDiT in bf16 (fp32 norms/modulation/time/head) on the device, random weights."""
    return random_dit(arch, dev, torch.bfloat16, seed)


def inputs(arch: WanArch, batch, frames, height, width, dev, seed=0):
    return dit_inputs(arch, frames, height, width, dev, seed, batch)


def copy_bandwidth(dev) -> tuple[float, float]:
    """Host→device GB/s from pinned and from pageable memory (1 GiB, event-timed)."""
    n = 1 << 30
    dst = torch.empty(n, dtype=torch.uint8, device=dev)
    out = []
    for pinned in (True, False):
        src = torch.ones(n, dtype=torch.uint8, pin_memory=pinned)
        dst.copy_(src, non_blocking=pinned)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=pinned)
        b.record()
        torch.cuda.synchronize()
        out.append(n / (a.elapsed_time(b) / 1e3) / 1e9)
        del src
    del dst
    return out[0], out[1]


def release_host_cache():
    fn = getattr(torch._C, "_host_emptyCache", None)
    if fn is not None:
        fn()


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    nan = a.isnan()
    return bool(torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan]))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    ok = ~(a.isnan() | b.isnan())
    a, b = a[ok].double(), b[ok].double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="i2v-14b", choices=[*sorted(ARCH_PRESETS), "tiny-i2v"])
    p.add_argument("--size", default="832x480")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--batch", type=int, default=1, help="1 = one forward of CFG run one by one")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"scheme:mode,... (default {DEFAULT_ROWS})")
    p.add_argument("--max-vram", type=float, default=24.0, help="GB, for the auto rows")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks")
    p.add_argument(
        "--disk-dir", help="where the disk rows write block shards (default: a temp dir)"
    )
    p.add_argument("--time-budget", type=float, default=210.0,
                   help="seconds; rows that would start later are skipped")  # fmt: skip
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="exercise the rows on the CPU (no timing or memory meaning; for CI)")  # fmt: skip
    a = p.parse_args()
    if not a.cpu_dry_run and not torch.cuda.is_available():
        print("bench_offload needs a CUDA GPU", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    logging_setup()
    from lightx2v.runtime.offload import (
        BlockOffloadRunner,
        activation_bytes,
        apply_offload,
        offloader_of,
        remove_offload,
        write_block_shards,
    )
    from lightx2v.runtime.runner import DiTRunner, compile_blocks

    cuda = not a.cpu_dry_run
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if a.arch == "tiny-i2v":
        import dataclasses

        from lightx2v.models.wan.tiny import tiny_arch

        arch = dataclasses.replace(tiny_arch("i2v"), num_layers=4)
    else:
        arch = ARCH_PRESETS[a.arch]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def allocated():
        return torch.cuda.memory_allocated(dev) if cuda else 0

    def peak_allocated():
        return torch.cuda.max_memory_allocated(dev) if cuda else 0

    def empty_cache():
        if cuda:
            torch.cuda.empty_cache()

    width, height = map(int, a.size.split("x"))
    rows_spec = [tuple(r.split(":")) for r in a.rows.split(",") if r]
    for s, m in rows_spec:
        if s not in ("bf16", "fp8") or m not in ("none", "block", "auto", "disk"):
            p.error(f"bad row {s}:{m}")
    rows_spec.sort(key=lambda r: r[0] != "bf16")  # bf16 first: fp8 quantizes in place
    name = torch.cuda.get_device_name(dev) if cuda else "cpu (dry run)"
    print(f"{name}, torch {torch.__version__}, {a.arch} {a.size}x{a.frames}f batch {a.batch}, "
          f"{'compiled' if a.compile else 'eager'}", flush=True)  # fmt: skip
    pin_bw, page_bw = copy_bandwidth(dev) if cuda else (float("nan"), float("nan"))
    print(f"host->device: pinned {pin_bw:.1f} GB/s, pageable {page_bw:.1f} GB/s", flush=True)

    t0 = time.perf_counter()
    model = build(arch, dev)
    x, t, ctx, clip, y = inputs(arch, a.batch, a.frames, height, width, dev)
    tokens = x.shape[2] * x.shape[3] * x.shape[4] // 4
    print(f"built in {time.perf_counter() - t0:.1f} s; {tokens} tokens", flush=True)
    if a.compile:
        compile_blocks(model)
    disk_dir = a.disk_dir or tempfile.mkdtemp(prefix="lx2v-offload-")
    results, ref_out, ref_time = [], {}, {}

    def timed_forward(runner):
        sync()
        t0 = time.perf_counter()
        out = runner(x, t, y)
        sync()
        return time.perf_counter() - t0, out

    state = {"scheme": "bf16", "longest": 0.0}

    def run_row(scheme, mode, last):
        if scheme == "fp8" and state["scheme"] != "fp8":
            from lightx2v.quant.linear import quantize_dit

            t0 = time.perf_counter()
            quantize_dit(model, "fp8", device=dev)
            gc.collect()
            empty_cache()
            if cuda:
                release_host_cache()  # the bf16 arenas (other sizes) are of no further use
            state["scheme"] = "fp8"
            print(f"quantized to FP8 in {time.perf_counter() - t0:.1f} s", flush=True)
        gc.collect()
        empty_cache()
        sync()
        t0 = time.perf_counter()
        off, write_s = None, None
        if mode == "disk":
            sources = write_block_shards(model, disk_dir)
            write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            off = apply_offload(model, "disk", dev, sources=sources)
        elif mode != "none":
            off = apply_offload(model, mode, dev,
                                max_vram_gb=a.max_vram if mode == "auto" else None)  # fmt: skip
        sync()
        setup_s = time.perf_counter() - t0
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        runner = BlockOffloadRunner(model) if off is not None else DiTRunner(model)
        t0 = time.perf_counter()
        runner.begin(ctx, clip)
        sync()
        begin_s = time.perf_counter() - t0
        base = allocated()
        first_s, out = timed_forward(runner)
        times = []
        for _ in range(a.repeat):
            s, out = timed_forward(runner)
            times.append(s)
        sec = statistics.median(times)
        peak = peak_allocated()
        stream_s = None
        if off is not None and off.streamed_blocks:
            sync()
            t0 = time.perf_counter()
            for _b in model.blocks:  # copies only
                pass
            sync()
            stream_s = time.perf_counter() - t0
        out = out.float().cpu()
        row = {
            "scheme": scheme, "mode": mode, "s_per_forward": sec, "first_s": first_s,
            "peak_gb": peak / 1e9, "begin_s": begin_s, "setup_s": setup_s, "stream_s": stream_s,
            "write_s": write_s, "activation_gb": (peak - base) / 1e9,
            "activation_estimate_gb": activation_bytes(arch, a.batch, tokens) / 1e9,
        }  # fmt: skip
        if off is not None:
            row["resident_blocks"] = len(off.resident_blocks)
            row["host_gb"] = off.source.host_bytes / 1e9
        if mode == "none":
            ref_out[scheme], ref_time[scheme] = out, sec
        if scheme in ref_out:
            row["identical"] = identical(out, ref_out[scheme])
            row["rel_l2"] = rel_l2(out, ref_out[scheme])
            row["ratio"] = sec / ref_time[scheme]
        del runner, out
        if off is not None and not last:
            restore()
        return row

    def restore():
        if offloader_of(model) is None:
            return
        t0 = time.perf_counter()
        remove_offload(model)
        gc.collect()
        empty_cache()
        print(f"restored in {time.perf_counter() - t0:.1f} s", flush=True)

    for idx, (scheme, mode) in enumerate(rows_spec):
        elapsed = time.perf_counter() - t_start
        if elapsed + state["longest"] > a.time_budget:
            print(f"skip {scheme}:{mode}: {elapsed:.0f} s elapsed (budget {a.time_budget:.0f} s)")
            results.append({"scheme": scheme, "mode": mode, "skipped": "time budget"})
            continue
        row_t0 = time.perf_counter()
        try:
            row = run_row(scheme, mode, last=idx == len(rows_spec) - 1)
        except Exception as e:  # one failed row must not cost the table
            traceback.print_exc()
            row = {"scheme": scheme, "mode": mode, "skipped": f"error: {type(e).__name__}: {e}"}
            try:
                restore()
            except Exception:
                traceback.print_exc()
        results.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
              flush=True)  # fmt: skip
        if mode == "disk" and not a.disk_dir:
            shutil.rmtree(disk_dir, ignore_errors=True)
        state["longest"] = max(state["longest"], time.perf_counter() - row_t0)

    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "args": vars(a),
                       "pinned_gbps": pin_bw, "pageable_gbps": page_bw, "rows": results},
                      f, indent=1)  # fmt: skip
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s. {name}; {a.arch} {a.size}x{a.frames}f, "
          f"batch {a.batch}, {tokens} tokens, {'compiled' if a.compile else 'eager'}; "
          f"auto at --max-vram {a.max_vram:g}; copies {pin_bw:.0f} GB/s pinned")  # fmt: skip
    hdr = (f"{'scheme':<6} {'mode':<6} {'s/fwd':>7} {'x res':>6} {'peak GB':>8} {'act GB':>7} "
           f"{'begin s':>7} {'stream s':>8} {'resid':>6} {'same':>5} {'target':>7}")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        if r.get("skipped"):
            print(f"{r['scheme']:<6} {r['mode']:<6} skipped ({r['skipped'][:80]})")
            continue
        target = ""
        if r["scheme"] == "fp8" and r["mode"] == "block" and "ratio" in r:
            ok = r["peak_gb"] <= 12.0 and r["ratio"] <= 1.10
            target = "ok" if ok else "MISS"
        resid = r.get("resident_blocks")
        resid_s = "all" if resid is None else f"{resid}/{arch.num_layers}"
        stream = "" if r["stream_s"] is None else f"{r['stream_s']:.3f}"
        same = "" if "identical" not in r else ("yes" if r["identical"] else "NO")
        ratio = r.get("ratio", float("nan"))
        print(f"{r['scheme']:<6} {r['mode']:<6} {r['s_per_forward']:7.3f} {ratio:6.3f} "
              f"{r['peak_gb']:8.2f} {r['activation_gb']:7.2f} {r['begin_s']:7.2f} {stream:>8} "
              f"{resid_s:>6} {same:>5} {target:>7}")  # fmt: skip
    return 0


def logging_setup():
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")


if __name__ == "__main__":
    sys.exit(main())
