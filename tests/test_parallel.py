"""Multi-process generation on CPU: the communication logic of runtime/parallel.py on gloo.

Each test spawns gloo processes (torch.multiprocessing) that set torchrun's environment
variables and join through `init_distributed`, exactly as ranks started by torchrun do.
Every rank computes the single-process reference itself (same seeded weights and inputs)
and compares it with the parallel result; the parent checks the per-rank reports.

Tolerance: fp32 everywhere, ≤ 1e-5 relative L2. The parallel path reorders no sum inside
a token (Ulysses attention sees every key; padded tokens are dropped before attention),
so only the matrix-product blocking of different row counts differs: ~1e-7.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lightx2v.config import WanArch
from lightx2v.errors import LX2VError
from lightx2v.runtime.parallel import (
    NVLS_OFF_ENV,
    ParallelConfig,
    check_ulysses_degree,
    valid_ulysses_degrees,
)

TOL = 1e-5


def tiny_arch(heads: int = 8) -> WanArch:
    # head dim 16 (8 RoPE pairs: 4/2/2); 8 heads so 8-way Ulysses is possible
    return WanArch("i2v", dim=16 * heads, ffn_dim=96, num_heads=heads, num_layers=2,
                   in_dim=36, text_dim=24, image_dim=40)  # fmt: skip


def build(arch: WanArch, seed: int = 0):
    from lightx2v.models.wan.dit import WanDiT

    torch.manual_seed(seed)
    dit = WanDiT(arch)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if "modulation" in name or "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + ("norm" in name))
    return dit.cast(torch.float32).eval()


def inputs(arch: WanArch, text_len: int, img_len: int, grid=(3, 6, 10), seed: int = 2):
    """Batch of 2 (cond, uncond); grid (3, 6, 10) → 45 tokens: not a multiple of 2, 4 or 8."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, *grid, generator=g).expand(2, -1, -1, -1, -1)
    y = torch.randn(1, 20, *grid, generator=g).expand(2, -1, -1, -1, -1)
    ctx = torch.randn(2, text_len, arch.text_dim, generator=g)
    clip = torch.randn(1, img_len, arch.image_dim, generator=g).expand(2, -1, -1)
    t = torch.tensor([700.0, 700.0])
    return x, t, ctx, clip, y


def rel_l2(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------
# worker (runs in each spawned process)


def _worker(rank: int, world: int, port: int, out_dir: str, scenarios: list[dict]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    report = {"rank": rank, "results": [], "error": None}
    try:
        import torch.distributed as dist

        from lightx2v.ops.attention import attention_backend
        from lightx2v.runtime.parallel import (
            ParallelConfig,
            ParallelRunner,
            init_distributed,
            make_groups,
        )
        from lightx2v.runtime.runner import DiTRunner

        r, w, dev = init_distributed(backend="gloo", timeout_s=120)
        assert (r, w, dev.type) == (rank, world, "cpu")
        report["env"] = {k: os.environ.get(k) for k in NVLS_OFF_ENV}
        for sc in scenarios:
            arch = tiny_arch(sc.get("heads", 8))
            dit = build(arch)
            if sc.get("quant"):  # FP8 weights (the reference GEMM path on CPU)
                from lightx2v.quant.linear import quantize_dit

                quantize_dit(dit, sc["quant"])
            from lightx2v.ops.attention import set_attention_backend

            set_attention_backend(sc.get("attention", "sdpa"))  # Ulysses wraps whichever
            x, t, ctx, clip, y = inputs(arch, sc["text_len"], sc["img_len"])
            batch = sc.get("batch", 2)
            x, t, ctx, clip, y = x[:batch], t[:batch], ctx[:batch], clip[:batch], y[:batch]
            ref_runner = DiTRunner(dit)
            ref_runner.begin(ctx, clip)
            ref = ref_runner(x, t, y)
            cfg = ParallelConfig(sc["cfg"], sc["ulysses"])
            groups = make_groups(cfg, sc.get("ranks"))  # collective: every rank calls it
            if groups is None:
                dist.barrier()
                continue
            runner = ParallelRunner(dit, groups)
            runner.begin(ctx, clip)
            before = attention_backend()
            outs = [runner(x, t, y) for _ in range(2)]  # twice: caches reused
            res = {
                "name": sc["name"],
                "rel_l2": max(rel_l2(o, ref) for o in outs),
                "shape_ok": all(o.shape == ref.shape for o in outs),
                "backend_restored": attention_backend() == before,
            }
            if batch == 2:  # guided prediction, as the pipeline combines it
                g = 5.0
                v_ref = ref[1] + g * (ref[0] - ref[1])
                v = outs[0][1] + g * (outs[0][0] - outs[0][1])
                res["cfg_rel_l2"] = rel_l2(v, v_ref)
            report["results"].append(res)
            dist.barrier()
    except Exception:
        report["error"] = traceback.format_exc()
    finish(out_dir, rank, report)


def finish(out_dir: str, rank: int, report: dict) -> None:
    """Write this rank's report (temp file, then rename), then end the process the way a
    rank of `lx2v run` ends: exit_rank (barrier, leave the group, os._exit) after success,
    os._exit(1) at once after a failure (a peer may never reach the barrier)."""
    from lightx2v.runtime.parallel import exit_now, exit_rank

    tmp = Path(out_dir, f".rank{rank}.json.tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, Path(out_dir, f"rank{rank}.json"))
    if report["error"] is None:
        exit_rank(0)
    exit_now(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, world: int, out_dir: Path, *args) -> list[dict]:
    """Start `world` processes of worker(rank, world, port, out_dir, *args) and return their
    reports. A rank's own error is shown first; a rank that died without one (signal, or
    exit status ≠ 0) fails the test, saying whether it had written its report."""
    died = None
    try:
        mp.spawn(worker, args=(world, free_port(), str(out_dir), *args), nprocs=world)
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
        died = e
    files = [out_dir / f"rank{r}.json" for r in range(world)]
    reports = [json.loads(f.read_text()) for f in files if f.exists()]
    for rep in reports:
        assert rep["error"] is None, f"rank {rep['rank']}:\n{rep['error']}"
    if died is not None:
        when = "after writing" if files[died.error_index].exists() else "before writing"
        raise AssertionError(f"rank {died.error_index} {when} its report: {died}")
    assert len(reports) == world
    return reports


def spawn(world: int, scenarios: list[dict], tmp_path: Path) -> list[dict]:
    reports = run_ranks(_worker, world, tmp_path, scenarios)
    for rep in reports:
        assert rep["env"] == NVLS_OFF_ENV
    return reports


def check(reports: list[dict], expected: dict[str, int]) -> None:
    """Every scenario ran on the expected number of ranks and matched the reference."""
    seen: dict[str, int] = {}
    for rep in reports:
        for res in rep["results"]:
            seen[res["name"]] = seen.get(res["name"], 0) + 1
            assert res["shape_ok"], res
            assert res["backend_restored"], res
            assert res["rel_l2"] <= TOL, res
            if "cfg_rel_l2" in res:
                assert res["cfg_rel_l2"] <= TOL, res
    assert seen == expected


# ---------------------------------------------------------------------------------------
# tests


def test_two_ranks_ulysses_and_cfg_parallel(tmp_path):
    # text_len 23 = ⌈45/2⌉: the local length collides with a cross-attention key length,
    # so the runner must pad one token more to keep self/cross attention apart
    scenarios = [
        {"name": "ulysses2", "cfg": 1, "ulysses": 2, "text_len": 23, "img_len": 5},
        {"name": "cfg2", "cfg": 2, "ulysses": 1, "text_len": 7, "img_len": 5},
        {
            "name": "ulysses2-nocfg",
            "cfg": 1,
            "ulysses": 2,
            "text_len": 7,
            "img_len": 5,
            "batch": 1,
        },  # fmt: skip
        {
            "name": "ulysses2-12heads",
            "cfg": 1,
            "ulysses": 2,
            "text_len": 7,
            "img_len": 5,
            "heads": 12,
        },  # fmt: skip
    ]
    reports = spawn(2, scenarios, tmp_path)
    check(reports, {s["name"]: 2 for s in scenarios})


def test_two_ranks_with_fp8_weights_and_another_attention_backend(tmp_path):
    base = {"text_len": 7, "img_len": 5}
    scenarios = [
        {"name": "ulysses2-fp8", "cfg": 1, "ulysses": 2, "quant": "fp8", **base},
        {"name": "cfg2-fp8", "cfg": 2, "ulysses": 1, "quant": "fp8", **base},
        {"name": "ulysses2-ref-attention", "cfg": 1, "ulysses": 2, "attention": "ref", **base},
    ]
    reports = spawn(2, scenarios, tmp_path)
    check(reports, {s["name"]: 2 for s in scenarios})


@pytest.mark.slow
def test_eight_ranks_all_layouts(tmp_path):
    """Issue 8's CPU part: the 8-way layouts (Ulysses 8; CFG 2 × Ulysses 4) on 8 gloo
    processes, plus CFG 2 × Ulysses 2 on 4 of them and the 2-way layouts on sub-groups."""
    base = {"text_len": 12, "img_len": 6}  # 12 = ⌈45/4⌉ and 6 = ⌈45/8⌉: both collide
    scenarios = [
        {"name": "ulysses8", "cfg": 1, "ulysses": 8, **base},
        {"name": "cfg2xulysses4", "cfg": 2, "ulysses": 4, **base},
        {"name": "cfg2xulysses2", "cfg": 2, "ulysses": 2, "ranks": [4, 5, 6, 7], **base},
        {"name": "ulysses4-sub", "cfg": 1, "ulysses": 4, "ranks": [3, 2, 1, 0], **base},
        {"name": "cfg2-sub", "cfg": 2, "ulysses": 1, "ranks": [6, 7], **base},
    ]
    reports = spawn(8, scenarios, tmp_path)
    check(reports, {"ulysses8": 8, "cfg2xulysses4": 8, "cfg2xulysses2": 4,
                    "ulysses4-sub": 4, "cfg2-sub": 2})  # fmt: skip


def test_config_choice_and_bad_degrees():
    assert valid_ulysses_degrees(40) == [1, 2, 4, 5, 8, 10, 20, 40]
    assert valid_ulysses_degrees(12, 8) == [1, 2, 3, 4, 6]
    assert ParallelConfig.choose(4, 40) == ParallelConfig(2, 2)
    assert ParallelConfig.choose(4, 40, uses_cfg=False) == ParallelConfig(1, 4)
    assert ParallelConfig.choose(8, 40) == ParallelConfig(2, 4)
    assert ParallelConfig.choose(8, 40, ulysses=8) == ParallelConfig(1, 8)
    assert ParallelConfig.choose(8, 40, cfg_parallel=False) == ParallelConfig(1, 8)
    assert ParallelConfig.choose(3, 12) == ParallelConfig(1, 3)
    assert ParallelConfig.choose(1, 40) == ParallelConfig(1, 1)
    with pytest.raises(LX2VError, match=r"valid degrees: 1, 2, 3, 4, 6"):
        ParallelConfig.choose(8, 12, cfg_parallel=False)  # 1.3B: 12 heads, 8-way Ulysses
    with pytest.raises(LX2VError, match=r"does not divide the model's 40 attention heads; "
                       r"valid degrees: 1, 2, 4, 5, 8, 10, 20, 40"):  # fmt: skip
        check_ulysses_degree(40, 3)
    with pytest.raises(LX2VError, match="even number of GPUs"):
        ParallelConfig.choose(3, 12, cfg_parallel=True)
    with pytest.raises(LX2VError, match="must be equal"):
        ParallelConfig.choose(4, 40, ulysses=8)
    with pytest.raises(LX2VError, match="must be 1 or 2"):
        ParallelConfig(3, 1).validate(40)


def test_launcher_sets_nvls_off_and_builds_torchrun_command(monkeypatch):
    from lightx2v.runtime import launch

    cmd = launch.torchrun_command(4, ["-m", "lightx2v", "run", "--gpus", "4"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=4" in cmd and "--standalone" in cmd
    assert cmd[-5:] == ["-m", "lightx2v", "run", "--gpus", "4"]
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv(launch.LAUNCHED_ENV, raising=False)
    assert launch.wants_relaunch(2) and not launch.wants_relaunch(1)
    assert not launch.wants_relaunch(None)
    monkeypatch.setenv(launch.LAUNCHED_ENV, "1")
    assert not launch.wants_relaunch(2)
    if not torch.cuda.is_available():
        with pytest.raises(LX2VError, match="only 0 CUDA GPU"):
            launch.launch(2, ["-c", "pass"])


RANK_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import torch.distributed as dist
    from lightx2v.errors import LX2VError
    from lightx2v.runtime.launch import run_rank
    from lightx2v.runtime.parallel import NVLS_OFF_ENV, init_distributed

    def body():
        rank, world, _ = init_distributed(backend="gloo", timeout_s=60)
        assert all(os.environ[k] == v for k, v in NVLS_OFF_ENV.items())
        dist.barrier()
        if sys.argv[1] == "fail" and rank == 1:
            raise LX2VError("tiny failure on purpose")
        if sys.argv[1] == "peer-gone" and rank == 1:
            os._exit(0)  # vanishes without leaving the group: rank 0's final barrier fails
        if sys.argv[1] != "peer-gone":
            dist.barrier()  # rank 0 waits here for a rank that is gone: torchrun must end it
        return 0

    sys.exit(run_rank(body))
    """
)


@pytest.mark.parametrize("mode", ["ok", "fail", "peer-gone"])
def test_launch_one_error_no_hang(tmp_path, mode):
    """Two torchrun ranks on gloo: success returns 0; a failing rank ends both with one
    LX2VError naming the rank and message, well before any collective timeout; so does a
    rank that vanishes at the end (the other one's final barrier fails)."""
    import time

    from lightx2v.runtime import launch

    script = tmp_path / "rank_body.py"
    script.write_text(RANK_SCRIPT)
    t0 = time.perf_counter()
    if mode == "ok":
        assert launch.launch(2, [str(script), mode], check_gpus=False) == 0
    elif mode == "peer-gone":
        with pytest.raises(LX2VError, match=r"rank 0 of 2 failed: leaving the process group"):
            launch.launch(2, [str(script), mode], check_gpus=False)
    else:
        with pytest.raises(LX2VError, match=r"rank 1 of 2 failed: tiny failure on purpose"):
            launch.launch(2, [str(script), mode], check_gpus=False)
    assert time.perf_counter() - t0 < 50  # the collective timeout is 60 s: no hang


def test_ulysses_runner_rejects_bad_degree():
    from lightx2v.runtime.parallel import ParallelGroups, ParallelRunner

    dit = build(tiny_arch(12))
    groups = ParallelGroups(ParallelConfig(1, 8), tuple(range(8)), 0, None, None)
    with pytest.raises(LX2VError, match="valid degrees: 1, 2, 3, 4, 6, 12"):
        ParallelRunner(dit, groups)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", __file__]))


# ---------------------------------------------------------------------------------------
# VAE decode in bands and the whole pipeline on 2 ranks


def _pipeline_worker(rank: int, world: int, port: int, out_dir: str, ckpt: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    report = {"rank": rank, "error": None}
    try:
        from lightx2v.config import GenerationRequest, RuntimeOptions
        from lightx2v.models.wan.formats import open_checkpoint
        from lightx2v.models.wan.vae import (
            WAN21_LATENTS_MEAN,
            WAN21_LATENTS_STD,
            WanVAE,
            _tiny_model,
        )
        from lightx2v.runtime.launch import ParallelWanPipeline, setup_parallel
        from lightx2v.runtime.parallel import banded_vae_decode, init_distributed, make_groups

        init_distributed(backend="gloo", timeout_s=120)
        # VAE: each rank one band, all-gathered; equals the one-process banded decode
        vae = WanVAE(_tiny_model(0), WAN21_LATENTS_MEAN, WAN21_LATENTS_STD)
        lat = torch.randn(1, 16, 2, 24, 8, generator=torch.Generator().manual_seed(3))
        groups = make_groups(ParallelConfig(1, 2))
        par = banded_vae_decode(vae, lat, 2, group=groups.group)
        torch.save(par, Path(out_dir, f"vae{rank}.pt"))
        # the whole pipeline: CFG parallel on 2 ranks (default choice), tiny I2V checkpoint
        groups, dev = setup_parallel(num_heads=2, gpus=2)  # → CFG 2 × Ulysses 1
        assert groups.config == ParallelConfig(2, 1)
        pipe = ParallelWanPipeline(open_checkpoint(ckpt), RuntimeOptions(device="cpu"), groups, dev)
        req = GenerationRequest(prompt="a cat", width=64, height=48, frames=5, steps=2,
                                image=None, seed=7)  # fmt: skip
        from lightx2v.io import demo_image

        req.image = demo_image(req.height, req.width)
        res = pipe.generate(req, progress=False)
        torch.save({"latents": res.latents, "video": res.video}, Path(out_dir, f"pipe{rank}.pt"))
    except Exception:
        report["error"] = traceback.format_exc()
    finish(out_dir, rank, report)


def test_vae_bands_and_pipeline_on_two_ranks(tmp_path, tiny_ckpts):
    from lightx2v.config import GenerationRequest, RuntimeOptions
    from lightx2v.io import demo_image
    from lightx2v.models.wan.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WanVAE, _tiny_model
    from lightx2v.pipeline import WanPipeline
    from lightx2v.runtime.parallel import banded_vae_decode

    ckpt = tiny_ckpts["i2v", "official"]
    run_ranks(_pipeline_worker, 2, tmp_path, str(ckpt))
    # VAE: the gathered bands equal the one-process banded decode and the undivided one
    vae = WanVAE(_tiny_model(0), WAN21_LATENTS_MEAN, WAN21_LATENTS_STD)
    lat = torch.randn(1, 16, 2, 24, 8, generator=torch.Generator().manual_seed(3))
    whole = vae.decode(lat)
    local = banded_vae_decode(vae, lat, 2)
    for r in range(2):
        par = torch.load(tmp_path / f"vae{r}.pt")
        assert rel_l2(par, local) <= 1e-6
        assert rel_l2(par, whole) <= 1e-5  # halo 8 rows: ~1e-6 on these random weights
    # pipeline: both ranks equal the single-process CFG-batched run
    pipe = WanPipeline.from_pretrained(ckpt, RuntimeOptions(device="cpu"))
    req = GenerationRequest(prompt="a cat", width=64, height=48, frames=5, steps=2, seed=7)
    req.image = demo_image(req.height, req.width)
    ref = pipe.generate(req, progress=False)
    for r in range(2):
        got = torch.load(tmp_path / f"pipe{r}.pt")
        assert rel_l2(got["latents"], ref.latents) <= TOL
        assert rel_l2(got["video"], ref.video) <= 1e-4  # bands: see the VAE check above


@pytest.mark.slow
def test_cli_run_on_two_ranks_matches_one(tiny_ckpts, tmp_path):
    """`lx2v run --gpus 2` re-launches itself under torchrun (gloo on CPU): same video."""
    import subprocess
    import sys

    from lightx2v.io import read_video

    common = ["--model", str(tiny_ckpts["t2v", "official"]), "--size", "48x32", "--frames", "5",
              "--steps", "2", "-q", "--device", "cpu"]  # fmt: skip
    one, two = tmp_path / "one.mp4", tmp_path / "two.mp4"
    for extra, out in (([], one), (["--gpus", "2"], two)):
        r = subprocess.run([sys.executable, "-m", "lightx2v", "run", *common, *extra, "-o", str(out)],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_video(one)[0].astype(float), read_video(two)[0].astype(float)
    assert a.shape == b.shape == (5, 32, 48, 3)
    assert abs(a - b).mean() < 1.0  # same latents to ~1e-6; the same encoder on both
