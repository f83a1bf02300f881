"""Samplers: the official Wan2.1 schedule, UniPC against diffusers, Euler by hand.

Tolerance principle (DESIGN.md): an fp32 path may err at most ~2x what the reference's own
fp32 path errs against an fp64 run of the same algorithm. For UniPC the fp64 reference is
diffusers' scheduler with its sigmas promoted to float64 (same values, so same schedule) fed
float64 latents; our float64 path must agree with it to fp64 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from lightx2v.errors import LX2VError
from lightx2v.schedule import (
    EulerFlowSampler,
    FlowSchedule,
    UniPCFlowSampler,
    make_sampler,
)

STEPS = [1, 2, 3, 10, 40]
SHIFTS = [1.0, 3.0, 5.0]
SHAPE = (2, 4, 3, 5, 6)  # batch, channels, frames, height, width: a small video latent
EPS32 = float(torch.finfo(torch.float32).eps)


def official_schedule(steps: int, shift: float, n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Wan2.1's FlowUniPCMultistepScheduler(shift=1) + set_timesteps(steps, shift), by formula.

    Returns (unshifted sigmas without the final 0, float64) and the int64 timesteps.
    """
    train_sigmas = (1.0 - np.linspace(1, 1 / n, n)[::-1]).astype(np.float32)
    unshifted = np.linspace(float(train_sigmas[0]), float(train_sigmas[-1]), steps + 1)[:-1]
    shifted = shift * unshifted / (1 + (shift - 1) * unshifted)
    return unshifted, (shifted * n).astype(np.int64)


def diffusers_unipc(steps: int, shift: float, fp64: bool) -> UniPCMultistepScheduler:
    sched = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
    )
    # Its default flow linspace runs 1 -> 1/N, the official one sigma_max -> 0: hand it ours.
    sched.set_timesteps(sigmas=official_schedule(steps, shift)[0])
    sched.set_begin_index(0)
    if fp64:
        sched.sigmas = sched.sigmas.double()  # same values; coefficient math now in fp64
    return sched


def velocities(steps: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(steps)
    return [torch.randn(SHAPE, generator=g, dtype=torch.float64).to(dtype) for _ in range(steps)]


def initial_noise(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(123), dtype=torch.float64).to(
        dtype
    )


def run_ours(sampler, vs: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    for v in vs:
        x = sampler.step(v, x)
    return x


def run_diffusers(sched, vs: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    for t, v in zip(sched.timesteps, vs, strict=True):
        x = sched.step(v, t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_schedule_matches_official_formula(steps, shift):
    unshifted, timesteps = official_schedule(steps, shift)
    shifted = shift * unshifted / (1 + (shift - 1) * unshifted)
    sampler = make_sampler("unipc", steps=steps, shift=shift)
    assert sampler.sigmas.dtype == torch.float32 and sampler.timesteps.dtype == torch.float32
    assert sampler.sigmas.shape == (steps + 1,) and sampler.timesteps.shape == (steps,)
    # Exact: same float64 arithmetic, then the same float32 cast and int64 truncation.
    expected_sigmas = torch.from_numpy(np.append(shifted, 0.0).astype(np.float32))
    assert torch.equal(sampler.sigmas, expected_sigmas)
    assert torch.equal(sampler.timesteps, torch.from_numpy(timesteps).float())
    assert sampler.sigmas[-1] == 0 and sampler.timesteps.max() <= 999


def test_schedule_known_values():
    # 1 step, shift 1: sigma is the training grid's top 0.999 (as float32), t = trunc(999.00001).
    s = FlowSchedule.shifted(1, 1.0)
    assert s.sigmas.tolist() == [pytest.approx(0.999, abs=1e-7), 0.0]
    assert s.timesteps.tolist() == [999.0]
    # 2 steps, shift 5: unshifted 0.4995 -> 5 * 0.4995 / (1 + 4 * 0.4995) = 0.83319...
    s = FlowSchedule.shifted(2, 5.0)
    assert s.sigmas[1].item() == pytest.approx(2.4975 / 2.998, rel=1e-6)
    assert s.timesteps[1].item() == 833.0


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_unipc_matches_diffusers(steps, shift):
    vs64 = velocities(steps, torch.float64)
    x64 = initial_noise(torch.float64)

    ref_sched = diffusers_unipc(steps, shift, fp64=True)
    ours64 = make_sampler("unipc", steps=steps, shift=shift)
    assert torch.equal(ours64.timesteps, ref_sched.timesteps.float())
    ref = run_diffusers(ref_sched, vs64, x64)
    got64 = run_ours(ours64, vs64, x64)
    assert got64.dtype == torch.float64
    # Same algorithm in fp64: only summation order differs; 1e-12 is ~4500 fp64 ulps at |x|~1.
    torch.testing.assert_close(got64, ref, rtol=0, atol=1e-12)

    vs32 = [v.float() for v in vs64]
    x32 = x64.float()
    theirs32 = run_diffusers(diffusers_unipc(steps, shift, fp64=False), vs32, x32)
    got32 = run_ours(make_sampler("unipc", steps=steps, shift=shift), vs32, x32)
    assert got32.dtype == torch.float32
    scale = ref.abs().max().item()
    their_err = (theirs32.double() - ref).abs().max().item()
    our_err = (got32.double() - ref).abs().max().item()
    # 2x diffusers' own fp32 error, floored at 8 fp32 ulps of the output scale (a one-step run
    # can be exact in fp32 by luck, which would make 2x zero).
    assert our_err <= max(2 * their_err, 8 * EPS32 * scale), (our_err, their_err)


def test_unipc_with_state_dependent_model_matches_diffusers():
    # A linear "model" v = A x + b closes the loop: each solver sees velocities of its own
    # latents, as in real sampling.
    steps, shift = 40, 5.0
    g = torch.Generator().manual_seed(7)
    c = SHAPE[1]
    a = torch.randn(c, c, generator=g, dtype=torch.float64) / c**0.5
    b = torch.randn(SHAPE, generator=g, dtype=torch.float64)

    def model(x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ij,bj...->bi...", a.to(x.dtype), x) + b.to(x.dtype)

    def run(step_fn, timesteps, x):
        for t in timesteps:
            x = step_fn(model(x), t, x)
        return x

    x64 = initial_noise(torch.float64)
    ref_sched = diffusers_unipc(steps, shift, fp64=True)
    ref = run(
        lambda v, t, x: ref_sched.step(v, t, x, return_dict=False)[0], ref_sched.timesteps, x64
    )
    ours = make_sampler("unipc", steps=steps, shift=shift)
    got64 = run(lambda v, t, x: ours.step(v, x), ours.timesteps, x64)
    torch.testing.assert_close(got64, ref, rtol=0, atol=1e-12)

    fp32_sched = diffusers_unipc(steps, shift, fp64=False)
    theirs32 = run(
        lambda v, t, x: fp32_sched.step(v, t, x, return_dict=False)[0],
        fp32_sched.timesteps,
        x64.float(),
    )
    ours.reset()
    got32 = run(lambda v, t, x: ours.step(v, x), ours.timesteps, x64.float())
    their_err = (theirs32.double() - ref).abs().max().item()
    our_err = (got32.double() - ref).abs().max().item()
    assert our_err <= max(2 * their_err, 8 * EPS32 * ref.abs().max().item()), (our_err, their_err)


@pytest.mark.parametrize("steps", [1, 3, 40])
def test_euler_by_hand(steps):
    shift = 3.0
    unshifted, _ = official_schedule(steps, shift)
    sig = np.append(shift * unshifted / (1 + (shift - 1) * unshifted), 0.0).astype(np.float32)
    vs = velocities(steps)
    x = initial_noise()
    expected = x.double()
    for i, v in enumerate(vs):
        expected = expected + (float(sig[i + 1]) - float(sig[i])) * v.double()
    got = run_ours(make_sampler("euler", steps=steps, shift=shift), vs, x)
    # One fp32 rounding per multiply-add per step on |x| of a few units.
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=4 * steps * EPS32 * 8)


@pytest.mark.parametrize("name", ["unipc", "euler"])
@pytest.mark.parametrize("steps", [1, 2, 10, 40])
def test_straight_path_lands_on_x0(name, steps):
    # Along x_sigma = (1 - sigma) x0 + sigma * noise the exact velocity is noise - x0 for all
    # sigma, and every solver here is exact for that field: it must end on x0.
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(SHAPE, generator=g)
    noise = torch.randn(SHAPE, generator=g)
    sampler = make_sampler(name, steps=steps, shift=5.0)
    s0 = sampler.sigmas[0].item()
    x = (1 - s0) * x0 + s0 * noise
    for _ in sampler.timesteps:
        x = sampler.step(noise - x0, x)
    # fp32 rounding of O(1) values over the steps; a wrong coefficient errs by O(0.1).
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-5)


def test_bf16_latents_keep_dtype_and_track_fp32():
    steps = 10
    vs = velocities(steps)
    x = initial_noise()
    ref = run_ours(make_sampler("unipc", steps=steps, shift=5.0), vs, x)
    got = run_ours(
        make_sampler("unipc", steps=steps, shift=5.0),
        [v.bfloat16() for v in vs],
        x.bfloat16(),
    )
    assert got.dtype == torch.bfloat16
    # Inputs and every returned latent are rounded to bf16 (eps 2^-7): allow a few bf16 ulps
    # of the output scale.
    assert (got.float() - ref).abs().max() <= 4 * 2**-7 * ref.abs().max()


def test_reset_and_independent_state():
    steps = 10
    vs = velocities(steps)
    x = initial_noise()
    a = make_sampler("unipc", steps=steps, shift=5.0)
    first = run_ours(a, vs, x)
    assert a.step_index == steps
    with pytest.raises(RuntimeError):
        a.step(vs[0], x)
    a.reset()
    assert torch.equal(run_ours(a, vs, x), first)  # deterministic, history fully cleared

    # Two samplers stepped in lockstep do not share history.
    b, c = make_sampler("unipc", steps, 5.0), make_sampler("unipc", steps, 5.0)
    xb, xc = x, -x
    for v in vs:
        xb, xc = b.step(v, xb), c.step(-v, xc)
    torch.testing.assert_close(xb, first, rtol=0, atol=0)
    torch.testing.assert_close(xc, -first, rtol=0, atol=0)


def test_any_shape():
    vs = [v.flatten() for v in velocities(3)]
    x = initial_noise().flatten()
    got = run_ours(make_sampler("unipc", 3, 5.0), vs, x)
    ref = run_ours(make_sampler("unipc", 3, 5.0), [v.view(SHAPE) for v in vs], x.view(SHAPE))
    assert torch.equal(got, ref.flatten())


def test_unipc_differs_from_euler():
    # Guards the comparisons above against a UniPC that silently degenerates to Euler.
    vs = velocities(10)
    x = initial_noise()
    u = run_ours(make_sampler("unipc", 10, 5.0), vs, x)
    e = run_ours(make_sampler("euler", 10, 5.0), vs, x)
    assert (u - e).abs().max() > 0.1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "unipc", "steps": 0},
        {"name": "euler", "steps": -3},
        {"name": "unipc", "steps": 2.5},
        {"name": "unipc", "steps": 10, "shift": 0.0},
        {"name": "unipc", "steps": 10, "shift": float("nan")},
        {"name": "unipc", "steps": 10, "num_train_timesteps": 1},
        {"name": "dpm++", "steps": 10},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(LX2VError):
        make_sampler(**kwargs)


def test_custom_schedule_for_distilled_samplers():
    # A step-distilled sampler supplies its own schedule; Euler accepts sigma 1 at the top,
    # UniPC (log-SNR steps) does not.
    sched = FlowSchedule(
        sigmas=torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]),
        timesteps=torch.tensor([1000.0, 750.0, 500.0, 250.0]),
    )
    assert EulerFlowSampler(sched).steps == 4
    with pytest.raises(ValueError):
        UniPCFlowSampler(sched)
    with pytest.raises(ValueError):
        FlowSchedule(sigmas=torch.tensor([0.5, 0.7, 0.0]), timesteps=torch.tensor([500.0, 700.0]))
