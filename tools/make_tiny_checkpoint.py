#!/usr/bin/env python3
"""Write a tiny random-weight Wan2.1 checkpoint in the official or diffusers layout.

    python tools/make_tiny_checkpoint.py OUT --task i2v --layout diffusers --seed 0

The weights are random (the video is noise); files, key names and shapes follow the real
layouts, so every loader runs as on a downloaded checkpoint.
"""

import argparse
import sys

from lightx2v.models.wan.tiny import write_tiny_checkpoint


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="directory to create")
    p.add_argument("--task", choices=["t2v", "i2v"], default="t2v")
    p.add_argument("--layout", choices=["official", "diffusers"], default="official")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1, help="split the DiT into N safetensors shards")
    a = p.parse_args()
    arch = write_tiny_checkpoint(a.out, a.task, a.layout, a.seed, a.shards)
    print(f"wrote {a.layout} {a.task} checkpoint to {a.out}: {arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
