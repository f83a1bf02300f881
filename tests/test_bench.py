"""`lx2v bench` on the CPU with the tiny architecture: the procedure, not the numbers."""

import json

from lightx2v.cli import main


def test_bench_dry_run(tmp_path, capsys):
    out = tmp_path / "b.json"
    args = ["bench", "--arch", "tiny", "--device", "cpu", "--frames", "5", "--repeat", "1",
            "--json", str(out), "--markdown", str(tmp_path / "b.md")]  # fmt: skip
    assert main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    names = [r["name"] for r in rows]
    assert names[0].startswith("diffusers") and rows[0]["vs_baseline"] == 1.0
    assert all(r["s_per_forward"] for r in rows), [r["note"] for r in rows]
    by = {r["name"]: r for r in rows}
    distill = next(r for n, r in by.items() if "distilled" in n)
    assert distill["s_per_step"] == distill["s_per_forward"]  # no CFG
    tea = next(r for n, r in by.items() if "TeaCache" in n)
    fp8 = by["lx2v FP8 + 8-bit attention"]
    # the TeaCache row projects 60% of the FP8 row's steps (a stated 40% skip)
    assert abs(tea["s_per_video"] - 0.6 * fp8["s_per_video"]) < 1e-9
    # CFG as one batch of 2: one measured call is the step, s/forward is half of it
    b2 = by["lx2v FP8 + 8-bit attention, CFG as one batch of 2"]
    assert b2["batch"] == 2 and b2["s_per_step"] == 2 * b2["s_per_forward"]
    assert b2["s_per_step"] != fp8["s_per_step"]  # its own measurement, not the B1 row's
    # LightX2V's RTX 4090 row: FP8 under a 24 GB budget (offload auto), after the block
    # offload row on the same model (the offload is swapped between the two)
    r4090 = next(r for r in rows if r["preset"] == "rtx4090")
    assert r4090["offload"] == "auto" and r4090["max_vram"] == 24.0 and r4090["s_per_forward"]
    # the auto row plans its resident set as `lx2v run` does (the tiny model fits 24 GB)
    assert "blocks resident" in r4090["note"] and not r4090["note"].startswith("0 of")
    assert "| 480p |" in capsys.readouterr().out
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_bench_bad_arguments_fail_before_any_work(tmp_path, capsys):
    base = ["bench", "--arch", "tiny", "--frames", "5", "--repeat", "1"]
    for extra, needle in (
        (["--device", "bogus"], "'bogus' is not a device"),
        (["--device", "cpu", "--json", str(tmp_path / "no" / "b.json")], "does not exist"),
    ):
        assert main([*base, *extra]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("lx2v: error:")]
        assert len(err) == 1 and needle in err[0], err


def test_tiny_defaults_are_a_cpu_dry_run(tmp_path, capsys, monkeypatch):
    """`lx2v bench --arch tiny` alone: 5 frames and the auto device (no --frames/--device)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "b.json"
    assert main(["bench", "--arch", "tiny", "--repeat", "1", "--json", str(out)]) == 0
    head = json.loads(out.read_text())["header"]
    assert "5 frames" in head and "CPU" in head, head


def _rows():
    from lightx2v.bench import BenchRow

    def row(size, preset, sf, sv=None, gb=None, impl="lx2v", note=""):
        return BenchRow(preset or "diffusers", impl=impl, preset=preset, size=size,
                        s_per_forward=sf, s_per_video=sv, peak_gb=gb, note=note)  # fmt: skip

    return [
        row("480p", None, 3.31, 267.8, 36.7, impl="diffusers"),
        row("480p", "fp8", 2.085, 169.8, 20.4),
        row("480p", "distill", 2.085, 11.4, 20.4),
        row("480p", "low-vram", 2.082, 169.6, 5.0),
        row("480p", "rtx4090", 2.082, 169.6, 17.5, note="31 of 40 blocks resident (batch 1)"),
        row("720p", None, 12.355, 995.2, 41.6, impl="diffusers"),
        row("720p", "fp8", 8.365, 676.0, 24.7),
        row("720p", "distill", None, note="skipped: time budget"),
    ]


def test_target_verdicts_on_the_cards_they_were_set_for():
    from lightx2v.bench import annotate_targets

    rows = _rows()
    annotate_targets(rows, "NVIDIA H200")
    by = {(r.size, r.preset): r.note for r in rows}
    assert by[("480p", "fp8")] == (
        "target ≤ 1.6 s/forward: 2.085 s, missed by 30%; "
        "target ≥ 2× diffusers per forward: 1.59×, missed by 26%; "
        "target ≤ 135 s/video: 169.8 s, missed by 26%"
    )
    assert by[("480p", "distill")] == "target ≤ 9 s/video: 11.4 s, missed by 27%"
    assert by[("480p", "low-vram")] == (
        "target ≤ 12 GB peak: 5.0 GB, met; target ≤ 1.1× the resident FP8 row: 1.00×, met"
    )
    assert by[("720p", "fp8")] == "target ≤ 540 s/video: 676.0 s, missed by 25%"
    # rows without a target, or without a number, keep their notes
    assert by[("480p", "rtx4090")] == "31 of 40 blocks resident (batch 1)"
    assert by[("720p", "distill")] == "skipped: time budget"
    assert by[("480p", None)] == ""


def test_a_near_miss_is_not_rounded_to_zero():
    from lightx2v.bench import BenchRow, annotate_targets

    rows = [BenchRow("x", preset="distill", size="480p", s_per_forward=1.0, s_per_video=9.02)]
    annotate_targets(rows, "NVIDIA H100 80GB HBM3")
    assert rows[0].note == "target ≤ 9 s/video: 9.0 s, missed by <1%"


def test_no_target_verdicts_on_other_cards():
    from lightx2v.bench import annotate_targets

    for card in ("NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 4090", "CPU"):
        rows = _rows()
        annotate_targets(rows, card)
        assert [r.note for r in rows] == [r.note for r in _rows()], card


def test_dry_run_uses_sdpa_where_the_8bit_kernel_cannot_run(monkeypatch):
    """On a Hopper GPU the 8-bit backend loads, but the tiny model's heads are 32 wide and
    our kernels take 128: the dry run must say so and go on with sdpa, not crash."""
    from lightx2v.bench import ATTN8, BenchRow, run_bench
    from lightx2v.models.wan.tiny import tiny_arch
    from lightx2v.ops import attention as A

    def kernel_like(q, k, v):  # loads like ours, and refuses other head dims like ours
        if q.shape[-1] != 128:
            raise ValueError(f"lx2v-int8 attention needs head dim 128, got {q.shape[-1]}")
        return A.attention_sdpa(q, k, v)

    monkeypatch.setitem(A._BACKENDS, ATTN8, kernel_like)
    row = BenchRow("8-bit", attention=ATTN8, compile=False)
    try:
        (out,) = [r for r in run_bench(["480p"], rows=[row], arch_name=tiny_arch("i2v"),
                  frames=5, repeat=1, device="cpu", real_stages=False, log=lambda m: None)
                  if r.impl == "lx2v"]  # fmt: skip
    finally:
        A.set_attention_backend("sdpa")
    assert out.s_per_forward and "sdpa used" in out.note, out.note


def test_batched_cfg_row_times_a_batch_of_two(monkeypatch):
    """The batch-2 row times the model on cond + uncond as one batch; the others on one."""
    from lightx2v import bench
    from lightx2v.models.wan.tiny import tiny_arch

    seen = {}
    real_timed = bench.timed

    def spy(fn, repeat, device):
        if isinstance(fn, bench.partial) and fn.args:
            seen.setdefault(fn.args[0].shape[0], 0)
            seen[fn.args[0].shape[0]] += 1
        return real_timed(fn, repeat, device)

    monkeypatch.setattr(bench, "timed", spy)
    rows = [bench.BenchRow("b1", compile=False), bench.BenchRow("b2", compile=False, batch=2)]
    out = {r.name: r for r in bench.run_bench(["480p"], rows=rows, arch_name=tiny_arch("i2v"),
           frames=5, repeat=1, device="cpu", real_stages=False, log=lambda m: None)}  # fmt: skip
    assert seen == {1: 1, 2: 1}, seen
    assert out["b2"].s_per_step == 2 * out["b2"].s_per_forward
    assert out["b1"].s_per_step == 2 * out["b1"].s_per_forward


def test_bad_batch_is_one_clear_error():
    import pytest

    from lightx2v import bench
    from lightx2v.errors import LX2VError

    for row in (bench.BenchRow("x", batch=3), bench.BenchRow("x", batch=2, cfg=False)):
        with pytest.raises(LX2VError, match="batch"):
            bench.run_bench(["480p"], rows=[row], device="cpu", real_stages=False)
