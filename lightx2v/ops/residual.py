"""Gated residual into the fp32 residual stream, in place.

    residual_add_(x, y, gate)  :  x += y · gate   (x fp32 [B, L, D], y [B, L, D], gate [B, D])
    residual_add_(x, y)        :  x += y          (no gate: the cross-attention residual)

The op `lx2v::gated_residual_` declares that it writes x (schema `Tensor(a!) x`), so
torch.compile orders it correctly and functionalizes it. The ungated form is a single
aten add_, already one pass; it needs no kernel.

Mutating x also mutates the caller's tensor: a runtime that keeps a block's input (e.g. a
cache of the residual) must clone it first.
"""

import torch

from lightx2v.ops.dispatch import cuda_impl, kernel_module, use_kernels


def gated_residual_ref_(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> None:
    """x += y · gate with y and gate in fp32: [B, L, D] += [B, L, D] · [B, 1, D]."""
    x.add_(y.float() * gate.float()[:, None])


@torch.library.custom_op("lx2v::gated_residual_", mutates_args=("x",))
def _gated_residual_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> None:
    gated_residual_ref_(x, y, gate)


@_gated_residual_op.register_fake
def _(x, y, gate):
    return None


@_gated_residual_op.register_kernel("cuda")
def _(x, y, gate):
    if x.numel() == 0:
        return
    if cuda_impl("gated_residual_", x) == "ref":  # no Triton: no csrc kernel either
        gated_residual_ref_(x, y, gate)
        return
    y = y if y.stride(-1) == 1 else y.contiguous()
    gate = gate if gate.stride(-1) == 1 else gate.contiguous()
    kr = kernel_module("residual")
    if x.stride(-1) == 1:
        kr.gated_residual_(x, y, gate)
    else:
        xc = x.contiguous()
        kr.gated_residual_(xc, y, gate)
        x.copy_(xc)


def residual_add_(
    x: torch.Tensor,  # [B, L, D] fp32, updated in place
    y: torch.Tensor,  # [B, L, D]
    gate: torch.Tensor | None = None,  # [B, D], [B, 1, D] or [1, D]
) -> torch.Tensor:
    """x += y · gate (or x += y), fp32; returns x."""
    if x.dim() != 3 or y.shape != x.shape or x.dtype != torch.float32:
        raise ValueError(f"residual_add_: x {tuple(x.shape)} {x.dtype}, y {tuple(y.shape)}")
    if gate is None:
        return x.add_(y)
    B, _, D = x.shape
    if gate.dim() == 3 and gate.shape[1] == 1:
        gate = gate.squeeze(1)
    if gate.dim() != 2 or gate.shape[-1] != D or gate.shape[0] not in (1, B):
        raise ValueError(f"residual_add_: gate {tuple(gate.shape)} does not fit x {tuple(x.shape)}")
    gate = gate.expand(B, D)
    if use_kernels(x, "gated_residual_"):
        torch.ops.lx2v.gated_residual_(x, y, gate)
    else:
        gated_residual_ref_(x, y, gate)
    return x
