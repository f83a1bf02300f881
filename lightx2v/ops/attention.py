"""Attention: one entry point, backends chosen once.

`attention(q, k, v)` takes and returns [B, L, H, D] (the layout the projections produce, so
no transposes leak into the model). Non-causal, no mask: Wan attends over whole sequences.

Backends: "sdpa" (torch.nn.functional.scaled_dot_product_attention; cuDNN/flash on
Hopper, math on CPU) is always present. Faster ones are registered by name and picked
with `set_attention_backend`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lightx2v.errors import LX2VError

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√D)·v in fp32, [B, Lq, H, D] × [B, Lk, H, D] → [B, Lq, H, D].

    The definition every backend is tested against.
    """
    scale = q.shape[-1] ** -0.5
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.float()).to(q.dtype)


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


_BACKENDS: dict[str, AttentionFn] = {"sdpa": attention_sdpa, "ref": attention_ref}
_active: list[str] = ["sdpa"]


def register_attention_backend(name: str, fn: AttentionFn) -> None:
    _BACKENDS[name] = fn


def available_attention_backends() -> list[str]:
    return sorted(_BACKENDS)


def set_attention_backend(name: str) -> None:
    if name not in _BACKENDS:
        raise LX2VError(
            f"attention backend {name!r} is not available here "
            f"(available: {', '.join(available_attention_backends())})"
        )
    _active[0] = name


def attention_backend() -> str:
    return _active[0]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention over [B, L, H, D] tensors with the active backend."""
    return _BACKENDS[_active[0]](q, k, v)
