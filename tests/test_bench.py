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
