"""Our WanDiT against diffusers' WanTransformer3DModel on the same random weights."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from lightx2v.bench import diffusers_dit
from lightx2v.config import WanArch
from lightx2v.models.wan.dit import WanDiT
from lightx2v.models.wan.formats import diffusers_to_official, official_to_diffusers


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_arch(task: str) -> WanArch:
    return WanArch(
        task, dim=64, ffn_dim=96, num_heads=2, num_layers=2,
        in_dim=36 if task == "i2v" else 16, text_dim=24, image_dim=40,
    )  # fmt: skip


def diffusers_model(arch: WanArch, seed: int) -> WanTransformer3DModel:
    m = diffusers_dit(arch, "cpu", torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():  # every parameter random, norms and zero-init heads included
            p.copy_(
                torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 0.2) + (p.dim() == 1)
            )
    return m.eval()


def ours_from(m: WanTransformer3DModel, arch: WanArch, dtype=torch.float32) -> WanDiT:
    state = {diffusers_to_official(k): v for k, v in m.state_dict().items()}
    ours = WanDiT(arch)
    ours.load_state_dict(state, strict=True)
    return ours.cast(dtype).eval()


def inputs(arch: WanArch, frames: int, h: int, w: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, frames, h, w, generator=g)
    y = torch.randn(2, 20, frames, h, w, generator=g) if arch.is_i2v else None
    ctx = torch.randn(2, 512, arch.text_dim, generator=g)
    ctx[:, 7:] = 0  # zero-padded prompt, as the pipeline builds it
    clip = torch.randn(2, 257, arch.image_dim, generator=g) if arch.is_i2v else None
    t = torch.tensor([999.0, 321.5])
    return x, t, ctx, clip, y


def run_diffusers(m, x, t, ctx, clip, y):
    hidden = x if y is None else torch.cat([x, y], 1)
    return m(hidden, t, ctx, encoder_hidden_states_image=clip, return_dict=False)[0]


def test_key_map_round_trip():
    for task in ("t2v", "i2v"):
        arch = tiny_arch(task)
        ours = set(WanDiT(arch).state_dict())
        theirs = set(diffusers_model(arch, 0).state_dict())
        assert {official_to_diffusers(k) for k in ours} == theirs
        assert {diffusers_to_official(k) for k in theirs} == ours


@pytest.mark.parametrize("task", ["t2v", "i2v"])
@pytest.mark.parametrize("grid", [(3, 6, 10), (2, 8, 4)])  # odd frames, H != W
def test_matches_diffusers_fp32(task, grid):
    arch = tiny_arch(task)
    m = diffusers_model(arch, seed=3)
    ours = ours_from(m, arch)
    x, t, ctx, clip, y = inputs(arch, *grid)
    with torch.no_grad():
        want = run_diffusers(m, x, t, ctx, clip, y)
        got = ours(x, t, ctx, clip, y)
    assert got.shape == want.shape == x.shape
    # Both are fp32 implementations of the same formulas; what differs is summation order
    # and diffusers' fp32 sinusoidal time embedding (ours is float64 like the official code:
    # at t≈1000 fp32 angles are off by ~1e-4 rad), which accounts for most of the ~7e-6 seen.
    # At t≈1 the two agree to ~3e-7. 1e-5 relative L2 is the bound.
    assert rel_l2(got, want) <= 1e-5


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_matches_diffusers_bf16(task):
    arch = tiny_arch(task)
    m = diffusers_model(arch, seed=4)
    ours = ours_from(m, arch, torch.bfloat16)
    x, t, ctx, clip, y = inputs(arch, 5, 6, 4)
    with torch.no_grad():
        want = run_diffusers(m, x, t, ctx, clip, y)  # fp32 reference
        got = ours(x, t, ctx, clip, y)
    assert got.dtype == torch.float32
    # bf16 keeps 8 mantissa bits (rounding 2^-9 ≈ 2e-3 per product); through two blocks
    # the accumulated error stays within 1e-2, the bound for bf16.
    assert rel_l2(got, want) <= 1e-2


def test_timestep_changes_output():
    arch = tiny_arch("t2v")
    ours = ours_from(diffusers_model(arch, 5), arch)
    x, t, ctx, _, _ = inputs(arch, 1, 4, 4)
    with torch.no_grad():
        a = ours(x, t, ctx)
        b = ours(x, t * 0.5, ctx)
    assert rel_l2(a, b) > 1e-3


def test_block_compiles_fullgraph_and_matches_eager():
    """Regional compile (one block graph, reused): no graph break, same numbers as eager."""
    arch = tiny_arch("i2v")
    ours = ours_from(diffusers_model(arch, 6), arch)
    x, t, ctx, clip, y = inputs(arch, 3, 4, 6)
    with torch.no_grad():
        want = ours(x, t, ctx, clip, y)
        for block in ours.blocks:
            block.compile(fullgraph=True, dynamic=False)
        got = ours(x, t, ctx, clip, y)
    # inductor fuses and reorders fp32 arithmetic; a few ulps of difference per op
    assert rel_l2(got, want) <= 1e-5


def test_runner_with_cached_cross_kv_equals_forward():
    from lightx2v.runtime.runner import DiTRunner

    arch = tiny_arch("i2v")
    ours = ours_from(diffusers_model(arch, 7), arch)
    x, t, ctx, clip, y = inputs(arch, 3, 4, 6)
    runner = DiTRunner(ours)
    runner.begin(ctx, clip)
    with torch.no_grad():
        want = ours(x, t, ctx, clip, y)
        assert torch.equal(runner(x, t, y), want)
        assert torch.equal(runner(x, t, y), want)  # the cache is reused, not consumed
