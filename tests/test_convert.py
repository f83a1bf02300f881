"""`lx2v convert` / verify / loading the converted layout, on tiny random checkpoints.

Fixtures are written here (official and diffusers DiT layouts from one random WanDiT), so
these tests depend only on formats.py and the quant package.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lightx2v.config import WanArch
from lightx2v.errors import CheckpointError, LX2VError
from lightx2v.models.wan.dit import WanDiT
from lightx2v.models.wan.formats import load_dit, official_to_diffusers, open_checkpoint
from lightx2v.quant import convert as conv
from lightx2v.quant.convert import convert, verify
from lightx2v.quant.fp8 import FP8_DTYPE
from lightx2v.quant.linear import FP8Linear, quantize_dit
from lightx2v.quant.synthetic import official_config

REPO = Path(__file__).resolve().parents[1]


def tiny_arch(task="t2v", layers=3) -> WanArch:
    return WanArch(task, dim=128, ffn_dim=256, num_heads=2, num_layers=layers,
                   in_dim=36 if task == "i2v" else 16, text_dim=24, image_dim=40)  # fmt: skip


def random_state(arch: WanArch, seed=0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    m = WanDiT(arch)
    g = torch.Generator().manual_seed(seed + 1)
    state = {}
    for k, v in m.state_dict().items():
        if "modulation" in k:
            v = torch.randn(v.shape, generator=g) / arch.dim**0.5
        elif v.dim() == 1:
            v = torch.randn(v.shape, generator=g) * 0.1 + ("norm" in k)
        state[k] = v.to(dtype).contiguous()
    return state


def write_official(root: Path, arch: WanArch, state, shards=1) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(official_config(arch)))
    if shards == 1:
        save_file(state, root / "diffusion_pytorch_model.safetensors")
    else:  # the index.json + shards form
        keys = sorted(state)
        per = -(-len(keys) // shards)
        wmap = {}
        for i in range(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in keys[i * per : (i + 1) * per]}
            save_file(part, root / name)
            wmap.update(dict.fromkeys(part, name))
        (root / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"weight_map": wmap})
        )
    return root


def write_diffusers(root: Path, arch: WanArch, state) -> Path:
    (root / "transformer").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    cfg = {
        "num_attention_heads": arch.num_heads, "attention_head_dim": arch.head_dim,
        "ffn_dim": arch.ffn_dim, "num_layers": arch.num_layers, "in_channels": arch.in_dim,
        "out_channels": arch.out_dim, "text_dim": arch.text_dim, "freq_dim": arch.freq_dim,
        "eps": arch.eps, "patch_size": list(arch.patch_size), "qk_norm": "rms_norm_across_heads",
        "cross_attn_norm": True, "image_dim": arch.image_dim if arch.is_i2v else None,
        "added_kv_proj_dim": arch.dim if arch.is_i2v else None,
    }  # fmt: skip
    (root / "transformer" / "config.json").write_text(json.dumps(cfg))
    renamed = {official_to_diffusers(k): v for k, v in state.items()}
    save_file(renamed, root / "transformer" / "diffusion_pytorch_model.safetensors")
    return root


def inputs(arch: WanArch, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 3, 6, 8, generator=g)
    ctx = torch.randn(2, 512, arch.text_dim, generator=g)
    ctx[:, 11:] = 0
    clip = torch.randn(2, 257, arch.image_dim, generator=g) if arch.is_i2v else None
    y = torch.randn(2, 20, 3, 6, 8, generator=g) if arch.is_i2v else None
    return x, torch.tensor([900.0, 250.0]), ctx, clip, y


def rel_l2(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run(src, dst, **kw) -> Path:
    kw.setdefault("progress", False)
    kw.setdefault("components", False)
    return convert(src, dst, **kw)


@pytest.fixture
def official_t2v(tmp_path) -> Path:
    arch = tiny_arch("t2v")
    return write_official(tmp_path / "src", arch, random_state(arch))


# ---------------------------------------------------------------------------------------
# equivalence


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_official_and_diffusers_convert_identically(tmp_path, task):
    arch = tiny_arch(task)
    state = random_state(arch, seed=2)
    off = write_official(tmp_path / "off", arch, state, shards=2)
    dif = write_diffusers(tmp_path / "dif", arch, state)
    a = json.loads((run(off, tmp_path / "a") / "lx2v.json").read_text())
    b = json.loads((run(dif, tmp_path / "b") / "lx2v.json").read_text())
    # same tensors, byte for byte: every DiT shard has the same size and sha256
    assert a["files"] == b["files"]
    assert a["arch"] == b["arch"]
    assert open_checkpoint(tmp_path / "a").arch == open_checkpoint(off).arch
    for rel in a["files"]:
        ta, tb = load_file(tmp_path / "a" / rel), load_file(tmp_path / "b" / rel)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)) for k in ta)


def test_bf16_scheme_keeps_values_and_fuses(tmp_path):
    arch = tiny_arch("i2v")
    state = random_state(arch, seed=3, dtype=torch.bfloat16)
    dst = run(write_official(tmp_path / "src", arch, state), tmp_path / "dst", quant="bf16")
    blk = load_file(dst / "dit" / "block-001.safetensors")
    want = torch.cat([state[f"blocks.1.self_attn.{p}.weight"] for p in "qkv"])
    assert torch.equal(blk["blocks.1.self_attn.qkv.weight"], want)
    want = torch.cat(
        [state["blocks.1.cross_attn.k_img.bias"], state["blocks.1.cross_attn.v_img.bias"]]
    )
    assert torch.equal(blk["blocks.1.cross_attn.kv_img_proj.bias"], want)
    assert torch.equal(blk["blocks.1.modulation"], state["blocks.1.modulation"])
    rest = load_file(dst / "dit" / "rest.safetensors")
    assert all(torch.equal(rest[k], state[k]) for k in rest)
    # and the loaded model computes what the source computes
    ref = load_dit(open_checkpoint(tmp_path / "src"))
    got = load_dit(open_checkpoint(dst))
    with torch.no_grad():
        assert rel_l2(got(*inputs(arch)), ref(*inputs(arch))) < 1e-6


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_fp8_conversion_equals_runtime_quantization(tmp_path, task):
    """Offline (streamed, row-chunked) and online (quantize_dit) FP8 give the same tensors."""
    arch = tiny_arch(task)
    state = random_state(arch, seed=4)
    dst = run(write_official(tmp_path / "src", arch, state), tmp_path / "dst")
    loaded = load_dit(open_checkpoint(dst))
    online = WanDiT(arch)
    online.load_state_dict(state)
    quantize_dit(online, "fp8")
    a, b = loaded.state_dict(), online.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) if a[k].dtype == FP8_DTYPE \
            else torch.equal(a[k], b[k]), k  # fmt: skip


@pytest.mark.parametrize("task", ["t2v", "i2v"])
@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_quantized_output_within_reported_error(tmp_path, capsys, task, scheme):
    """The converted model's output vs the fp32 source model stays within the error the
    report predicts from the per-layer weight errors: 3·max_l e_l (report.py explains the
    factor: √2 activation quantization, √2 for chains of two quantized layers, 1.5 margin;
    the residual stream bounds the output error by the largest branch error)."""
    arch = tiny_arch(task)
    state = random_state(arch, seed=5)
    src = write_official(tmp_path / "src", arch, state)
    dst = run(src, tmp_path / "dst", quant=scheme, report=True)
    table = capsys.readouterr().out
    assert "blocks.0.self_attn.qkv" in table and "predicted" in table
    report = json.loads((dst / "lx2v.json").read_text())["report"]
    assert report["layers"] == arch.num_layers * (8 if arch.is_i2v else 7)
    q = load_dit(open_checkpoint(dst))
    ref = load_dit(open_checkpoint(src))
    with torch.no_grad():
        got, want = q(*inputs(arch)), ref(*inputs(arch))
    err = rel_l2(got, want)
    assert 0 < err <= report["predicted_output_rel_l2"], (err, report)
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.995


def test_keep_high_precision(tmp_path, official_t2v):
    dst = run(official_t2v, tmp_path / "dst", keep_high_precision=[0, 2])
    m = json.loads((dst / "lx2v.json").read_text())
    assert m["high_precision"]["blocks"] == [0, 2]
    assert (
        load_file(dst / "dit/block-000.safetensors")["blocks.0.ffn.0.weight"].dtype
        == torch.bfloat16
    )
    assert load_file(dst / "dit/block-001.safetensors")["blocks.1.ffn.0.weight"].dtype == FP8_DTYPE
    model = load_dit(open_checkpoint(dst))
    assert type(model.blocks[0].ffn[0]) is torch.nn.Linear
    assert isinstance(model.blocks[1].ffn[0], FP8Linear)
    with pytest.raises(LX2VError, match="out of range"):
        run(official_t2v, tmp_path / "bad", keep_high_precision=[3])


def test_load_bf16_compute_dtype(tmp_path, official_t2v):
    model = load_dit(open_checkpoint(run(official_t2v, tmp_path / "dst")), torch.bfloat16)
    lin = model.blocks[0].self_attn.qkv
    assert lin.weight.dtype == FP8_DTYPE and lin.weight_scale.dtype == torch.float32
    assert lin.bias.dtype == torch.bfloat16 and model.patch_embedding.weight.dtype == torch.bfloat16
    assert model.head.head.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(*inputs(tiny_arch("t2v")))).all()


# ---------------------------------------------------------------------------------------
# manifest and safety


def test_manifest(tmp_path, official_t2v):
    dst = run(official_t2v, tmp_path / "dst")
    m = json.loads((dst / "lx2v.json").read_text())
    assert m["format"] == "lx2v" and m["format_version"] == conv.FORMAT_VERSION
    assert m["tool"]["name"] == "lightx2v" and m["tool"]["version"]
    assert m["quant"]["scheme"] == "fp8" and "amax/448" in m["quant"]["weight"]
    assert m["dit"]["blocks"] == [f"dit/block-{i:03d}.safetensors" for i in range(3)]
    assert len(m["source"]["fingerprint"]) == 64 and m["source"]["layout"] == "official"
    hp = m["high_precision"]["layers"]
    for layer in (
        "patch_embedding",
        "head.head",
        "head.modulation",
        "time_projection.1",
        "blocks.*.modulation",
        "blocks.*.norm3",
        "blocks.*.self_attn.norm_q",
    ):
        assert layer in hp
    assert not any("ffn" in x or "qkv" in x for x in hp)
    files = {str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()} - {"lx2v.json"}
    assert files == set(m["files"])  # nothing unlisted, nothing left over (no .tmp, no progress)
    for rel, rec in m["files"].items():
        assert (dst / rel).stat().st_size == rec["size"]
        assert conv.sha256_file(dst / rel) == rec["sha256"]
    assert not (tmp_path / "dst.partial").exists()
    verify(dst)
    ckpt = open_checkpoint(dst)
    assert (
        ckpt.layout == "lx2v"
        and ckpt.arch == open_checkpoint(official_t2v).arch
        and ckpt.component_layout == "diffusers"
    )


def test_no_pickle_in_output(tmp_path, official_t2v):
    dst = run(official_t2v, tmp_path / "dst")
    for p in dst.rglob("*"):
        if p.is_file():
            assert p.suffix in (".safetensors", ".json"), p
            assert b"\x80\x04\x95" not in p.read_bytes()[:16]  # no pickle protocol-4 header


def test_unknown_format_version_refused(tmp_path, official_t2v):
    dst = run(official_t2v, tmp_path / "dst")
    m = json.loads((dst / "lx2v.json").read_text())
    m["format_version"] = 99
    (dst / "lx2v.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="format version 99 is not supported"):
        open_checkpoint(dst)


def test_overwrite_refused_without_force(tmp_path, official_t2v):
    dst = run(official_t2v, tmp_path / "dst")
    marker = dst / "dit" / "rest.safetensors"
    before = marker.stat().st_mtime_ns
    with pytest.raises(LX2VError, match="already exists; pass --force"):
        run(official_t2v, dst)
    assert marker.stat().st_mtime_ns == before
    time.sleep(0.01)
    run(official_t2v, dst, force=True, quant="int8")
    assert json.loads((dst / "lx2v.json").read_text())["quant"]["scheme"] == "int8"
    assert not (tmp_path / "dst.old").exists() and not (tmp_path / "dst.partial").exists()


def test_bad_options(tmp_path, official_t2v):
    with pytest.raises(LX2VError, match="--quant"):
        run(official_t2v, tmp_path / "x", quant="fp4")
    dst = run(official_t2v, tmp_path / "dst")
    with pytest.raises(LX2VError, match="already a converted"):
        run(dst, tmp_path / "again")


def test_truncated_shard_named(tmp_path, official_t2v):
    dst = run(official_t2v, tmp_path / "dst")
    shard = dst / "dit" / "block-001.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="block-001.safetensors is truncated"):
        open_checkpoint(dst)
    with pytest.raises(CheckpointError, match="block-001.safetensors is truncated"):
        verify(dst)


def test_missing_shard_named(tmp_path, official_t2v):
    dst = run(official_t2v, tmp_path / "dst")
    (dst / "dit" / "rest.safetensors").unlink()
    with pytest.raises(CheckpointError, match="rest.safetensors is missing"):
        open_checkpoint(dst)


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def test_flipped_data_byte_caught_by_verify(tmp_path, official_t2v):
    dst = run(official_t2v, tmp_path / "dst")
    shard = dst / "dit" / "block-002.safetensors"
    _flip(shard, shard.stat().st_size - 7)  # in the tensor data: same size, wrong hash
    open_checkpoint(dst)  # sizes still match: loading's cheap checks cannot see it
    with pytest.raises(CheckpointError, match="block-002.safetensors is corrupt"):
        verify(dst)


def test_flipped_header_byte_caught_at_load(tmp_path, official_t2v):
    dst = run(official_t2v, tmp_path / "dst")
    shard = dst / "dit" / "block-000.safetensors"
    _flip(shard, 8)  # the '{' opening the JSON header
    with pytest.raises(CheckpointError, match="block-000.safetensors"):
        load_dit(open_checkpoint(dst))
    with pytest.raises(CheckpointError, match="block-000.safetensors is corrupt"):
        verify(dst)


# ---------------------------------------------------------------------------------------
# resume


class _Interrupt(Exception):
    pass


def test_resume_reuses_finished_shards(tmp_path, official_t2v, monkeypatch):
    dst = tmp_path / "dst"
    written: list[str] = []

    def stop_after_two(rel):
        written.append(rel)
        if len(written) == 2:
            raise _Interrupt

    monkeypatch.setattr(conv, "_on_shard_written", stop_after_two)
    with pytest.raises(_Interrupt):
        run(official_t2v, dst)
    partial = tmp_path / "dst.partial"
    assert not dst.exists() and (partial / conv.PROGRESS).exists()
    first = {rel: (partial / rel).stat().st_mtime_ns for rel in written}

    written.clear()
    monkeypatch.setattr(conv, "_on_shard_written", written.append)
    run(official_t2v, dst)
    assert written == ["dit/block-002.safetensors", "dit/rest.safetensors"]  # only the rest
    for rel, mtime in first.items():
        assert (dst / rel).stat().st_mtime_ns == mtime  # reused, not rewritten
    verify(dst)
    fresh = run(official_t2v, tmp_path / "fresh")
    assert json.loads((dst / "lx2v.json").read_text())["files"] == \
        json.loads((fresh / "lx2v.json").read_text())["files"]  # fmt: skip


def test_resume_rewrites_a_damaged_shard(tmp_path, official_t2v, monkeypatch):
    dst = tmp_path / "dst"
    n = []
    monkeypatch.setattr(conv, "_on_shard_written",
                        lambda rel: n.append(rel) or (len(n) == 2 and (_ for _ in ()).throw(_Interrupt)))  # fmt: skip
    with pytest.raises(_Interrupt):
        run(official_t2v, dst)
    _flip(tmp_path / "dst.partial" / "dit" / "block-000.safetensors", 200)
    n.clear()
    monkeypatch.setattr(conv, "_on_shard_written", n.append)
    run(official_t2v, dst)
    assert n[0] == "dit/block-000.safetensors" and "dit/block-001.safetensors" not in n
    verify(dst)


def test_resume_with_other_options_starts_over(tmp_path, official_t2v, monkeypatch):
    dst = tmp_path / "dst"
    n = []
    monkeypatch.setattr(conv, "_on_shard_written",
                        lambda rel: n.append(rel) or (_ for _ in ()).throw(_Interrupt))  # fmt: skip
    with pytest.raises(_Interrupt):
        run(official_t2v, dst, quant="int8")
    n.clear()
    monkeypatch.setattr(conv, "_on_shard_written", n.append)
    run(official_t2v, dst, quant="fp8")
    assert len(n) == 4  # nothing reused from the int8 attempt
    assert json.loads((dst / "lx2v.json").read_text())["quant"]["scheme"] == "fp8"


def test_foreign_partial_dir_refused(tmp_path, official_t2v):
    partial = tmp_path / "dst.partial"
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    with pytest.raises(LX2VError, match="not a conversion in progress"):
        run(official_t2v, tmp_path / "dst")
    assert (partial / "notes.txt").exists()


def test_source_problems(tmp_path):
    arch = tiny_arch()
    state = random_state(arch)
    del state["blocks.1.ffn.2.bias"]
    src = write_official(tmp_path / "src", arch, state)
    with pytest.raises(CheckpointError, match="missing 1 key"):
        run(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


# ---------------------------------------------------------------------------------------
# memory: measured peak RSS of a real conversion of a multi-GB checkpoint


@pytest.mark.slow
def test_multi_gb_conversion_memory_bound(tmp_path):
    """2.9 GB bf16 checkpoint whose two largest tensors are 512 MiB each (ffn 4096x65536):
    the converter's peak RSS, measured in a fresh process, stays under two largest
    tensors + 1 GiB (in practice ~0.6 GiB, most of it torch itself)."""
    arch = WanArch("t2v", dim=4096, ffn_dim=65536, num_heads=32, num_layers=2, text_dim=4096)
    src, dst = tmp_path / "src", tmp_path / "dst"
    code = textwrap.dedent(f"""
        import json, resource, sys, time
        import torch
        from lightx2v.config import WanArch
        from lightx2v.quant.synthetic import write_synthetic_official
        from lightx2v.quant.convert import convert
        arch = WanArch.from_json(json.loads({json.dumps(json.dumps(arch.to_json()))}))
        write_synthetic_official({str(src)!r}, arch)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        convert({str(src)!r}, {str(dst)!r}, progress=False, components=False)
        dt = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"peak_kb": peak, "before_kb": base, "seconds": dt}}))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    src_file = src / "diffusion_pytorch_model.safetensors"
    largest = sorted((t.numel() * t.element_size() for t in _meta_tensors(arch)), reverse=True)[:2]
    bound = sum(largest) + (1 << 30)
    peak = res["peak_kb"] * 1024
    print(f"source {src_file.stat().st_size / 2**30:.2f} GiB, peak RSS {peak / 2**30:.2f} GiB, "
          f"bound {bound / 2**30:.2f} GiB, {res['seconds']:.1f} s")  # fmt: skip
    assert src_file.stat().st_size > 2.5 * 2**30
    assert peak < bound
    verify(dst)


def _meta_tensors(arch: WanArch):
    with torch.device("meta"):
        sd = WanDiT(arch).state_dict()
    return [torch.empty(v.shape, dtype=torch.bfloat16, device="meta") for v in sd.values()]


# ---------------------------------------------------------------------------------------
# components: encoders, VAE, tokenizers beside the DiT, safetensors in diffusers layout


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_components_converted(tmp_path, layout):
    tiny = pytest.importorskip("lightx2v.models.wan.tiny")
    from lightx2v.models.wan import encoders, vae

    tiny.write_tiny_checkpoint(tmp_path / "src", "i2v", layout)
    dst = convert(tmp_path / "src", tmp_path / "dst", progress=False)
    m = json.loads((dst / "lx2v.json").read_text())
    assert m["components"]["layout"] == "diffusers"
    for name in ("text_encoder", "tokenizer", "vae", "image_encoder", "image_processor"):
        assert m["components"][name] == name and (dst / name).is_dir()
    assert not [p for p in dst.rglob("*") if p.suffix in (".pth", ".bin", ".pt", ".pkl")]
    verify(dst)
    ck, src = open_checkpoint(dst), open_checkpoint(tmp_path / "src")
    ck.check_files()
    if src.component_layout == "official":
        te0 = encoders.TextEncoder.from_official(
            src.text_encoder, src.tokenizer, dtype=torch.float32
        )
        v0 = vae.WanVAE.from_official(src.vae)
        ie0 = encoders.ImageEncoder.from_official(src.image_encoder, dtype=torch.float32)
    else:
        te0 = encoders.TextEncoder.from_diffusers(
            src.text_encoder, src.tokenizer, dtype=torch.float32
        )
        v0 = vae.WanVAE.from_diffusers(src.vae)
        ie0 = encoders.ImageEncoder.from_diffusers(src.image_encoder, src.image_processor,
                                                   dtype=torch.float32)  # fmt: skip
    te1 = encoders.TextEncoder.from_diffusers(ck.text_encoder, ck.tokenizer, dtype=torch.float32)
    v1 = vae.WanVAE.from_diffusers(ck.vae)
    ie1 = encoders.ImageEncoder.from_diffusers(ck.image_encoder, ck.image_processor,
                                               dtype=torch.float32)  # fmt: skip
    prompt = ["a red car on a beach at sunset"]
    assert torch.equal(te0.encode(prompt), te1.encode(prompt))
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    assert torch.equal(v0.encode(video), v1.encode(video))
    img = torch.rand(1, 3, 40, 48) * 2 - 1
    assert torch.equal(ie0.encode(img), ie1.encode(img))


@pytest.mark.parametrize("damage", ["truncated-vae", "pickle-in-tokenizer"])
def test_bad_diffusers_component_fails_before_any_work(tmp_path, tiny_ckpts, damage):
    """A truncated component safetensors or a pickle file in a component folder: refused
    before the DiT is converted (no OUT, no OUT.partial), so the manifest can never record
    a corrupt file."""
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpts["t2v", "diffusers"], src)
    if damage == "truncated-vae":
        f = next((src / "vae").glob("*.safetensors"))
        f.write_bytes(f.read_bytes()[:100])
        needle = "not a readable safetensors file"
    else:
        (src / "tokenizer" / "extra.pth").write_bytes(b"\x80\x04K\x01.")
        needle = "is a pickle file"
    with pytest.raises(CheckpointError, match=needle):
        convert(src, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists() and not (tmp_path / "dst.partial").exists()
