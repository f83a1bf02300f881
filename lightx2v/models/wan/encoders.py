"""Wan2.1 conditioning encoders: umT5-XXL for text, the CLIP ViT-H/14 vision tower for images.

Both run through `transformers` modules (`UMT5EncoderModel`, `CLIPVisionModel`); this file
only knows how to fill them from the two source layouts and how Wan feeds them:

- official Wan2.1: `models_t5_umt5-xxl-enc-bf16.pth` (Wan's own T5 module) with the tokenizer
  in `google/umt5-xxl/`, and `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (the whole
  open-clip XLM-RoBERTa + ViT-H/14 model, of which only `visual.*` is used);
- diffusers: `text_encoder/` + `tokenizer/`, `image_encoder/` (+ `image_processor/`).

Text: prompts are whitespace-cleaned as Wan does, tokenized to 512 tokens, and positions past
each prompt's own token count (its `</s>` included) are zero in the output. Wan trims the
encoder output to each prompt's length and the DiT pads it back with zeros; zeroing here gives
the same [B, 512, d_model] tensor without the ragged list.

Image: [-1, 1] images → bicubic 224×224 → CLIP mean/std → the output of the penultimate
transformer block, [B, 257, 1280] for ViT-H/14.

The `write_tiny_*` functions write small random encoders in the real layouts, with a tokenizer
built in-process, for tests and the embedded default model.
"""

from __future__ import annotations

import html
import json
import re
import string
from collections.abc import Callable
from pathlib import Path

import ftfy
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedModel,
    UMT5Config,
    UMT5EncoderModel,
)

from lightx2v.errors import CheckpointError, LX2VError
from lightx2v.fileio import atomic_dir, atomic_torch_save, first_line, load_pth, short_list

TEXT_LEN = 512  # tokens per prompt; the DiT's text context length

T5_OFFICIAL_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T5_OFFICIAL_TOKENIZER = "google/umt5-xxl"
CLIP_OFFICIAL_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
CLIP_OFFICIAL_TOKENIZER = "xlm-roberta-large"

# OpenAI CLIP normalisation, used by Wan's open-clip ViT-H/14 and by diffusers' processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ViT-H/14 has width 1280 and 16 heads. The checkpoint has no tensor whose shape gives the head
# count, so we take the ViT convention of this family (ViT-H: 80 per head) and derive
# heads = width / 80.
CLIP_HEAD_DIM = 80


# ---------------------------------------------------------------------------------------------
# Loading helpers
# ---------------------------------------------------------------------------------------------


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise CheckpointError(f"{what} folder not found: {path}")
    return path


def _assign_weights(
    model: PreTrainedModel,
    state: dict[str, torch.Tensor],
    unexpected: set[str],
    dtype: torch.dtype,
    what: str,
    path: Path,
    source_name: Callable[[str], str],
) -> None:
    """Load `state` strictly into a model built on the meta device (no random init, no copy).

    `unexpected` holds source keys the key map did not recognise; they are reported together
    with the model keys the checkpoint lacks, named as in the source file by `source_name`.
    """
    expected = model.state_dict()
    missing = {source_name(k) for k in set(expected) - set(state)}
    unexpected = unexpected | {source_name(k) for k in set(state) - set(expected)}
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {short_list(unexpected)}")
        raise CheckpointError(f"{what} checkpoint {path}: " + "; ".join(parts))
    for key, ref in expected.items():
        if state[key].shape != ref.shape:
            raise CheckpointError(
                f"{what} checkpoint {path}: {source_name(key)} has shape "
                f"{tuple(state[key].shape)}, the architecture read from the checkpoint "
                f"expects {tuple(ref.shape)}"
            )
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)


def _check_loading_info(info: dict, what: str, path: Path) -> None:
    """Turn `from_pretrained(output_loading_info=True)` complaints into a CheckpointError."""
    parts = []
    for name in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [k if isinstance(k, str) else str(k[0]) for k in info.get(name) or ()]
        if keys:
            parts.append(f"{name.replace('_', ' ')}: {short_list(keys)}")
    if parts:
        raise CheckpointError(f"{what} checkpoint {path}: " + "; ".join(parts))


def _from_pretrained(cls: type[PreTrainedModel], folder: Path, dtype: torch.dtype, what: str):
    _require_dir(folder, what)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{what} folder {folder} has no config.json")
    try:
        model, info = cls.from_pretrained(
            folder, dtype=dtype, local_files_only=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise CheckpointError(f"cannot load {what} from {folder}: {first_line(err)}") from err
    _check_loading_info(info, what, folder)
    return model


# ---------------------------------------------------------------------------------------------
# Key maps (official Wan2.1 name ↔ transformers name). `{i}` stands for a layer index.
# ---------------------------------------------------------------------------------------------

# Wan's T5 (wan/modules/t5.py, T5Encoder with shared_pos=False: every block owns its relative
# position table, as in umT5) → transformers' UMT5EncoderModel.
T5_KEY_MAP: list[tuple[str, str]] = [
    ("token_embedding.weight", "shared.weight"),
    ("blocks.{i}.norm1.weight", "encoder.block.{i}.layer.0.layer_norm.weight"),
    ("blocks.{i}.attn.q.weight", "encoder.block.{i}.layer.0.SelfAttention.q.weight"),
    ("blocks.{i}.attn.k.weight", "encoder.block.{i}.layer.0.SelfAttention.k.weight"),
    ("blocks.{i}.attn.v.weight", "encoder.block.{i}.layer.0.SelfAttention.v.weight"),
    ("blocks.{i}.attn.o.weight", "encoder.block.{i}.layer.0.SelfAttention.o.weight"),
    (
        "blocks.{i}.pos_embedding.embedding.weight",
        "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    ("blocks.{i}.norm2.weight", "encoder.block.{i}.layer.1.layer_norm.weight"),
    # Wan: fc2(fc1(x) * gelu(gate(x))); transformers: wo(gelu(wi_0(x)) * wi_1(x)).
    ("blocks.{i}.ffn.gate.0.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight"),
    ("blocks.{i}.ffn.fc1.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight"),
    ("blocks.{i}.ffn.fc2.weight", "encoder.block.{i}.layer.1.DenseReluDense.wo.weight"),
    ("norm.weight", "encoder.final_layer_norm.weight"),
]
# transformers ties the encoder's input embedding to `shared`; it has no official counterpart.
_T5_TIED_KEY = "encoder.embed_tokens.weight"

# open-clip ViT (wan/modules/clip.py, VisionTransformer) → CLIPVisionModel (transformers 5 names;
# under transformers 4 every name gains a `vision_model.` prefix, added at load time).
# The fused `attn.to_qkv` is split into q/k/v separately (see _clip_official_to_hf).
CLIP_KEY_MAP: list[tuple[str, str]] = [
    ("visual.patch_embedding.weight", "embeddings.patch_embedding.weight"),
    ("visual.cls_embedding", "embeddings.class_embedding"),  # [1, 1, D] → [D]
    ("visual.pos_embedding", "embeddings.position_embedding.weight"),  # [1, N, D] → [N, D]
    ("visual.pre_norm.weight", "pre_layrnorm.weight"),  # sic: transformers' spelling
    ("visual.pre_norm.bias", "pre_layrnorm.bias"),
    ("visual.transformer.{i}.norm1.weight", "encoder.layers.{i}.layer_norm1.weight"),
    ("visual.transformer.{i}.norm1.bias", "encoder.layers.{i}.layer_norm1.bias"),
    ("visual.transformer.{i}.attn.proj.weight", "encoder.layers.{i}.self_attn.out_proj.weight"),
    ("visual.transformer.{i}.attn.proj.bias", "encoder.layers.{i}.self_attn.out_proj.bias"),
    ("visual.transformer.{i}.norm2.weight", "encoder.layers.{i}.layer_norm2.weight"),
    ("visual.transformer.{i}.norm2.bias", "encoder.layers.{i}.layer_norm2.bias"),
    ("visual.transformer.{i}.mlp.0.weight", "encoder.layers.{i}.mlp.fc1.weight"),
    ("visual.transformer.{i}.mlp.0.bias", "encoder.layers.{i}.mlp.fc1.bias"),
    ("visual.transformer.{i}.mlp.2.weight", "encoder.layers.{i}.mlp.fc2.weight"),
    ("visual.transformer.{i}.mlp.2.bias", "encoder.layers.{i}.mlp.fc2.bias"),
    ("visual.post_norm.weight", "post_layernorm.weight"),
    ("visual.post_norm.bias", "post_layernorm.bias"),
]
_CLIP_QKV = "visual.transformer.{i}.attn.to_qkv.{p}"  # p: weight [3D, D] | bias [3D], rows q|k|v
_CLIP_QKV_HF = "encoder.layers.{i}.self_attn.{n}_proj.{p}"
# The contrastive projection [D, 1024] is part of `visual` but not of the tower Wan uses.
_CLIP_IGNORED = {"visual.head"}
# transformers name → its number of dims, for tensors open-clip stores with leading 1s.
_CLIP_LEADING_ONES = {"embeddings.class_embedding": 1, "embeddings.position_embedding.weight": 2}


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + r"\Z")


_T5_FORWARD = [(_compile(src), dst) for src, dst in T5_KEY_MAP]
_T5_BACKWARD = [(_compile(dst), src) for src, dst in T5_KEY_MAP]
_CLIP_FORWARD = [(_compile(src), dst) for src, dst in CLIP_KEY_MAP]
_CLIP_BACKWARD = [(_compile(dst), src) for src, dst in CLIP_KEY_MAP]
_CLIP_QKV_RE = re.compile(r"visual\.transformer\.(?P<i>\d+)\.attn\.to_qkv\.(?P<p>weight|bias)\Z")
_CLIP_QKV_HF_RE = re.compile(
    r"encoder\.layers\.(?P<i>\d+)\.self_attn\.(?P<n>[qkv])_proj\.(?P<p>weight|bias)\Z"
)


def _rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in table:
        m = pattern.match(key)
        if m:
            return template.replace("{i}", m.group("i")) if "{i}" in template else template
    return None


def t5_official_to_hf(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Official Wan T5 state dict → UMT5EncoderModel names; also returns unrecognised keys."""
    out: dict[str, torch.Tensor] = {}
    unknown: set[str] = set()
    for key, tensor in sd.items():
        new = _rename(key, _T5_FORWARD)
        if new is None:
            unknown.add(key)
        else:
            out[new] = tensor
    if "shared.weight" in out:
        out[_T5_TIED_KEY] = out["shared.weight"]
    return out, unknown


def t5_hf_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UMT5EncoderModel state dict → official Wan T5 names (used to write official files)."""
    out = {}
    for key, tensor in sd.items():
        if key == _T5_TIED_KEY:
            continue
        new = _rename(key, _T5_BACKWARD)
        if new is None:
            raise KeyError(f"no official name for {key}")
        out[new] = tensor
    return out


def _clip_official_to_hf(
    sd: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """`visual.*` of the official open-clip model → CLIPVisionModel names (+ unknown keys).

    Keys outside `visual.` (the XLM-RoBERTa text tower, `log_scale`) are not ours and are
    skipped; so is `visual.head`.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: set[str] = set()
    for key, tensor in sd.items():
        if not key.startswith("visual.") or key in _CLIP_IGNORED:
            continue
        qkv = _CLIP_QKV_RE.match(key)
        if qkv:
            # Wan splits the fused projection as .view(b, s, 3, heads, head_dim): rows are
            # [q | k | v], each D rows.
            for name, part in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                out[_CLIP_QKV_HF.format(i=qkv["i"], n=name, p=qkv["p"])] = part
            continue
        new = _rename(key, _CLIP_FORWARD)
        if new is None:
            unknown.add(key)
        elif new in _CLIP_LEADING_ONES:
            # open-clip keeps broadcast dims: cls [1, 1, D] → [D], pos [1, N, D] → [N, D]
            while tensor.dim() > _CLIP_LEADING_ONES[new] and tensor.shape[0] == 1:
                tensor = tensor[0]
            out[new] = tensor
        else:
            out[new] = tensor
    return out, unknown


def _t5_source_name(key: str) -> str:
    """The official name of a UMT5EncoderModel key, for error messages."""
    if key == _T5_TIED_KEY:
        return "token_embedding.weight"
    return _rename(key, _T5_BACKWARD) or key


def _clip_source_name(key: str) -> str:
    """The official name of a CLIPVisionModel key, for error messages."""
    key = key.removeprefix("vision_model.")
    qkv = _CLIP_QKV_HF_RE.match(key)
    if qkv:
        return _CLIP_QKV.format(i=qkv["i"], p=qkv["p"])
    return _rename(key, _CLIP_BACKWARD) or key


def _clip_hf_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPVisionModel state dict → official `visual.*` names (used to write official files)."""
    out: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        key = key.removeprefix("vision_model.")
        qkv = _CLIP_QKV_HF_RE.match(key)
        if qkv:
            qkv_parts.setdefault((qkv["i"], qkv["p"]), {})[qkv["n"]] = tensor
            continue
        new = _rename(key, _CLIP_BACKWARD)
        if new is None:
            raise KeyError(f"no official name for {key}")
        if new == "visual.cls_embedding":
            tensor = tensor.reshape(1, 1, -1)
        elif new == "visual.pos_embedding":
            tensor = tensor.unsqueeze(0)
        out[new] = tensor
    for (i, p), parts in qkv_parts.items():
        out[_CLIP_QKV.format(i=i, p=p)] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# ---------------------------------------------------------------------------------------------
# Architecture from tensor shapes
# ---------------------------------------------------------------------------------------------


def _needed(sd: dict[str, torch.Tensor], key: str, what: str, path: Path) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{what} checkpoint {path}: missing keys: {key}")
    return sd[key]


def _layer_count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    # A gap in the indices shows up later as missing keys of the absent layer.
    return max(indices) + 1 if indices else 0


def umt5_config_from_official(sd: dict[str, torch.Tensor], path: Path) -> UMT5Config:
    """UMT5Config of an official Wan T5 state dict; sizes from shapes, the rest as umt5-xxl."""
    what = "text encoder"
    vocab, d_model = _needed(sd, "token_embedding.weight", what, path).shape
    num_buckets, heads = _needed(sd, "blocks.0.pos_embedding.embedding.weight", what, path).shape
    inner = _needed(sd, "blocks.0.attn.q.weight", what, path).shape[0]
    d_ff = _needed(sd, "blocks.0.ffn.fc1.weight", what, path).shape[0]
    if inner % heads:
        raise CheckpointError(
            f"{what} checkpoint {path}: attention width {inner} is not a multiple of "
            f"{heads} heads (from the relative position table)"
        )
    return UMT5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=_layer_count(sd, "blocks."),
        num_heads=heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",  # tanh-approximated GELU, as Wan's T5 GELU
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        tie_word_embeddings=False,
    )


def clip_config_from_official(sd: dict[str, torch.Tensor], path: Path) -> CLIPVisionConfig:
    """CLIPVisionConfig of the official open-clip `visual` tower; sizes from shapes."""
    what = "image encoder"
    width, channels, patch, _ = _needed(sd, "visual.patch_embedding.weight", what, path).shape
    positions = _needed(sd, "visual.pos_embedding", what, path).shape[-2]
    mlp = _needed(sd, "visual.transformer.0.mlp.0.weight", what, path).shape[0]
    grid = round((positions - 1) ** 0.5)  # one class token + grid² patches
    if grid * grid != positions - 1:
        raise CheckpointError(f"{what} checkpoint {path}: {positions} positions is not 1 + n²")
    if width % CLIP_HEAD_DIM:
        raise CheckpointError(
            f"{what} checkpoint {path}: width {width} is not a multiple of the head size "
            f"{CLIP_HEAD_DIM} of ViT-H/14"
        )
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=_layer_count(sd, "visual.transformer."),
        num_attention_heads=width // CLIP_HEAD_DIM,
        num_channels=channels,
        image_size=grid * patch,
        patch_size=patch,
        # open-clip ViT-H/14 is built with activation='gelu' (nn.GELU, exact erf), not
        # quick_gelu; its LayerNorms use eps 1e-5.
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
    )


# ---------------------------------------------------------------------------------------------
# Text encoder
# ---------------------------------------------------------------------------------------------


def clean_prompt(text: str) -> str:
    """Wan's `clean='whitespace'`: fix mojibake, unescape HTML twice, collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def load_tokenizer(folder: str | Path, what: str = "tokenizer"):
    """A tokenizer from a local folder only (no download)."""
    folder = _require_dir(Path(folder), what)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load {what} from {folder}: {first_line(err)}") from err


class TextEncoder:
    """umT5 encoder + its tokenizer: prompts → [B, 512, d_model] text context."""

    def __init__(self, model: UMT5EncoderModel, tokenizer, text_len: int = TEXT_LEN) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len

    @classmethod
    def from_official(
        cls,
        pth_path: str | Path,
        tokenizer_dir: str | Path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> TextEncoder:
        """From `models_t5_umt5-xxl-enc-bf16.pth` and the `google/umt5-xxl` tokenizer folder."""
        path = Path(pth_path)
        tokenizer = load_tokenizer(tokenizer_dir, "text tokenizer")
        official = load_pth(path, "text encoder")
        config = umt5_config_from_official(official, path)
        state, unknown = t5_official_to_hf(official)
        with torch.device("meta"):
            model = UMT5EncoderModel(config)
        _assign_weights(model, state, unknown, dtype, "text encoder", path, _t5_source_name)
        model.tie_weights()  # one embedding tensor behind shared / encoder.embed_tokens
        return cls(model, tokenizer).to(device)

    @classmethod
    def from_diffusers(
        cls,
        text_encoder_dir: str | Path,
        tokenizer_dir: str | Path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> TextEncoder:
        """From diffusers' `text_encoder/` (UMT5EncoderModel) and `tokenizer/` folders."""
        tokenizer = load_tokenizer(tokenizer_dir, "text tokenizer")
        model = _from_pretrained(UMT5EncoderModel, Path(text_encoder_dir), dtype, "text encoder")
        return cls(model, tokenizer).to(device)

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TextEncoder:
        self.model.to(device=device, dtype=dtype)
        return self

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned prompts → (ids, mask), both [B, text_len] int64, padded/truncated."""
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,  # appends </s>, as Wan does
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch.input_ids, batch.attention_mask

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts → [B, text_len, d_model] in the encoder's dtype; zero past each prompt."""
        if isinstance(prompts, str) or not prompts:
            raise LX2VError("encode() takes a non-empty list of prompts")
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, D]
        # masked_fill rather than a product: padded rows must not leak inf/NaN.
        return hidden.masked_fill(mask.unsqueeze(-1) == 0, 0.0)


# ---------------------------------------------------------------------------------------------
# Image encoder
# ---------------------------------------------------------------------------------------------


def load_official_clip_vision(pth_path: str | Path, dtype: torch.dtype) -> CLIPVisionModel:
    """The whole CLIP vision tower (all layers) from the official open-clip `.pth`."""
    path = Path(pth_path)
    official = load_pth(path, "image encoder")
    config = clip_config_from_official(official, path)
    state, unknown = _clip_official_to_hf(official)
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    prefix = clip_tower_prefix(model)
    state = {prefix + k: v for k, v in state.items()}
    _assign_weights(model, state, unknown, dtype, "image encoder", path, _clip_source_name)
    # Non-persistent buffer, not in any checkpoint: rebuild it off the meta device.
    embeddings = model.get_submodule(prefix + "embeddings")
    positions = torch.arange(embeddings.num_positions).expand((1, -1))
    embeddings.register_buffer("position_ids", positions, persistent=False)
    return model


class ImageEncoder:
    """CLIP vision tower: images in [-1, 1] → [B, 257, width] tokens of the penultimate block.

    Wan's `use_31_block=True` runs `transformer[:-1]` and returns its output with no
    `post_norm`; diffusers' WanImageToVideoPipeline takes `hidden_states[-2]` of
    CLIPVisionModel, where hidden_states[0] is the pre-norm'ed embedding and [k] the output of
    block k, so [-2] is the output of block L-1, likewise without `post_layernorm` (that norm
    only touches the pooled token). They are the same tensor. We load every block (so a
    truncated checkpoint is still an error) and then drop the last one, which never
    contributes; `last_hidden_state` of the shortened model is that tensor.
    """

    def __init__(
        self,
        model: CLIPVisionModel,
        mean: tuple[float, ...] = CLIP_MEAN,
        std: tuple[float, ...] = CLIP_STD,
    ) -> None:
        layers = model.get_submodule(clip_tower_prefix(model) + "encoder.layers")
        del layers[-1]
        model.config.num_hidden_layers -= 1
        self.model = model.eval().requires_grad_(False)
        self.image_size: int = model.config.image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    @classmethod
    def from_official(
        cls,
        pth_path: str | Path,
        *,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
    ) -> ImageEncoder:
        """From `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (only `visual.*`)."""
        return cls(load_official_clip_vision(pth_path, dtype)).to(device)

    @classmethod
    def from_diffusers(
        cls,
        image_encoder_dir: str | Path,
        image_processor_dir: str | Path | None = None,
        *,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
    ) -> ImageEncoder:
        """From diffusers' `image_encoder/`; mean/std from `image_processor/` when given.

        Resizing always follows Wan (squash to the model's image size, torch bicubic), not
        CLIPImageProcessor's shortest-side resize + centre crop on PIL images.
        """
        model = _from_pretrained(CLIPVisionModel, Path(image_encoder_dir), dtype, "image encoder")
        mean, std = CLIP_MEAN, CLIP_STD
        if image_processor_dir is not None:
            folder = _require_dir(Path(image_processor_dir), "image processor")
            config_path = folder / "preprocessor_config.json"
            try:
                config = json.loads(config_path.read_text())
                mean, std = tuple(config["image_mean"]), tuple(config["image_std"])
            except (OSError, ValueError, KeyError) as err:
                raise CheckpointError(
                    f"cannot read image mean/std from {config_path}: {first_line(err)}"
                ) from err
        return cls(model, mean, std).to(device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ImageEncoder:
        self.model.to(device=device, dtype=dtype)
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] → [B, 3, S, S] CLIP-normalised float32 (S = image size)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise LX2VError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        x = images.to(device=self.device, dtype=torch.float32)
        size = (self.image_size, self.image_size)
        # Same order as Wan: resize in [-1, 1], then to [0, 1]; no clamp after the bicubic
        # overshoot. (Bicubic weights sum to 1, so the order would not matter anyway.)
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        x = x.mul(0.5).add(0.5)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] → [B, 1 + (S/patch)², width] in the encoder's dtype."""
        pixels = self.preprocess(images).to(self.dtype)
        return self.model(pixel_values=pixels).last_hidden_state


def clip_tower_prefix(model: CLIPVisionModel) -> str:
    """transformers 4 nests the tower under `vision_model`; transformers 5 does not."""
    return "vision_model." if hasattr(model, "vision_model") else ""


# ---------------------------------------------------------------------------------------------
# Tiny checkpoints for tests and the embedded default model
# ---------------------------------------------------------------------------------------------

# Enough whole words that ordinary prompts mostly become word tokens; every printable ASCII
# character is in the vocabulary too, so any English prompt tokenizes without <unk>.
_TINY_WORDS = (
    "a an the and or of in on at to with from by for is are was be it this that his her "
    "their its over under into up down while as very slowly quickly camera shot close wide "
    "view light bright dark color colors red green blue white black golden sun sunset beach "
    "sea ocean wave waves sky cloud clouds city street night day rain snow tree trees forest "
    "mountain river water cat cats dog dogs man woman person people child bird fish horse "
    "car walking running walks runs flying sitting standing dancing playing looking smiling "
    "video scene background style cinematic realistic detailed high quality low worst blurry "
    "static still picture image frame motion moving"
).split()


def build_tiny_tokenizer() -> Tokenizer:
    """A SentencePiece-style Unigram tokenizer made from a fixed vocabulary (no training).

    Ids: 0 <pad>, 1 </s>, 2 <unk> (as umT5); `</s>` is appended to every sequence.
    """
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -6.0)]
    chars = [c for c in string.printable if not c.isspace()]
    vocab += [(c, -10.0) for c in chars] + [("▁" + c, -9.0) for c in chars]
    vocab += [("▁" + w, -2.0 - 0.01 * i) for i, w in enumerate(_TINY_WORDS)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return tok


def write_tiny_tokenizer(folder: Path) -> int:
    """Write the tiny tokenizer as tokenizer.json + configs; returns its vocabulary size."""
    tok = build_tiny_tokenizer()
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": TEXT_LEN,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        **special,
    }
    with atomic_dir(folder) as tmp:
        (tmp / "tokenizer.json").write_text(tok.to_str(pretty=True))
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True))
    return tok.get_vocab_size()


def write_tiny_text_encoder(
    root: Path, layout: str, seed: int = 0, d_model: int = 32
) -> dict[str, int]:
    """A tiny random umT5 encoder + tokenizer in the "official" or "diffusers" layout.

    The same seed gives the same weights in both layouts (bf16 values, as the official file).
    `d_model` must equal the DiT's text_dim.
    """
    root = Path(root)
    _check_layout(layout)
    tok_dir = root / (T5_OFFICIAL_TOKENIZER if layout == "official" else "tokenizer")
    tokenizer_vocab = write_tiny_tokenizer(tok_dir)
    sizes = {
        "text_dim": d_model,
        "vocab": -(-tokenizer_vocab // 64) * 64,  # padded past the tokenizer, as umt5-xxl is
        "tokenizer_vocab": tokenizer_vocab,
        "layers": 2,
        "heads": 2,
        "d_kv": 16,
        "d_ff": 64,
    }
    config = UMT5Config(
        vocab_size=sizes["vocab"],
        d_model=d_model,
        d_kv=sizes["d_kv"],
        d_ff=sizes["d_ff"],
        num_layers=sizes["layers"],
        num_heads=sizes["heads"],
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = UMT5EncoderModel(config).to(torch.bfloat16)
    _randomize_(model, seed)
    if layout == "official":
        atomic_torch_save(t5_hf_to_official(model.state_dict()), root / T5_OFFICIAL_FILE)
    else:
        with atomic_dir(root / "text_encoder") as tmp:
            model.save_pretrained(tmp)
    return sizes


def write_tiny_image_encoder(
    root: Path, layout: str, seed: int = 0, width: int = 160
) -> dict[str, int]:
    """A tiny random CLIP vision tower (224 px, patch 14 → 257 tokens, 3 blocks).

    `width` (a multiple of 80, the ViT-H/14 head size) is the DiT's image_dim. The official
    file also holds a few `textual.*` tensors and `log_scale`, which loading must ignore.
    """
    root = Path(root)
    _check_layout(layout)
    if width % CLIP_HEAD_DIM:
        raise ValueError(f"width must be a multiple of {CLIP_HEAD_DIM}, got {width}")
    sizes = {
        "image_dim": width,
        "layers": 3,  # > 2 so that taking the penultimate block is observable
        "heads": width // CLIP_HEAD_DIM,
        "image_size": 224,
        "patch_size": 14,
        "tokens": 1 + (224 // 14) ** 2,
    }
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=sizes["layers"],
        num_attention_heads=sizes["heads"],
        image_size=sizes["image_size"],
        patch_size=sizes["patch_size"],
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    model = CLIPVisionModel(config).to(torch.float16)
    _randomize_(model, seed)
    if layout == "official":
        gen = torch.Generator().manual_seed(seed + 1)
        sd = _clip_hf_to_official(model.state_dict())
        sd["visual.head"] = torch.randn(width, 32, generator=gen).half()
        sd["textual.token_embedding.weight"] = torch.randn(16, 8, generator=gen).half()
        sd["textual.head.0.weight"] = torch.randn(8, 8, generator=gen).half()
        sd["log_scale"] = torch.tensor(4.6052, dtype=torch.float16)
        atomic_torch_save(sd, root / CLIP_OFFICIAL_FILE)
        write_tiny_tokenizer(root / CLIP_OFFICIAL_TOKENIZER)
    else:
        with atomic_dir(root / "image_encoder") as tmp:
            model.save_pretrained(tmp)
        processor = {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": sizes["image_size"]},
            "do_center_crop": True,
            "crop_size": {"height": sizes["image_size"], "width": sizes["image_size"]},
            "resample": 3,  # PIL bicubic
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD),
            "do_convert_rgb": True,
        }
        with atomic_dir(root / "image_processor") as tmp:
            text = json.dumps(processor, indent=2, sort_keys=True)
            (tmp / "preprocessor_config.json").write_text(text)
    return sizes


def _check_layout(layout: str) -> None:
    if layout not in ("official", "diffusers"):
        raise ValueError(f"layout must be 'official' or 'diffusers', got {layout!r}")


@torch.no_grad()
def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights with every tensor non-trivial (biases and norm gains too), so a wrong
    key map cannot hide behind zero biases or unit gains; the scales keep activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if "norm" in name and name.endswith("weight"):
            value = 1.0 + 0.1 * noise  # LayerNorm / RMSNorm gains
        elif param.dim() == 1:
            value = 0.1 * noise  # biases, CLIP class token
        elif name == "shared.weight":
            value = noise  # unit-variance token embeddings, as Wan's T5 init
        elif "relative_attention_bias" in name or "position_embedding" in name:
            value = 0.5 * noise
        else:
            value = noise * param[0].numel() ** -0.5  # fan-in scaling
        param.copy_(value.to(param.dtype))
