"""Multi-GPU denoising through torch.distributed: CFG parallel and Ulysses sequence parallel.

One video, N processes (one per GPU, started by torchrun), every process holding the whole
model. Two independent ways to split a step, combinable (N = cfg × ulysses):

- CFG parallel (cfg = 2): the conditional branch runs on one half of the ranks, the
  unconditional on the other. No communication inside the model; the two predictions are
  exchanged once per step. Preferred first: it costs one small all-gather per step.
- Ulysses sequence parallel (degree P, DeepSpeed-Ulysses): after patchify each rank keeps
  1/P of the video tokens (padded to a multiple of P; the RoPE tables are cut the same way).
  Everything in a block is per-token except self-attention, which needs every token: an
  all-to-all turns q, k, v [B, L/P, H, D] into [B, L, H/P, D] (all tokens, 1/P of the
  heads), attention runs with whatever backend is active, and a second all-to-all turns the
  output back. Cross-attention needs no communication (every rank has all text/image
  tokens). The head is per-token too, so it runs on the local tokens and only its small
  output (64 channels instead of 5120) is gathered.
  The head count must divide by P (40 heads: 1, 2, 4, 5, 8, ...; 12 heads: 1, 2, 3, 4, 6).

Rank layout (cfg-major): rank r of a parallel group has branch r // P and sequence chunk
r % P, so each Ulysses group is P consecutive ranks (neighbours on one host).

The model and DiTRunner are not changed. `ParallelRunner(DiTRunner)` overrides `begin` and
`__call__` (so subclass hooks in `run_blocks`, e.g. TeaCache/offload, still apply to the
local tokens) and, for the duration of a step, wraps the active attention backend in a
Ulysses backend registered with `register_attention_backend`. That backend tells
self-attention from cross-attention by shape: self-attention has q and k of the local
length; the local length is chosen (by extra padding if needed) to differ from every
cross-attention key length, so the test is exact. Wrapping per step, whichever backend is
active at that moment (also one set by `attention_backend_override`), means every backend
works and none can run unwrapped by mistake.

Padding tokens (zeros) are dropped before attention and never attended to, so the result
equals the single-GPU one up to floating-point reordering.

Shared multi-GPU hosts: NVLink multicast (NVLS) must stay off in every process we start;
`disable_nvls()` sets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1 (launch.py sets them for torchrun and its children too).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightx2v.errors import LX2VError
from lightx2v.models.wan.dit import WanDiT
from lightx2v.ops import attention as attn_ops
from lightx2v.runtime.runner import DiTRunner

log = logging.getLogger("lightx2v")

NVLS_OFF_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
DEFAULT_TIMEOUT_S = 900  # a collective stuck this long ends the run (loading 14B + compile fit)


def disable_nvls(env: MutableMapping[str, str] | None = None) -> None:
    """Force NVLink multicast off (NCCL, PyTorch symmetric memory, NVSHMEM) in `env`.

    Set, not setdefault: a value inherited from the caller's shell must not turn it on.
    """
    env = os.environ if env is None else env
    env.update(NVLS_OFF_ENV)


# ---------------------------------------------------------------------------------------
# configuration


def valid_ulysses_degrees(num_heads: int, limit: int | None = None) -> list[int]:
    """Degrees P with num_heads % P == 0 (optionally P ≤ limit)."""
    return [
        p for p in range(1, num_heads + 1) if num_heads % p == 0 and (limit is None or p <= limit)
    ]


def check_ulysses_degree(num_heads: int, degree: int) -> None:
    if degree < 1:
        raise LX2VError(f"--ulysses {degree}: the degree must be at least 1")
    if num_heads % degree:
        valid = ", ".join(map(str, valid_ulysses_degrees(num_heads)))
        raise LX2VError(
            f"Ulysses degree {degree} does not divide the model's {num_heads} attention heads; "
            f"valid degrees: {valid}"
        )


@dataclass(frozen=True)
class ParallelConfig:
    """How one step is split: `cfg` (1 or 2) × `ulysses` (P) processes."""

    cfg: int = 1
    ulysses: int = 1

    @property
    def world(self) -> int:
        return self.cfg * self.ulysses

    def validate(self, num_heads: int) -> ParallelConfig:
        if self.cfg not in (1, 2):
            raise LX2VError(f"CFG parallel degree {self.cfg}: must be 1 or 2")
        check_ulysses_degree(num_heads, self.ulysses)
        return self

    @classmethod
    def choose(
        cls,
        world: int,
        num_heads: int,
        ulysses: int | None = None,
        cfg_parallel: bool | None = None,
        uses_cfg: bool = True,
    ) -> ParallelConfig:
        """The split for `world` processes.

        Defaults: CFG parallel whenever the request uses CFG and world is even (it needs no
        communication inside the model), Ulysses over the rest. Explicit choices are checked:
        cfg × ulysses must equal world, and the head count must divide by ulysses.
        """
        if world < 1:
            raise LX2VError(f"--gpus {world}: must be at least 1")
        if cfg_parallel is None:
            if ulysses is not None:
                cfg_parallel = ulysses * 2 == world
            else:
                cfg_parallel = uses_cfg and world % 2 == 0
        cfg = 2 if cfg_parallel else 1
        if cfg_parallel and world % 2:
            raise LX2VError(f"--cfg-parallel needs an even number of GPUs, got {world}")
        if ulysses is None:
            ulysses = world // cfg
        if cfg * ulysses != world:
            raise LX2VError(
                f"{world} GPU(s) but cfg {cfg} × ulysses {ulysses} = {cfg * ulysses} processes; "
                "they must be equal"
            )
        if num_heads % ulysses:
            valid = valid_ulysses_degrees(num_heads, world)
            raise LX2VError(
                f"Ulysses degree {ulysses} does not divide the model's {num_heads} attention "
                f"heads; valid degrees: {', '.join(map(str, valid))} (with --cfg-parallel: "
                f"GPUs = 2 × degree)"
            )
        if cfg == 2 and not uses_cfg:
            log.warning(
                "CFG parallel with guidance 1.0 (no CFG): both halves compute the same branch"
            )
        return cls(cfg, ulysses).validate(num_heads)


# ---------------------------------------------------------------------------------------
# process groups


def in_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(
    backend: str | None = None, timeout_s: float | None = None
) -> tuple[int, int, torch.device]:
    """Join the process group described by torchrun's environment.

    → (rank, world size, this rank's device). NCCL with one GPU per local rank when CUDA is
    present, else gloo on CPU. A collective that waits longer than `timeout_s` (default
    LX2V_DIST_TIMEOUT or 900 s) fails instead of hanging.
    """
    disable_nvls()
    if not in_torchrun():
        raise LX2VError("multi-GPU needs torchrun's environment (use `lx2v run --gpus N`)")
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise LX2VError(
                f"local rank {local_rank} but only {torch.cuda.device_count()} GPU(s) visible"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if timeout_s is None:
        timeout_s = float(os.environ.get("LX2V_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


def leave_process_group() -> None:
    """Wait for every rank (so no peer is still in a collective), then leave the process
    group. Raises if a peer is gone."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_now(code: int) -> NoReturn:
    """Flush stdout/stderr and end the process with os._exit: no interpreter finalization.

    Deliberate: two-rank gloo runs on CPU sometimes died with SIGABRT, "terminate called
    without an active exception" (what a std::thread destroyed while still running prints,
    i.e. teardown): once in CI, 3 times in about 46 runs of the two-rank tests under CPU
    load. Finalization tears down the objects that own the communication threads in no
    fixed order; os._exit runs no destructor at all. Every file a rank writes is closed
    (and renamed into place) before it gets here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_rank(code: int = 0) -> NoReturn:
    """End a rank after a successful run: leave_process_group, then exit_now(code). A
    failure at the final barrier (a peer died) is one line on stderr and a non-zero status.
    (`lx2v run` ranks go through launch.run_rank, which also records that failure.)"""
    try:
        leave_process_group()
    except BaseException as e:  # noqa: BLE001 - a peer died at the end: exit non-zero
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        print(f"lx2v: error: leaving the process group: {msg}", file=sys.stderr)
        code = code or 1
    exit_now(code)


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


@dataclass
class ParallelGroups:
    """This process's place in one parallel instance (a set of ranks running one video)."""

    config: ParallelConfig
    ranks: tuple[int, ...]  # global ranks, cfg-major
    index: int  # this process's position in `ranks`
    group: dist.ProcessGroup | None  # all of `ranks` (None when there is one)
    ulysses_group: dist.ProcessGroup | None  # the P ranks sharing this branch (None if P == 1)

    @property
    def cfg_index(self) -> int:
        return self.index // self.config.ulysses

    @property
    def ulysses_rank(self) -> int:
        return self.index % self.config.ulysses


def make_groups(
    config: ParallelConfig, ranks: list[int] | tuple[int, ...] | None = None
) -> ParallelGroups | None:
    """Process groups for `config` over `ranks` (default: all ranks; their count must be
    config.world). Collective: every rank of the default group must call it, in the same
    order, also ranks outside `ranks` (they get None)."""
    world, me = dist.get_world_size(), dist.get_rank()
    # sorted: a process group numbers its members by global rank, and the slices of
    # all_to_all / all_gather follow that numbering
    ranks = tuple(range(world)) if ranks is None else tuple(sorted(ranks))
    if len(ranks) != config.world:
        raise LX2VError(
            f"parallel config cfg {config.cfg} × ulysses {config.ulysses} needs "
            f"{config.world} processes, got {len(ranks)}"
        )
    if len(set(ranks)) != len(ranks) or not all(0 <= r < world for r in ranks):
        raise ValueError(f"bad rank list {ranks} for world size {world}")
    p = config.ulysses
    group = None
    if len(ranks) > 1:
        group = dist.group.WORLD if ranks == tuple(range(world)) else dist.new_group(list(ranks))
    mine = None
    if p > 1:
        for c in range(config.cfg):
            sub = ranks[c * p : (c + 1) * p]
            g = group if config.cfg == 1 else dist.new_group(list(sub))
            if me in sub:
                mine = g
    if me not in ranks:
        return None
    return ParallelGroups(config, ranks, ranks.index(me), group, mine)


# ---------------------------------------------------------------------------------------
# Ulysses attention


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Exchange the P equal slices of dim 0: slice j goes to group rank j, and slice j of
    the result came from group rank j."""
    x = x.contiguous()
    if torch.compiler.is_compiling():  # traceable functional collective inside a graph
        import torch.distributed._functional_collectives as funcol

        return funcol.wait_tensor(funcol.all_to_all_single(x, None, None, group))
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


class _SeqLayout:
    """The token split of the current step (read by the attention wrapper)."""

    def __init__(self, degree: int, group: dist.ProcessGroup | None):
        self.degree = degree
        self.group = group
        self.full_len = 0  # real tokens L
        self.local_len = 0  # tokens per rank after padding (P · local_len ≥ L)


def ulysses_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: _SeqLayout, inner
) -> torch.Tensor:
    """Self-attention over the sequence split across the Ulysses group.

    q, k, v [B, L/P, H, D] → all-to-all → [B, L, H/P, D] → inner attention → back.
    """
    p, n = layout.degree, layout.local_len
    b, _, h, d = q.shape
    hp = h // p
    # [P, 3, B, n, H/P, D], one copy: slice j (head group j) goes to rank j
    send = q.new_empty(p, 3, b, n, hp, d)
    for i, x in enumerate((q, k, v)):
        send[:, i].copy_(x.unflatten(2, (p, hp)).permute(2, 0, 1, 3, 4))
    qkv = _all_to_all(send, layout.group)  # slice j: rank j's tokens of our head group
    qkv = qkv.permute(1, 2, 0, 3, 4, 5).reshape(3, b, p * n, hp, d)[:, :, : layout.full_len]
    out = inner(qkv[0], qkv[1], qkv[2])  # [B, L, H/P, D]
    pad = p * n - layout.full_len
    if pad:
        out = F.pad(out, (0, 0, 0, 0, 0, pad))
    out = out.view(b, p, n, hp, d).transpose(0, 1)  # [P, B, n, H/P, D]: slice j → rank j
    out = _all_to_all(out, layout.group)  # slice j: head group j of our tokens
    return out.permute(1, 2, 0, 3, 4).reshape(b, n, h, d)


def _backend_fn(name: str):
    """The function of a registered attention backend (loading it if needed)."""
    attn_ops.set_attention_backend(name)  # loads it, or raises naming what is available
    # attention.py has no public getter for a backend's function yet; its registry is
    # the one source of truth, so read it rather than keep a copy that could go stale.
    return attn_ops._BACKENDS[name]


# ---------------------------------------------------------------------------------------
# the runner


class ParallelRunner(DiTRunner):
    """DiTRunner for one rank of a parallel instance; same API, same results.

    begin(context [B, T, C], clip [B, I, C] | None) with B = 2 (cond, uncond) or 1;
    __call__(x [B, C, F, H, W], t [B], y) → the full prediction [B, 16, F, H, W] on every
    rank of the instance (so every rank's sampler stays in step with no further exchange).
    """

    def __init__(self, dit: WanDiT, groups: ParallelGroups):
        super().__init__(dit)
        if groups is None:
            raise ValueError("this rank is not part of the parallel instance")
        groups.config.validate(dit.arch.num_heads)
        self.groups = groups
        self.config = groups.config
        self._layout = _SeqLayout(groups.config.ulysses, groups.ulysses_group)
        self._batch = 0
        self._cross_lens: set[int] = set()
        self._local_rope: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._wrapped: dict[str, str] = {}  # inner backend → registered Ulysses name
        self._warned_dup = False

    # -- per generation ------------------------------------------------------------------

    @torch.no_grad()
    def begin(self, context: torch.Tensor, clip_tokens: torch.Tensor | None = None) -> None:
        self._batch = context.shape[0]
        if self.config.cfg == 2:
            context, clip_tokens = self._branch(context), self._branch(clip_tokens)
        super().begin(context, clip_tokens)
        self._cross_lens = {kv.shape[1] for kv in self._cross_kv[0]}

    def _branch(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's share of a CFG batch: row cfg_index of [cond, uncond]."""
        if x is None or self.config.cfg == 1:
            return x
        if x.shape[0] == 2:
            i = self.groups.cfg_index
            return x[i : i + 1]
        if x.shape[0] == 1:
            if not self._warned_dup:
                log.warning("CFG parallel without CFG (batch 1): both halves run the same branch")
                self._warned_dup = True
            return x
        raise ValueError(f"CFG parallel expects a batch of 2 (cond, uncond) or 1, got {x.shape[0]}")

    # -- token split -----------------------------------------------------------------------

    def _local_len(self, full: int) -> int:
        """Tokens per rank: ⌈L/P⌉, raised past any cross-attention key length so the
        attention wrapper's shape test (q and k of the local length = self-attention)
        cannot be fooled."""
        n = -(-full // self.config.ulysses)
        while n in self._cross_lens:
            n += 1
        return n

    def _split_rope(self, grid, device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (grid, n)
        if key not in self._local_rope:
            cos, sin = self.rope(grid, device)  # [L, 1, Dh/2]
            pad = self.config.ulysses * n - cos.shape[0]
            cos = F.pad(cos, (0, 0, 0, 0, 0, pad), value=1.0)  # padding: identity rotation
            sin = F.pad(sin, (0, 0, 0, 0, 0, pad), value=0.0)
            r = self.groups.ulysses_rank
            self._local_rope[key] = (
                cos[r * n : (r + 1) * n].contiguous(),
                sin[r * n : (r + 1) * n].contiguous(),
            )
        return self._local_rope[key]

    def _attention_name(self) -> str:
        """Register (once per inner backend) and return the Ulysses wrapper of the active
        backend."""
        inner = attn_ops.attention_backend()
        if inner in self._wrapped.values():  # already ours (nested call)
            return inner
        if inner not in self._wrapped:
            fn = _backend_fn(inner)
            layout = self._layout

            def wrapped(q, k, v, _fn=fn):
                n = layout.local_len
                if q.shape[1] == n and k.shape[1] == n:
                    return ulysses_attention(q, k, v, layout, _fn)
                return _fn(q, k, v)  # cross-attention: all keys are local already

            name = f"ulysses{self.config.ulysses}@{id(self):x}[{inner}]"
            attn_ops.register_attention_backend(name, wrapped)
            self._wrapped[inner] = name
        return self._wrapped[inner]

    # -- per step --------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        if self._cross_kv is None:
            raise RuntimeError("call begin(context, clip_tokens) before stepping")
        if x.shape[0] != self._batch:
            raise ValueError(f"latents batch {x.shape[0]} != context batch {self._batch}")
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        x, t, y = self._branch(x), self._branch(t), self._branch(y)
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        tokens, grid = self.dit.patchify(x)  # [b, L, D]; the conv is cheap next to a block
        full = tokens.shape[1]
        p = self.config.ulysses
        t_emb, e = self.dit.embed_time(t)
        if p > 1:
            n = self._local_len(full)
            cos, sin = self._split_rope(grid, x.device, n)
            r = self.groups.ulysses_rank
            tokens = F.pad(tokens, (0, 0, 0, p * n - full))[:, r * n : (r + 1) * n].contiguous()
            self._layout.full_len, self._layout.local_len = full, n
            prev = attn_ops.attention_backend()
            attn_ops.set_attention_backend(self._attention_name())
            try:
                tokens = self.run_blocks(tokens, t_emb, e, cos, sin)
            finally:
                attn_ops.set_attention_backend(prev)
        else:
            n = full
            cos, sin = self.rope(grid, x.device)
            tokens = self.run_blocks(tokens, t_emb, e, cos, sin)
        out = self.dit.head(tokens, t_emb)  # per token: [b, n, pf·ph·pw·C] fp32
        out = self._gather(out, full)  # [B, L, ·]
        return self.dit.unpatchify(out, grid)

    def _gather(self, out: torch.Tensor, full: int) -> torch.Tensor:
        """Local head outputs of every rank → the whole batch [B, L, C] on every rank."""
        g = self.groups
        if g.group is None:
            return out[:, :full]
        parts = [torch.empty_like(out) for _ in g.ranks]
        dist.all_gather(parts, out.contiguous(), group=g.group)
        p = self.config.ulysses
        branches = [
            torch.cat(parts[c * p : (c + 1) * p], dim=1)[:, :full] for c in range(self.config.cfg)
        ]
        if self.config.cfg == 2 and self._batch == 2:
            return torch.cat(branches, dim=0)
        return branches[0]


def make_runner(dit: WanDiT, groups: ParallelGroups | None) -> DiTRunner:
    """ParallelRunner for a parallel instance of more than one rank, else a DiTRunner."""
    if groups is None or groups.config.world == 1:
        return DiTRunner(dit)
    return ParallelRunner(dit, groups)


def broadcast_(tensor: torch.Tensor, groups: ParallelGroups | None) -> torch.Tensor:
    """Make `tensor` equal on every rank of the instance (rank 0's value), in place."""
    if groups is not None and groups.group is not None:
        dist.broadcast(tensor, src=groups.ranks[0], group=groups.group)
    return tensor


__all__ = [
    "NVLS_OFF_ENV",
    "ParallelConfig",
    "ParallelGroups",
    "ParallelRunner",
    "broadcast_",
    "check_ulysses_degree",
    "disable_nvls",
    "exit_now",
    "exit_rank",
    "in_torchrun",
    "init_distributed",
    "is_rank0",
    "leave_process_group",
    "make_groups",
    "make_runner",
    "ulysses_attention",
    "valid_ulysses_degrees",
]


# ---------------------------------------------------------------------------------------
# VAE decode split across ranks: horizontal bands with overlap, blended

SPATIAL = 8  # pixels per latent row/column


def band_plan(height: int, parts: int, halo: int) -> list[tuple[int, int, int, int]]:
    """Split `height` latent rows into `parts` bands: (core_start, core_end, win_start,
    win_end); each band is decoded over its window (core ± halo rows, clipped)."""
    parts = max(1, min(parts, height))
    edges = [round(i * height / parts) for i in range(parts + 1)]
    return [
        (a, b, max(0, a - halo), min(height, b + halo))
        for a, b in zip(edges, edges[1:], strict=False)
    ]


def _band_weights(plan, i: int, height_px: int, blend_px: int, device) -> tuple[int, torch.Tensor]:
    """Rows of band i's window in pixels and its blend weight per row: 1 in the core,
    linear ramps of `blend_px` centred on each inner boundary, so adjacent weights sum to 1."""
    core_a, core_b, win_a, win_b = (v * SPATIAL for v in plan[i])
    rows = torch.arange(win_a, win_b, device=device, dtype=torch.float32) + 0.5
    w = torch.ones_like(rows)
    half = blend_px / 2
    if i > 0:  # ramp up across the upper boundary
        w = torch.minimum(w, ((rows - (core_a - half)) / blend_px).clamp(0, 1))
    if i < len(plan) - 1:  # ramp down across the lower boundary
        w = torch.minimum(w, (((core_b + half) - rows) / blend_px).clamp(0, 1))
    return win_a, w


class _CropRows(torch.nn.Module):
    """Runs `inner` and keeps rows [a, b) of its output (dim -2)."""

    def __init__(self, inner: torch.nn.Module, a: int, b: int):
        super().__init__()
        self.inner, self.a, self.b = inner, a, b

    def forward(self, x, *args, **kwargs):
        return self.inner(x, *args, **kwargs)[..., self.a : self.b, :]


@contextlib.contextmanager
def _band_after_middle(vae, a: int, b: int):
    """Within: the VAE decoder runs its input conv and middle block (which attends over the
    whole frame) on the whole latent frame, then keeps latent rows [a, b) for the rest
    (upsampling stages and head: convolutions and per-pixel norms only, so a band with
    enough halo rows decodes exactly as the whole frame would). Yields False, changing
    nothing, for a decoder without that structure (then bands see only their window)."""
    dec = getattr(getattr(vae, "model", None), "decoder", None)
    mid = getattr(dec, "mid_block", None)
    if not isinstance(mid, torch.nn.Module) or not hasattr(dec, "up_blocks"):
        yield False
        return
    dec.mid_block = _CropRows(mid, a, b)
    try:
        yield True
    finally:
        dec.mid_block = mid


def banded_vae_decode(
    vae,
    latents: torch.Tensor,
    parts: int,
    halo: int = 8,
    blend_px: int = 32,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Decode latents [B, z, T, h, w] as `parts` overlapping horizontal bands, blended.

    With a process group of `parts` ranks each rank decodes one band (its group rank's)
    and the bands are all-gathered, so every rank returns the whole video; without one,
    this process decodes every band (the single-GPU definition of the same result).
    Every band runs the decoder's input conv and middle block (its one attention, over the
    whole frame) on the whole latent frame (cheap: latent resolution), then the upsampling
    stages on its window: core ± `halo` latent rows. Those stages are convolutions whose
    receptive field is about 12.6 latent rows (Wan2.1: 6 3×3 convs at 1×, 2×, 4×, 8× each
    plus the upsamplers' and head's), so with halo ≥ 13 each core row equals the undivided
    decode up to floating-point reordering; the overlap is blended over `blend_px` rows.
    """
    if blend_px > 2 * halo * SPATIAL:
        raise ValueError(f"blend {blend_px} px needs a halo of ≥ {blend_px / 16} latent rows")
    h = latents.shape[-2]
    plan = band_plan(h, parts, halo)
    if len(plan) == 1:
        return vae.decode(latents)
    me = None if group is None else dist.get_rank(group)
    if group is not None and dist.get_world_size(group) != len(plan):
        raise ValueError(f"{len(plan)} bands but a group of {dist.get_world_size(group)}")
    decoded: dict[int, torch.Tensor] = {}
    for i, (_, _, wa, wb) in enumerate(plan):
        if me is None or me == i:
            with _band_after_middle(vae, wa, wb) as split:
                # [B, 3, F, rows·8, W] fp32
                decoded[i] = vae.decode(latents if split else latents[..., wa:wb, :])
    if group is not None:
        mine = decoded[me]
        tallest = max(wb - wa for _, _, wa, wb in plan) * SPATIAL
        send = F.pad(mine, (0, 0, 0, tallest - mine.shape[-2])).contiguous()
        parts_ = [torch.empty_like(send) for _ in plan]
        dist.all_gather(parts_, send, group=group)
        decoded = {
            i: parts_[i][..., : (wb - wa) * SPATIAL, :] for i, (_, _, wa, wb) in enumerate(plan)
        }
    first = decoded[0]
    out = first.new_zeros(*first.shape[:-2], h * SPATIAL, first.shape[-1])
    for i in range(len(plan)):
        start, w = _band_weights(plan, i, h * SPATIAL, blend_px, first.device)
        out[..., start : start + w.numel(), :] += decoded[i] * w[:, None]
    return out


def parallel_vae_decode(
    vae, latents: torch.Tensor, groups: ParallelGroups | None, halo: int = 8, blend_px: int = 32
) -> torch.Tensor:
    """The whole video on every rank of the instance, each rank decoding one band."""
    if groups is None or groups.group is None:
        return vae.decode(latents)
    n = len(groups.ranks)
    if len(band_plan(latents.shape[-2], n, halo)) != n:  # fewer latent rows than ranks
        return vae.decode(latents)
    return banded_vae_decode(vae, latents, n, halo, blend_px, groups.group)
