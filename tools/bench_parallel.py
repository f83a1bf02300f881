#!/usr/bin/env python3
"""Per-step time of multi-GPU denoising (CFG parallel, Ulysses, both) against one GPU.

One torchrun launch times every GPU count up to its size, the one-GPU baseline included
(rank 0 alone), on the same cards in the same run:

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    torchrun --standalone --nproc-per-node 4 tools/bench_parallel.py --json bench_parallel.json

Model: the 14B I2V architecture with random bf16 weights (built on the GPU, no checkpoint).
A step is what the sampler asks for once: the flow prediction for cond and uncond (CFG), at
480P (832x480, 81 frames: 32760 tokens) and 720P (1280x720, 81 frames: 75600 tokens).
Layouts per GPU count N: Ulysses N (CFG as a batch of 2) and CFG 2 × Ulysses N/2.
Each layout: one warm-up step, then `--iters` timed steps (1 when a step takes > 10 s);
the time of a step is the slowest rank's. The prediction of every layout is compared with
the one-GPU prediction (relative L2; bf16, so ~1e-3 is rounding, ≤ 1e-2 is the issue's bar).
A time budget (--budget-s) skips what would not finish; skipped layouts are listed.
Eager by default (--compile to compile the blocks regionally; first steps then compile).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout

from lightx2v.runtime.parallel import NVLS_OFF_ENV, disable_nvls  # noqa: E402

disable_nvls()  # before anything can create a communicator

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from lightx2v.config import ARCH_PRESETS, WanArch  # noqa: E402

SIZES = {"480p": (832, 480), "720p": (1280, 720), "tiny": (80, 48)}  # tiny: CPU smoke test
TARGETS = {  # issue 7 (2 and 4 GPUs) and issue 8 (8 GPUs): per-step speedup over one GPU
    ("480p", 2): 1.85, ("720p", 2): 1.85, ("480p", 4): 3.4, ("720p", 4): 3.7,
    ("480p", 8): 6.5, ("720p", 8): 7.0,
}  # fmt: skip


def tiny_arch() -> WanArch:
    """For a CPU smoke run of this script (gloo): 8 heads, so 8-way layouts exist."""
    return WanArch("i2v", dim=128, ffn_dim=96, num_heads=8, num_layers=2, text_dim=24,
                   image_dim=40, in_dim=36, text_len=16)  # fmt: skip


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if cuda() else 0.0


def free() -> None:
    if cuda():
        torch.cuda.empty_cache()


def device_name() -> str:
    return torch.cuda.get_device_name() if cuda() else "CPU"


def log0(*a) -> None:
    if dist.get_rank() == 0:
        print(*a, flush=True)


@torch.no_grad()
def build_model(arch: WanArch, device: torch.device, seed: int = 0):
    """Random bf16 weights straight on the GPU (no fp32 copy): matrices ~ N(0, 1/fan_in),
    norm weights 1, other vectors N(0, 0.02); the same on every rank (same seed)."""
    from lightx2v.models.wan.dit import WanDiT

    with torch.device("meta"):
        dit = WanDiT(arch)
    dit = dit.to(torch.bfloat16).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in dit.named_parameters():
        if p.dim() >= 2:
            p.normal_(0, p[0].numel() ** -0.5, generator=g)
        elif "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.normal_(0, 0.02, generator=g)
    return dit.cast(torch.bfloat16).eval()


def make_inputs(arch: WanArch, width: int, height: int, frames: int, device, seed: int = 1):
    g = torch.Generator(device=device).manual_seed(seed)
    lat = ((frames - 1) // 4 + 1, height // 8, width // 8)
    x = torch.randn(1, 16, *lat, generator=g, device=device).expand(2, -1, -1, -1, -1)
    y = torch.randn(1, arch.in_dim - 16, *lat, generator=g, device=device)
    y = y.expand(2, -1, -1, -1, -1) if arch.is_i2v else None
    ctx = torch.randn(2, arch.text_len, arch.text_dim, generator=g, device=device)
    clip = None
    if arch.is_i2v:
        clip = torch.randn(1, 257, arch.image_dim, generator=g, device=device).expand(2, -1, -1)
    t = torch.full((2,), 900.0, device=device)
    tokens = lat[0] * lat[1] * lat[2] // 4
    return (x, t, y, ctx, clip), tokens


def layouts(world: int, num_heads: int, gpu_counts: list[int]):
    """(gpus, cfg, ulysses) in the order they run: 1 GPU first, then the largest counts."""
    out = [(1, 1, 1)] if 1 in gpu_counts else []
    for n in sorted((n for n in gpu_counts if 1 < n <= world), reverse=True):
        if num_heads % n == 0:
            out.append((n, 1, n))
        if n % 2 == 0 and num_heads % (n // 2) == 0:
            out.append((n, 2, n // 2))
    return out


def fmt(v, spec: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, spec) + suffix


def table_row(r: dict) -> str:
    tgt = TARGETS.get((r["size"], r["gpus"]))
    cells = [
        r["size"], r["tokens"], r["gpus"], r["cfg"], r["ulysses"], fmt(r["s_per_step"], ".3f"),
        fmt(r["speedup"], ".2f", "x"), "" if tgt is None or r["gpus"] == 1 else f"≥ {tgt}x",
        fmt(r["rel_l2_vs_1gpu"], ".2e") + ("" if r["finite"] else " NON-FINITE"),
        fmt(r["peak_gb_max_rank"], ".1f"),
    ]  # fmt: skip
    return "| " + " | ".join(map(str, cells)) + " |"


def nccl_version() -> str:
    try:
        v = torch.cuda.nccl.version()
        return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception as e:  # noqa: BLE001 - informational only
        return f"unknown ({type(e).__name__})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="i2v-14b", choices=[*sorted(ARCH_PRESETS), "tiny"])
    p.add_argument("--sizes", default="480p,720p", help="comma list of " + ", ".join(SIZES))
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--gpus", default="1,2,4,8", help="GPU counts to time (≤ torchrun's size)")
    p.add_argument("--iters", type=int, default=2, help="timed steps per layout")
    p.add_argument("--budget-s", type=float, default=270.0, help="skip layouts past this")
    p.add_argument("--attention", default="sdpa", help="attention backend")
    p.add_argument("--compile", action="store_true", help="regional torch.compile")
    p.add_argument("--json", default="bench_parallel.json", help="rows written here")
    a = p.parse_args()

    from lightx2v.ops.attention import set_attention_backend
    from lightx2v.runtime.parallel import (
        ParallelConfig,
        exit_rank,
        init_distributed,
        make_groups,
        make_runner,
    )
    from lightx2v.runtime.runner import DiTRunner, compile_blocks

    if not cuda() and a.arch != "tiny":
        print("bench_parallel needs CUDA GPUs (run it under torchrun); on CPU only "
              "--arch tiny --sizes tiny (a smoke test)", file=sys.stderr)  # fmt: skip
        return 2
    if "RANK" not in os.environ:  # plain `python tools/bench_parallel.py`: one rank
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))  # fmt: skip
    rank, world, dev = init_distributed(timeout_s=1800)
    t_start = time.perf_counter()
    set_attention_backend(a.attention)
    arch = tiny_arch() if a.arch == "tiny" else ARCH_PRESETS[a.arch]
    sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    counts = [int(n) for n in a.gpus.split(",")]
    plan = layouts(world, arch.num_heads, counts)
    # groups first, the same calls on every rank (new_group is collective)
    groups = {
        lay: (
            make_groups(ParallelConfig(lay[1], lay[2]), list(range(lay[0]))) if lay[0] > 1 else None
        )
        for lay in plan
    }
    dit = build_model(arch, dev)
    if a.compile:
        torch._dynamo.config.cache_size_limit = 64  # one graph per layout and size
        compile_blocks(dit)
    sync()
    log0(f"bench_parallel: {a.arch} random bf16 weights on {world} × "
         f"{device_name()}, model built in {time.perf_counter() - t_start:.1f} s; "
         f"layouts (gpus, cfg, ulysses): {plan}")  # fmt: skip

    rows, skipped = [], []
    meta = {
        "arch": a.arch, "frames": a.frames, "dtype": "bf16", "attention": a.attention,
        "compile": a.compile, "world": world, "gpu": device_name(),
        "torch": torch.__version__, "nccl": nccl_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"torchrun --nproc-per-node {world} {' '.join(sys.argv)}",
        "env": {k: os.environ.get(k) for k in NVLS_OFF_ENV},
    }  # fmt: skip

    def write_json():
        if rank == 0 and a.json:
            with open(a.json, "w") as f:
                json.dump({"meta": meta, "rows": rows, "skipped": skipped}, f, indent=2)

    for size in sizes:
        width, height = SIZES[size]
        args, tokens = make_inputs(arch, width, height, a.frames, dev)
        x, t, y, ctx, clip = args
        ref = None
        for lay in plan:
            n, cfg, uly = lay
            # one decision for all ranks, made by rank 0 (its clock, its baseline)
            ok = time.perf_counter() - t_start < a.budget_s
            if rank == 0 and n > 1 and (1, 1, 1) in plan and ref is None:
                ok = False  # no baseline for this size: a speedup would mean nothing
            go = torch.tensor([int(ok)], dtype=torch.int32, device=dev)
            dist.broadcast(go, 0)
            name = f"{size} gpus={n} cfg={cfg} ulysses={uly}"
            if not bool(go.item()):
                skipped.append(name)
                log0(f"  skipped {name} (time budget)")
                dist.barrier()
                continue
            member = rank < n
            row = None
            if member:
                runner = make_runner(dit, groups[lay]) if n > 1 else DiTRunner(dit)
                runner.begin(ctx, clip)
                if cuda():
                    torch.cuda.reset_peak_memory_stats()
                sync()
                t0 = time.perf_counter()
                out = runner(x, t, y)
                sync()
                warm = time.perf_counter() - t0
                iters = 1 if warm > 10 else a.iters
                times = []
                for _ in range(iters):
                    if n > 1:
                        dist.barrier(group=groups[lay].group)
                    sync()
                    t0 = time.perf_counter()
                    out = runner(x, t, y)
                    sync()
                    times.append(time.perf_counter() - t0)
                stats = torch.tensor(
                    [statistics.mean(times), peak_gb(), warm],
                    device=dev,
                )
                if n > 1:  # the step is over when the slowest rank is done
                    dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=groups[lay].group)
                if rank == 0:
                    out = out.float()
                    if n == 1:
                        ref = out
                    finite = bool(torch.isfinite(out).all())
                    rel = None
                    if ref is not None and n > 1:
                        rel = ((out - ref).norm() / ref.norm()).item()
                    row = {
                        "size": size, "width": width, "height": height, "tokens": tokens,
                        "gpus": n, "cfg": cfg, "ulysses": uly, "s_per_step": stats[0].item(),
                        "first_step_s": stats[2].item(), "timed_steps": iters,
                        "peak_gb_max_rank": stats[1].item(), "rel_l2_vs_1gpu": rel,
                        "finite": finite,
                    }  # fmt: skip
                del runner, out
                free()
            dist.barrier()
            if row is not None:
                base = next((r for r in rows if r["size"] == size and r["gpus"] == 1), None)
                row["speedup"] = base["s_per_step"] / row["s_per_step"] if base else None
                rows.append(row)
                sp = f"{row['speedup']:.2f}x" if row["speedup"] else "-"
                rel = row["rel_l2_vs_1gpu"]
                print(f"  {name}: {row['s_per_step']:.3f} s/step ({sp}), "
                      f"first {row['first_step_s']:.2f} s, peak {row['peak_gb_max_rank']:.1f} GB, "
                      f"rel L2 vs 1 GPU {fmt(rel, '.2e')}"
                      f"{'' if row['finite'] else ', NON-FINITE'}", flush=True)  # fmt: skip
                write_json()
        del ref, args, x, t, y, ctx, clip
        free()

    if rank == 0:
        print(f"\n{a.arch}, {a.frames} frames, bf16, attention {a.attention}, "
              f"{'compiled' if a.compile else 'eager'}, {device_name()}, "
              f"{meta['date']}")  # fmt: skip
        print(
            "| size | tokens | GPUs | CFG | Ulysses | s/step | speedup | target | rel L2 vs 1 GPU | peak GB |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(table_row(r))
        for s in skipped:
            print(f"skipped: {s}")
        write_json()
        print(f"wrote {a.json}; total {time.perf_counter() - t_start:.0f} s")
    exit_rank(0)  # waits for every rank, leaves the group, skips interpreter teardown


if __name__ == "__main__":
    sys.exit(main())
