"""Typed configuration: model architecture, generation request, runtime options.

The architecture is read from the checkpoint (see models/wan/formats.py); the presets
below are the four published Wan2.1 models and exist for benchmarks that build a model
with random weights at the real shapes.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightx2v.errors import LX2VError


@dataclass(frozen=True)
class WanArch:
    """Architecture of a Wan2.1 DiT. Derived sizes are properties, computed from these."""

    model_type: str  # "t2v" or "i2v"
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16  # 16 latent channels; I2V adds 4 mask + 16 condition channels = 36
    out_dim: int = 16
    text_dim: int = 4096  # umT5-XXL width
    image_dim: int = 1280  # CLIP ViT-H/14 width
    freq_dim: int = 256
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6

    def __post_init__(self):
        if self.model_type not in ("t2v", "i2v"):
            raise LX2VError(f"unknown model_type {self.model_type!r} (expected 't2v' or 'i2v')")
        sizes = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                 if f.type in (int, "int")]  # fmt: skip
        sizes += [(f"patch_size[{i}]", v) for i, v in enumerate(self.patch_size)]
        for name, v in sizes:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LX2VError(f"architecture: {name} {v!r} is not a positive integer")
        if len(self.patch_size) != 3:
            raise LX2VError(f"architecture: patch_size {self.patch_size!r} needs 3 entries")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise LX2VError(f"architecture: eps {self.eps!r} is not a positive number")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise LX2VError(
                f"dim {self.dim} does not split into {self.num_heads} heads of even size"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Complex-pair counts per head for (frames, height, width): 22/21/21 at head dim 128."""
        half = self.head_dim // 2
        hw = half // 3
        return half - 2 * hw, hw, hw

    @property
    def is_i2v(self) -> bool:
        return self.model_type == "i2v"

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> WanArch:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "patch_size" in kw:
            kw["patch_size"] = tuple(kw["patch_size"])
        return cls(**kw)


ARCH_PRESETS: dict[str, WanArch] = {
    "t2v-1.3b": WanArch("t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "t2v-14b": WanArch("t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "i2v-14b": WanArch("i2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36),
}


# The negative prompt the official Wan2.1 code uses when none is given (its own words, in
# Chinese, listing artefacts to avoid).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass
class GenerationRequest:
    """What to generate. Defaults are the official Wan2.1 sampling defaults at 480P."""

    prompt: str = "A cat walks on the grass, realistic style."
    negative_prompt: str | None = None  # None: the official default negative prompt
    image: str | None = None  # path; required for i2v
    width: int = 832
    height: int = 480
    frames: int = 81
    steps: int | None = None  # None: the official default, 40 for I2V, 50 for T2V
    guidance: float = 5.0
    shift: float | None = None  # None: the official default, 3 for I2V at 480P, else 5
    seed: int = 42
    sampler: str = "unipc"  # "unipc", "euler", or "distill4" (4-step distilled models)
    fps: int = 16
    teacache: float = 0.0  # TeaCache threshold; 0 = off (typical 0.1 .. 0.3)
    teacache_variant: str = "e0"  # "e0" (modulation, ret-steps; upstream default) or "e"

    def fill_defaults(self, task: str) -> GenerationRequest:
        """Fill what was left unset with the official Wan2.1 defaults for `task`."""
        if self.steps is None:
            self.steps = 40 if task == "i2v" else 50
        if self.shift is None:
            at_480p = {self.width, self.height} == {832, 480}
            self.shift = 3.0 if task == "i2v" and at_480p else 5.0
        return self

    def validate(self, task: str) -> None:
        self.fill_defaults(task)
        if self.width % 16 or self.height % 16:
            raise LX2VError(
                f"--size {self.width}x{self.height}: width and height must be divisible by 16"
            )
        if self.width <= 0 or self.height <= 0:
            raise LX2VError(f"--size {self.width}x{self.height}: width and height must be positive")
        if self.frames < 1 or (self.frames - 1) % 4:
            raise LX2VError(f"--frames {self.frames}: must be 4n+1 (1, 5, 9, ..., 81)")
        if self.steps < 1:
            raise LX2VError(f"--steps {self.steps}: must be at least 1")
        from lightx2v.schedule import SAMPLER_NAMES

        if self.sampler not in SAMPLER_NAMES:
            raise LX2VError(
                f"--sampler {self.sampler!r}: expected one of {', '.join(SAMPLER_NAMES)}"
            )
        if not 0 <= self.guidance < float("inf"):
            raise LX2VError(f"--guidance {self.guidance}: must be a number >= 0 (1 = no CFG)")
        if not 0 <= self.seed < 2**64:
            raise LX2VError(f"--seed {self.seed}: must be in 0 .. 2**64-1")
        if self.shift is not None and not (0 < self.shift < float("inf")):
            raise LX2VError(f"--shift {self.shift}: must be a positive number")
        if not 0 <= self.teacache < float("inf"):
            raise LX2VError(f"--teacache {self.teacache}: the threshold must be >= 0 (0 = off)")
        if self.teacache_variant not in ("e", "e0"):
            raise LX2VError(f"--teacache-variant {self.teacache_variant!r}: expected 'e' or 'e0'")
        if self.fps < 1:
            raise LX2VError(f"--fps {self.fps}: must be at least 1")
        if task == "i2v" and self.image is None:
            raise LX2VError("task i2v needs an input image (--image PATH)")
        if task == "t2v" and self.image is not None:
            raise LX2VError("an image was given but the model is text-to-video (T2V); drop --image")


# Official sizes (`--resolution`); flags given with them win.
RESOLUTIONS: dict[str, dict[str, Any]] = {
    "480p": {"width": 832, "height": 480, "frames": 81},
    "480p-portrait": {"width": 480, "height": 832, "frames": 81},
    "720p": {"width": 1280, "height": 720, "frames": 81},
    "720p-portrait": {"width": 720, "height": 1280, "frames": 81},
}


@dataclass
class RuntimeOptions:
    """How to run: device, precision, memory."""

    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    dtype: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "bf16", "fp32"
    cfg_batch: bool = True  # cond and uncond as one batch of 2
    compile: bool | None = None  # regional torch.compile of the blocks; None: on for CUDA
    # VAE decode in spatial tiles: auto (tile only when the untiled decode would not fit the
    # GPU memory free then, capped by max_vram; the largest tile that fits), on, off.
    # JSON true/false mean on/off.
    vae_tiling: str | bool = "auto"
    offload_encoders: bool = True  # move text/image encoders off the GPU after use
    offload: str = "auto"  # DiT blocks: none | block | disk | auto (resident as far as they fit)
    quant: str = (
        "none"  # quantize the DiT at load: none | fp8 | int8 (converted checkpoints already are)
    )
    attention: str = "sdpa"  # sdpa | lx2v-int8[-fp8|-int8] | fa4 | sage | flash | auto
    # the first and last N sampling steps use exact bf16 attention (sdpa): a known quality
    # guard for 8-bit attention in video models
    attention_exact_steps: int = 0
    # GB budget for offload auto and VAE tiling auto (default: the card's free memory)
    max_vram: float | None = None
    loras: list[str] = field(default_factory=list)  # "PATH[:STRENGTH]", merged at load
    save_frames: str | None = None  # folder for PNG frames

    def validate(self) -> None:
        """Checks that need no weights: run before anything is loaded."""
        choices = {"offload": ("none", "block", "disk", "auto"), "quant": ("none", "fp8", "int8"),
                   "dtype": ("auto", "bf16", "fp32")}  # fmt: skip
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise LX2VError(
                    f"{key} {getattr(self, key)!r}: expected one of {', '.join(allowed)}"
                )
        self.vae_tiling = vae_tiling_mode(self.vae_tiling)
        if self.attention_exact_steps < 0:
            raise LX2VError(f"attention_exact_steps {self.attention_exact_steps}: must be >= 0")
        if self.max_vram is not None and not self.max_vram > 0:
            raise LX2VError(f"max_vram {self.max_vram}: must be a positive number of GB")
        if self.save_frames:
            folder = Path(self.save_frames)
            if folder.exists() and not folder.is_dir():
                raise LX2VError(f"--save-frames {folder}: exists and is not a folder")
            from lightx2v.fileio import writable_folder_problem

            parent = folder if folder.exists() else folder.parent
            why = writable_folder_problem(parent) if parent.is_dir() else "no such folder"
            if why:
                raise LX2VError(
                    f"--save-frames {folder}: cannot create or write that folder ({why})"
                )


VAE_TILING_MODES = ("auto", "on", "off")


def vae_tiling_mode(value: str | bool) -> str:
    """auto | on | off from a vae_tiling setting; true/false (the older boolean) mean on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value in VAE_TILING_MODES:
        return value
    raise LX2VError(f"vae_tiling {value!r}: expected one of {', '.join(VAE_TILING_MODES)} "
                    "(or true/false)")  # fmt: skip


# Named configurations (`--preset`), one per row of LightX2V's benchmark table, as
# measured by `lx2v bench`; flags given with a preset win. "auto" attention picks our 8-bit
# kernel where it runs and passes its self-check (Hopper), else sdpa.
RUN_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "bf16": {"runtime": {"quant": "none", "attention": "sdpa"}},
    "bf16-int8attn": {"runtime": {"quant": "none", "attention": "lx2v-int8-int8"}},
    "fp8": {"runtime": {"quant": "fp8", "attention": "auto"}},
    "fp8-teacache": {
        "runtime": {"quant": "fp8", "attention": "auto"},
        "request": {"teacache": 0.2},
    },
    "distill": {
        "runtime": {"quant": "fp8", "attention": "auto"},
        "request": {"sampler": "distill4"},
    },
    # The two memory presets run cond and uncond one after the other, as `lx2v bench` times
    # them: one batch of 2 holds twice the activations (480P FP8: 23.7 GB peak against 20.5
    # at batch 1), keeps fewer blocks resident under a --max-vram budget, and was no faster at
    # 480P (1.6% slower; 1.4% faster at 720P; H200, docs/BENCHMARKS.md). --cfg-batched
    # overrides it.
    "low-vram": {
        "runtime": {"quant": "fp8", "attention": "auto", "offload": "block", "cfg_batch": False}
    },
    "rtx4090": {
        "runtime": {
            "quant": "fp8",
            "attention": "auto",
            "offload": "auto",
            "max_vram": 24,
            "cfg_batch": False,
        }
    },
}


@dataclass
class RunConfig:
    """A whole `lx2v run` configuration: JSON file in, CLI flags override."""

    model: str | None = None
    task: str | None = None  # None: from the checkpoint
    output: str = "output.mp4"
    request: GenerationRequest = field(default_factory=GenerationRequest)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    # request fields the file set explicitly (they win over defaults a caller fills in)
    request_keys: set[str] = field(default_factory=set)

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        p = Path(path)
        try:
            raw = json.loads(p.read_text())
        except FileNotFoundError:
            raise LX2VError(f"config file not found: {p}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LX2VError(f"config file {p} is not valid JSON: {e}") from None
        except OSError as e:  # a folder, unreadable, ...
            raise LX2VError(f"config file {p}: cannot read it ({e.strerror or e})") from None
        if not isinstance(raw, dict):
            raise LX2VError(f"config file {p}: expected a JSON object at the top level")
        return cls.from_dict(raw, source=str(p))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> RunConfig:
        cfg = cls()
        sections = {"request": cfg.request, "runtime": cfg.runtime}
        for key, value in raw.items():
            if key in sections:
                if not isinstance(value, dict):
                    raise LX2VError(f"{source}: '{key}' must be an object")
                if key == "request":
                    cfg.request_keys = set(value)
                _update(sections[key], value, f"{source}: {key}")
            elif key in ("model", "output"):
                if not isinstance(value, str):
                    raise LX2VError(f"{source}: '{key}' must be a string path")
                setattr(cfg, key, value)
            elif key == "task":
                if value not in ("t2v", "i2v"):
                    raise LX2VError(f'{source}: \'task\' must be "t2v" or "i2v"')
                cfg.task = value
            else:
                raise LX2VError(f"{source}: unknown key '{key}'")
        return cfg


def _type_ok(value: Any, tp: Any) -> bool:
    """Does a JSON value fit a dataclass field's annotation (int, float, str, bool, X | None, list)?"""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typing.get_origin(tp) is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _update(obj: Any, values: dict[str, Any], where: str) -> None:
    names = {f.name for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for k, v in values.items():
        if k not in names:
            raise LX2VError(f"{where}: unknown key '{k}' (known: {', '.join(sorted(names))})")
        if not _type_ok(v, hints[k]):
            raise LX2VError(f"{where}: '{k}' = {v!r} is not of type {hints[k]}")
        setattr(obj, k, v)
