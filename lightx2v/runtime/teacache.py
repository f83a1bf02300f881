"""TeaCache: skip the block stack on steps whose input barely changed, reuse its residual.

TeaCache (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video
Diffusion Model"; the Wan2.1 recipe of ali-vilab/TeaCache `TeaCache4Wan2.1`) watches an
indicator that is cheap to compute before the blocks run and estimates from it how much
the output of the 30/40 blocks will change:

    rel_i  = ‖a_i − a_{i−1}‖₁ / ‖a_{i−1}‖₁            (relative L1 change of the indicator)
    acc   += poly(rel_i)                               (published 4th-degree fit, highest power first)
    acc < threshold  →  skip: tokens_out = tokens_in + cached residual
    else             →  run the blocks, cache residual = tokens_out − tokens_in, acc = 0

Two published variants, each with its own coefficient table:

- "e": the indicator is the time embedding t_emb [B, D]. The first and the last step
  always run the blocks (upstream: ret_steps = 1, cutoff = steps − 1).
- "e0" ("ret-steps", the upstream default): the indicator is the projected modulation
  e [B, 6, D]. The first 5 steps always run; the last step is NOT forced (upstream:
  ret_steps = 5, cutoff = steps).

As upstream, the previous indicator is updated on every step (computed or skipped), the
accumulator is reset on every forced step, and the metric is taken as one number over the
whole batch. Upstream keeps separate state for cond and uncond; here cond and uncond,
batched as 2, share one decision (their indicators are identical, as both only depend on
t) and the residual keeps one row per batch element. With CFG run sequentially each
runner keeps its own state and, the indicators being equal, reaches the same decisions.

A threshold of 0 (or below) disables caching: every step runs the blocks, bit-identical
to a DiTRunner. (Upstream, threshold 0 with a negative polynomial value could still skip.)

Coefficient rows: T2V-1.3B / T2V-14B are told apart by the model width (1536 / 5120).
The two I2V-14B rows (480P, 720P) come from models with identical architectures, so they
cannot be told apart from the weights: the row follows the requested size — an area up to
832×480 picks 480P, anything larger 720P (LightX2V picks by a 480 / 720 side; the area
rule also covers portrait and odd sizes). `model=` overrides the choice.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch

from lightx2v.config import WanArch
from lightx2v.errors import LX2VError
from lightx2v.runtime.runner import DiTRunner

log = logging.getLogger("lightx2v")

VARIANTS = ("e", "e0")

# Published polynomial coefficients, highest power first: {model: {variant: coefficients}}.
TEACACHE_COEFFICIENTS: dict[str, dict[str, tuple[float, ...]]] = {
    "t2v-1.3b": {
        "e": (2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01),
        "e0": (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    },
    "t2v-14b": {
        "e": (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
        "e0": (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
    },
    "i2v-14b-480p": {
        "e": (-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01),
        "e0": (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    },
    "i2v-14b-720p": {
        "e": (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
        "e0": (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
    },
}

# Steps that always run the blocks: (first `ret` steps, steps from `cutoff(steps)` on).
_FORCED = {"e": (1, lambda n: n - 1), "e0": (5, lambda n: n)}

AREA_480P = 832 * 480


def teacache_model(arch: WanArch, width: int, height: int, model: str | None = None) -> str:
    """The TEACACHE_COEFFICIENTS row for a model and request size (see the module docstring)."""
    if model is not None:
        if model not in TEACACHE_COEFFICIENTS:
            raise LX2VError(
                f"TeaCache: unknown model {model!r}; choose one of {', '.join(TEACACHE_COEFFICIENTS)}"
            )
        return model
    if arch.is_i2v:
        return "i2v-14b-480p" if width * height <= AREA_480P else "i2v-14b-720p"
    if arch.dim not in (1536, 5120):  # tiny test models, unpublished widths
        log.warning("TeaCache: no coefficients for a T2V model of width %d; using the %s row",
                    arch.dim, "1.3B" if arch.dim < 5120 else "14B")  # fmt: skip
    return "t2v-1.3b" if arch.dim < 5120 else "t2v-14b"


def poly(coefficients: tuple[float, ...], x: float) -> float:
    """Polynomial with coefficients highest power first (numpy.poly1d's order), in double."""
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return y


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖₁ / ‖b‖₁ as a Python float (one device sync), in fp32 (fp64 for fp64 inputs)."""
    dt = torch.promote_types(a.dtype, torch.float32)
    a, b = a.to(dt), b.to(dt)
    return ((a - b).abs().sum() / b.abs().sum()).item()


@dataclass
class TeaCachePolicy:
    """The skip decision, free of tensors: feed it one indicator per step."""

    coefficients: tuple[float, ...]
    threshold: float
    steps: int
    variant: str = "e0"
    accumulated: float = field(default=0.0, init=False)
    step: int = field(default=0, init=False)
    _prev: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise LX2VError(f"--teacache-variant {self.variant!r}: expected 'e' or 'e0'")
        if not (isinstance(self.threshold, (int, float)) and self.threshold >= 0):
            raise LX2VError(f"--teacache {self.threshold!r}: the threshold must be a number >= 0")
        if self.steps < 1:
            raise ValueError("TeaCache needs the number of steps (>= 1)")
        ret, cutoff = _FORCED[self.variant]
        self.ret_steps, self.cutoff_steps = ret, cutoff(self.steps)

    def reset(self) -> None:
        self.accumulated, self.step, self._prev = 0.0, 0, None

    def forced(self, step: int) -> bool:
        return step < self.ret_steps or step >= self.cutoff_steps

    def update(self, indicator: torch.Tensor) -> bool:
        """Advance one step; True: run the blocks, False: reuse the cached residual."""
        step, prev = self.step, self._prev
        self.step += 1
        self._prev = indicator.detach().clone()
        if self.threshold <= 0:
            return True
        if self.forced(step) or prev is None:
            self.accumulated = 0.0
            return True
        self.accumulated += poly(self.coefficients, rel_l1(indicator, prev))
        if self.accumulated < self.threshold:
            return False
        self.accumulated = 0.0
        return True


class TeaCacheMixin:
    """Adds TeaCache to a runner class: put it first in the bases of a DiTRunner subclass.

    It wraps the base class's `run_blocks`, so it composes with other runners (see
    `with_teacache`, e.g. the sequence-parallel runner, whose run_blocks sees this rank's
    token shard: the residual is then per shard). Block offload swaps `dit.blocks` and
    needs nothing here. TeaCache costs one [B, L, D] fp32 residual buffer while on.
    """

    def __init__(self, dit, *args, threshold: float, steps: int, variant: str = "e0",
                 coefficients: tuple[float, ...] | None = None, model: str | None = None,
                 size: tuple[int, int] | None = None, **kwargs):  # fmt: skip
        super().__init__(dit, *args, **kwargs)
        if variant not in VARIANTS:
            raise LX2VError(f"--teacache-variant {variant!r}: expected 'e' or 'e0'")
        if coefficients is None:
            w, h = size if size is not None else (832, 480)
            self.teacache_model = teacache_model(dit.arch, w, h, model)
            coefficients = TEACACHE_COEFFICIENTS[self.teacache_model][variant]
        else:
            self.teacache_model = "custom"
        self.policy = TeaCachePolicy(tuple(coefficients), threshold, steps, variant)
        self.skipped_steps: list[int] = []
        self._residual: torch.Tensor | None = None

    def begin(self, context, clip_tokens=None) -> None:
        super().begin(context, clip_tokens)
        self.policy.reset()
        self.skipped_steps = []
        self._residual = None

    def end(self) -> None:
        super().end()
        self._residual = None

    def run_blocks(self, tokens, t_emb, e, cos, sin):
        step = self.policy.step
        compute = self.policy.update(t_emb if self.policy.variant == "e" else e)
        res = self._residual
        if not compute:
            if res is not None and res.shape == tokens.shape:
                self.skipped_steps.append(step)
                return tokens + res
            self.policy.accumulated = 0.0  # nothing to reuse (new shape): compute, as a reset
        if self.policy.threshold <= 0:  # nothing is ever reused: no residual to keep
            return super().run_blocks(tokens, t_emb, e, cos, sin)
        # The blocks update the residual stream in place (ops.residual_add_), so the input
        # is saved first, into the residual's own buffer: residual = out - in, no extra copy.
        if res is None or res.shape != tokens.shape:
            res = self._residual = torch.empty_like(tokens)
        res.copy_(tokens)
        out = super().run_blocks(tokens, t_emb, e, cos, sin)
        torch.sub(out, res, out=res)
        return out

    def teacache_summary(self) -> str:
        n, s = self.policy.step, self.skipped_steps
        return (f"TeaCache ({self.policy.variant}, {self.teacache_model}, threshold "
                f"{self.policy.threshold:g}): skipped {len(s)}/{n} steps {s}")  # fmt: skip


class TeaCacheRunner(TeaCacheMixin, DiTRunner):
    """A DiTRunner with TeaCache:

    runner = TeaCacheRunner(dit, threshold=0.2, steps=40, variant="e0", size=(832, 480))
    runner.begin(context, clip); v = runner(x, t, y) ...; runner.skipped_steps
    """


@functools.cache
def with_teacache(runner_cls: type[DiTRunner]) -> type[DiTRunner]:
    """`runner_cls` with TeaCache on top, e.g. with_teacache(ParallelRunner)(dit, groups,
    threshold=..., steps=...). The decision needs no communication between ranks: every rank
    sees the same t, hence the same indicator and the same decision."""
    if issubclass(runner_cls, TeaCacheMixin):
        return runner_cls
    if runner_cls is DiTRunner:
        return TeaCacheRunner
    return type(f"TeaCache{runner_cls.__name__}", (TeaCacheMixin, runner_cls), {})
