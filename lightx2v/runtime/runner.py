"""The block loop of one generation.

A `DiTRunner` drives a built WanDiT through the steps of a generation. It caches what
does not change between steps (the text/image keys and values of every block's
cross-attention, the RoPE tables), compiles the block regionally, and is the one place
where step-level features hook in by replacing `run_blocks` (TeaCache, offload) or the
token layout (sequence parallel). The model itself stays a plain module.

    compile_blocks(dit)                       # optional, once per model
    runner = DiTRunner(dit)
    runner.begin(context, clip_tokens)        # once per generation
    v = runner(x, t, y)                       # every step
"""

from __future__ import annotations

import logging
import os
import time

import torch

from lightx2v.models.wan.dit import CrossKV, WanDiT

log = logging.getLogger("lightx2v")


def enable_compile_cache() -> None:
    """Keep inductor's compiled kernels across runs in our cache folder (default is /tmp)."""
    from lightx2v.models.wan.tiny import cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def compile_blocks(dit: WanDiT) -> None:
    """Regional compile: every block shares one graph (its parameters are graph inputs)."""
    if getattr(dit, "blocks_compiled", False):
        return
    enable_compile_cache()
    for block in dit.blocks.children():  # children(): no weight streaming when offloaded
        block.compile(fullgraph=True, dynamic=False)
    dit.blocks_compiled = True


class DiTRunner:
    def __init__(self, dit: WanDiT):
        self.dit = dit
        self.compile_seconds: float | None = None
        self._cross_kv: list[CrossKV] | None = None
        self._rope: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def compiled(self) -> bool:
        return getattr(self.dit, "blocks_compiled", False)

    @torch.no_grad()
    def begin(self, context: torch.Tensor, clip_tokens: torch.Tensor | None = None) -> None:
        """Per generation: embed the prompt/image and compute every block's cross k, v."""
        ctx, ctx_img = self.dit.embed_context(context, clip_tokens)
        self._cross_kv = [block.cross_attn.kv(ctx, ctx_img) for block in self.dit.blocks]

    def end(self) -> None:
        self._cross_kv = None

    def rope(self, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        if grid not in self._rope:
            self._rope[grid] = self.dit.rope(grid, device)
        return self._rope[grid]

    def run_blocks(
        self, tokens: torch.Tensor, t_emb: torch.Tensor, e: torch.Tensor, cos, sin
    ) -> torch.Tensor:
        """tokens [B, L, D] fp32 → the same after every block.

        The hook for step-level features: a subclass may skip the stack (TeaCache: t_emb
        [B, D] and e [B, 6, D] are its indicators) or move weights around it (offload).
        """
        for block, kv in zip(self.dit.blocks, self._cross_kv, strict=True):
            tokens = block(tokens, e, cos, sin, kv)
        return tokens

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        """Flow prediction [B, 16, F, H, W] fp32 for latents x at timesteps t."""
        if self._cross_kv is None:
            raise RuntimeError("call begin(context, clip_tokens) before stepping")
        batch = self._cross_kv[0][0].shape[0]
        if x.shape[0] != batch:
            raise ValueError(f"latents batch {x.shape[0]} != context batch {batch}")
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        tokens, grid = self.dit.patchify(x)
        cos, sin = self.rope(grid, x.device)
        t_emb, e = self.dit.embed_time(t)
        first = self.compiled and self.compile_seconds is None
        t0 = time.perf_counter()
        tokens = self.run_blocks(tokens, t_emb, e, cos, sin)
        if first:
            self.compile_seconds = time.perf_counter() - t0
            log.info(
                "first compiled step took %.1f s (compilation is cached)", self.compile_seconds
            )
        return self.dit.unpatchify(self.dit.head(tokens, t_emb), grid)
