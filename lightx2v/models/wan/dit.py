"""The Wan2.1 diffusion transformer, top to bottom.

Parameter names equal the official Wan2.1 checkpoint's, so an official state dict loads
as it is; formats.py maps the diffusers names onto these.

Precision (as the official code does it): the residual stream, norms, modulation, time
embedding and head run in fp32; the matrix products and attention run in the weights'
dtype (bf16 on GPU). `WanDiT.cast(dtype)` applies that policy to the parameters.

Transformations (quantized linears, fused projections, offload, compile) are applied to a
built model by replacing modules; nothing here knows about them. The attention modules
expose `project_qkv` / `project_kv` so a fused-projection subclass can replace them.

Shapes: B batch, C channels, F/H/W latent frames/height/width, L = F·H·W/4 tokens,
D model width, N heads, Dh head dim (128), T text tokens (512), I image tokens (257).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lightx2v.config import WanArch
from lightx2v.ops.attention import attention
from lightx2v.ops.dispatch import requested_backend
from lightx2v.ops.norm import adaln, adaln_fp8, affine_layer_norm, affine_layer_norm_fp8
from lightx2v.ops.residual import residual_add_
from lightx2v.ops.rope import qk_norm_rope

# text k, v (+ image k, v for I2V), each [B, T|I, N, Dh]
CrossKV = tuple[torch.Tensor, ...]
# a normed activation quantized per token for an FP8 linear: q float8_e4m3fn [B, L, D] and
# s fp32 [B, L, 1], h ≈ q · s (lightx2v/ops/norm.py)
FP8Tokens = tuple[torch.Tensor, torch.Tensor]

# ---------------------------------------------------------------------------------------
# position and time encodings


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [B] → [B, dim] as [cos | sin], computed in float64 like the original."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def rope_angles(arch: WanArch, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """Rotation angles [L, Dh/2] for a (F, H, W) token grid.

    Each head's Dh/2 complex pairs are split over frames/height/width (22/21/21 at Dh=128);
    pair j of an axis with n pairs turns by pos · 10000^(-j/n).
    """
    f, h, w = grid
    angles = []
    for size, n in zip(grid, arch.rope_dims, strict=True):
        inv = torch.pow(10000.0, -torch.arange(n, dtype=torch.float64, device=device) / n)
        angles.append(torch.arange(size, dtype=torch.float64, device=device)[:, None] * inv)
    af, ah, aw = angles
    full = torch.cat(
        [
            af[:, None, None, :].expand(f, h, w, -1),
            ah[None, :, None, :].expand(f, h, w, -1),
            aw[None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    )
    return full.reshape(f * h * w, -1)


# ---------------------------------------------------------------------------------------
# layers


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a weight, statistics in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused kernel accumulates the mean square in fp32 for bf16 inputs
        return F.rms_norm(x, x.shape[-1:], self.weight.to(x.dtype), self.eps)


def layer_norm(x: torch.Tensor, eps: float, norm: nn.LayerNorm | None = None) -> torch.Tensor:
    """LayerNorm in fp32; affine when `norm` (whose weight/bias are used) is given."""
    if norm is None:
        return F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return F.layer_norm(x.float(), x.shape[-1:], norm.weight.float(), norm.bias.float(), eps)


class _Attention(nn.Module):
    """The parameters both attentions share, named as in the official checkpoint: q, k, v, o
    and the RMSNorms of q and k (over the full hidden dim)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)


class SelfAttention(_Attention):
    def project_qkv(
        self, x: torch.Tensor | FP8Tokens
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q(x), self.k(x), self.v(x)

    def attend(
        self, x: torch.Tensor | FP8Tokens, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """The attention output before the projection `o`: [B, L, D]. x is the normed input,
        or its FP8 pair where the projection takes one (WanBlock decides)."""
        q, k, v = self.project_qkv(x)  # [B, L, D] each (slices of one fused output are fine)
        eps = self.norm_q.eps
        q, k = qk_norm_rope(
            q, k, self.norm_q.weight, self.norm_k.weight, cos, sin, self.num_heads, eps
        )
        out = attention(q, k, v.unflatten(-1, (self.num_heads, -1)))  # [B, L, N, Dh]
        return out.flatten(2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.o(self.attend(x, cos, sin))


class CrossAttention(_Attention):
    """Attention from video tokens to text tokens, plus (I2V) a separate image-token branch."""

    def __init__(self, dim: int, num_heads: int, eps: float, with_image: bool):
        super().__init__(dim, num_heads, eps)
        if with_image:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k(context), self.v(context)

    def project_kv_img(self, context_img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_img(context_img), self.v_img(context_img)

    def kv(self, context: torch.Tensor, context_img: torch.Tensor | None) -> CrossKV:
        """Keys and values of the text (+ image) tokens, [B, T|I, N, Dh] each.

        They depend only on the prompt and image, so a runtime computes them once per
        generation and reuses them at every step.
        """
        heads = (self.num_heads, -1)
        k, v = self.project_kv(context)  # [B, T, D]
        kv = (self.norm_k(k).unflatten(-1, heads), v.unflatten(-1, heads))
        if context_img is not None:
            k_img, v_img = self.project_kv_img(context_img)  # [B, I, D]
            kv += (self.norm_k_img(k_img).unflatten(-1, heads), v_img.unflatten(-1, heads))
        return kv

    def attend(self, x: torch.Tensor | FP8Tokens, kv: CrossKV) -> torch.Tensor:
        """The attention output before the projection `o`: [B, L, D] (x as SelfAttention's)."""
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))  # [B, L, N, Dh]
        out = attention(q, kv[0], kv[1])
        if len(kv) == 4:  # I2V: image tokens attended separately, outputs summed
            out = out + attention(q, kv[2], kv[3])
        return out.flatten(2)

    def forward(self, x: torch.Tensor, kv: CrossKV) -> torch.Tensor:
        return self.o(self.attend(x, kv))


class FeedForward(nn.Sequential):
    """Linear → GELU(tanh) → Linear; indices 0 and 2 match the official parameter names."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__(
            nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim)
        )


class WanBlock(nn.Module):
    """x += gate·SelfAttn(mod(LN(x))); x += CrossAttn(LN'(x)); x += gate·FFN(mod(LN(x))).

    Each norm writes its output in the compute dtype, or, where the linear that reads it
    takes per-token FP8 input (FP8Linear: self_attn.qkv, cross_attn.q, ffn.0 after
    quantize_dit), as that FP8 pair directly (adaln_fp8, affine_layer_norm_fp8): one pass
    instead of a norm then the linear's own quantization, and no bf16 rounding before the
    quantization. Under torch.compile, and with the kernel backend "ref" (LX2V_KERNELS=ref,
    set_kernel_backend("ref"): the "before" of an A/B comparison, as for the FP8 GEMM
    epilogues), the block keeps the unfused chain (see fp8_input).
    """

    def __init__(self, arch: WanArch):
        super().__init__()
        d = arch.dim
        self.eps = arch.eps
        self.self_attn = SelfAttention(d, arch.num_heads, arch.eps)
        self.norm3 = nn.LayerNorm(d, eps=arch.eps)  # affine, before cross-attention
        self.cross_attn = CrossAttention(d, arch.num_heads, arch.eps, arch.is_i2v)
        self.ffn = FeedForward(d, arch.ffn_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 6, d))

    def forward(
        self,
        x: torch.Tensor,  # [B, L, D] fp32 residual stream
        e: torch.Tensor,  # [B, 6, D] fp32 projected time embedding
        cos: torch.Tensor,  # [L, 1, Dh/2]
        sin: torch.Tensor,
        cross_kv: CrossKV,  # from self.cross_attn.kv(context, context_img)
    ) -> torch.Tensor:
        dt = cross_kv[1].dtype  # the compute dtype
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e).unbind(1)
        # x is updated in place (fused gated residual): callers that keep a block's input
        # must copy it first
        up, act, down = self.ffn
        # FP8 linears come with quantize_dit, which fuses q, k, v into one `qkv` (None: the
        # plain SelfAttention, high precision)
        qkv = getattr(self.self_attn, "qkv", None)
        h = self._adaln(x, shift1, scale1, qkv, dt)
        x = linear_residual_(x, self.self_attn.o, self.self_attn.attend(h, cos, sin), gate1)
        w3, b3 = self.norm3.weight, self.norm3.bias
        if fp8_input(self.cross_attn.q):
            h = affine_layer_norm_fp8(x, w3, b3, self.eps)
        else:
            h = affine_layer_norm(x, w3, b3, self.eps, dt)
        x = linear_residual_(x, self.cross_attn.o, self.cross_attn.attend(h, cross_kv))
        h = self._adaln(x, shift2, scale2, up, dt)
        h = up.forward_gelu(h) if hasattr(up, "forward_gelu") else act(up(h))
        return linear_residual_(x, down, h, gate2)

    def _adaln(self, x, shift, scale, linear: nn.Module | None, dt) -> torch.Tensor | FP8Tokens:
        """adaLN of x for `linear`: its FP8 pair where it takes one, else in dt."""
        if fp8_input(linear):
            return adaln_fp8(x, shift, scale, self.eps)
        return adaln(x, shift, scale, self.eps, dt)


def fp8_input(linear: nn.Module | None) -> bool:
    """Whether the norm before `linear` hands it a per-token FP8 pair (see WanBlock).

    Eager only. Inside a compiled graph the norm writes the compute dtype and inductor
    fuses it with the linear's quantization into one kernel by itself, which measured
    faster than its fusion of the fp32 pair definition (one 14B I2V FP8 block, H200,
    2026-11-28: 58.49 vs 58.95 ms compiled). In eager, where the csrc kernel writes the
    pair, the pairs win: 66.49 vs 67.02 ms (tools/bench_block.py).
    """
    if (torch.compiler.is_compiling() and not FP8_PAIRS_UNDER_COMPILE) or (
        requested_backend() == "ref"
    ):
        return False
    return getattr(linear, "takes_fp8_input", False)


# True: compiled graphs use the FP8 pairs too (tools/profile_block.py and bench_block.py
# measure that alternative with it)
FP8_PAIRS_UNDER_COMPILE = False


def linear_residual_(
    x: torch.Tensor, linear: nn.Module, h: torch.Tensor, gate: torch.Tensor | None = None
) -> torch.Tensor:
    """x += gate · linear(h) in place. Quantized linears (FP8Linear) fold the residual into
    their GEMM's epilogue where they can (lightx2v/ops/gemm.py)."""
    if hasattr(linear, "forward_residual_"):
        return linear.forward_residual_(x, h, gate)
    return residual_add_(x, linear(h), gate)


class Head(nn.Module):
    def __init__(self, arch: WanArch):
        super().__init__()
        self.eps = arch.eps
        self.head = nn.Linear(arch.dim, math.prod(arch.patch_size) * arch.out_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 2, arch.dim))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + t_emb[:, None].float()).unbind(1)
        h = adaln(x, shift, scale, self.eps, torch.float32)
        return F.linear(h, self.head.weight.float(), self.head.bias.float())


class ImageEmbedding(nn.Module):
    """CLIP tokens → model width: LN, Linear, GELU, Linear, LN (official: img_emb.proj.*)."""

    def __init__(self, image_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(image_dim),
            nn.Linear(image_dim, image_dim),
            nn.GELU(),
            nn.Linear(image_dim, dim),
            nn.LayerNorm(dim),
        )

    def forward(self, clip_tokens: torch.Tensor) -> torch.Tensor:
        ln0, fc1, _, fc2, ln4 = self.proj
        h = layer_norm(clip_tokens, ln0.eps, ln0).to(fc1.weight.dtype)
        h = fc2(F.gelu(fc1(h)))
        return layer_norm(h, ln4.eps, ln4).to(fc2.weight.dtype)


# ---------------------------------------------------------------------------------------
# the model


class WanDiT(nn.Module):
    """forward(x, t, context, clip_tokens?, y?) → flow prediction [B, out_dim, F, H, W] fp32."""

    def __init__(self, arch: WanArch):
        super().__init__()
        self.arch = arch
        d = arch.dim
        self.patch_embedding = nn.Conv3d(
            arch.in_dim, d, kernel_size=arch.patch_size, stride=arch.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(arch.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d)
        )
        self.time_embedding = nn.Sequential(nn.Linear(arch.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(arch) for _ in range(arch.num_layers))
        self.head = Head(arch)
        if arch.is_i2v:
            self.img_emb = ImageEmbedding(arch.image_dim, d)

    # -- precision policy --------------------------------------------------------------

    def cast(self, dtype: torch.dtype) -> WanDiT:
        """Matrix-product weights to `dtype`; norms, modulation, time embedding, head to fp32."""
        self.to(dtype)
        keep_fp32 = [self.time_embedding, self.time_projection, self.head]
        for m in self.modules():
            if isinstance(m, (nn.LayerNorm, RMSNorm)):
                keep_fp32.append(m)
        for m in keep_fp32:
            m.float()
        for block in self.blocks:
            block.modulation.data = block.modulation.data.float()
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    # -- pieces, usable on their own by runtimes ---------------------------------------

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] → (t_emb [B, D], e [B, 6, D]), both fp32."""
        sin = timestep_embedding(t, self.arch.freq_dim)
        fc1, _, fc2 = self.time_embedding
        t_emb = F.linear(F.silu(F.linear(sin, fc1.weight.float(), fc1.bias.float())),
                         fc2.weight.float(), fc2.bias.float())  # fmt: skip
        proj = self.time_projection[1]
        e = F.linear(F.silu(t_emb), proj.weight.float(), proj.bias.float())
        return t_emb, e.unflatten(1, (6, self.arch.dim))

    def embed_context(
        self, context: torch.Tensor, clip_tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text [B, T, text_dim] and CLIP tokens [B, I, image_dim] → model width."""
        dt = self.compute_dtype
        ctx = self.text_embedding(context.to(dt))
        ctx_img = None
        if self.arch.is_i2v:
            if clip_tokens is None:
                raise ValueError("an I2V model needs clip_tokens")
            ctx_img = self.img_emb(clip_tokens.to(dt))
        return ctx, ctx_img

    def rope(self, grid: tuple[int, int, int], device: torch.device):
        ang = rope_angles(self.arch, grid, device)[:, None, :]  # [L, 1, Dh/2]
        return ang.cos().float(), ang.sin().float()

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[B, C, F, H, W] → tokens [B, L, D] fp32 and the token grid."""
        x = self.patch_embedding(x.to(self.compute_dtype))  # [B, D, F, H/2, W/2]
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2).float(), grid

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, pf·ph·pw·C] → [B, C, F·pf, H·ph, W·pw]."""
        pf, ph, pw = self.arch.patch_size
        f, h, w = grid
        x = x.view(x.shape[0], f, h, w, pf, ph, pw, self.arch.out_dim)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(x.shape[0], self.arch.out_dim, f * pf, h * ph, w * pw)

    def forward(
        self,
        x: torch.Tensor,  # [B, C_lat, F, H, W] noisy latents
        t: torch.Tensor,  # [B] timesteps in [0, 1000]
        context: torch.Tensor,  # [B, T, text_dim] text encoder output, zero-padded
        clip_tokens: torch.Tensor | None = None,  # [B, I, image_dim] (I2V)
        y: torch.Tensor | None = None,  # [B, 20, F, H, W] mask + image latents (I2V)
    ) -> torch.Tensor:
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.shape[1] != self.arch.in_dim:
            raise ValueError(f"expected {self.arch.in_dim} input channels, got {x.shape[1]}")
        tokens, grid = self.patchify(x)
        cos, sin = self.rope(grid, x.device)
        t_emb, e = self.embed_time(t.expand(x.shape[0]) if t.dim() == 0 else t)
        ctx, ctx_img = self.embed_context(context, clip_tokens)
        for block in self.blocks:
            tokens = block(tokens, e, cos, sin, block.cross_attn.kv(ctx, ctx_img))
        return self.unpatchify(self.head(tokens, t_emb), grid)
