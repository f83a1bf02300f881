"""Synthetic official-layout DiT checkpoints of any size, written with bounded memory.

For converter benchmarks and memory tests (a 14B-shaped checkpoint is 28 GB in bf16): the
weights are random rows drawn once per (shape of row) and reused, scaled per tensor, so
writing is disk-bound; the values are meaningless, the layout and sizes are real.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lightx2v.config import WanArch
from lightx2v.quant.stio import OutTensor, build_header

_CHUNK = 16 << 20


def official_config(arch: WanArch) -> dict:
    keys = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "freq_dim",
            "text_len", "eps")  # fmt: skip
    return {"model_type": arch.model_type, **{k: getattr(arch, k) for k in keys}}


def write_synthetic_official(root: str | Path, arch: WanArch, dtype=torch.bfloat16,
                             seed: int = 0, shard_bytes: int = 10 * 10**9) -> Path:  # fmt: skip
    """root/config.json + the DiT (official names) as diffusion_pytorch_model.safetensors, or,
    above `shard_bytes`, as numbered shards + .index.json like the published 14B models
    (a single 28 GB file cannot even be mmap'd on a 24 GB machine)."""
    from lightx2v.models.wan.dit import WanDiT

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(official_config(arch)))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanDiT(arch).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    pools: dict[int, torch.Tensor] = {}
    itemsize = torch.empty((), dtype=dtype).element_size()

    def rows_of(shape, scale):
        cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        n = shape[0] if shape else 1
        per = max(1, _CHUNK // (cols * itemsize))
        if cols not in pools:
            pools[cols] = (torch.randn(min(per, n), cols, generator=g)).to(dtype)
        pool = pools[cols]
        steps = []
        for r0 in range(0, n, per):
            r = min(per, n - r0)
            steps.append((None, lambda _, r=r: (pool[:r] if r <= pool.shape[0]
                                                 else pool.repeat(-(-r // pool.shape[0]), 1)[:r])
                          * scale))  # fmt: skip
        return steps

    tensors = []
    for k, shape in shapes.items():
        scale = 0.02 if len(shape) > 1 else 0.1
        tensors.append(OutTensor(k, dtype, shape, rows_of(shape, scale)))
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    names = (["diffusion_pytorch_model.safetensors"] if len(groups) == 1 else
             [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
              for i in range(len(groups))])  # fmt: skip
    for name, group in zip(names, groups, strict=True):
        with open(root / name, "wb") as f:
            f.write(build_header(group, {"format": "pt"}))
            for t in group:
                for _, fn in t.steps:
                    piece = fn(None).to(dtype).contiguous().reshape(-1).view(torch.uint8)
                    f.write(memoryview(piece.numpy()))
    if len(groups) > 1:
        wmap = {t.name: name for name, group in zip(names, groups, strict=True) for t in group}
        (root / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": wmap}, indent=1)
        )
    return root
