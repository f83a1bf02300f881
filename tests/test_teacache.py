"""TeaCache: the decision rule against a plain re-statement of upstream's, exact reuse of the
residual, threshold 0 == no cache bit for bit, and the coefficient-row choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightx2v.config import ARCH_PRESETS
from lightx2v.errors import LX2VError
from lightx2v.models.wan.dit import WanDiT
from lightx2v.models.wan.tiny import random_dit_state, tiny_arch
from lightx2v.runtime.runner import DiTRunner
from lightx2v.runtime.teacache import (
    TEACACHE_COEFFICIENTS,
    TeaCacheMixin,
    TeaCachePolicy,
    TeaCacheRunner,
    poly,
    rel_l1,
    teacache_model,
)
from lightx2v.schedule import make_sampler

STEPS = 10
CONST = (0.0, 0.0, 0.0, 0.0, 0.1)  # poly ≡ 0.1: every step adds 0.1 to the accumulator


@pytest.fixture(scope="module")
def dit():
    arch = tiny_arch("t2v")
    model = WanDiT(arch)
    model.load_state_dict(random_dit_state(arch, seed=3))
    return model.eval()


def inputs(batch: int = 1):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 6, generator=g).expand(batch, -1, -1, -1, -1)
    ctx = torch.randn(batch, 512, 32, generator=g)
    return x, ctx


def denoise(runner, x, ctx, steps=STEPS):
    """Euler flow sampling with `runner`; returns every step's prediction."""
    sampler = make_sampler("euler", steps)
    runner.begin(ctx)
    preds = []
    for t in sampler.timesteps:
        v = runner(x, t.expand(x.shape[0]))
        preds.append(v)
        x = sampler.step(v, x)
    return preds


def test_threshold_zero_is_no_cache_exactly(dit):
    x, ctx = inputs(batch=2)
    ref = denoise(DiTRunner(dit), x, ctx)
    for variant in ("e", "e0"):
        tea = TeaCacheRunner(dit, threshold=0.0, steps=STEPS, variant=variant)
        got = denoise(tea, x, ctx)
        assert tea.skipped_steps == []
        assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))


class Recorder(TeaCacheRunner):
    """Keeps (tokens in, tokens out) of the block stack at every step."""

    def begin(self, context, clip_tokens=None):
        super().begin(context, clip_tokens)
        self.io = []

    def run_blocks(self, tokens, t_emb, e, cos, sin):
        t_in = tokens.clone()  # the blocks may update tokens in place
        out = super().run_blocks(tokens, t_emb, e, cos, sin)
        self.io.append((t_in, out.clone()))
        return out


@pytest.mark.parametrize(
    ("variant", "skipped"),
    [("e", [1, 2, 3, 5, 6, 7, 9, 10]), ("e0", [5, 6, 7, 9, 10, 11])],
)
def test_skipped_steps_reuse_the_residual_exactly(dit, variant, skipped):
    x, ctx = inputs(batch=2)
    tea = Recorder(dit, threshold=0.35, steps=12, variant=variant, coefficients=CONST)
    denoise(tea, x, ctx, steps=12)
    # 0.1 per step: skip, skip, skip, run (0.4 ≥ 0.35), ... inside the forced first/last steps
    assert tea.skipped_steps == skipped
    residual = None
    for step, (t_in, t_out) in enumerate(tea.io):
        if step in skipped:
            assert torch.equal(t_out, t_in + residual)
        else:
            residual = t_out - t_in
    assert tea.io[0][1].shape[0] == 2  # one residual row for cond, one for uncond


def reference_decisions(coefficients, threshold, steps, variant, indicators):
    """Upstream's rule (TeaCache4Wan2.1), one branch, restated with numpy."""
    ret, cutoff = (1, steps - 1) if variant == "e" else (5, steps)
    rescale = np.poly1d(coefficients)
    acc, prev, skip, accs = 0.0, None, [], []
    for cnt, a in enumerate(indicators):
        if cnt < ret or cnt >= cutoff:
            acc = 0.0
        else:
            acc += rescale(float((a - prev).abs().mean() / prev.abs().mean()))
            if acc < threshold:
                skip.append(cnt)
            else:
                acc = 0.0
        accs.append(acc)
        prev = a
    return skip, accs


@pytest.mark.parametrize("variant", ["e", "e0"])
@pytest.mark.parametrize("model", sorted(TEACACHE_COEFFICIENTS))
def test_policy_matches_upstream_rule(model, variant):
    coefficients = TEACACHE_COEFFICIENTS[model][variant]
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    # relative changes that shrink then grow, as along a real schedule
    scales = np.cumprod(1 + np.concatenate([np.linspace(0.3, 0.01, 12), np.linspace(0.01, 0.2, 8)]))
    indicators = [base * float(s) + 0.01 * k for k, s in enumerate(scales)]
    steps = len(indicators)
    for threshold in (0.05, 0.2, 0.5):
        policy = TeaCachePolicy(coefficients, threshold, steps, variant)
        got_skip, got_acc = [], []
        for k, a in enumerate(indicators):
            if not policy.update(a):
                got_skip.append(k)
            got_acc.append(policy.accumulated)
        want_skip, want_acc = reference_decisions(
            coefficients, threshold, steps, variant, indicators
        )
        assert got_skip == want_skip
        np.testing.assert_allclose(got_acc, want_acc, rtol=1e-12, atol=1e-12)


def test_poly_and_rel_l1_by_hand():
    assert poly((2.0, -3.0, 1.0), 0.5) == 2 * 0.25 - 3 * 0.5 + 1  # highest power first
    c = TEACACHE_COEFFICIENTS["t2v-14b"]["e0"]
    assert poly(c, 0.013) == pytest.approx(float(np.poly1d(c)(0.013)), rel=1e-12)
    a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.5, -2.0, 2.0])
    assert rel_l1(a, b) == pytest.approx((0.5 + 0 + 1) / (1.5 + 2 + 2))


@pytest.mark.parametrize(
    ("variant", "skipped"), [("e", list(range(1, 9))), ("e0", [5, 6, 7, 8, 9])]
)
def test_high_threshold_skips(dit, variant, skipped):
    x, ctx = inputs()
    ref = denoise(DiTRunner(dit), x, ctx)
    tea = TeaCacheRunner(dit, threshold=1e9, steps=STEPS, variant=variant)
    got = denoise(tea, x, ctx)
    assert tea.skipped_steps == skipped
    assert str(skipped) in tea.teacache_summary()
    assert torch.equal(got[0], ref[0])
    assert not torch.equal(got[skipped[-1]], ref[skipped[-1]])
    assert all(torch.isfinite(v).all() for v in got)


def test_sequential_cfg_reaches_the_batched_decisions(dit):
    x, ctx = inputs(batch=2)
    kw = dict(threshold=0.15, steps=STEPS, variant="e0", model="t2v-1.3b")
    batched = TeaCacheRunner(dit, **kw)
    denoise(batched, x, ctx)
    for i in (0, 1):
        single = TeaCacheRunner(dit, **kw)
        denoise(single, x[i : i + 1], ctx[i : i + 1])
        assert single.skipped_steps == batched.skipped_steps


def test_begin_resets_state(dit):
    x, ctx = inputs()
    tea = TeaCacheRunner(dit, threshold=1e9, steps=STEPS, variant="e")
    first = denoise(tea, x, ctx)
    skipped = list(tea.skipped_steps)
    second = denoise(tea, x, ctx)
    assert tea.skipped_steps == skipped
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_in_place_block_stack(dit):
    """A block stack that updates its input in place (as ops.residual_add_ does) still
    leaves the exact residual: the input is saved before the blocks run."""

    class InPlace(DiTRunner):
        def run_blocks(self, tokens, t_emb, e, cos, sin):
            return tokens.mul_(1.5).add_(t_emb.mean())

    class Tea(TeaCacheMixin, InPlace):
        pass

    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 5, 64, generator=g)
    t_emb, e = torch.randn(2, 64, generator=g), torch.randn(2, 6, 64, generator=g)
    tea = Tea(dit, threshold=1e9, steps=STEPS, variant="e")
    tea.begin(torch.randn(2, 512, 32, generator=g))
    t_in = tokens.clone()
    out = tea.run_blocks(tokens, t_emb, e, None, None)
    assert torch.equal(tea._residual, out - t_in)
    skipped = tea.run_blocks(t_in.clone(), t_emb, e, None, None)
    assert tea.skipped_steps == [1] and torch.equal(skipped, t_in + (out - t_in))


def test_coefficient_rows():
    assert teacache_model(ARCH_PRESETS["t2v-1.3b"], 832, 480) == "t2v-1.3b"
    assert teacache_model(ARCH_PRESETS["t2v-14b"], 1280, 720) == "t2v-14b"
    i2v = ARCH_PRESETS["i2v-14b"]
    assert teacache_model(i2v, 832, 480) == "i2v-14b-480p"
    assert teacache_model(i2v, 480, 832) == "i2v-14b-480p"
    assert teacache_model(i2v, 1280, 720) == "i2v-14b-720p"
    assert teacache_model(i2v, 832, 480, model="i2v-14b-720p") == "i2v-14b-720p"
    with pytest.raises(LX2VError, match="unknown model"):
        teacache_model(i2v, 832, 480, model="i2v-14b-1080p")


def test_bad_settings(dit):
    with pytest.raises(LX2VError, match="variant"):
        TeaCacheRunner(dit, threshold=0.1, steps=STEPS, variant="x")
    with pytest.raises(LX2VError, match=">= 0"):
        TeaCacheRunner(dit, threshold=-1.0, steps=STEPS)


def test_with_teacache_composes_with_runner_subclasses(dit):
    from lightx2v.runtime.teacache import with_teacache

    class Other(DiTRunner):
        pass

    cls = with_teacache(Other)
    assert with_teacache(Other) is cls and with_teacache(DiTRunner) is TeaCacheRunner
    x, ctx = inputs()
    tea = cls(dit, threshold=1e9, steps=STEPS, variant="e")
    denoise(tea, x, ctx)
    assert isinstance(tea, Other) and tea.skipped_steps == list(range(1, STEPS - 1))
