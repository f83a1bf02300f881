"""Checkpoint layouts: recognise a directory, read its architecture, yield DiT tensors.

Layouts:
- official Wan2.1: config.json, diffusion_pytorch_model*.safetensors (+ .index.json),
  models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/, Wan2.1_VAE.pth, and for I2V
  models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth, xlm-roberta-large/.
- diffusers: model_index.json, transformer/, text_encoder/, tokenizer/, vae/,
  image_encoder/, image_processor/, scheduler/.
- lx2v (ours, written by `lx2v convert`): lx2v.json manifest; see lightx2v/quant.

Our DiT uses the official parameter names; DIT_TOP_KEYS / DIT_BLOCK_KEYS are the one key
map between the official and diffusers names.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lightx2v.config import WanArch
from lightx2v.errors import CheckpointError, LX2VError
from lightx2v.fileio import key_mismatch, short_list

OFFICIAL, DIFFUSERS, LX2V = "official", "diffusers", "lx2v"

# official name (module path) → diffusers name, outside the blocks
DIT_TOP_KEYS = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}
# official → diffusers, inside `blocks.N.` (note the two swap the names norm2/norm3)
DIT_BLOCK_KEYS = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
}


def _rename(key: str, top: dict[str, str], block: dict[str, str]) -> str | None:
    def sub(name: str, table: dict[str, str]) -> str | None:
        for src, dst in table.items():
            if name == src or name.startswith(src + "."):
                return dst + name[len(src) :]
        return None

    if key.startswith("blocks."):
        _, idx, rest = key.split(".", 2)
        new = sub(rest, block)
        return None if new is None else f"blocks.{idx}.{new}"
    return sub(key, top)


_INV_TOP = {v: k for k, v in DIT_TOP_KEYS.items()}
_INV_BLOCK = {v: k for k, v in DIT_BLOCK_KEYS.items()}


def official_to_diffusers(key: str) -> str | None:
    """Official DiT parameter name → diffusers name (None if it has no counterpart)."""
    return _rename(key, DIT_TOP_KEYS, DIT_BLOCK_KEYS)


def diffusers_to_official(key: str) -> str | None:
    """diffusers DiT parameter name → official name (None if it has no counterpart)."""
    return _rename(key, _INV_TOP, _INV_BLOCK)


# ---------------------------------------------------------------------------------------
# lazy tensor access


class SafetensorsSource:
    """Tensors from one or more safetensors files, by (renamed) key, read lazily (mmap)."""

    def __init__(self, files: list[Path], rename: Callable[[str], str | None] = lambda k: k):
        self._where: dict[str, tuple[object, str]] = {}
        self.unmapped: list[str] = []
        self._handles = []
        for f in files:
            h = open_safetensors(f)
            self._handles.append(h)
            for raw in h.keys():
                name = rename(raw)
                if name is None:
                    self.unmapped.append(raw)
                else:
                    self._where[name] = (h, raw, f)

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        h, raw, _ = self._where[key]
        return tuple(h.get_slice(raw).get_shape())

    def get(self, key: str) -> torch.Tensor:
        h, raw, f = self._where[key]
        try:
            return h.get_tensor(raw)
        except (SafetensorError, RuntimeError, OSError) as e:
            raise CheckpointError(f"cannot read tensor {raw!r} from {f}: {e}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)


def open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _weight_files(folder: Path, stem: str) -> list[Path]:
    """`stem.safetensors`, or the shards listed by `stem.safetensors.index.json`."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.exists():
        files = sorted({folder / f for f in read_json(index).get("weight_map", {}).values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"shards listed in {index} are missing: {', '.join(missing[:5])}")
        return files
    single = folder / f"{stem}.safetensors"
    if single.exists():
        return [single]
    shards = sorted(folder.glob(f"{stem}-*-of-*.safetensors"))
    if shards:
        return shards
    raise CheckpointError(f"no DiT weights in {folder} (expected {stem}.safetensors or shards)")


# ---------------------------------------------------------------------------------------
# checkpoint directories


@dataclass
class Checkpoint:
    """A recognised checkpoint directory: its layout, architecture and component paths."""

    root: Path
    layout: str
    arch: WanArch
    dit_files: list[Path]
    text_encoder: Path  # official: .pth; diffusers: folder
    tokenizer: Path
    vae: Path  # official: .pth; diffusers: folder
    image_encoder: Path | None = None  # I2V only
    image_processor: Path | None = None
    # how the encoders/VAE are stored: "official" (.pth files) or "diffusers" (folders);
    # converted checkpoints store them diffusers-style as safetensors
    component_layout: str = ""

    def __post_init__(self):
        if not self.component_layout:
            self.component_layout = OFFICIAL if self.layout == OFFICIAL else DIFFUSERS

    @property
    def task(self) -> str:
        return self.arch.model_type

    def dit_source(self) -> SafetensorsSource:
        rename = diffusers_to_official if self.layout == DIFFUSERS else (lambda k: k)
        return SafetensorsSource(self.dit_files, rename)

    def check_files(self) -> None:
        """Every component the pipeline will load must exist (checked before any work)."""
        need = [self.text_encoder, self.tokenizer, self.vae]
        if self.arch.is_i2v:
            need.append(self.image_encoder)
        missing = [str(p) for p in need if p is None or not p.exists()]
        if missing:
            raise CheckpointError(f"checkpoint {self.root} is missing: {', '.join(missing)}")


def detect_layout(root: Path) -> str:
    if not root.exists():
        raise CheckpointError(f"model directory {root} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"--model {root} is not a directory")
    if (root / "lx2v.json").exists():
        return LX2V
    if (root / "model_index.json").exists():
        return DIFFUSERS
    if (root / "config.json").exists() and any(root.glob("diffusion_pytorch_model*.safetensors")):
        return OFFICIAL
    raise CheckpointError(
        f"{root} is not a Wan2.1 checkpoint: expected the official layout (config.json + "
        "diffusion_pytorch_model*.safetensors), the diffusers layout (model_index.json) "
        "or a converted one (lx2v.json)"
    )


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Recognise a checkpoint directory and read its architecture (no weights are loaded)."""
    root = Path(path).expanduser()
    layout = detect_layout(root)
    if layout == OFFICIAL:
        return _open_official(root)
    if layout == DIFFUSERS:
        return _open_diffusers(root)
    from lightx2v.quant.layout import open_converted  # the converter owns that format

    return open_converted(root)


def _arch_from_shapes(src: SafetensorsSource, base: dict, where: Path) -> WanArch:
    try:
        text_dim = src.shape("text_embedding.0.weight")[1]
        base.setdefault("text_dim", text_dim)
        if base.get("model_type") == "i2v":
            base["image_dim"] = src.shape("img_emb.proj.0.weight")[0]
        return WanArch.from_json(base)
    except KeyError as e:
        raise CheckpointError(f"DiT weights in {where} lack tensor {e}") from None
    except TypeError as e:
        raise CheckpointError(f"config in {where} is incomplete: {e}") from None
    except CheckpointError:
        raise
    except LX2VError as e:  # a wrong value in the config (WanArch checks them)
        raise CheckpointError(f"config in {where}: {e}") from None


def _open_official(root: Path) -> Checkpoint:
    cfg = read_json(root / "config.json")
    model_type = cfg.get("model_type", "t2v")
    if model_type not in ("t2v", "i2v"):
        raise CheckpointError(f"{root}/config.json: model_type {model_type!r} is not supported")
    files = _weight_files(root, "diffusion_pytorch_model")
    src = SafetensorsSource(files)
    base = {k: cfg[k] for k in ("model_type", "dim", "ffn_dim", "num_heads", "num_layers",
                                "in_dim", "out_dim", "freq_dim", "text_len", "eps") if k in cfg}  # fmt: skip
    base.setdefault("model_type", model_type)
    arch = _arch_from_shapes(src, base, root)
    i2v = arch.is_i2v
    return Checkpoint(
        root=root,
        layout=OFFICIAL,
        arch=arch,
        dit_files=files,
        text_encoder=root / "models_t5_umt5-xxl-enc-bf16.pth",
        tokenizer=root / "google" / "umt5-xxl",
        vae=root / "Wan2.1_VAE.pth",
        image_encoder=root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
        if i2v
        else None,
        image_processor=None,
    )


def _open_diffusers(root: Path) -> Checkpoint:
    tdir = root / "transformer"
    cfg = read_json(tdir / "config.json")
    if cfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise CheckpointError(f"{tdir}/config.json: qk_norm {cfg['qk_norm']!r} is not Wan2.1's")
    if cfg.get("cross_attn_norm") is False:
        raise CheckpointError(f"{tdir}/config.json: cross_attn_norm=false is not Wan2.1's")
    try:
        heads = cfg["num_attention_heads"]
        base = {
            "model_type": "i2v" if cfg.get("image_dim") else "t2v",
            "dim": heads * cfg["attention_head_dim"],
            "ffn_dim": cfg["ffn_dim"],
            "num_heads": heads,
            "num_layers": cfg["num_layers"],
            "in_dim": cfg.get("in_channels", 16),
            "out_dim": cfg.get("out_channels", 16),
            "freq_dim": cfg.get("freq_dim", 256),
            "eps": cfg.get("eps", 1e-6),
            "patch_size": cfg.get("patch_size", [1, 2, 2]),
        }
    except KeyError as e:
        raise CheckpointError(f"{tdir}/config.json lacks {e}") from None
    files = _weight_files(tdir, "diffusion_pytorch_model")
    arch = _arch_from_shapes(SafetensorsSource(files, diffusers_to_official), base, tdir)
    i2v = arch.is_i2v
    return Checkpoint(
        root=root,
        layout=DIFFUSERS,
        arch=arch,
        dit_files=files,
        text_encoder=root / "text_encoder",
        tokenizer=root / "tokenizer",
        vae=root / "vae",
        image_encoder=root / "image_encoder" if i2v else None,
        image_processor=root / "image_processor" if i2v else None,
    )


# ---------------------------------------------------------------------------------------
# building the DiT


def _check_keys(expected: set[str], found: set[str], where: Path) -> None:
    problem = key_mismatch(expected - found, found - expected)
    if problem:
        raise CheckpointError(f"DiT weights in {where} do not match the architecture: {problem}")


def load_dit_weights(model: torch.nn.Module, src: SafetensorsSource, where: Path, device) -> None:
    """Fill a (meta-device) DiT from a tensor source; keys and shapes must match exactly."""
    expected = dict(model.state_dict())
    _check_keys(set(expected), set(src.keys()), where)
    if src.unmapped:
        raise CheckpointError(
            f"DiT weights in {where} have keys with no meaning here: {short_list(src.unmapped)}"
        )
    state = {}
    for name, ref in expected.items():
        t = src.get(name)
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{where}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
            )
        state[name] = t.to(device)
    model.load_state_dict(state, assign=True)


def load_dit(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device="cpu"):
    """Build our WanDiT from a checkpoint (official, diffusers or converted layout)."""
    from lightx2v.models.wan.dit import WanDiT

    if ckpt.layout == LX2V:
        from lightx2v.quant.layout import load_converted_dit

        return load_converted_dit(ckpt, dtype, device)

    with torch.device("meta"):
        model = WanDiT(ckpt.arch)
    load_dit_weights(model, ckpt.dit_source(), ckpt.root, device)
    return model.cast(dtype).eval().requires_grad_(False)
