"""SM clock and power while attention backends run back to back: is the kernel clock-bound?

    PYTHONPATH=. python3 tools/attention_clocks.py [--seconds 6] [--S 32760] [--B 1] \\
        [--json clocks.json]

Each backend runs in a loop for --seconds (after a warm-up) while `nvidia-smi` samples the
SM clock, power draw and temperature every 100 ms. Per backend it prints TFLOP/s
(4·S²·D·H·B over the mean call time, quantisation included), the median SM clock and power
over its window, and TFLOP/s per GHz (the rate at a fixed clock, to compare backends and
runs whose clocks differ). Idle gaps of 2 s between backends let the card cool a little;
the order is fixed, so compare within one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightx2v.kernels.attention as K  # noqa: E402

from lightx2v.ops.attention import attention_sdpa  # noqa: E402


def backends():
    return {
        "sdpa": attention_sdpa,
        "lx2v-int8-int8": lambda q, k, v: K.attention_int8(q, k, v, "int8"),
        "lx2v-int8-fp8": lambda q, k, v: K.attention_int8(q, k, v, "fp8"),
    }


def _num(field: str) -> float:
    try:
        return float(field.split()[0])
    except (ValueError, IndexError):  # "[N/A]" where the driver does not report it
        return float("nan")


def sample_clocks(log: Path) -> list[tuple[float, float, float, float]]:
    """(time.time(), SM MHz, W, °C) rows from nvidia-smi's CSV lines."""
    rows = []
    for line in log.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        except ValueError:
            continue
        rows.append((t, _num(parts[1]), _num(parts[2]), _num(parts[3])))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--S", type=int, default=32760)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=40)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("attention_clocks: needs a CUDA GPU", file=sys.stderr)
        return 2
    S, B, H = args.S, args.B, args.H
    flops = 4 * S * S * 128 * H * B
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(B, S, H, 128, device="cuda", generator=g, dtype=torch.bfloat16)
        for _ in range(3)
    )
    log = Path(f"/tmp/attention_clocks_{int(time.time())}.csv")
    query = "timestamp,clocks.sm,power.draw,temperature.gpu"
    # this process's GPU only (by UUID, so CUDA_VISIBLE_DEVICES is respected)
    gpu = [f"--id=GPU-{torch.cuda.get_device_properties(0).uuid}"]
    cmd = ["nvidia-smi", *gpu, f"--query-gpu={query}", "--format=csv,noheader", "-lms", "100"]
    try:
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        print("attention_clocks: needs nvidia-smi on the PATH", file=sys.stderr)
        return 2
    windows = {}
    try:
        time.sleep(1.0)
        for name, fn in backends().items():
            fn(q, k, v)  # warm-up, compilation
            torch.cuda.synchronize()
            time.sleep(2.0)
            t0 = time.time()
            n = 0
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            while time.time() - t0 < args.seconds:
                fn(q, k, v)
                n += 1
                if n % 4 == 0:
                    torch.cuda.synchronize()  # keep the host within a few calls of the GPU
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end) / n
            windows[name] = (t0 + 1.0, time.time(), ms, n)  # skip the first second
    finally:
        time.sleep(0.3)
        proc.terminate()
        proc.wait()
    samples = sample_clocks(log)
    props = torch.cuda.get_device_properties(0)
    result = dict(card=props.name, date=datetime.date.today().isoformat(), S=S, B=B, H=H,
                  torch=torch.__version__, samples=len(samples), rows=[])  # fmt: skip
    print(f"{props.name}, S={S}, B={B}, H={H}, {len(samples)} clock samples")
    print(f"{'backend':16s} {'TFLOP/s':>8s} {'calls':>6s} {'SM MHz':>7s} {'W':>6s} {'°C':>4s} "
          f"{'TFLOP/s/GHz':>11s}")  # fmt: skip
    for name, (t0, t1, ms, n) in windows.items():
        inside = [r for r in samples if t0 <= r[0] <= t1]
        tf = flops / ms / 1e9
        row = dict(backend=name, ms=ms, calls=n, tflops=tf)
        if inside:
            mhz = statistics.median(r[1] for r in inside)
            row.update(sm_mhz=mhz, watts=statistics.median(r[2] for r in inside),
                       temp_c=max(r[3] for r in inside), tflops_per_ghz=tf / (mhz / 1000))  # fmt: skip
            print(f"{name:16s} {tf:8.1f} {n:6d} {mhz:7.0f} {row['watts']:6.0f} "
                  f"{row['temp_c']:4.0f} {row['tflops_per_ghz']:11.1f}")  # fmt: skip
        else:
            print(f"{name:16s} {tf:8.1f} {n:6d}   (no clock samples in its window)")
        result["rows"].append(row)
    if args.json:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
