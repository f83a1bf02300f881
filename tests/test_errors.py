"""Every bad input: one clear error line, a non-zero exit, nothing written."""

import shutil
from pathlib import Path

import pytest
import torch

from lightx2v.cli import main

SMALL = ["--size", "48x32", "--frames", "5", "--steps", "1", "-q"]


def run_cli(args, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    rc = main(["run", *args, "-o", str(out)] if "-o" not in args else ["run", *args])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("lx2v: error:")]
    return rc, errors, out


def assert_fails(args, tmp_path, capsys, *needles):
    rc, errors, out = run_cli(args, tmp_path, capsys)
    assert rc != 0
    assert len(errors) == 1, errors
    for n in needles:
        assert n in errors[0], errors[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.mp4")]
    return errors[0]


@pytest.fixture
def copy_ckpt(tiny_ckpts, tmp_path):
    def make(task="t2v", layout="official"):
        dst = tmp_path / f"copy-{task}-{layout}"
        shutil.copytree(tiny_ckpts[task, layout], dst)
        return dst

    return make


def test_missing_model_dir(tmp_path, capsys):
    assert_fails(["--model", str(tmp_path / "nope"), *SMALL], tmp_path, capsys, "does not exist")


def test_unknown_model_dir(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hi")
    assert_fails(
        ["--model", str(tmp_path / "junk"), *SMALL], tmp_path, capsys, "not a Wan2.1 checkpoint"
    )


def test_missing_component_file(copy_ckpt, tmp_path, capsys):
    ck = copy_ckpt()
    (ck / "Wan2.1_VAE.pth").unlink()
    assert_fails(["--model", str(ck), *SMALL], tmp_path, capsys, "Wan2.1_VAE.pth")


def test_corrupt_safetensors(copy_ckpt, tmp_path, capsys):
    ck = copy_ckpt()
    f = ck / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    assert_fails(
        ["--model", str(ck), *SMALL], tmp_path, capsys, "diffusion_pytorch_model.safetensors"
    )


def test_missing_and_unexpected_dit_keys(copy_ckpt, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    ck = copy_ckpt()
    f = ck / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    sd.pop("blocks.1.ffn.2.weight")
    sd["blocks.1.extra.weight"] = torch.zeros(1)
    save_file(sd, f)
    msg = assert_fails(["--model", str(ck), *SMALL], tmp_path, capsys, "blocks.1.ffn.2.weight")
    assert "blocks.1.extra.weight" in msg


def test_i2v_without_image(tiny_ckpts, tmp_path, capsys):
    assert_fails(
        ["--model", str(tiny_ckpts["i2v", "official"]), *SMALL], tmp_path, capsys, "--image"
    )


def test_image_for_t2v(tiny_ckpts, tmp_path, capsys):
    img = tmp_path / "i.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    assert_fails(
        ["--model", str(tiny_ckpts["t2v", "official"]), "--image", str(img), *SMALL],
        tmp_path,
        capsys,
        "T2V",
    )


def test_task_mismatch(tiny_ckpts, tmp_path, capsys):
    assert_fails(
        ["--model", str(tiny_ckpts["t2v", "official"]), "--task", "i2v", *SMALL],
        tmp_path,
        capsys,
        "T2V model",
    )


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--size", "50x32"], "divisible by 16"),
        (["--frames", "6"], "4n+1"),
        (["--steps", "0"], "at least 1"),
        (["--guidance", "nan"], "--guidance nan"),
        (["--seed", str(2**64)], "--seed"),
    ],
)
def test_bad_request(tiny_ckpts, tmp_path, capsys, flags, needle):
    args = ["--model", str(tiny_ckpts["t2v", "official"]), *SMALL, *flags]
    assert_fails(args, tmp_path, capsys, needle)


def test_unreadable_image(tiny_ckpts, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert_fails(
        ["--model", str(tiny_ckpts["i2v", "official"]), "--image", str(bad), *SMALL],
        tmp_path,
        capsys,
        "cannot read image",
    )
    assert_fails(
        [
            "--model",
            str(tiny_ckpts["i2v", "official"]),
            "--image",
            str(tmp_path / "no.png"),
            *SMALL,
        ],
        tmp_path,
        capsys,
        "image not found",
    )
    assert_fails(
        ["--model", str(tiny_ckpts["i2v", "official"]), "--image", str(tmp_path), *SMALL],
        tmp_path,
        capsys,
        "is a folder",
    )


def test_unwritable_output(tiny_ckpts, tmp_path, capsys):
    out = tmp_path / "missing-dir" / "o.mp4"
    assert_fails(
        ["--model", str(tiny_ckpts["t2v", "official"]), *SMALL, "-o", str(out)],
        tmp_path,
        capsys,
        "does not exist",
    )
    if Path("/proc/self").is_dir():  # a folder nobody can create files in, root included
        assert_fails(
            ["--model", str(tiny_ckpts["t2v", "official"]), *SMALL, "-o", "/proc/o.mp4"],
            tmp_path,
            capsys,
            "not writable: /proc",
        )
        assert_fails(
            ["--model", str(tiny_ckpts["t2v", "official"]), *SMALL, "--save-frames", "/proc/f"],
            tmp_path,
            capsys,
            "--save-frames /proc/f",
        )
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os

        if os.access(ro, os.W_OK):  # root ignores permission bits
            pytest.skip("running as root: permission bits do not stop writes")
        assert_fails(
            ["--model", str(tiny_ckpts["t2v", "official"]), *SMALL, "-o", str(ro / "o.mp4")],
            tmp_path,
            capsys,
            "not writable",
        )
    finally:
        ro.chmod(0o700)


def test_output_must_be_mp4(tiny_ckpts, tmp_path, capsys):
    assert_fails(
        ["--model", str(tiny_ckpts["t2v", "official"]), *SMALL, "-o", str(tmp_path / "o.avi")],
        tmp_path,
        capsys,
        ".mp4",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_absent(tiny_ckpts, tmp_path, capsys):
    assert_fails(
        ["--model", str(tiny_ckpts["t2v", "official"]), *SMALL, "--device", "cuda"],
        tmp_path,
        capsys,
        "no CUDA GPU",
    )


def test_gpu_out_of_memory_message(tiny_ckpts, tmp_path, capsys, monkeypatch):
    from lightx2v.pipeline import WanPipeline

    def boom(self, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(WanPipeline, "generate", boom)
    assert_fails(
        ["--model", str(tiny_ckpts["t2v", "official"]), *SMALL],
        tmp_path,
        capsys,
        "out of memory",
        "--size",
    )


def test_bad_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"request": {"widht": 3}}')
    assert_fails(["--config", str(cfg)], tmp_path, capsys, "widht")
    cfg.write_text("{not json")
    assert_fails(["--config", str(cfg)], tmp_path, capsys, "not valid JSON")
    cfg.write_bytes(b'{"seed": "\xff"}')
    assert_fails(["--config", str(cfg)], tmp_path, capsys, "not valid JSON")
    assert_fails(["--config", str(tmp_path)], tmp_path, capsys, "cannot read it")


def test_bad_lora_strength(tiny_ckpts, tmp_path, capsys):
    lora = tmp_path / "l.safetensors"
    lora.write_bytes(b"")
    args = ["--model", str(tiny_ckpts["t2v", "official"]), *SMALL, "--lora", f"{lora}:abc"]
    assert_fails(args, tmp_path, capsys, "strength 'abc' is not a number")
    args[-1] = str(tmp_path)
    assert_fails(args, tmp_path, capsys, "not a file")


def test_wrong_value_type_in_checkpoint_config(copy_ckpt, tmp_path, capsys):
    import json

    root = copy_ckpt()
    cfg = json.loads((root / "config.json").read_text())
    cfg["num_layers"] = "two"
    (root / "config.json").write_text(json.dumps(cfg))
    assert_fails(["--model", str(root), *SMALL], tmp_path, capsys, "num_layers 'two'")


def test_verify_needs_a_converted_checkpoint(tiny_ckpts, tmp_path, capsys):
    f = tmp_path / "f.txt"
    f.write_text("x")
    for path, needle in ((f, "not a folder"), (tiny_ckpts["t2v", "official"], "no lx2v.json")):
        assert main(["verify", str(path)]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("lx2v: error:")]
        assert len(err) == 1 and needle in err[0], err


def test_pickled_component_is_refused_with_a_clear_line(copy_ckpt, tmp_path, capsys):
    """A .pth holding a non-tensor object: refused (never unpickled), and the message does
    not suggest loading it with weights_only=False."""
    import argparse

    root = copy_ckpt()
    torch.save({"x": argparse.Namespace(a=1), "w": torch.zeros(1)}, root / "Wan2.1_VAE.pth")
    err = assert_fails(["--model", str(root), *SMALL], tmp_path, capsys, "refused")
    assert "weights_only" not in err


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"request": {"steps": "ten"}}', "'steps'"),
        ('{"runtime": {"loras": "x.safetensors"}}', "'loras'"),
        ('{"task": "t3v"}', "'task'"),
        ('{"model": 5}', "'model'"),
    ],
)
def test_config_file_types(tmp_path, capsys, content, needle):
    cfg = tmp_path / "c.json"
    cfg.write_text(content)
    assert_fails(["--config", str(cfg)], tmp_path, capsys, needle)


def test_checks_before_loading(tiny_ckpts, tmp_path, capsys):
    model = ["--model", str(tiny_ckpts["t2v", "official"]), *SMALL]
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_fails([*model, "--save-frames", str(afile)], tmp_path, capsys, "--save-frames")
    assert_fails([*model, "--shift", "0"], tmp_path, capsys, "--shift")
    assert_fails([*model, "--gpus", "0"], tmp_path, capsys, "--gpus")
    assert_fails([*model, "--max-vram", "-1"], tmp_path, capsys, "max_vram")
    cfg = tmp_path / "c.json"
    cfg.write_text('{"runtime": {"offload": "bogus"}}')
    assert_fails([*model, "--config", str(cfg)], tmp_path, capsys, "offload 'bogus'")


def test_quant_flag_cannot_change_a_converted_checkpoint(tiny_ckpts, tmp_path, capsys):
    from lightx2v.quant.convert import convert

    dst = convert(tiny_ckpts["t2v", "official"], tmp_path / "bf16", quant="bf16", progress=False)
    assert_fails(
        ["--model", str(dst), *SMALL, "--quant", "fp8"], tmp_path, capsys, "already converted"
    )


def test_convert_never_deletes_the_source_or_a_foreign_folder(tiny_ckpts, tmp_path, capsys):
    import shutil

    from lightx2v.cli import main as cli

    box = tmp_path / "box"
    shutil.copytree(tiny_ckpts["t2v", "official"], box / "src")
    assert cli(["convert", "--model", str(box / "src"), "--out", str(box), "--force"]) != 0
    assert (box / "src" / "config.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert cli(["convert", "--model", str(box / "src"), "--out", str(other), "--force"]) != 0
    assert (other / "keep.txt").read_text() == "mine"
    afile = tmp_path / "f.txt"
    afile.write_text("x")
    assert cli(["convert", "--model", str(box / "src"), "--out", str(afile), "--force"]) != 0
    assert afile.read_text() == "x"
    err = capsys.readouterr().err
    assert err.count("lx2v: error:") == 3


def test_convert_to_an_unwritable_place_fails_first(tiny_ckpts, capsys):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc: a folder nobody can create files in")
    assert main(["convert", "--model", str(tiny_ckpts["t2v", "official"]), "--out", "/proc/x"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("lx2v: error:")]
    assert len(err) == 1 and "cannot write in /proc" in err[0], err


def test_flag_errors_are_one_line(tiny_ckpts, tmp_path, capsys):
    model = ["--model", str(tiny_ckpts["t2v", "official"]), *SMALL]
    with pytest.raises(SystemExit) as exit_:
        main(["run", *model, "--size", "abc"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lx2v: error:") and "--size" in err[0], err
    assert_fails([*model, "--ulysses", "0"], tmp_path, capsys, "--ulysses 0")
    assert_fails([*model, "-o", ""], tmp_path, capsys, "empty")


def test_host_out_of_memory_message(tiny_ckpts, tmp_path, capsys, monkeypatch):
    from lightx2v.pipeline import WanPipeline

    def boom(self, *a, **k):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"
        )  # noqa: E501

    monkeypatch.setattr(WanPipeline, "generate", boom)
    rc, errors, out = run_cli(
        ["--model", str(tiny_ckpts["t2v", "official"]), *SMALL], tmp_path, capsys
    )
    assert rc == 3 and len(errors) == 1 and "host (CPU) memory" in errors[0], errors
    assert not out.exists()
