"""End-to-end tiny runs: layouts agree, videos decode back, seeds are deterministic."""

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lightx2v.cli import main
from lightx2v.config import GenerationRequest, RuntimeOptions
from lightx2v.errors import LX2VError
from lightx2v.io import read_video
from lightx2v.models.wan.formats import load_dit, open_checkpoint
from lightx2v.pipeline import WanPipeline

SMALL = dict(width=48, height=32, frames=5, steps=3)


@pytest.fixture(scope="module")
def pipes(tiny_ckpts):
    return {key: WanPipeline.from_pretrained(path) for key, path in tiny_ckpts.items()}


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "in.png"
    g = torch.Generator().manual_seed(0)
    Image.fromarray(
        torch.randint(0, 255, (40, 56, 3), generator=g, dtype=torch.uint8).numpy()
    ).save(path)
    return path


def request(task, image_file, **kw):
    return GenerationRequest(
        prompt="a red fox", image=str(image_file) if task == "i2v" else None, **SMALL, **kw
    )


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_layouts_load_identical_dit(tiny_ckpts, task):
    a = load_dit(open_checkpoint(tiny_ckpts[task, "official"])).state_dict()
    b = load_dit(open_checkpoint(tiny_ckpts[task, "diffusers"])).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sharded_official_layout(tmp_path, tiny_ckpts):
    from lightx2v.models.wan.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path / "sharded", "t2v", "official", seed=0, shards=3)
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    a = load_dit(open_checkpoint(tmp_path / "sharded")).state_dict()
    b = load_dit(open_checkpoint(tiny_ckpts["t2v", "official"])).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_layouts_generate_same_video(pipes, task, image_file):
    req = request(task, image_file)
    a = pipes[task, "official"].generate(req, progress=False)
    b = pipes[task, "diffusers"].generate(req, progress=False)
    # same weights in two layouts, same code path: only the loaders differ, so bit-equal
    # up to the encoders' different (but equivalent) module code: allow fp32 rounding
    rel = (a.latents - b.latents).norm() / a.latents.norm()
    assert rel < 1e-5
    assert a.video.shape == (3, 5, 32, 48)


def test_determinism_and_seed(pipes, image_file):
    p = pipes["t2v", "official"]
    a = p.generate(request("t2v", image_file, seed=1), progress=False)
    b = p.generate(request("t2v", image_file, seed=1), progress=False)
    c = p.generate(request("t2v", image_file, seed=2), progress=False)
    assert torch.equal(a.latents, b.latents)
    assert not torch.allclose(a.latents, c.latents)


def test_cfg_batched_equals_sequential(tiny_ckpts, pipes, image_file):
    seq = WanPipeline.from_pretrained(
        tiny_ckpts["i2v", "official"], RuntimeOptions(cfg_batch=False)
    )
    req = request("i2v", image_file)
    a = pipes["i2v", "official"].generate(req, progress=False).latents
    b = seq.generate(req, progress=False).latents
    assert (a - b).norm() / a.norm() < 1e-5  # same math, batch of 2 vs two batches of 1


def test_guidance_one_skips_uncond(pipes, image_file):
    p = pipes["t2v", "official"]
    ctx, _, _ = p.encode(request("t2v", image_file, guidance=1.0))
    assert ctx.shape[0] == 1
    ctx, _, _ = p.encode(request("t2v", image_file))
    assert ctx.shape[0] == 2


def test_text_context_zero_padded(pipes, image_file):
    ctx, _, _ = pipes["t2v", "official"].encode(request("t2v", image_file))
    assert ctx.shape[1] == 512
    assert ctx[:, 100:].abs().max() == 0  # short prompts: everything past the tokens is zero
    assert ctx[:, 0].abs().max() > 0


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_cli_writes_decodable_mp4(tiny_ckpts, tmp_path, task, image_file, capsys):
    out = tmp_path / f"{task}.mp4"
    args = ["run", "--model", str(tiny_ckpts[task, "official"]), "--size", "48x32",
            "--frames", "9", "--steps", "2", "-q", "-o", str(out), "--save-frames", str(tmp_path / "png")]  # fmt: skip
    if task == "i2v":
        args += ["--image", str(image_file)]
    assert main(args) == 0
    frames, fps, codec, pix = read_video(out)
    assert frames.shape == (9, 32, 48, 3)
    assert (fps, codec, pix) == (16.0, "h264", "yuv420p")
    assert len(list((tmp_path / "png").glob("frame_*.png"))) == 9
    assert "s/step" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_config_file_and_flag_override(tiny_ckpts, tmp_path):
    cfg = tmp_path / "run.json"
    run = {"model": str(tiny_ckpts["t2v", "official"]),
           "request": {"width": 32, "height": 32, "frames": 5, "steps": 1, "prompt": "x"}}  # fmt: skip
    cfg.write_text(json.dumps(run))
    out = tmp_path / "o.mp4"
    assert main(["run", "--config", str(cfg), "--size", "48x32", "-q", "-o", str(out)]) == 0
    frames, *_ = read_video(out)
    assert frames.shape == (5, 32, 48, 3)  # width from the flag, frames from the file


def test_embedded_default_end_to_end(tmp_path):
    """The README's first command, as a user runs it: a fresh cache, the real entry point."""
    env = {"LX2V_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    out = tmp_path / "demo.mp4"
    exe = shutil.which("lx2v") or ""
    cmd = [exe] if exe else [sys.executable, "-m", "lightx2v"]
    r = subprocess.run(
        [*cmd, "run", "-q", "-o", str(out)],
        env=env | _pyenv(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "RANDOM" in r.stderr
    frames, *_ = read_video(out)
    assert frames.shape == (9, 96, 160, 3)


def _pyenv():
    import os

    keep = ("PYTHONPATH", "HOME", "VIRTUAL_ENV", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    return {k: os.environ[k] for k in keep if k in os.environ}


def test_official_defaults_by_task():
    i2v = GenerationRequest(image="x.png")
    i2v.validate("i2v")
    assert (i2v.steps, i2v.shift) == (40, 3.0)  # official: I2V 40 steps, shift 3 at 832x480
    i2v720 = GenerationRequest(image="x.png", width=1280, height=720)
    i2v720.validate("i2v")
    assert i2v720.shift == 5.0
    t2v = GenerationRequest()
    t2v.validate("t2v")
    assert (t2v.steps, t2v.shift) == (50, 5.0)
    explicit = GenerationRequest(steps=7, shift=2.0)
    explicit.validate("t2v")
    assert (explicit.steps, explicit.shift) == (7, 2.0)


def test_preset_then_flags(tiny_ckpts, tmp_path):
    out = tmp_path / "p.mp4"
    args = ["run", "--model", str(tiny_ckpts["t2v", "official"]), "--resolution", "480p", "--size", "48x32",
            "--frames", "5", "--steps", "1", "-q", "-o", str(out)]  # fmt: skip
    assert main(args) == 0
    assert read_video(out)[0].shape == (5, 32, 48, 3)


def test_cli_convert_verify_run(tiny_ckpts, tmp_path, image_file, capsys):
    """`lx2v convert` output is what `lx2v run --model` is normally given."""
    dst = tmp_path / "fp8"
    assert main(["convert", "--model", str(tiny_ckpts["i2v", "diffusers"]), "--out", str(dst)]) == 0
    assert main(["verify", str(dst)]) == 0
    out = tmp_path / "c.mp4"
    args = ["run", "--model", str(dst), "--image", str(image_file), "--size", "48x32",
            "--frames", "5", "--steps", "2", "-q", "-o", str(out)]  # fmt: skip
    assert main(args) == 0
    assert read_video(out)[0].shape == (5, 32, 48, 3)
    assert main(["convert", "--model", str(tiny_ckpts["i2v", "diffusers"]), "--out", str(dst)]) != 0
    assert "exists" in capsys.readouterr().err


def test_teacache_distill_and_lora_through_the_pipeline(pipes, tiny_ckpts, tmp_path, image_file):
    from safetensors.torch import save_file

    pipe = pipes["t2v", "official"]
    base = pipe.generate(request("t2v", image_file), progress=False)
    off = pipe.generate(request("t2v", image_file, teacache=0.0), progress=False)
    assert torch.equal(base.latents, off.latents) and off.teacache is None
    on = pipe.generate(
        request("t2v", image_file, teacache=1e9, teacache_variant="e"), progress=False
    )
    assert "skipped 1/3 steps [1]" in on.teacache and "skipped" in on.summary()

    d1 = pipe.generate(request("t2v", image_file, sampler="distill4"), progress=False)
    d2 = pipe.generate(request("t2v", image_file, sampler="distill4"), progress=False)
    assert torch.equal(d1.latents, d2.latents)
    d3 = pipe.generate(request("t2v", image_file, sampler="distill4", seed=7), progress=False)
    assert not torch.equal(d1.latents, d3.latents)

    g = torch.Generator().manual_seed(0)
    lora = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, 64, generator=g),
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(64, 4, generator=g)}  # fmt: skip
    save_file(lora, str(tmp_path / "l.safetensors"))
    merged = WanPipeline.from_pretrained(
        tiny_ckpts["t2v", "official"], RuntimeOptions(loras=[f"{tmp_path / 'l.safetensors'}:0.5"])
    )
    w0 = pipe.dit.blocks[0].self_attn.q.weight
    want = (
        w0
        + 0.5
        * lora["diffusion_model.blocks.0.self_attn.q.lora_up.weight"]
        @ lora["diffusion_model.blocks.0.self_attn.q.lora_down.weight"]
    )
    assert torch.allclose(merged.dit.blocks[0].self_attn.q.weight, want, atol=1e-6)


def test_quantize_at_load_equals_converted(tiny_ckpts, tmp_path, image_file):
    """--quant fp8 on a bf16/fp32 checkpoint gives the model `lx2v convert` would write."""
    from lightx2v.quant.convert import convert

    dst = convert(tiny_ckpts["i2v", "official"], tmp_path / "fp8", quant="fp8", progress=False)
    req = request("i2v", image_file)
    a = WanPipeline.from_pretrained(dst).generate(req, progress=False).latents
    at_load = WanPipeline.from_pretrained(
        tiny_ckpts["i2v", "official"], RuntimeOptions(quant="fp8")
    )
    b = at_load.generate(req, progress=False).latents
    assert (a - b).norm() / a.norm() < 1e-5  # the same FP8 weights and scales, same path


def test_preset_sets_runtime(tiny_ckpts, tmp_path, capsys):
    out = tmp_path / "p.mp4"
    base = ["run", "--model", str(tiny_ckpts["t2v", "official"]), "--size", "48x32",
            "--frames", "5", "--steps", "1", "-q", "-o", str(out)]  # fmt: skip
    assert main([*base, "--preset", "bf16"]) == 0
    # fp8 = FP8 weights at load + "auto" attention (sdpa where our kernel cannot run)
    assert main([*base, "--preset", "fp8"]) == 0
    if not torch.cuda.is_available():  # a preset that names the 8-bit kernel explicitly
        assert main([*base, "--preset", "bf16-int8attn"]) != 0
        assert "lx2v-int8" in capsys.readouterr().err


def test_memory_presets_run_cfg_sequentially_unless_told(tiny_ckpts, tmp_path, capsys):
    """low-vram and rtx4090 run cond and uncond one after the other (as `lx2v bench` times
    them); --cfg-batched overrides the preset, and it cannot be given with --cfg-sequential."""
    from lightx2v.cli import _prepare_run, build_parser

    def cfg_batch(*flags):
        argv = ["run", "--model", str(tiny_ckpts["t2v", "official"]), "--size", "48x32",
                "--frames", "5", "-o", str(tmp_path / "p.mp4"), *flags]  # fmt: skip
        return _prepare_run(build_parser().parse_args(argv))[2].cfg_batch

    assert cfg_batch() and cfg_batch("--preset", "fp8")
    assert not cfg_batch("--preset", "low-vram") and not cfg_batch("--preset", "rtx4090")
    assert cfg_batch("--preset", "rtx4090", "--cfg-batched")
    assert not cfg_batch("--cfg-sequential")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--cfg-sequential", "--cfg-batched"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_written_files_get_normal_permissions(tmp_path):
    import os
    import stat

    from lightx2v.io import write_video

    mask = os.umask(0o022)
    try:
        out = write_video(np.zeros((1, 16, 16, 3), dtype=np.uint8), tmp_path / "p.mp4")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # not mkstemp's 0600


def test_attention_exact_steps_guard(pipes, image_file, monkeypatch):
    """--attention-exact-steps N: the first and last N steps use sdpa, the rest the chosen one."""
    from lightx2v.ops import attention as A

    calls = []

    def spy(q, k, v):
        calls.append(q.shape[1])
        return A.attention_sdpa(q, k, v)

    monkeypatch.setitem(A._BACKENDS, "spy", spy)
    p = pipes["t2v", "official"]
    req = dataclasses.replace(request("t2v", image_file), steps=4)
    per_step = p.dit.arch.num_layers * 2  # self + text cross-attention per block, CFG batched
    try:
        for exact, spy_steps in ((0, 4), (1, 2), (2, 0)):
            calls.clear()
            p.runtime.attention, p.runtime.attention_exact_steps = "spy", exact
            A.set_attention_backend("spy")
            p.generate(req, progress=False)
            assert len(calls) == spy_steps * per_step, (exact, len(calls))
            assert A.attention_backend() == "spy"  # restored after the guarded steps
    finally:
        p.runtime.attention, p.runtime.attention_exact_steps = "sdpa", 0
        A.set_attention_backend("sdpa")


def test_auto_attention_falls_back_for_heads_our_kernels_do_not_take(tiny_ckpts, monkeypatch):
    """The tiny models' heads are 32 wide; our kernels take 128. A pipeline whose "auto"
    chose one of them runs sdpa instead; naming one explicitly is an error at load."""
    from lightx2v.ops import attention as A

    arch = open_checkpoint(tiny_ckpts["t2v", "official"]).arch
    assert arch.dim // arch.num_heads != 128
    monkeypatch.setitem(A._BACKENDS, "lx2v-test", A.attention_sdpa)
    monkeypatch.setitem(A._auto_report, "choice", "lx2v-test")  # what "auto" decided
    try:
        p = WanPipeline.from_pretrained(
            tiny_ckpts["t2v", "official"], RuntimeOptions(attention="auto", compile=False)
        )
        assert A.attention_backend() == "sdpa" and p.dit is not None
        with pytest.raises(LX2VError, match="'lx2v-test' takes head dim 128"):
            WanPipeline.from_pretrained(
                tiny_ckpts["t2v", "official"],
                RuntimeOptions(attention="lx2v-test", compile=False),
            )
    finally:
        A.set_attention_backend("sdpa")
