"""umT5 text encoder and CLIP image encoder: key maps, Wan's pre/post-processing, errors.

The key maps are checked against small float64 re-implementations of Wan's own T5 and
open-clip ViT forward passes that read the OFFICIAL key names directly (written here from the
formulas in wan/modules/t5.py and clip.py), so a swapped or misnamed tensor cannot pass just
because the writer and the loader share the same mistake.

Tolerance principle: our encoders run in float32 against a float64 reference; through 2-3
blocks the accumulated float32 rounding is a few hundred ulps (eps 1.2e-7), so relative L2 must
be below 1e-5. A wrong key map, head split or activation gives errors of order 1e-1 to 1.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel

from lightx2v.errors import CheckpointError
from lightx2v.models.wan.encoders import (
    CLIP_MEAN,
    CLIP_OFFICIAL_FILE,
    CLIP_STD,
    T5_OFFICIAL_FILE,
    T5_OFFICIAL_TOKENIZER,
    ImageEncoder,
    TextEncoder,
    clean_prompt,
    write_tiny_image_encoder,
    write_tiny_text_encoder,
)

F32_VS_F64 = 1e-5  # see the module docstring

PROMPTS = [
    "A cat walks on the beach at sunset, golden light, cinematic.",
    "dog",
    "  Two   people\tdancing in the rain &amp;amp; snow\n",
]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Both layouts of the same tiny weights (same seed)."""
    root = tmp_path_factory.mktemp("encoders")
    sizes = {}
    for layout in ("official", "diffusers"):
        sizes["text"] = write_tiny_text_encoder(root / layout, layout, seed=3, d_model=32)
        sizes["image"] = write_tiny_image_encoder(root / layout, layout, seed=4, width=160)
    return root, sizes


def official_text(root) -> TextEncoder:
    return TextEncoder.from_official(
        root / "official" / T5_OFFICIAL_FILE,
        root / "official" / T5_OFFICIAL_TOKENIZER,
        dtype=torch.float32,
    )


def official_image(root) -> ImageEncoder:
    return ImageEncoder.from_official(root / "official" / CLIP_OFFICIAL_FILE, dtype=torch.float32)


def load_official(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True, map_location="cpu")


# ---------------------------------------------------------------------------------------------
# Float64 references on official key names
# ---------------------------------------------------------------------------------------------


def ref_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int = 128) -> torch.Tensor:
    """Bidirectional T5 relative-position bucket of rel = key index - query index."""
    half = num_buckets // 2  # one half of the buckets per direction
    exact = half // 2  # distances below this get a bucket each; beyond, log-spaced
    n = rel.abs()
    log_spaced = (
        exact
        + (
            torch.log(n.double().clamp(min=1) / exact)
            / math.log(max_distance / exact)
            * (half - exact)
        ).long()
    )
    return (rel > 0).long() * half + torch.where(n < exact, n, log_spaced.clamp(max=half - 1))


def ref_umt5(sd: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Wan's T5Encoder (shared_pos=False) in float64. ids, mask: [B, L] → [B, L, D]."""
    sd = {k: v.double() for k, v in sd.items()}

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    b, length = ids.shape
    x = sd["token_embedding.weight"][ids]
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(layers):
        p = f"blocks.{i}."
        table = sd[p + "pos_embedding.embedding.weight"]  # [buckets, heads]
        heads = table.shape[1]
        bias = table[ref_bucket(rel, table.shape[0])].permute(2, 0, 1)  # [H, L, L]
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = (
            (h @ sd[p + f"attn.{n}.weight"].T).view(b, length, heads, -1).transpose(1, 2)
            for n in "qkv"
        )
        logits = q @ k.transpose(-1, -2) + bias  # T5 has no 1/sqrt(d) scale
        logits = logits.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        attn = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, length, -1)
        x = x + attn @ sd[p + "attn.o.weight"].T
        h = rms(x, sd[p + "norm2.weight"])
        gated = gelu_tanh(h @ sd[p + "ffn.gate.0.weight"].T) * (h @ sd[p + "ffn.fc1.weight"].T)
        x = x + gated @ sd[p + "ffn.fc2.weight"].T
    return rms(x, sd["norm.weight"])


def ref_clip_penultimate(sd: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """open-clip VisionTransformer(use_31_block=True) in float64: all blocks but the last."""
    sd = {k: v.double() for k, v in sd.items() if k.startswith("visual.")}

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    patch = sd["visual.patch_embedding.weight"]
    x = F.conv2d(pixels.double(), patch, stride=patch.shape[-1]).flatten(2).transpose(1, 2)
    b, _, dim = x.shape
    x = torch.cat([sd["visual.cls_embedding"].expand(b, 1, dim), x], dim=1)
    x = ln(x + sd["visual.pos_embedding"], "visual.pre_norm")
    heads = dim // 80
    layers = len({k.split(".")[2] for k in sd if k.startswith("visual.transformer.")})
    for i in range(layers - 1):
        p = f"visual.transformer.{i}."
        qkv = ln(x, p + "norm1") @ sd[p + "attn.to_qkv.weight"].T + sd[p + "attn.to_qkv.bias"]
        q, k, v = qkv.view(b, -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-1, -2)) / math.sqrt(dim // heads)).softmax(-1) @ v
        attn = attn.transpose(1, 2).reshape(b, -1, dim)
        x = x + attn @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        h = ln(x, p + "norm2") @ sd[p + "mlp.0.weight"].T + sd[p + "mlp.0.bias"]
        x = x + F.gelu(h) @ sd[p + "mlp.2.weight"].T + sd[p + "mlp.2.bias"]
    return x


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def test_clean_prompt_matches_wan_whitespace_cleaning():
    assert clean_prompt("  a\t cat \n\n runs  ") == "a cat runs"
    assert clean_prompt("rain &amp;amp; snow") == "rain & snow"  # unescaped twice
    assert clean_prompt("cafÃ©") == "café"  # ftfy repairs mojibake


def test_text_official_matches_reference_t5(ckpt):
    root, sizes = ckpt
    enc = official_text(root)
    out = enc.encode(PROMPTS)
    assert out.shape == (len(PROMPTS), 512, sizes["text"]["text_dim"])
    assert out.dtype == torch.float32

    ids, mask = enc.tokenize(PROMPTS)
    ref = ref_umt5(load_official(root / "official" / T5_OFFICIAL_FILE), ids, mask)
    valid = mask.bool()
    assert rel_l2(out[valid], ref[valid]) < F32_VS_F64


def test_text_zero_beyond_each_prompt_and_cleaning_applies(ckpt):
    root, _ = ckpt
    enc = official_text(root)
    out = enc.encode(PROMPTS)
    for row, prompt in zip(out, PROMPTS, strict=True):
        count = len(enc.tokenizer(clean_prompt(prompt)).input_ids)  # with </s>
        assert 1 < count < 40
        assert row[:count].abs().sum(-1).min() > 0
        assert torch.equal(row[count:], torch.zeros_like(row[count:]))
    # Wan cleans whitespace before tokenizing: messy and tidy spellings embed identically.
    messy = enc.encode(["  Two   people\tdancing\n in the rain"])
    tidy = enc.encode(["Two people dancing in the rain"])
    assert torch.equal(messy, tidy)
    # A batch is not a padded-together sequence: each row equals its own single encoding.
    assert torch.allclose(enc.encode([PROMPTS[1]])[0], out[1], atol=1e-6)


def test_text_official_and_diffusers_layouts_agree(ckpt):
    root, _ = ckpt
    official = official_text(root).encode(PROMPTS)
    diffusers = TextEncoder.from_diffusers(
        root / "diffusers" / "text_encoder", root / "diffusers" / "tokenizer", dtype=torch.float32
    )
    assert diffusers.dtype == torch.float32
    # Same bf16 weights, same float32 arithmetic in the same module: bit-identical.
    assert torch.equal(diffusers.encode(PROMPTS), official)


def test_text_default_dtype_and_to(ckpt):
    root, _ = ckpt
    enc = TextEncoder.from_official(
        root / "official" / T5_OFFICIAL_FILE, root / "official" / T5_OFFICIAL_TOKENIZER
    )
    assert enc.dtype == torch.bfloat16 and enc.device == torch.device("cpu")
    assert enc.model.encoder.embed_tokens.weight is enc.model.shared.weight  # tied, one copy
    assert enc.to(dtype=torch.float32).dtype == torch.float32


def test_writers_are_deterministic(ckpt, tmp_path):
    root, _ = ckpt
    write_tiny_text_encoder(tmp_path, "official", seed=3, d_model=32)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        path = f"{T5_OFFICIAL_TOKENIZER}/{name}"
        assert (tmp_path / path).read_bytes() == (root / "official" / path).read_bytes()
    a = load_official(tmp_path / T5_OFFICIAL_FILE)
    b = load_official(root / "official" / T5_OFFICIAL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.bfloat16 for v in a.values())


# ---------------------------------------------------------------------------------------------
# Image
# ---------------------------------------------------------------------------------------------


def test_image_official_matches_reference_vit(ckpt):
    root, sizes = ckpt
    enc = official_image(root)
    images = torch.rand(2, 3, 90, 130) * 2 - 1
    out = enc.encode(images)
    assert out.shape == (2, sizes["image"]["tokens"], sizes["image"]["image_dim"])
    ref = ref_clip_penultimate(
        load_official(root / "official" / CLIP_OFFICIAL_FILE), enc.preprocess(images)
    )
    assert rel_l2(out, ref) < F32_VS_F64


def test_image_is_penultimate_hidden_state_of_diffusers_clip(ckpt):
    """Ours (official file) == CLIPVisionModel(diffusers dir).hidden_states[-2], as diffusers'
    WanImageToVideoPipeline uses; and the last block's output would differ."""
    root, _ = ckpt
    enc = official_image(root)
    full = CLIPVisionModel.from_pretrained(
        root / "diffusers" / "image_encoder", dtype=torch.float32
    )
    images = torch.rand(2, 3, 224, 224) * 2 - 1
    pixels = enc.preprocess(images)
    with torch.no_grad():
        hidden = full(pixel_values=pixels, output_hidden_states=True).hidden_states
    out = enc.encode(images)
    # Same fp16-representable weights, float32 in both: only summation-order differences.
    assert rel_l2(out, hidden[-2]) < F32_VS_F64
    assert rel_l2(out, hidden[-1]) > 0.05

    diffusers = ImageEncoder.from_diffusers(
        root / "diffusers" / "image_encoder", root / "diffusers" / "image_processor",
        dtype=torch.float32,
    )  # fmt: skip
    assert torch.equal(diffusers.encode(images), out)


def test_image_preprocess_by_hand(ckpt):
    root, _ = ckpt
    enc = official_image(root)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    # A per-channel constant image stays constant through any bicubic resize (weights sum to 1).
    levels = torch.tensor([-1.0, 0.2, 0.9]).view(1, 3, 1, 1)
    out = enc.preprocess(levels.expand(2, 3, 57, 301))
    assert out.shape == (2, 3, 224, 224)
    want = ((levels * 0.5 + 0.5) - mean) / std
    torch.testing.assert_close(out, want.expand_as(out), rtol=0, atol=1e-5)
    # At 224x224 the resize is the identity: only [-1, 1] → [0, 1] and normalisation remain.
    images = torch.rand(1, 3, 224, 224) * 2 - 1
    want = ((images * 0.5 + 0.5) - mean) / std
    torch.testing.assert_close(enc.preprocess(images), want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def edited_copy(src, dst, drop=(), add=None):
    sd = load_official(src)
    for key in drop:
        del sd[key]
    sd.update(add or {})
    torch.save(sd, dst)
    return dst


def test_text_missing_and_unexpected_keys(ckpt, tmp_path):
    root, _ = ckpt
    src, tok = root / "official" / T5_OFFICIAL_FILE, root / "official" / T5_OFFICIAL_TOKENIZER
    bad = edited_copy(src, tmp_path / "a.pth", drop=["blocks.1.ffn.fc2.weight"])
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.ffn\.fc2\.weight"):
        TextEncoder.from_official(bad, tok)
    bad = edited_copy(src, tmp_path / "b.pth", add={"blocks.0.attn.extra": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: blocks\.0\.attn\.extra"):
        TextEncoder.from_official(bad, tok)
    bad = edited_copy(src, tmp_path / "c.pth", add={"blocks.0.norm1.weight": torch.ones(7)})
    with pytest.raises(CheckpointError, match=r"blocks\.0\.norm1\.weight has shape \(7,\)"):
        TextEncoder.from_official(bad, tok)
    with pytest.raises(CheckpointError, match="not found"):
        TextEncoder.from_official(tmp_path / "nope.pth", tok)
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a plain dict of tensors"):
        TextEncoder.from_official(tmp_path / "list.pth", tok)


def test_missing_tokenizer_folder(ckpt, tmp_path):
    root, _ = ckpt
    with pytest.raises(CheckpointError, match="tokenizer folder not found: .*no_tokenizer"):
        TextEncoder.from_official(root / "official" / T5_OFFICIAL_FILE, tmp_path / "no_tokenizer")
    with pytest.raises(CheckpointError, match="text encoder folder not found"):
        TextEncoder.from_diffusers(tmp_path / "missing", root / "diffusers" / "tokenizer")


def test_image_missing_and_unexpected_keys(ckpt, tmp_path):
    root, _ = ckpt
    src = root / "official" / CLIP_OFFICIAL_FILE
    # The last block is never run, but a checkpoint without it is still incomplete.
    bad = edited_copy(src, tmp_path / "a.pth", drop=["visual.transformer.2.attn.to_qkv.bias"])
    with pytest.raises(CheckpointError, match=r"missing keys: visual\.transformer\.2\.attn"):
        ImageEncoder.from_official(bad)
    bad = edited_copy(src, tmp_path / "b.pth", add={"visual.extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: visual\.extra"):
        ImageEncoder.from_official(bad)
    # Keys outside the vision tower (text tower, log_scale, visual.head) are ignored.
    assert {"log_scale", "visual.head"} <= load_official(src).keys()


def test_diffusers_missing_key(ckpt, tmp_path):
    root, _ = ckpt
    import shutil

    folder = shutil.copytree(root / "diffusers" / "image_encoder", tmp_path / "image_encoder")
    sd = load_file(folder / "model.safetensors")
    del sd["encoder.layers.0.mlp.fc1.bias"]
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys: .*layers\.0\.mlp\.fc1\.bias"):
        ImageEncoder.from_diffusers(folder)
