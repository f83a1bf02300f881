"""The Wan2.1 video VAE: loading (official .pth or diffusers folder), normalised encode/decode,
tiled decode and the I2V condition.

The network itself is diffusers' `AutoencoderKLWan`; this module owns what sits around it:
the official -> diffusers key map, the architecture read from tensor shapes, the per-channel
latent normalisation the DiT was trained with, and the 20-channel I2V condition.

Shapes: video [B, 3, F, H, W] in [-1, 1] with F = 4k + 1 and H, W multiples of 8;
latent [B, z, (F - 1) // 4 + 1, H / 8, W / 8] with z = 16 for Wan2.1.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan
from safetensors import SafetensorError
from safetensors.torch import load_file

from lightx2v.errors import CheckpointError, LX2VError
from lightx2v.fileio import atomic_torch_save, key_mismatch, load_pth, short_list

OFFICIAL_FILENAME = "Wan2.1_VAE.pth"

# Per-channel statistics of the Wan2.1 latent space (wan/modules/vae.py, WanVAE.__init__; the
# same numbers are diffusers' AutoencoderKLWan defaults). They are part of the format, not of
# the weights: the DiT was trained on (mu - mean) / std, so a tiny random VAE uses them too.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

TEMPORAL_STRIDE = 4  # pixel frames per latent frame (after the first, which stands alone)
SPATIAL_STRIDE = 8

# A size where a 5-frame 32x48 encode + decode takes a fraction of a second on one CPU core.
# base_dim must be even (the decoder's upsamplers halve channels); RMS norms and the
# single-head attention accept any width.
TINY_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,  # as in Wan2.1, so the stage layout of the key map is the real one
    "temperal_downsample": [False, True, True],
}


# --------------------------------------------------------------------------------------------
# Official <-> diffusers key map
#
# Official (wan/modules/vae.py, WanVAE_):        diffusers (AutoencoderKLWan):
#   conv1 / conv2                                  quant_conv / post_quant_conv
#   {enc,dec}oder.conv1                            {enc,dec}oder.conv_in
#   {enc,dec}oder.middle.{0,1,2}                   .mid_block.resnets.0 / attentions.0 / resnets.1
#   {enc,dec}oder.head.{0,2}                       .norm_out / .conv_out
#   encoder.downsamples.N (flat Sequential)        encoder.down_blocks.N (flat ModuleList)
#   decoder.upsamples.N (flat: per stage R+1       decoder.up_blocks.S.resnets.r /
#     residual blocks, then one resample)            decoder.up_blocks.S.upsamplers.0
#   residual.{0,2,3,6}, shortcut                   norm1, conv1, norm2, conv2, conv_shortcut
# Resample internals (resample.1, time_conv) and attention internals (norm, to_qkv, proj) keep
# their names. Wan2.1 has no attention in the down/up stages (attn_scales=[]).
# --------------------------------------------------------------------------------------------

# residual.K indexes the official nn.Sequential(norm, SiLU, conv, norm, SiLU, Dropout, conv).
_RESBLOCK_OFFICIAL_TO_DIFFUSERS = {
    "residual.0": "norm1",
    "residual.2": "conv1",
    "residual.3": "norm2",
    "residual.6": "conv2",
    "shortcut": "conv_shortcut",
}
_RESBLOCK_DIFFUSERS_TO_OFFICIAL = {v: k for k, v in _RESBLOCK_OFFICIAL_TO_DIFFUSERS.items()}
_TOP_OFFICIAL_TO_DIFFUSERS = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
_TOP_DIFFUSERS_TO_OFFICIAL = {v: k for k, v in _TOP_OFFICIAL_TO_DIFFUSERS.items()}
_CODER_OFFICIAL_TO_DIFFUSERS = {
    "conv1": "conv_in",
    "head.0": "norm_out",
    "head.2": "conv_out",
    "middle.0": "mid_block.resnets.0",
    "middle.1": "mid_block.attentions.0",
    "middle.2": "mid_block.resnets.1",
}
_CODER_DIFFUSERS_TO_OFFICIAL = {v: k for k, v in _CODER_OFFICIAL_TO_DIFFUSERS.items()}
_PARAM = r"(weight|bias|gamma)"


def _rename_resblock_part(rest: str, table: dict[str, str]) -> str | None:
    """Maps `<resblock sub-module>.<param>` through `table`; None if it is not a resblock part."""
    for src, dst in table.items():
        m = re.fullmatch(re.escape(src) + r"\." + _PARAM, rest)
        if m:
            return f"{dst}.{m.group(1)}"
    return None


def _rename_block_part(rest: str, table: dict[str, str]) -> str | None:
    """A residual block part, or a resample / attention part (names shared by both layouts)."""
    renamed = _rename_resblock_part(rest, table)
    if renamed is not None:
        return renamed
    if re.fullmatch(r"(resample\.1|time_conv|norm|to_qkv|proj)\." + _PARAM, rest):
        return rest
    return None


def official_to_diffusers_key(key: str, num_res_blocks: int) -> str | None:
    """Name of an official Wan2.1 VAE tensor in AutoencoderKLWan; None if the key is not one."""
    m = re.fullmatch(r"(conv1|conv2)\.(weight|bias)", key)
    if m:
        return f"{_TOP_OFFICIAL_TO_DIFFUSERS[m.group(1)]}.{m.group(2)}"
    m = re.fullmatch(r"(encoder|decoder)\.(conv1|head\.0|head\.2|middle\.[012])\.(.+)", key)
    if m:
        coder, part, rest = m.groups()
        if part.startswith("middle"):
            rest = _rename_block_part(rest, _RESBLOCK_OFFICIAL_TO_DIFFUSERS)
        elif not re.fullmatch(_PARAM, rest):
            rest = None
        return None if rest is None else f"{coder}.{_CODER_OFFICIAL_TO_DIFFUSERS[part]}.{rest}"
    m = re.fullmatch(r"encoder\.downsamples\.(\d+)\.(.+)", key)
    if m:
        rest = _rename_block_part(m.group(2), _RESBLOCK_OFFICIAL_TO_DIFFUSERS)
        return None if rest is None else f"encoder.down_blocks.{m.group(1)}.{rest}"
    m = re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", key)
    if m:
        # Each decoder stage is num_res_blocks + 1 residual blocks followed by one resample
        # (absent in the last stage, which does not change the index of anything before it).
        stage, pos = divmod(int(m.group(1)), num_res_blocks + 2)
        rest = m.group(2)
        if pos <= num_res_blocks:
            rest = _rename_resblock_part(rest, _RESBLOCK_OFFICIAL_TO_DIFFUSERS)
            where = f"resnets.{pos}"
        else:
            rest = rest if re.fullmatch(r"(resample\.1|time_conv)\." + _PARAM, rest) else None
            where = "upsamplers.0"
        return None if rest is None else f"decoder.up_blocks.{stage}.{where}.{rest}"
    return None


def diffusers_to_official_key(key: str, num_res_blocks: int) -> str | None:
    """Inverse of `official_to_diffusers_key`; None if the key is not an AutoencoderKLWan one."""
    m = re.fullmatch(r"(quant_conv|post_quant_conv)\.(weight|bias)", key)
    if m:
        return f"{_TOP_DIFFUSERS_TO_OFFICIAL[m.group(1)]}.{m.group(2)}"
    m = re.fullmatch(
        r"(encoder|decoder)\.(conv_in|norm_out|conv_out|mid_block\.(?:resnets|attentions)\.\d)\.(.+)",
        key,
    )
    if m:
        coder, part, rest = m.groups()
        if part not in _CODER_DIFFUSERS_TO_OFFICIAL:
            return None
        if part.startswith("mid_block"):
            rest = _rename_block_part(rest, _RESBLOCK_DIFFUSERS_TO_OFFICIAL)
        elif not re.fullmatch(_PARAM, rest):
            rest = None
        return None if rest is None else f"{coder}.{_CODER_DIFFUSERS_TO_OFFICIAL[part]}.{rest}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key)
    if m:
        rest = _rename_block_part(m.group(2), _RESBLOCK_DIFFUSERS_TO_OFFICIAL)
        return None if rest is None else f"encoder.downsamples.{m.group(1)}.{rest}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)", key)
    if m:
        stage, res_idx, rest = int(m.group(1)), m.group(3), m.group(4)
        if res_idx is not None:
            if int(res_idx) > num_res_blocks:
                return None
            pos = int(res_idx)
            rest = _rename_resblock_part(rest, _RESBLOCK_DIFFUSERS_TO_OFFICIAL)
        else:
            pos = num_res_blocks + 1
            rest = rest if re.fullmatch(r"(resample\.1|time_conv)\." + _PARAM, rest) else None
        index = stage * (num_res_blocks + 2) + pos
        return None if rest is None else f"decoder.upsamples.{index}.{rest}"
    return None


# --------------------------------------------------------------------------------------------
# Architecture from shapes
# --------------------------------------------------------------------------------------------


def _require(sd: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{path}: not a Wan2.1 VAE checkpoint (no tensor {key!r})")
    return sd[key]


def infer_official_config(sd: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """AutoencoderKLWan constructor arguments for an official-layout state dict.

    Read from shapes: base_dim (encoder.conv1 out channels), z_dim (conv2), the stage layout
    of encoder.downsamples (residual blocks split by resamples -> len(dim_mult) and
    num_res_blocks), dim_mult (each stage's output channels / base_dim), temporal downsampling
    (a resample with a time_conv), and the decoder width (decoder.head.2 input channels).
    """
    conv_in = _require(sd, "encoder.conv1.weight", path)  # [base_dim, 3, 3, 3, 3]
    base_dim = conv_in.shape[0]
    z_dim = _require(sd, "conv2.weight", path).shape[0]  # [z, z, 1, 1, 1]
    head_out = _require(sd, "decoder.head.2.weight", path)  # [3, dec_dim * dim_mult[0], 3, 3, 3]

    indices = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")})
    stages: list[list[int]] = [[]]  # output channels of each stage's residual blocks
    temporal: list[bool] = []
    for i in indices:
        prefix = f"encoder.downsamples.{i}."
        if prefix + "residual.2.weight" in sd:
            stages[-1].append(sd[prefix + "residual.2.weight"].shape[0])
        elif prefix + "resample.1.weight" in sd:
            temporal.append(prefix + "time_conv.weight" in sd)
            stages.append([])
    num_res_blocks = len(stages[0])
    if num_res_blocks == 0 or any(len(s) != num_res_blocks for s in stages):
        counts = [len(s) for s in stages]
        raise CheckpointError(
            f"{path}: encoder stages have unequal residual block counts {counts}; "
            "not a Wan2.1 VAE layout"
        )
    if any(c % base_dim for s in stages for c in s):
        raise CheckpointError(f"{path}: encoder widths {stages} are not multiples of {base_dim}")
    dim_mult = [s[-1] // base_dim for s in stages]
    decoder_base_dim = head_out.shape[1] // dim_mult[0]
    return {
        "base_dim": base_dim,
        "decoder_base_dim": None if decoder_base_dim == base_dim else decoder_base_dim,
        "z_dim": z_dim,
        "dim_mult": dim_mult,
        "num_res_blocks": num_res_blocks,
        "temperal_downsample": temporal,
        "in_channels": conv_in.shape[1],
        "out_channels": head_out.shape[0],
        "latents_mean": list(WAN21_LATENTS_MEAN),
        "latents_std": list(WAN21_LATENTS_STD),
    }


# --------------------------------------------------------------------------------------------
# Loading helpers
# --------------------------------------------------------------------------------------------


def _build_and_load(
    config: dict[str, Any], sd: dict[str, torch.Tensor], source: str, dtype: torch.dtype
) -> AutoencoderKLWan:
    """Builds AutoencoderKLWan on the meta device and assigns `sd` (diffusers names, cast to
    `dtype`) to it; no weights are initialised only to be overwritten.

    Missing, unexpected and wrongly-shaped tensors are one CheckpointError naming them.
    """
    with torch.device("meta"):
        model = AutoencoderKLWan.from_config(config)
    expected = model.state_dict()
    problem = key_mismatch(set(expected) - set(sd), set(sd) - set(expected))
    if problem:
        raise CheckpointError(f"{source}: VAE checkpoint does not match: {problem}")
    wrong = [
        f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if sd[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError(f"{source}: VAE tensors of the wrong shape: {short_list(wrong, 3)}")
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _load_diffusers_weights(vae_dir: Path) -> dict[str, torch.Tensor]:

    single = vae_dir / "diffusion_pytorch_model.safetensors"
    index = vae_dir / "diffusion_pytorch_model.safetensors.index.json"
    try:
        if single.is_file():
            return load_file(single, device="cpu")
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(load_file(vae_dir / shard, device="cpu"))
            return sd
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # corrupt or truncated files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{vae_dir}: cannot read the VAE weights ({reason})") from e
    raise CheckpointError(
        f"{vae_dir}: no diffusion_pytorch_model.safetensors (pickled .bin weights are not read)"
    )


# --------------------------------------------------------------------------------------------
# Decode memory: an explicit model whose constants are measured, and the tiling plan
#
# The decoder runs one latent frame (4 pixel frames) at a time and keeps a causal cache of
# the last 2 frames of every conv's input, so its activations scale with the area decoded at
# once (the frame, or one tile) and not with the frame count; the video it assembles scales
# with frames x area. The peak is the larger of two phases, in elements of the model's dtype:
#
#   decoding:   act * CHUNK * r            activations + causal cache of one chunk
#             + 3 * F * (tiles + out * r)  the tiles decoded so far (tiled), and the frames of
#                                          the region being decoded, concatenated chunk by chunk
#   assembling: 3 * F * (tiles + out_tiled * H * W)   tiled: the tiles, blended rows, the whole
#                                          frame, its clamp (untiled: the video, out_tiled = 1)
#             + 4 bytes * 3 * F * H * W    and the float32 result (unless the model is fp32)
#
# r = h x w px is the region decoded at once (the frame untiled, the largest tile tiled),
# tiles the sum of the tiles' areas (0 untiled), H x W and F the output video. Bytes beyond
# what is allocated before the decode (weights, latents).
# --------------------------------------------------------------------------------------------

DECODE_CHUNK_FRAMES = TEMPORAL_STRIDE  # pixel frames the decoder produces per call
TILE_OVERLAP = 64  # px shared by neighbouring tiles, blended linearly (diffusers: 256 / 192)
MIN_TILE = 128  # px; auto tiles no smaller (stride 64)
DEFAULT_TILE = (256, 192)  # `vae_tiling: on`: size / stride in px (diffusers' default)


@dataclass(frozen=True)
class DecodeMemoryModel:
    """The constants of `decode_peak_bytes` (see the model above) and where they come from."""

    act: float  # elements per pixel of the region decoded at once, per frame of a chunk
    out: float  # copies of the decoded region's frames while decoding (the concatenation)
    out_tiled: float  # whole-video copies while tiles are blended, beside the tiles
    source: str


# Fitted by `python3 tools/bench_vae.py --max-vram 8` to torch.cuda.max_memory_allocated on
# an NVIDIA H200 (bf16, random weights, torch 2.11 + cuDNN 9.19, 2026-11-27) over ten decodes
# (480P and 720P; untiled at 5 and 81 frames; tiled 256/192, 384/320, 512/448): the estimate
# is never below the measured peak and at most 12.7% above it (docs/BENCHMARKS.md). Counting
# live tensors on the meta device gave act=1211, out=1.98, out_tiled=1.1: the GPU adds
# cuDNN workspaces and allocator rounding.
DECODE_MEMORY = DecodeMemoryModel(
    act=1355.1, out=1.94, out_tiled=1.05,
    source="NVIDIA H200 bf16, tools/bench_vae.py, 2026-11-27",
)  # fmt: skip


def _lat_hw(latent_shape) -> tuple[int, int, int, int]:
    """(batch, latent frames, h, w) of [B, z, T, h, w] or [z, T, h, w]."""
    shape = tuple(latent_shape)
    if len(shape) == 4:
        shape = (1, *shape)
    if len(shape) != 5:
        raise ValueError(f"a latent shape is [B, z, T, h, w], got {shape}")
    b, _, t, h, w = shape
    return b, t, h, w


def tile_grid(h: int, w: int, tile: tuple[int, int]) -> list[tuple[int, int]]:
    """Latent (rows, cols) of every tile diffusers decodes for a latent h x w at `tile`
    = (size, stride) px: a tile starts every stride and is cut at the frame's edge. Empty when
    the frame fits one tile (diffusers then decodes it whole)."""
    size, stride = tile[0] // SPATIAL_STRIDE, tile[1] // SPATIAL_STRIDE
    if h <= size and w <= size:
        return []
    return [(min(size, h - i), min(size, w - j))
            for i in range(0, h, stride) for j in range(0, w, stride)]  # fmt: skip


def decode_peak_terms(
    latent_shape, tile: tuple[int, int] | None = None, dtype: torch.dtype = torch.bfloat16
) -> dict[str, float]:
    """The model's terms in bytes: peak = max(decoding, assembling) with
    decoding = act * x_act + out * x_out + x_tiles and
    assembling = out_tiled * x_out_tiled + x_tiles + x_result (one batch element)."""
    _, t, h, w = _lat_hw(latent_shape)
    frames = (t - 1) * TEMPORAL_STRIDE + 1
    px = SPATIAL_STRIDE * SPATIAL_STRIDE
    itemsize = torch.empty((), dtype=dtype, device="meta").element_size()
    tiles = tile_grid(h, w, tile) if tile is not None else []
    region = max(th * tw for th, tw in tiles) * px if tiles else h * w * px
    video = 3 * frames * itemsize  # bytes per pixel of the whole clip
    return {
        "x_act": itemsize * DECODE_CHUNK_FRAMES * region,
        "x_out": video * region,
        "x_tiles": video * sum(th * tw for th, tw in tiles) * px,
        "x_out_tiled": video * h * w * px,
        "x_result": 0 if dtype == torch.float32 else 4 * 3 * frames * h * w * px,
        "tiled": bool(tiles),
    }


def decode_peak_bytes(
    latent_shape,
    tile: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    model: DecodeMemoryModel | None = None,
) -> int:
    """Estimated peak bytes `WanVAE.decode` allocates for `latent_shape` ([B, z, T, h, w]),
    untiled or at `tile` = (size, stride) px, with the model in `dtype` (see DECODE_MEMORY)."""
    m = DECODE_MEMORY if model is None else model
    b = _lat_hw(latent_shape)[0]
    x = decode_peak_terms(latent_shape, tile, dtype)
    decoding = m.act * x["x_act"] + m.out * x["x_out"] + x["x_tiles"]
    copies = m.out_tiled if x["tiled"] else 1.0
    assembling = copies * x["x_out_tiled"] + x["x_tiles"] + x["x_result"]
    return int(b * max(decoding, assembling))


def decode_memory_budget(device: torch.device, max_vram_gb: float | None = None) -> int | None:
    """Bytes a decode on `device` may allocate now: free + what torch holds unused, capped by
    max_vram (a budget for the whole process); None off CUDA, where there is no cap."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    have = free + torch.cuda.memory_reserved(device) - allocated
    if max_vram_gb is not None:
        have = min(have, int(max_vram_gb * 1e9) - allocated)
    return max(have, 0)


@dataclass(frozen=True)
class DecodePlan:
    """How one decode runs: untiled, or tiled at (tile_size, tile_stride) px, and why."""

    tiled: bool
    tile_size: int = DEFAULT_TILE[0]
    tile_stride: int = DEFAULT_TILE[1]
    mode: str = "auto"
    estimate: int | None = None  # bytes, of the chosen way
    untiled_estimate: int | None = None
    budget: int | None = None  # bytes available, None: no cap known
    fits: bool = True

    def decode_kwargs(self) -> dict[str, Any]:
        return {"tiled": self.tiled, "tile_size": self.tile_size, "tile_stride": self.tile_stride}

    def describe(self) -> str:
        """One log line."""
        how = f"tiled {self.tile_size}/{self.tile_stride} px" if self.tiled else "untiled"
        if self.mode != "auto":
            return f"VAE decode: {how} (vae_tiling {self.mode})"
        if self.budget is None:
            return f"VAE decode: {how} (auto: no memory cap on this device)"
        gb = 1e9
        need = f"~{self.untiled_estimate / gb:.1f} GB untiled"
        if self.tiled:
            need += f", ~{self.estimate / gb:.1f} GB tiled"
        line = f"VAE decode: {how} (auto: {need}; {self.budget / gb:.1f} GB available)"
        if not self.fits:
            line += "; may not fit"
        return line


def plan_decode(
    latent_shape,
    mode: str | bool,
    budget: int | None,
    dtype: torch.dtype = torch.bfloat16,
    model: DecodeMemoryModel | None = None,
) -> DecodePlan:
    """`mode` off: untiled; on: tiled at DEFAULT_TILE; auto: untiled when its estimate fits
    `budget` bytes (less a margin for allocator fragmentation), else the largest tile
    (multiple of 8 px, overlap TILE_OVERLAP, at least MIN_TILE) whose estimate fits, else
    the tile with the smallest estimate (fits=False). No budget (CPU): untiled."""
    from lightx2v.config import vae_tiling_mode

    mode = vae_tiling_mode(mode)
    if mode == "off":
        return DecodePlan(tiled=False, mode=mode)
    if mode == "on":
        return DecodePlan(tiled=True, mode=mode)
    if budget is None:
        return DecodePlan(tiled=False)
    _, _, h, w = _lat_hw(latent_shape)
    untiled = decode_peak_bytes(latent_shape, None, dtype, model)
    usable = budget - max(1 << 29, budget // 20)
    if untiled <= usable:
        return DecodePlan(tiled=False, estimate=untiled, untiled_estimate=untiled, budget=budget)
    largest = SPATIAL_STRIDE * max(h, w) - SPATIAL_STRIDE  # a size >= the frame does not tile
    best = None  # (estimate, tile) with the smallest estimate, for when nothing fits
    for size in range(largest, MIN_TILE - 1, -SPATIAL_STRIDE):
        tile = (size, size - TILE_OVERLAP)
        est = decode_peak_bytes(latent_shape, tile, dtype, model)
        if est <= usable:
            return DecodePlan(True, *tile, estimate=est, untiled_estimate=untiled, budget=budget)
        if tile_grid(h, w, tile) and (best is None or est < best[0]):
            best = (est, tile)
    if best is None:  # a frame within the smallest tile: nothing to split
        return DecodePlan(False, estimate=untiled, untiled_estimate=untiled, budget=budget,
                          fits=False)  # fmt: skip
    # Nothing fits: the least memory. Not the smallest tile, which decodes the most overlap
    # and can need more (720P: 128 px tiles ~3.0 GB, 320 px ~2.0 GB by this model).
    est, tile = best
    return DecodePlan(True, *tile, estimate=est, untiled_estimate=untiled, budget=budget,
                      fits=False)  # fmt: skip


# --------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------


class WanVAE:
    """Wan2.1 video VAE with the latent normalisation the DiT expects.

    encode: video [B, 3, F, H, W] in [-1, 1] -> (mu - mean) / std, [B, z, (F-1)//4 + 1, H/8, W/8]
    decode: latent [B, z, T, h, w] -> video [B, 3, 4(T-1) + 1, 8h, 8w] clamped to [-1, 1]
    Encoding returns the posterior mean, never a sample, as the official pipeline does.
    """

    def __init__(
        self,
        model: AutoencoderKLWan,
        latents_mean: list[float] | tuple[float, ...],
        latents_std: list[float] | tuple[float, ...],
    ):
        z_dim = model.config.z_dim
        if len(latents_mean) != z_dim or len(latents_std) != z_dim:
            raise CheckpointError(
                f"VAE latents_mean/latents_std have {len(latents_mean)}/{len(latents_std)} "
                f"values, expected z_dim={z_dim}"
            )
        self.model = model
        # Kept in fp32 whatever the model dtype: normalisation is done in fp32.
        self.latents_mean = torch.tensor(latents_mean, dtype=torch.float32, device=self.device)
        self.latents_std = torch.tensor(latents_std, dtype=torch.float32, device=self.device)

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def from_official(
        cls, pth_path: str | os.PathLike, dtype: torch.dtype = torch.float32
    ) -> WanVAE:
        """Loads the official `Wan2.1_VAE.pth` (a state dict of Wan's own `WanVAE_`)."""
        path = Path(pth_path)
        sd = load_pth(path, "VAE")
        config = infer_official_config(sd, path)
        nrb = config["num_res_blocks"]
        mapped: dict[str, torch.Tensor] = {}
        for key, tensor in sd.items():
            # An unmappable key keeps its official name so the error shows what the file holds.
            mapped[official_to_diffusers_key(key, nrb) or key] = tensor
        model = _build_and_load(config, mapped, str(path), dtype)
        return cls(model, config["latents_mean"], config["latents_std"])

    @classmethod
    def from_diffusers(
        cls, vae_dir: str | os.PathLike, dtype: torch.dtype = torch.float32
    ) -> WanVAE:
        """Loads a diffusers `vae/` folder (config.json + safetensors weights)."""
        vae_dir = Path(vae_dir)
        config_path = vae_dir / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{vae_dir}: no config.json (not a diffusers VAE folder)")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: invalid JSON ({e})") from e
        if config.get("_class_name") != "AutoencoderKLWan":
            raise CheckpointError(
                f"{config_path}: _class_name is {config.get('_class_name')!r}, "
                "expected 'AutoencoderKLWan'"
            )
        sd = _load_diffusers_weights(vae_dir)
        model = _build_and_load(config, sd, str(vae_dir), dtype)
        return cls(model, model.config.latents_mean, model.config.latents_std)

    # ---- placement -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def z_dim(self) -> int:
        return self.model.config.z_dim

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> WanVAE:
        """Moves the network (and casts it to `dtype`); the normalisation stays fp32."""
        # nn.Module.to, not ModelMixin.to: the latter warns about casting on every call.
        torch.nn.Module.to(self.model, device=device, dtype=dtype)
        self.latents_mean = self.latents_mean.to(self.device)
        self.latents_std = self.latents_std.to(self.device)
        return self

    # ---- encode / decode -------------------------------------------------------------------

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        view = (1, self.z_dim, 1, 1, 1)
        return self.latents_mean.view(view), self.latents_std.view(view)

    @torch.inference_mode()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in [-1, 1] -> normalised posterior mean [B, z, (F-1)//4+1, H/8, W/8],
        float32."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"encode expects [B, 3, F, H, W], got {tuple(video.shape)}")
        frames, height, width = video.shape[2:]
        if (frames - 1) % TEMPORAL_STRIDE:
            raise LX2VError(f"frame count {frames} is not 4k+1 (1, 5, 9, ..., 81)")
        if height % SPATIAL_STRIDE or width % SPATIAL_STRIDE:
            raise LX2VError(f"video size {height}x{width} is not a multiple of 8")
        posterior = self.model.encode(video.to(self.device, self.dtype)).latent_dist
        mu = posterior.mode().float()  # [B, z, T, h, w]: the mean; the variance is unused
        mean, std = self._stats()
        return (mu - mean) / std

    @torch.inference_mode()
    def decode(
        self,
        latents: torch.Tensor,
        tiled: bool = False,
        tile_size: int = 256,
        tile_stride: int = 192,
    ) -> torch.Tensor:
        """Normalised latent [B, z, T, h, w] -> video [B, 3, 4(T-1)+1, 8h, 8w] in [-1, 1], float32.

        tiled=True decodes overlapping spatial tiles of `tile_size` pixels every `tile_stride`
        pixels (diffusers' tiling) and blends the overlaps linearly. It trades speed for memory:
        activation memory is bounded by one tile instead of the whole frame, but the overlap is
        decoded twice (about (size/stride)^2 = 1.8x the work at 256/192), and each tile sees
        only its own context, so the result differs slightly from the untiled one near seams.
        Frames smaller than one tile are decoded untiled. `plan_decode` chooses for a memory cap.
        """
        if latents.ndim != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"decode expects [B, {self.z_dim}, T, h, w], got {latents.shape}")
        mean, std = self._stats()
        z = (latents.float().to(self.device) * std + mean).to(self.dtype)
        if not tiled:
            return self.model.decode(z).sample.float().clamp_(-1.0, 1.0)
        if (
            tile_size % SPATIAL_STRIDE
            or tile_stride % SPATIAL_STRIDE
            or not (0 < tile_stride <= tile_size)
        ):
            raise LX2VError(
                f"tile size {tile_size} / stride {tile_stride} must be multiples of 8 "
                "with 0 < stride <= size"
            )
        m = self.model
        saved = (m.use_tiling, m.tile_sample_min_height, m.tile_sample_min_width,
                 m.tile_sample_stride_height, m.tile_sample_stride_width)  # fmt: skip
        try:
            m.use_tiling = True
            m.tile_sample_min_height = m.tile_sample_min_width = tile_size
            m.tile_sample_stride_height = m.tile_sample_stride_width = tile_stride
            # diffusers tiles only frames larger than one tile, else decodes them whole.
            return m.decode(z).sample.float().clamp_(-1.0, 1.0)
        finally:
            (m.use_tiling, m.tile_sample_min_height, m.tile_sample_min_width,
             m.tile_sample_stride_height, m.tile_sample_stride_width) = saved  # fmt: skip

    def plan_decode(
        self, latent_shape, mode: str | bool = "auto", max_vram_gb: float | None = None
    ) -> DecodePlan:
        """How to decode `latent_shape` here and now: `plan_decode` with the memory this VAE's
        device has free (capped by max_vram_gb); pass `.decode_kwargs()` to `decode`."""
        from lightx2v.config import vae_tiling_mode

        mode = vae_tiling_mode(mode)  # a bad mode is an error before any memory query
        budget = decode_memory_budget(self.device, max_vram_gb) if mode == "auto" else None
        return plan_decode(latent_shape, mode, budget, self.dtype)

    # ---- I2V -------------------------------------------------------------------------------

    @torch.inference_mode()
    def i2v_condition(self, image: torch.Tensor, frames: int) -> torch.Tensor:
        """The 20-channel I2V condition of official Wan2.1 image2video.

        image [3, H, W] in [-1, 1] (already at the output size) -> [4 + z, T, H/8, W/8] with
        T = (frames - 1) // 4 + 1: a 4-channel mask, then the normalised latent of the video
        [image, 0, 0, ..., 0] (frames long).
        The mask's 4 channels are the 4 pixel frames a latent frame stands for; latent frame 0
        stands for the given image (repeated 4 times in the official construction) so it is
        all ones, every later latent frame is to be generated so it is all zeros.
        """
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"i2v_condition expects an image [3, H, W], got {tuple(image.shape)}")
        if frames < 1 or (frames - 1) % TEMPORAL_STRIDE:
            raise LX2VError(f"frame count {frames} is not 4k+1 (1, 5, 9, ..., 81)")
        _, height, width = image.shape
        video = torch.zeros(1, 3, frames, height, width, dtype=image.dtype, device=image.device)
        video[0, :, 0] = image
        latent = self.encode(video)[0]  # [z, T, h, w]
        mask = torch.zeros(TEMPORAL_STRIDE, *latent.shape[1:], dtype=latent.dtype,
                           device=latent.device)  # fmt: skip
        mask[:, 0] = 1.0
        return torch.cat([mask, latent], dim=0)  # [4 + z, T, h, w]


# --------------------------------------------------------------------------------------------
# Tiny checkpoints for tests
# --------------------------------------------------------------------------------------------


def _tiny_model(seed: int) -> AutoencoderKLWan:
    """TINY_VAE_CONFIG with every tensor drawn from a seeded generator.

    Norm gains are 1 + noise (not ones) so that swapping two norms in a key map shows up;
    conv weights are scaled by 1/sqrt(fan_in) so activations stay O(1) through the stack.
    """
    model = AutoencoderKLWan(**TINY_VAE_CONFIG).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("gamma"):  # RMS norm gains, [C, 1, 1(, 1)]
            p.copy_(1.0 + 0.1 * noise)
        elif p.ndim > 1:  # conv weights [out, in, *kernel]
            p.copy_(noise / (p[0].numel() ** 0.5))
        else:  # biases
            p.copy_(0.1 * noise)
    return model


def write_tiny_vae(root: str | os.PathLike, layout: str, seed: int = 0) -> dict[str, Any]:
    """Writes a tiny random Wan2.1 VAE in a real layout; deterministic for a given seed.

    layout "official":  root/Wan2.1_VAE.pth (torch.save of a plain dict, official key names)
    layout "diffusers": root/vae/{config.json, diffusion_pytorch_model.safetensors}
    Returns {"layout", "path" (the file or folder written), "config" (AutoencoderKLWan args)}.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model = _tiny_model(seed)
    nrb = TINY_VAE_CONFIG["num_res_blocks"]
    if layout == "official":
        sd = {}
        for key, tensor in model.state_dict().items():
            official = diffusers_to_official_key(key, nrb)
            assert official is not None, key  # every AutoencoderKLWan(2.1) tensor has a name
            sd[official] = tensor.contiguous().clone()
        path = root / OFFICIAL_FILENAME
        atomic_torch_save(sd, path)
    elif layout == "diffusers":
        path = root / "vae"
        path.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            for f in sorted(Path(tmp).iterdir()):
                os.replace(f, path / f.name)  # same filesystem: each file lands atomically
    else:
        raise LX2VError(f"unknown VAE layout {layout!r} (expected 'official' or 'diffusers')")
    return {"layout": layout, "path": path, "config": dict(TINY_VAE_CONFIG)}
