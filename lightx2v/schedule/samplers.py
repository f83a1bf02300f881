"""Flow-matching samplers for Wan2.1: UniPC (the official solver) and Euler.

Wan2.1 is trained with rectified flow: a latent at noise level sigma is
``x = (1 - sigma) * x0 + sigma * noise`` and the DiT predicts the velocity
``v = noise - x0``. A sampler walks sigma from near 1 down to 0.

Schedule (what the official ``FlowUniPCMultistepScheduler(num_train_timesteps=N, shift=1)``
followed by ``set_timesteps(steps, shift=shift)`` produces, reproduced in the same float64
arithmetic so the integer timesteps truncate identically):

    sigma_max = float32(1 - 1/N)                    # the training grid's top, 0.999 for N=1000
    s_i       = sigma_max - i * sigma_max / steps   # i = 0 .. steps-1 (a linspace to 0, 0 dropped)
    s_i'      = shift * s_i / (1 + (shift - 1) * s_i)
    sigmas    = float32([s_0', ..., s_{steps-1}', 0])
    timesteps = trunc(s_i' * N)                     # int64 upstream; the DiT sees these integers

diffusers' ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)`` (what its
WanPipeline uses) starts its linspace at 1 and ends at 1/N instead, i.e. every unshifted sigma
is larger by ~1/N (and it nudges a top sigma of exactly 1 down by 1e-6). We follow the official
schedule; diffusers reproduces it when given our unshifted sigmas via ``set_timesteps(sigmas=)``.

Samplers own their step counter and history: build one per generation (or call ``reset``).
``step`` computes in float32 (float64 if the latents are float64) and returns the latents' dtype.
Step coefficients are Python floats computed in float64 from the float32 sigmas, so stepping
never reads a device tensor back to the host.

Step-distilled models (LightX2V's 4-step CFG-distilled Wan2.1 checkpoints and LoRAs) use a
fixed list of training timesteps instead (``FlowSchedule.distilled``, ``DistillFlowSampler``):
each step predicts x0 and re-noises it to the next level with fresh noise, without CFG.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from itertools import pairwise

import torch

from lightx2v.errors import LX2VError

__all__ = [
    "DISTILL_SHIFT",
    "DISTILL_STEP_LISTS",
    "SAMPLER_NAMES",
    "DistillFlowSampler",
    "EulerFlowSampler",
    "FlowSampler",
    "FlowSchedule",
    "UniPCFlowSampler",
    "distill_settings",
    "is_step_distilled",
    "make_sampler",
]


@dataclass(frozen=True)
class FlowSchedule:
    """Noise levels of one generation.

    sigmas:    float32 [steps + 1], strictly decreasing, in (0, 1] except the last, which may be 0.
    timesteps: float32 [steps], what the DiT is conditioned on at each step (in [0, N]).
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    def __post_init__(self) -> None:
        s = self.sigmas.tolist()
        if len(s) < 2 or self.timesteps.shape != (len(s) - 1,):
            raise ValueError("FlowSchedule needs steps+1 sigmas and steps timesteps")
        if not all(a > b for a, b in pairwise(s)) or s[0] > 1 or s[-1] < 0:
            raise ValueError(f"sigmas must decrease strictly within [0, 1], got {s}")

    @property
    def steps(self) -> int:
        return self.timesteps.numel()

    @classmethod
    def shifted(cls, steps: int, shift: float, num_train_timesteps: int = 1000) -> FlowSchedule:
        """The official Wan2.1 schedule (see the module docstring for the formula)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise LX2VError(f"sampling steps must be an integer >= 1, got {steps!r}")
        if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
            raise LX2VError(f"sample shift must be a finite number > 0, got {shift!r}")
        n = num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise LX2VError(f"num_train_timesteps must be an integer >= 2, got {n!r}")
        shift = float(shift)
        # Upstream builds the training grid in float32 and reads its top back as a double.
        sigma_max = float(torch.tensor(1.0 - 1.0 / n, dtype=torch.float32))
        # numpy.linspace(sigma_max, 0, steps + 1) evaluates start + i * ((stop - start) / div).
        delta = (0.0 - sigma_max) / steps
        unshifted = [i * delta + sigma_max for i in range(steps)]
        shifted = [shift * s / (1 + (shift - 1) * s) for s in unshifted]
        sigmas = torch.tensor([*shifted, 0.0], dtype=torch.float64).to(torch.float32)
        # Truncation, not rounding: upstream casts the float64 product to int64.
        timesteps = torch.tensor([math.trunc(s * n) for s in shifted], dtype=torch.float32)
        return cls(sigmas=sigmas, timesteps=timesteps)

    @classmethod
    def distilled(
        cls, step_list: tuple[int, ...], shift: float, num_train_timesteps: int = 1000
    ) -> FlowSchedule:
        """The schedule of a step-distilled model, as LightX2V's WanStepDistillScheduler.

        The training grid is ``sigma_j = linspace(1, 0, N + 1)[j]`` for j = 0 .. N-1 in float32
        (1, 0.999, ..., 0.001 for N = 1000), shifted in float32 as above; step list entry t
        selects grid index N - t, and the DiT sees ``shifted sigma * N`` unrounded. For
        [1000, 750, 500, 250] with shift 5: sigmas 1, 0.9375, 0.8333, 0.625 (then 0),
        timesteps 1000, 937.5, 833.33, 625.
        """
        n = num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise LX2VError(f"num_train_timesteps must be an integer >= 2, got {n!r}")
        ts = list(step_list)
        if (
            not ts
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 < t <= n for t in ts)
            or not all(a > b for a, b in pairwise(ts))
        ):
            raise LX2VError(
                f"distilled step list must be decreasing integers in 1..{n}, got {step_list!r}"
            )
        if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
            raise LX2VError(f"sample shift must be a finite number > 0, got {shift!r}")
        grid = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float32)[:-1]
        grid = float(shift) * grid / (1 + (float(shift) - 1) * grid)
        idx = torch.tensor([n - t for t in ts])
        sigmas = torch.cat([grid[idx], torch.zeros(1)])
        return cls(sigmas=sigmas, timesteps=grid[idx] * n)


class FlowSampler(ABC):
    """One generation's walk down a FlowSchedule, driven by velocity predictions.

    Use: ``for t in sampler.timesteps: latents = sampler.step(model(latents, t), latents)``.
    Subclasses implement ``_step`` (and extend ``reset`` if they keep history); a step-distilled
    sampler only needs its own FlowSchedule and a ``_step``.
    """

    name: str = ""

    def __init__(self, schedule: FlowSchedule) -> None:
        self.schedule = schedule
        # The float32 sigmas as exact doubles, for host-side coefficient math.
        self._sig: list[float] = schedule.sigmas.tolist()
        self.reset()

    @property
    def sigmas(self) -> torch.Tensor:
        return self.schedule.sigmas

    @property
    def timesteps(self) -> torch.Tensor:
        return self.schedule.timesteps

    @property
    def steps(self) -> int:
        return self.schedule.steps

    @property
    def step_index(self) -> int:
        """How many steps have been taken since construction or the last reset."""
        return self._index

    def reset(self) -> None:
        """Forget all history so the sampler can run a new generation."""
        self._index = 0

    def step(self, velocity: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Advance latents from sigmas[i] to sigmas[i+1] given the model's velocity at step i.

        velocity, latents: same shape, any layout (batched or not); returns latents' dtype.
        """
        if self._index >= self.steps:
            raise RuntimeError(f"{type(self).__name__} already took all {self.steps} steps")
        if velocity.shape != latents.shape:
            raise ValueError(f"velocity {tuple(velocity.shape)} != latents {tuple(latents.shape)}")
        work = torch.promote_types(latents.dtype, torch.float32)
        out = self._step(velocity.to(work), latents.to(work), self._index)
        self._index += 1
        return out.to(latents.dtype)

    @abstractmethod
    def _step(self, v: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        """Step i on float32/float64 tensors."""


class EulerFlowSampler(FlowSampler):
    """First-order flow ODE step: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i."""

    name = "euler"

    def _step(self, v: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        return x + (self._sig[i + 1] - self._sig[i]) * v


def _lam(sigma: float) -> float:
    """Half log-SNR of a flow latent: log(alpha / sigma) with alpha = 1 - sigma."""
    # 1 - sigma is exact in double for a float32 sigma, so no log1p needed.
    return math.log(1.0 - sigma) - math.log(sigma)


class UniPCFlowSampler(FlowSampler):
    """UniPC multistep (Zhao et al. 2023) on x0 predictions, as Wan2.1 samples by default.

    Configuration fixed to the official one: solver order 2, B(h) variant bh2, data (x0)
    prediction with x0 = x - sigma * v, the UniC corrector on every step after the first,
    order 1 on the first step (no history yet) and on the last (lower_order_final).

    With lambda = log((1 - sigma) / sigma), h = lambda_t - lambda_s, phi = expm1(-h) = B(h),
    a step from s to t with x0 predictions m_s (now) and m_p (previous step) is

        x_t = (sigma_t / sigma_s) x_s - alpha_t phi m_s - alpha_t phi rho (m_p - m_s) / r,

    r = (lambda_p - lambda_s) / h, rho = 1/2 for the order-2 predictor (0 for order 1). The
    corrector redoes the previous step once m_t is known, adding the term for (m_t - m_s):
    weight 1/2 after an order-1 step, weights from a 2x2 linear system after an order-2 step.
    """

    name = "unipc"

    def __init__(self, schedule: FlowSchedule) -> None:
        if float(schedule.sigmas[0]) >= 1.0:
            # lambda(1) = -inf: UniPC's log-SNR steps are undefined at pure noise.
            raise ValueError("UniPC needs sigmas[0] < 1")
        super().__init__(schedule)

    def reset(self) -> None:
        super().reset()
        self._x0_hist: list[torch.Tensor] = []  # x0 predictions of earlier steps, newest last
        self._last_x: torch.Tensor | None = None  # the (corrected) sample the last step left
        self._last_order = 0

    def _step(self, v: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        x0 = x - self._sig[i] * v
        if i > 0:
            x = self._correct(x0, i)
        order = min(2, i + 1, self.steps - i)  # warm-up from order 1; order 1 on the last step
        self._x0_hist = [*self._x0_hist[-1:], x0]
        self._last_x, self._last_order = x, order
        return self._predict(x, i, order)

    def _predict(self, x: torch.Tensor, i: int, order: int) -> torch.Tensor:
        s, t = self._sig[i], self._sig[i + 1]
        m_s = self._x0_hist[-1]
        if t == 0.0:
            # alpha_t = 1, sigma_t = 0, phi = -1: the order-1 step lands on the x0 prediction.
            # (order is 1 here: only the last sigma can be 0 and the last step is order 1.)
            return m_s
        lam_s = _lam(s)
        h = _lam(t) - lam_s
        phi = math.expm1(-h)
        alpha_t = 1.0 - t
        x_t = (t / s) * x - (alpha_t * phi) * m_s
        if order == 2:
            r = (_lam(self._sig[i - 1]) - lam_s) / h
            d = (self._x0_hist[-2] - m_s) / r
            x_t = x_t - (alpha_t * phi * 0.5) * d
        return x_t

    def _correct(self, x0_t: torch.Tensor, i: int) -> torch.Tensor:
        """UniC: redo step i-1 (sigma s -> t) using the fresh x0 prediction at t."""
        assert self._last_x is not None
        s, t = self._sig[i - 1], self._sig[i]
        m_s = self._x0_hist[-1]
        lam_s = _lam(s)
        h = _lam(t) - lam_s
        hh = -h
        phi = math.expm1(hh)
        alpha_t = 1.0 - t
        x_c = (t / s) * self._last_x - (alpha_t * phi) * m_s
        if self._last_order == 1:
            return x_c - (alpha_t * phi * 0.5) * (x0_t - m_s)
        # Order 2: rho solves [[1, 1], [r, 1]] rho = b with b_k = k! g_k / B(h), where
        # g_1 = phi/hh - 1 and g_2 = g_1/hh - 1/2 (the phi_k recursion of the UniPC paper).
        r = (_lam(self._sig[i - 2]) - lam_s) / h
        g1 = phi / hh - 1.0
        g2 = g1 / hh - 0.5
        b1, b2 = g1 / phi, 2.0 * g2 / phi
        rho_p = (b1 - b2) / (1.0 - r)
        rho_t = b1 - rho_p
        d_p = (self._x0_hist[-2] - m_s) / r
        return x_c - (alpha_t * phi) * (rho_p * d_p + rho_t * (x0_t - m_s))


class DistillFlowSampler(FlowSampler):
    """Sampler of step-distilled models: predict x0, re-noise to the next level.

        x0      = x_i - sigma_i * v_i
        x_{i+1} = (1 - sigma_{i+1}) * x0 + sigma_{i+1} * noise_i     (the last step returns x0)

    noise_i is fresh float32 standard normal noise drawn from `generator` (latents' shape and
    device), so a run is deterministic given the generator's seed. As LightX2V, pass the
    generator that drew the initial latents to continue its stream; or pass `seed` and a
    generator is made on the latents' device at the first step. Step-distilled models are
    also CFG-distilled: run them with guidance 1 (see `distill_settings`).
    """

    name = "distill"

    def __init__(
        self,
        schedule: FlowSchedule,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        if generator is None and seed is None:
            raise ValueError("DistillFlowSampler needs a generator or a seed for its noise")
        self._seed = seed
        self._init_generator = generator
        super().__init__(schedule)

    def reset(self) -> None:
        super().reset()
        self.generator = self._init_generator

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        if self.generator is None:
            self.generator = torch.Generator(device=x.device).manual_seed(self._seed)
        return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=torch.float32)

    def _step(self, v: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        x0 = x - self._sig[i] * v
        if i == self.steps - 1:
            return x0
        s = self._sig[i + 1]
        return (1.0 - s) * x0 + s * self._noise(x).to(x.dtype)


# Step-distilled sampler names → their training-timestep lists.
DISTILL_STEP_LISTS: dict[str, tuple[int, ...]] = {"distill4": (1000, 750, 500, 250)}

_SAMPLERS: dict[str, type[FlowSampler]] = {
    cls.name: cls for cls in (UniPCFlowSampler, EulerFlowSampler)
}
SAMPLER_NAMES: tuple[str, ...] = (*_SAMPLERS, *DISTILL_STEP_LISTS)


def is_step_distilled(name: str) -> bool:
    return name in DISTILL_STEP_LISTS


# The shift step-distilled models were trained with (LightX2V's distill configs: 5, T2V and I2V).
DISTILL_SHIFT = 5.0


def distill_settings(
    name: str, steps: int | None, guidance: float | None, shift: float | None = None
) -> tuple[int | None, float | None, float | None, list[str]]:
    """(steps, guidance, shift, notes) to run sampler `name` with; notes say what changed.

    A step-distilled sampler fixes the step count to its list's length and runs without CFG
    (the models are CFG-distilled: guidance 1, no negative prompt); an unset (None) shift
    becomes DISTILL_SHIFT. Unset steps/guidance change silently; values the user set that
    cannot apply give a note. Other samplers pass everything through.
    """
    if name not in DISTILL_STEP_LISTS:
        return steps, guidance, shift, []
    n = len(DISTILL_STEP_LISTS[name])
    notes = []
    if steps is not None and steps != n:
        notes.append(f"--sampler {name} runs exactly {n} steps (not {steps})")
    if guidance is not None and guidance != 1.0:
        notes.append(
            f"--sampler {name} is for step- and CFG-distilled models: guidance {guidance:g} "
            "ignored, running without CFG (guidance 1)"
        )
    return n, 1.0, DISTILL_SHIFT if shift is None else shift, notes


def make_sampler(
    name: str,
    steps: int,
    shift: float = 5.0,
    num_train_timesteps: int = 1000,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> FlowSampler:
    """A fresh sampler; name is one of SAMPLER_NAMES.

    unipc/euler walk the official shifted schedule of `steps` steps. A step-distilled name
    ("distill4") walks its fixed timestep list (steps must equal its length) and draws its
    re-noising from `generator` (or a generator seeded with `seed`).
    """
    if name in DISTILL_STEP_LISTS:
        step_list = DISTILL_STEP_LISTS[name]
        if steps != len(step_list):
            raise LX2VError(f"--sampler {name} runs exactly {len(step_list)} steps, got {steps}")
        if generator is None and seed is None:
            raise LX2VError(f"--sampler {name} needs a seed (it re-noises between steps)")
        schedule = FlowSchedule.distilled(step_list, shift, num_train_timesteps)
        return DistillFlowSampler(schedule, generator=generator, seed=seed)
    if name not in _SAMPLERS:
        raise LX2VError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    return _SAMPLERS[name](FlowSchedule.shifted(steps, shift, num_train_timesteps))
