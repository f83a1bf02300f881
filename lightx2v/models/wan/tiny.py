"""Tiny random-weight Wan2.1 checkpoints in the real file layouts.

Used as the embedded default model of `lx2v run` and as test fixtures. The weights are
random, so the video is noise; what is real is every file, key name and shape rule, so
the same loaders run as on a downloaded checkpoint. `tools/make_tiny_checkpoint.py` is
the command-line front.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from lightx2v.config import WanArch
from lightx2v.models.wan.formats import DIFFUSERS, OFFICIAL, official_to_diffusers

TEXT_DIM = 32  # tiny umT5 width = the DiT's text_dim
IMAGE_DIM = 160  # tiny CLIP width (2 heads of 80, as ViT-H/14's head size) = image_dim


def tiny_arch(task: str) -> WanArch:
    return WanArch(
        task,
        dim=64,
        ffn_dim=128,
        num_heads=2,
        num_layers=2,
        in_dim=36 if task == "i2v" else 16,
        text_dim=TEXT_DIM,
        image_dim=IMAGE_DIM,
    )


def random_dit_state(arch: WanArch, seed: int) -> dict[str, torch.Tensor]:
    """A WanDiT state dict (official names) with every parameter random and finite."""
    from lightx2v.models.wan.dit import WanDiT

    torch.manual_seed(seed)
    model = WanDiT(arch)  # default PyTorch init for convs/linears
    g = torch.Generator().manual_seed(seed + 1)
    state = {}
    for name, t in model.state_dict().items():
        if "modulation" in name:  # official init: randn / sqrt(dim)
            t = torch.randn(t.shape, generator=g) / arch.dim**0.5
        elif "norm" in name:  # norms near identity, but not exactly (so the key map matters)
            t = (name.endswith(".weight") + 0.1 * torch.randn(t.shape, generator=g)).float()
        state[name] = t.contiguous().clone()
    return state


def _official_config(arch: WanArch) -> dict:
    return {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "model_type": arch.model_type,
        "dim": arch.dim,
        "ffn_dim": arch.ffn_dim,
        "freq_dim": arch.freq_dim,
        "in_dim": arch.in_dim,
        "num_heads": arch.num_heads,
        "num_layers": arch.num_layers,
        "out_dim": arch.out_dim,
        "text_len": arch.text_len,
        "eps": arch.eps,
    }


def _diffusers_config(arch: WanArch) -> dict:
    return {
        "_class_name": "WanTransformer3DModel",
        "_diffusers_version": "0.42.1",
        "patch_size": list(arch.patch_size),
        "num_attention_heads": arch.num_heads,
        "attention_head_dim": arch.head_dim,
        "in_channels": arch.in_dim,
        "out_channels": arch.out_dim,
        "text_dim": arch.text_dim,
        "freq_dim": arch.freq_dim,
        "ffn_dim": arch.ffn_dim,
        "num_layers": arch.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": arch.eps,
        "image_dim": arch.image_dim if arch.is_i2v else None,
        "added_kv_proj_dim": arch.dim if arch.is_i2v else None,
        "rope_max_seq_len": 1024,
    }


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _save_shards(state: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    stem = "diffusion_pytorch_model"
    folder.mkdir(parents=True, exist_ok=True)
    if shards <= 1:
        save_file(state, str(folder / f"{stem}.safetensors"))
        return
    names = list(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, str(folder / fname))
        weight_map.update(dict.fromkeys(part, fname))
    _write_json(
        folder / f"{stem}.safetensors.index.json", {"metadata": {}, "weight_map": weight_map}
    )


def write_tiny_checkpoint(
    root: str | Path, task: str = "t2v", layout: str = OFFICIAL, seed: int = 0, shards: int = 1
) -> WanArch:
    """Write a complete tiny checkpoint (DiT, umT5, VAE, tokenizers; CLIP for I2V) into root."""
    from lightx2v.models.wan.encoders import write_tiny_image_encoder, write_tiny_text_encoder
    from lightx2v.models.wan.vae import write_tiny_vae

    if layout not in (OFFICIAL, DIFFUSERS):
        raise ValueError(f"layout must be {OFFICIAL!r} or {DIFFUSERS!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    arch = tiny_arch(task)
    state = random_dit_state(arch, seed)
    if layout == OFFICIAL:
        _write_json(root / "config.json", _official_config(arch))
        _save_shards(state, root, shards)
    else:
        _write_json(root / "transformer" / "config.json", _diffusers_config(arch))
        _save_shards(
            {official_to_diffusers(k): v for k, v in state.items()}, root / "transformer", shards
        )
        pipe = "WanImageToVideoPipeline" if arch.is_i2v else "WanPipeline"
        index = {
            "_class_name": pipe,
            "_diffusers_version": "0.42.1",
            "scheduler": ["diffusers", "UniPCMultistepScheduler"],
            "text_encoder": ["transformers", "UMT5EncoderModel"],
            "tokenizer": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLWan"],
        }
        if arch.is_i2v:
            index["image_encoder"] = ["transformers", "CLIPVisionModel"]
            index["image_processor"] = ["transformers", "CLIPImageProcessor"]
        _write_json(root / "model_index.json", index)
        _write_json(
            root / "scheduler" / "scheduler_config.json",
            {
                "_class_name": "UniPCMultistepScheduler",
                "num_train_timesteps": 1000,
                "prediction_type": "flow_prediction",
                "use_flow_sigmas": True,
                "flow_shift": 5.0,
                "solver_order": 2,
                "solver_type": "bh2",
                "predict_x0": True,
            },
        )
    write_tiny_text_encoder(root, layout, seed=seed, d_model=TEXT_DIM)
    write_tiny_vae(root, layout, seed=seed)
    if arch.is_i2v:
        write_tiny_image_encoder(root, layout, seed=seed, width=IMAGE_DIM)
    return arch


# Bumped whenever the tiny files change, so an old cached copy is not reused.
TINY_VERSION = 1


def cache_dir() -> Path:
    base = os.environ.get("LX2V_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lightx2v"
    )
    return Path(base)


def embedded_checkpoint(task: str) -> Path:
    """The embedded default model for `task`, created once in the cache folder."""
    target = cache_dir() / f"tiny-wan2.1-{task}-v{TINY_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write_tiny_checkpoint(tmp, task, OFFICIAL, seed=0)
        try:
            os.replace(tmp, target)
        except OSError:  # another process created it first
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
