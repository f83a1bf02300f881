"""Wan2.1 VAE: key map, loading both layouts, normalisation, shapes, tiling, I2V condition.

Tolerance principle: where our code and diffusers run the same modules on the same fp32
weights, the only difference is the order of a few fp32 operations (e.g. x / std versus
x * (1 / std)), so results must agree to a few fp32 ulps of O(1) values: rtol = atol = 1e-6.
Where the same computation runs at a different shape (one batch element alone, one spatial
tile alone) the conv kernels may pick another reduction order at every one of the ~40 convs, so
ulp-level differences accumulate: we allow 1e-5 (~80 fp32 ulps of the O(1) values; measured
~1e-6). Anything looser would hide a real difference (a wrong tensor or a wrong mean/std moves
values by O(0.1)).
"""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import load_file, save_file

from lightx2v.errors import CheckpointError, LX2VError
from lightx2v.models.wan import vae as vae_module
from lightx2v.models.wan.vae import (
    OFFICIAL_FILENAME,
    TINY_VAE_CONFIG,
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    WanVAE,
    decode_memory_budget,
    decode_peak_bytes,
    diffusers_to_official_key,
    official_to_diffusers_key,
    plan_decode,
    tile_grid,
)
from lightx2v.models.wan.vae import write_tiny_vae as write_tiny

FP32 = {"rtol": 1e-6, "atol": 1e-6}  # same ops, same shapes
FP32_RESHAPED = {"rtol": 1e-5, "atol": 1e-5}  # same ops, other shapes (other conv algorithms)
FRAME_COUNTS = [1, 5, 9]
HEIGHT, WIDTH = 32, 48  # H != W so a transposed axis cannot pass


@pytest.fixture(scope="module")
def official_file(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("official"), "official", seed=0)["path"]


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("diffusers"), "diffusers", seed=0)["path"]


@pytest.fixture(scope="module")
def vae(official_file) -> WanVAE:
    return WanVAE.from_official(official_file)


@pytest.fixture(scope="module")
def reference(diffusers_dir) -> AutoencoderKLWan:
    """diffusers' own loader on the diffusers layout: the model we must behave like."""
    return AutoencoderKLWan.from_pretrained(diffusers_dir).eval()


def _video(frames: int, height: int = HEIGHT, width: int = WIDTH, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, height, width, generator=gen) * 2 - 1


def _stats(shape=(1, 16, 1, 1, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(WAN21_LATENTS_MEAN).view(shape), torch.tensor(WAN21_LATENTS_STD).view(shape)


# ---- key map ---------------------------------------------------------------------------------


@pytest.mark.parametrize("num_res_blocks", [1, 2, 3])
def test_key_map_is_a_bijection(num_res_blocks):
    with torch.device("meta"):
        model = AutoencoderKLWan(base_dim=8, num_res_blocks=num_res_blocks)
    keys = list(model.state_dict())
    official = [diffusers_to_official_key(k, num_res_blocks) for k in keys]
    assert None not in official
    assert len(set(official)) == len(keys)
    assert [official_to_diffusers_key(k, num_res_blocks) for k in official] == keys
    assert official_to_diffusers_key("encoder.extra.weight", num_res_blocks) is None


def test_key_map_agrees_with_diffusers_converter(official_file):
    # diffusers' converter hard-codes the real Wan2.1 layout (2 residual blocks per stage),
    # which the tiny model shares: an independent check of every name and tensor.
    sd = torch.load(official_file, weights_only=True)
    theirs = convert_wan_vae_to_diffusers(dict(sd))
    ours = {official_to_diffusers_key(k, 2): v for k, v in sd.items()}
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_official_round_trip_is_identity(official_file, vae):
    # official file -> WanVAE (diffusers names) -> official names: same keys, same tensors.
    sd = torch.load(official_file, weights_only=True)
    back = {diffusers_to_official_key(k, 2): v for k, v in vae.model.state_dict().items()}
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


# ---- loading ---------------------------------------------------------------------------------


def test_architecture_read_from_shapes(vae):
    cfg = vae.model.config
    for name in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample"):
        assert getattr(cfg, name) == TINY_VAE_CONFIG[name], name
    assert vae.dtype == torch.float32 and vae.device == torch.device("cpu")


def test_both_layouts_load_the_same_weights(vae, diffusers_dir, reference):
    from_diffusers = WanVAE.from_diffusers(diffusers_dir)
    ref = reference.state_dict()
    for other in (vae, from_diffusers):
        sd = other.model.state_dict()
        assert sd.keys() == ref.keys()
        for k in ref:
            assert torch.equal(sd[k], ref[k]), k
    torch.testing.assert_close(from_diffusers.latents_mean, torch.tensor(WAN21_LATENTS_MEAN))


def test_tiny_writer_is_deterministic(tmp_path):
    a = torch.load(write_tiny(tmp_path / "a", "official", seed=3)["path"], weights_only=True)
    b = torch.load(write_tiny(tmp_path / "b", "official", seed=3)["path"], weights_only=True)
    c = torch.load(write_tiny(tmp_path / "c", "official", seed=4)["path"], weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_diffusers_config_supplies_latent_stats(tmp_path):
    vae_dir = write_tiny(tmp_path, "diffusers")["path"]
    config = json.loads((vae_dir / "config.json").read_text())
    config["latents_mean"] = [0.5] * 16
    config["latents_std"] = [2.0] * 16
    (vae_dir / "config.json").write_text(json.dumps(config))
    custom = WanVAE.from_diffusers(vae_dir)
    video = _video(1)
    mu = custom.model.encode(video).latent_dist.mode()
    torch.testing.assert_close(custom.encode(video), (mu - 0.5) / 2.0, **FP32)


# ---- encode / decode -------------------------------------------------------------------------


@pytest.mark.parametrize("frames", FRAME_COUNTS)
def test_shapes(vae, frames):
    latents = vae.encode(_video(frames))
    assert latents.shape == (1, 16, (frames - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    assert latents.dtype == torch.float32
    video = vae.decode(latents)
    assert video.shape == (1, 3, frames, HEIGHT, WIDTH)
    assert video.min() >= -1 and video.max() <= 1


def test_normalisation_matches_formula(vae, reference):
    video = _video(5)
    mean, std = _stats()
    mu = reference.encode(video).latent_dist.mode()  # posterior mean, never a sample
    latents = vae.encode(video)
    torch.testing.assert_close(latents, (mu - mean) / std, **FP32)
    # The normalisation is not the identity here: a missing one would be caught.
    assert (latents - mu).abs().max() > 0.1
    expected = reference.decode(latents * std + mean).sample.clamp(-1, 1)
    torch.testing.assert_close(vae.decode(latents), expected, **FP32)


def test_batch_is_independent(vae):
    videos = torch.cat([_video(5, seed=1), _video(5, seed=2)])
    latents = vae.encode(videos)
    torch.testing.assert_close(latents[1:], vae.encode(videos[1:]), **FP32_RESHAPED)


def test_to_bfloat16_keeps_fp32_interface(official_file):
    vae = WanVAE.from_official(official_file).to("cpu", torch.bfloat16)
    assert vae.dtype == torch.bfloat16 and vae.latents_mean.dtype == torch.float32
    latents = vae.encode(_video(1))
    assert latents.dtype == torch.float32
    assert vae.decode(latents).dtype == torch.float32


# ---- tiled decode ----------------------------------------------------------------------------


def test_tiled_decode(vae):
    """Tiled decode is not compared with untiled decode at a tolerance: each tile sees only its
    own context, and the mid-block attention is global within a tile, so with random weights
    the two differ by O(1) wherever tiles overlap (trained weights make the seams nearly
    invisible; random ones do not). We check instead what tiling promises: a frame within one
    tile is decoded exactly as untiled, a tile's own region is that tile's plain decode, and
    the overlap is the linear blend of the two neighbours.
    """
    tile, stride = 32, 24  # pixels; latent tile 4, latent stride 3, blend width 8 px
    latents = vae.encode(_video(5, height=64, width=96))  # latent 8 x 12: 3 x 4 tiles
    untiled = vae.decode(latents)
    torch.testing.assert_close(vae.decode(latents, tiled=True), untiled, rtol=0, atol=0)

    tiled = vae.decode(latents, tiled=True, tile_size=tile, tile_stride=stride)
    assert tiled.shape == untiled.shape and not vae.model.use_tiling
    assert (tiled - untiled).abs().max() > 0  # it really tiled

    t_lat, s_lat = tile // 8, stride // 8
    left = vae.decode(latents[..., :t_lat, :t_lat])  # tile (0, 0): [1, 3, 5, 32, 32]
    right = vae.decode(latents[..., :t_lat, s_lat : s_lat + t_lat])  # tile (0, 1)
    torch.testing.assert_close(
        tiled[..., :stride, :stride], left[..., :stride, :stride], **FP32_RESHAPED
    )

    blend = tile - stride
    ramp = torch.arange(blend) / blend  # weight of the right tile across the overlap
    a = left[..., :stride, stride:tile]
    b = right[..., :stride, :blend]
    seam = tiled[..., :stride, stride : stride + blend]
    # Our tile decodes are clamped; compare where neither neighbour was clipped.
    inside = (a.abs() < 1) & (b.abs() < 1)
    assert inside.float().mean() > 0.5
    expected = (a * (1 - ramp) + b * ramp).clamp(-1, 1)
    torch.testing.assert_close(seam[inside], expected[inside], **FP32_RESHAPED)


def test_tile_sizes_are_checked(vae):
    latents = torch.zeros(1, 16, 1, 4, 4)
    with pytest.raises(LX2VError, match="multiples of 8"):
        vae.decode(latents, tiled=True, tile_size=30, tile_stride=24)
    with pytest.raises(LX2VError, match="stride"):
        vae.decode(latents, tiled=True, tile_size=32, tile_stride=40)


# ---- I2V condition ---------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 9])
def test_i2v_condition_matches_diffusers_pipeline(vae, reference, frames):
    image = _video(1, seed=5)[0, :, 0]  # [3, H, W]
    pipe = WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=reference,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    _, theirs = pipe.prepare_latents(
        image[None], 1, 16, HEIGHT, WIDTH, frames, torch.float32, torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    ours = vae.i2v_condition(image, frames)
    lat_frames = (frames - 1) // 4 + 1
    assert ours.shape == (20, lat_frames, HEIGHT // 8, WIDTH // 8)
    torch.testing.assert_close(ours, theirs[0], **FP32)
    # The mask on its own: latent frame 0 (the given image) is known, the rest are not.
    assert torch.all(ours[:4, 0] == 1) and torch.all(ours[:4, 1:] == 0)


def test_i2v_condition_rejects_bad_frame_count(vae):
    with pytest.raises(LX2VError, match="4k\\+1"):
        vae.i2v_condition(torch.zeros(3, HEIGHT, WIDTH), 8)


def test_encode_rejects_bad_sizes(vae):
    with pytest.raises(LX2VError, match="4k\\+1"):
        vae.encode(torch.zeros(1, 3, 4, HEIGHT, WIDTH))
    with pytest.raises(LX2VError, match="multiple of 8"):
        vae.encode(torch.zeros(1, 3, 1, 36, WIDTH))


# ---- bad checkpoints -------------------------------------------------------------------------


def test_missing_and_unexpected_keys(official_file, tmp_path):
    sd = dict(torch.load(official_file, weights_only=True))
    del sd["decoder.middle.1.proj.bias"]
    sd["encoder.extra.weight"] = torch.zeros(1)
    bad = tmp_path / OFFICIAL_FILENAME
    torch.save(sd, bad)
    with pytest.raises(CheckpointError) as err:
        WanVAE.from_official(bad)
    msg = str(err.value)
    assert "decoder.mid_block.attentions.0.proj.bias" in msg and "encoder.extra.weight" in msg
    assert "\n" not in msg


def test_long_key_lists_are_truncated(official_file, tmp_path):
    sd = dict(torch.load(official_file, weights_only=True))
    decoder_keys = [k for k in sd if k.startswith("decoder.upsamples.")]
    for k in decoder_keys:
        del sd[k]
    torch.save(sd, tmp_path / OFFICIAL_FILENAME)
    with pytest.raises(CheckpointError, match=rf"missing {len(decoder_keys)} .*more\)"):
        WanVAE.from_official(tmp_path / OFFICIAL_FILENAME)


def test_wrong_shape_is_an_error(official_file, tmp_path):
    sd = dict(torch.load(official_file, weights_only=True))
    sd["decoder.middle.1.proj.bias"] = torch.zeros(5)
    torch.save(sd, tmp_path / OFFICIAL_FILENAME)
    with pytest.raises(CheckpointError, match="wrong shape"):
        WanVAE.from_official(tmp_path / OFFICIAL_FILENAME)


def test_diffusers_missing_key(tmp_path):
    vae_dir = write_tiny(tmp_path, "diffusers")["path"]
    weights = vae_dir / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    del sd["post_quant_conv.bias"]
    save_file(sd, weights)
    with pytest.raises(CheckpointError, match="post_quant_conv.bias"):
        WanVAE.from_diffusers(vae_dir)
    weights.write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="cannot read the VAE weights"):
        WanVAE.from_diffusers(vae_dir)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        WanVAE.from_official(tmp_path / OFFICIAL_FILENAME)
    (tmp_path / OFFICIAL_FILENAME).write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read") as err:
        WanVAE.from_official(tmp_path / OFFICIAL_FILENAME)
    assert "\n" not in str(err.value)
    torch.save({"weights": [1, 2]}, tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="plain dict of tensors"):
        WanVAE.from_official(tmp_path / "list.pth")
    torch.save({"encoder.conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a Wan2.1 VAE"):
        WanVAE.from_official(tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="config.json"):
        WanVAE.from_diffusers(tmp_path)


# ---- decode memory model and the tiling plan -------------------------------------------------


def test_estimate_is_monotonic_in_size():
    """More frames, rows or columns never need less memory, untiled or at a fixed tile; and at
    real sizes tiling needs less than the whole frame."""
    base = (1, 16, 5, 40, 64)
    for tile in (None, (256, 192)):
        for axis in (2, 3, 4):
            sizes = [base[:axis] + (n,) + base[axis + 1 :] for n in range(2, 90, 3)]
            est = [decode_peak_bytes(s, tile) for s in sizes]
            assert all(a <= b for a, b in zip(est, est[1:], strict=False)), (tile, axis)
            if tile is None:
                assert all(a < b for a, b in zip(est, est[1:], strict=False)), axis
    assert decode_peak_bytes((2, *base[1:])) == 2 * decode_peak_bytes(base)
    for lat in ((1, 16, 21, 60, 104), (1, 16, 21, 90, 160)):  # 480P, 720P, 81 frames
        untiled = decode_peak_bytes(lat)
        assert untiled > 1e9
        for tile in ((256, 192), (384, 320), (512, 448)):
            assert decode_peak_bytes(lat, tile) < untiled, (lat, tile)
    assert decode_peak_bytes(base, None, torch.float32) > decode_peak_bytes(base)


def test_tile_grid_matches_diffusers_loop():
    # latent 8 x 24 at 128/64 px (16/8 latent): rows start at 0 only, columns at 0, 8, 16
    assert tile_grid(8, 24, (128, 64)) == [(8, 16), (8, 16), (8, 8)]
    assert tile_grid(16, 16, (128, 64)) == []  # the frame fits one tile: decoded whole


def test_auto_is_untiled_on_cpu(vae):
    assert decode_memory_budget(torch.device("cpu")) is None
    plan = vae.plan_decode((1, 16, 21, 90, 160), "auto", max_vram_gb=1)
    assert not plan.tiled and plan.budget is None
    assert plan.describe() == "VAE decode: untiled (auto: no memory cap on this device)"
    assert vae.plan_decode((1, 16, 2, 8, 8), "on").decode_kwargs() == {
        "tiled": True, "tile_size": 256, "tile_stride": 192}  # fmt: skip
    assert not vae.plan_decode((1, 16, 2, 8, 8), False).tiled


def test_auto_tiles_under_a_small_budget(vae, monkeypatch):
    """A budget the untiled decode does not fit: the largest tile whose estimate fits, and
    that tile decodes the tiny VAE to the untiled shape."""
    latents = torch.randn(1, 16, 2, 8, 24, generator=torch.Generator().manual_seed(0))
    untiled = decode_peak_bytes(latents.shape, None, vae.dtype)
    margin = 1 << 29  # plan_decode keeps max(512 MiB, 5%) aside
    asked = []

    def fake_budget(device, max_vram_gb=None):
        asked.append((device, max_vram_gb))
        return margin + untiled - 1

    monkeypatch.setattr(vae_module, "decode_memory_budget", fake_budget)
    plan = vae.plan_decode(latents.shape, "auto", max_vram_gb=3.0)
    assert asked == [(vae.device, 3.0)]
    assert plan.tiled and plan.fits, plan
    size, stride = plan.tile_size, plan.tile_stride
    assert size % 8 == 0 and stride == size - 64 and size >= 128
    assert plan.estimate <= untiled - 1
    for larger in range(size + 8, 8 * 24, 8):  # every larger tile would not have fit
        assert decode_peak_bytes(latents.shape, (larger, larger - 64), vae.dtype) > untiled - 1
    line = plan.describe()
    assert line.startswith(f"VAE decode: tiled {size}/{stride} px (auto: ") and "\n" not in line
    video = vae.decode(latents, **plan.decode_kwargs())
    assert video.shape == vae.decode(latents).shape == (1, 3, 5, 64, 192)

    # nothing fits: the smallest tile, said to be a risk
    monkeypatch.setattr(vae_module, "decode_memory_budget", lambda d, m=None: 1)
    plan = vae.plan_decode(latents.shape)
    assert plan.tiled and (plan.tile_size, plan.tile_stride) == (128, 64) and not plan.fits
    assert plan.describe().endswith("may not fit")
    # a frame within the smallest tile cannot be split
    assert not vae.plan_decode((1, 16, 2, 8, 8)).tiled


def test_pipeline_decode_follows_the_plan(tiny_ckpts, monkeypatch, caplog):
    from lightx2v.config import GenerationRequest, RuntimeOptions
    from lightx2v.pipeline import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_ckpts["t2v", "official"], RuntimeOptions())
    req = GenerationRequest(prompt="a fox", width=160, height=96, frames=5, steps=1)
    with caplog.at_level("INFO", logger="lightx2v"):
        result = pipe.generate(req, progress=False)
    assert "VAE decode: untiled (auto: no memory cap on this device)" in caplog.text
    monkeypatch.setattr(vae_module, "decode_memory_budget", lambda d, m=None: (1 << 29) + 1)
    caplog.clear()
    with caplog.at_level("INFO", logger="lightx2v"):
        tiled = pipe.generate(req, progress=False)
    assert "VAE decode: tiled " in caplog.text
    assert tiled.video.shape == result.video.shape == (3, 5, 96, 160)
    torch.testing.assert_close(tiled.latents, result.latents, rtol=0, atol=0)


def test_vae_tiling_setting_accepts_modes_and_booleans():
    from lightx2v.cli import build_parser
    from lightx2v.config import RunConfig, RuntimeOptions, vae_tiling_mode

    assert RuntimeOptions().vae_tiling == "auto"
    for value, mode in ((True, "on"), (False, "off"), ("auto", "auto"), ("off", "off")):
        cfg = RunConfig.from_dict({"runtime": {"vae_tiling": value}})
        cfg.runtime.validate()
        assert cfg.runtime.vae_tiling == mode == vae_tiling_mode(value)
    for bad in ("sometimes", "ON", "true", ""):
        rt = RuntimeOptions(vae_tiling=bad)
        with pytest.raises(LX2VError, match="vae_tiling .*expected one of auto, on, off") as e:
            rt.validate()
        assert "\n" not in str(e.value)
    with pytest.raises(LX2VError, match="'vae_tiling' = 1 is not of type"):
        RunConfig.from_dict({"runtime": {"vae_tiling": 1}})
    with pytest.raises(LX2VError, match="vae_tiling 'tiles'"):
        plan_decode((1, 16, 2, 8, 8), "tiles", None)

    parse = build_parser().parse_args
    assert parse(["run"]).vae_tiling is None  # the config's value (default auto) stays
    assert parse(["run", "--vae-tiling"]).vae_tiling == "on"  # the old flag
    assert parse(["run", "--vae-tiling", "-q"]).vae_tiling == "on"
    for mode in ("auto", "on", "off"):
        assert parse(["run", "--vae-tiling", mode]).vae_tiling == mode
    with pytest.raises(SystemExit):
        parse(["run", "--vae-tiling", "maybe"])


def test_auto_when_nothing_fits_takes_the_least_memory_not_the_smallest_tile():
    """Smaller tiles decode more overlap, so below some size the estimate grows again; with
    a budget nothing fits, auto must pick the tile with the smallest estimate."""
    from lightx2v.models.wan.vae import MIN_TILE, TILE_OVERLAP, decode_peak_bytes

    shape = (1, 16, 21, 90, 160)  # 720P, 81 frames
    plan = plan_decode(shape, "auto", budget=1)
    assert plan.tiled and not plan.fits
    chosen = (plan.tile_size, plan.tile_stride)
    smallest = decode_peak_bytes(shape, (MIN_TILE, MIN_TILE - TILE_OVERLAP))
    assert plan.estimate == decode_peak_bytes(shape, chosen) < smallest
    for size in range(MIN_TILE, 1280, 8):
        assert plan.estimate <= decode_peak_bytes(shape, (size, size - TILE_OVERLAP))
