"""Reading our converted layout (written by convert.py): manifest checks, verify, DiT loading.

`open_converted(root)` is what formats.open_checkpoint calls for a directory holding
lx2v.json; `load_converted_dit` is what formats.load_dit calls for it.

Checks, cheapest first:
- opening: the manifest parses, its format version is one we know, every listed file
  exists with exactly the listed size (a truncated or replaced shard is named);
- loading: each shard's safetensors header is well-formed and covers the file, and the
  tensors match the model's names, shapes and dtypes (a corrupted header is named);
- `verify(root)` (`lx2v verify`): every file's sha256 (a flipped byte anywhere is named).
  Hashing 14 GB costs seconds, so it is not done on every load.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightx2v.config import WanArch
from lightx2v.errors import CheckpointError
from lightx2v.models.wan.formats import (
    DIFFUSERS,
    LX2V,
    Checkpoint,
    SafetensorsSource,
    read_json,
)
from lightx2v.quant.stio import index_file

KNOWN_FORMAT_VERSIONS = (1,)
MANIFEST = "lx2v.json"


@dataclass
class ConvertedCheckpoint(Checkpoint):
    """A Checkpoint in our layout; `manifest` is the parsed lx2v.json."""

    manifest: dict = field(default_factory=dict)

    @property
    def quant_scheme(self) -> str:
        return self.manifest["quant"]["scheme"]

    @property
    def keep_blocks(self) -> list[int]:
        return list(self.manifest.get("high_precision", {}).get("blocks", []))

    def dit_source(self) -> SafetensorsSource:
        """Our (fused/quantized) tensor names, lazily from the shards (mmap)."""
        return SafetensorsSource(self.dit_files)


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    m = read_json(path)
    if m.get("format") != "lx2v":
        raise CheckpointError(f"{path}: not an lx2v manifest (format={m.get('format')!r})")
    version = m.get("format_version")
    if version not in KNOWN_FORMAT_VERSIONS:
        raise CheckpointError(
            f"{path}: format version {version!r} is not supported by this lightx2v "
            f"(knows {', '.join(map(str, KNOWN_FORMAT_VERSIONS))}); convert again or upgrade"
        )
    for key in ("arch", "quant", "dit", "files"):
        if key not in m:
            raise CheckpointError(f"{path}: manifest lacks '{key}'")
    return m


def check_sizes(root: Path, manifest: dict) -> None:
    """Every file in the manifest exists with its recorded size."""
    for rel, rec in manifest["files"].items():
        p = root / rel
        if not p.is_file():
            raise CheckpointError(f"{p} is missing (listed in {root / MANIFEST})")
        size = p.stat().st_size
        if size != rec["size"]:
            what = "truncated" if size < rec["size"] else "larger than recorded"
            raise CheckpointError(
                f"{p} is {what}: {size} bytes, manifest says {rec['size']} (convert again)"
            )


def open_converted(root: str | Path) -> ConvertedCheckpoint:
    root = Path(root)
    m = read_manifest(root)
    try:
        arch = WanArch.from_json(m["arch"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{root / MANIFEST}: bad architecture ({e})") from None
    dit = m["dit"]
    rels = [*dit["blocks"], dit["rest"]]
    unlisted = [r for r in rels if r not in m["files"]]
    if unlisted:
        raise CheckpointError(f"{root / MANIFEST}: DiT shards not in 'files': {unlisted[:4]}")
    check_sizes(root, m)
    comps = m.get("components") or {}

    def comp(name: str) -> Path:
        return root / comps.get(name, name)

    i2v = arch.is_i2v
    return ConvertedCheckpoint(
        root=root,
        layout=LX2V,
        arch=arch,
        dit_files=[root / r for r in rels],
        text_encoder=comp("text_encoder"),
        tokenizer=comp("tokenizer"),
        vae=comp("vae"),
        image_encoder=comp("image_encoder") if i2v else None,
        image_processor=comp("image_processor") if i2v else None,
        component_layout=DIFFUSERS,
        manifest=m,
    )


def verify(root: str | Path) -> None:
    """Check every listed file's size and sha256; raises CheckpointError naming the first bad one."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: " + ("not a folder" if root.exists() else "not found"))
    if not (root / MANIFEST).is_file():
        raise CheckpointError(f"{root} is not a converted checkpoint (no {MANIFEST}); "
                              "verify checks the output of `lx2v convert`")  # fmt: skip
    m = read_manifest(root)
    check_sizes(root, m)
    for rel, rec in m["files"].items():
        h = hashlib.sha256()
        with open(root / rel, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        if h.hexdigest() != rec["sha256"]:
            raise CheckpointError(f"{root / rel} is corrupt: sha256 differs from the manifest")


def load_converted_dit(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device="cpu",
                       backend: str | None = None):  # fmt: skip
    """Build WanDiT on meta, fuse/quantize it as the manifest says, fill it from the shards.

    `dtype` is the compute dtype (bf16 on GPU): high-precision layers follow WanDiT.cast's
    policy; quantized weights keep their 8-bit dtype and fp32 scales.
    """
    from lightx2v.models.wan.dit import WanDiT
    from lightx2v.quant.linear import quantize_dit

    m = ckpt.manifest if isinstance(ckpt, ConvertedCheckpoint) else read_manifest(ckpt.root)
    scheme = m["quant"]["scheme"]
    keep = m.get("high_precision", {}).get("blocks", [])
    device = torch.device(device)
    with torch.device("meta"):
        model = WanDiT(ckpt.arch)
    quantize_dit(model, scheme, keep_blocks=keep, backend=backend, device=device)
    model.cast(dtype)
    expected = dict(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for f in ckpt.dit_files:
        index_file(f)  # header well-formed and consistent with the file size, else named
        src = SafetensorsSource([f])
        for name in src.keys():
            ref = expected.get(name)
            if ref is None:
                raise CheckpointError(f"{f}: tensor {name!r} has no place in the model")
            t = src.get(name)
            if tuple(t.shape) != tuple(ref.shape):
                raise CheckpointError(
                    f"{f}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
                )
            if ref.dtype in (torch.float8_e4m3fn, torch.int8) and t.dtype != ref.dtype:
                raise CheckpointError(f"{f}: tensor {name} is {t.dtype}, expected {ref.dtype}")
            state[name] = t.to(device=device, dtype=ref.dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(
            f"converted DiT in {ckpt.root} lacks {len(missing)} tensor(s): {', '.join(missing[:8])}"
        )
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)
