"""LoRA merging into a Wan2.1 DiT: W += strength · (alpha / rank) · B · A, in fp32.

    specs = [LoraSpec.parse("distill.safetensors:1.0"), LoraSpec.parse("style.safetensors:0.7")]
    merge_loras(dit, specs)                    # a built WanDiT: plain, fused or FP8/INT8
    merge_loras_into_state(state, specs)       # an official-named state dict (before convert)

Files: safetensors only (no pickle). Key styles recognised (one style per file):

- official names, the style of LightX2V's and Kijai's Wan LoRAs:
  `diffusion_model.blocks.0.self_attn.q.lora_down.weight` / `.lora_up.weight` / `.alpha`;
- diffusers / PEFT names: `transformer.blocks.0.attn1.to_q.lora_A.weight` / `.lora_B.weight`,
  mapped through formats.diffusers_to_official;
- kohya / musubi-tuner names: `lora_unet_blocks_0_self_attn_q.lora_down.weight`, matched
  against the official names with '.' written as '_';
- full differences (LightX2V, Kijai): `X.diff` (X's weight, or X itself for a bare parameter
  such as `blocks.0.modulation`), `X.diff_b` (X's bias), `X.diff_m` (X's modulation).

Prefixes `diffusion_model.`, `model.diffusion_model.`, `transformer.`, `base_model.model.`
and `model.` are stripped. A missing `.alpha` means alpha = rank (scale 1, PEFT's default).
Strength scales every term, differences included. Several LoRAs add up: all terms of one
target are summed in fp32 and applied once, then cast back to the weight's dtype.

Quantized models: a target inside a QuantLinear (lightx2v.quant.linear, FP8 or INT8, fused
q|k|v and k|v rows included) is dequantized, merged and requantized in place, only the
rows it owns (per-output-channel scales make that equal to requantizing the whole matrix).
Merging before quantizing is more accurate (one rounding instead of two): merge into the
bf16 model, then quantize; `merge_loras` on an FP8 checkpoint is for prebuilt FP8 weights.

Anything a file holds that does not map onto the model is an LX2VError listing the keys.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lightx2v.errors import LX2VError
from lightx2v.fileio import first_line, short_list
from lightx2v.models.wan.formats import diffusers_to_official

log = logging.getLogger("lightx2v")

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.",
            "model.")  # fmt: skip
KOHYA_PREFIX = "lora_unet_"

# key suffix → (role, which tensor of the target it changes)
_SUFFIXES = {
    ".lora_down.weight": ("down", "weight"),
    ".lora_up.weight": ("up", "weight"),
    ".lora_A.weight": ("down", "weight"),
    ".lora_B.weight": ("up", "weight"),
    ".lora_A.default.weight": ("down", "weight"),  # PEFT with the adapter name kept
    ".lora_B.default.weight": ("up", "weight"),
    ".alpha": ("alpha", "weight"),
    ".diff": ("diff", "weight"),
    ".diff_b": ("diff", "bias"),
    ".diff_m": ("diff", "modulation"),
}


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora PATH[:STRENGTH]`."""

    path: Path
    strength: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """'PATH' or 'PATH:STRENGTH'; a tail after the last ':' that is not a number is part
        of the path (so 'C:/x.safetensors' still reads as a path)."""
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                strength = float(tail)
            except ValueError:
                return cls(Path(text))
            if strength != strength or abs(strength) == float("inf"):
                raise LX2VError(f"--lora {text}: strength must be a finite number")
            return cls(Path(head), strength)
        return cls(Path(text))


@dataclass
class LowRank:
    down: torch.Tensor  # A [r, in, ...]
    up: torch.Tensor  # B [out, r, ...]
    scale: float  # strength · alpha / rank

    def delta(self, shape: torch.Size, device) -> torch.Tensor:
        b = self.up.to(device, torch.float32).flatten(1)
        a = self.down.to(device, torch.float32).flatten(1)
        return (b @ a).mul_(self.scale).reshape(shape)


@dataclass
class Diff:
    value: torch.Tensor
    scale: float  # strength

    def delta(self, shape: torch.Size, device) -> torch.Tensor:
        return self.value.to(device, torch.float32).reshape(shape) * self.scale


Term = LowRank | Diff


# ---------------------------------------------------------------------------------------
# reading a file


def read_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a LoRA safetensors file (CPU)."""
    path = Path(path)
    if not path.is_file():
        raise LX2VError(f"--lora {path}: file not found")
    if path.suffix != ".safetensors":
        raise LX2VError(f"--lora {path}: only .safetensors LoRA files are read (no pickle)")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise LX2VError(
            f"--lora {path}: not a readable safetensors file: {first_line(err)}"
        ) from err
    if not tensors:
        raise LX2VError(f"--lora {path}: the file holds no tensors")
    return tensors


def _strip_prefix(key: str) -> str:
    for p in PREFIXES:
        if key.startswith(p):
            return key[len(p) :]
    return key


def _split_suffix(key: str) -> tuple[str, str, str] | None:
    """key → (module path, role, target tensor) or None if no known suffix."""
    for suffix, (role, which) in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role, which
    return None


def _target_name(module: str, which: str, params: dict[str, torch.Size]) -> str:
    """The official parameter a (module, which) pair changes; `which` is weight/bias/modulation."""
    name = f"{module}.{which}"
    if which == "weight" and name not in params and module in params:
        return module  # a bare parameter such as blocks.0.modulation (diff only)
    return name


def _resolve_modules(modules: Iterable[str], style: str, params: dict[str, torch.Size]):
    """Map LoRA module paths to official module paths; returns (mapping, unresolved)."""
    official_modules = {n.rsplit(".", 1)[0] for n in params} | set(params)
    kohya = {m.replace(".", "_"): m for m in official_modules}
    out, bad = {}, []
    for m in modules:
        if style == "official":
            new = m if m in official_modules else None
        elif style == "kohya":
            new = kohya.get(m[len(KOHYA_PREFIX) :]) if m.startswith(KOHYA_PREFIX) else None
        else:  # diffusers names: map through the parameter key map
            new = diffusers_to_official(m + ".weight")
            new = new[: -len(".weight")] if new is not None else diffusers_to_official(m)
            if new is not None and new not in official_modules:
                new = None
        if new is None:
            bad.append(m)
        else:
            out[m] = new
    return out, bad


def lora_terms(
    tensors: dict[str, torch.Tensor],
    params: dict[str, torch.Size],
    strength: float = 1.0,
    source: str = "LoRA",
) -> dict[str, list[Term]]:
    """{official parameter name: terms} for one LoRA file, checked against `params`
    (the official names and shapes of the model)."""
    groups: dict[str, dict[tuple[str, str], torch.Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        split = _split_suffix(_strip_prefix(key))
        if split is None:
            unknown.append(key)
            continue
        module, role, which = split
        groups.setdefault(module, {})[role, which] = t
    if unknown:
        raise LX2VError(f"{source}: keys of no known LoRA form: {short_list(unknown)}")

    # One naming style per file: the first under which every module resolves.
    best = None
    for style in ("official", "diffusers", "kohya"):
        mapping, bad = _resolve_modules(groups, style, params)
        if not bad:
            break
        if best is None or len(bad) < len(best[1]):
            best = (style, bad)
    else:
        style, bad = best
        raise LX2VError(
            f"{source}: {len(bad)} LoRA target(s) are not in this model (closest naming: "
            f"{style}): {short_list(bad)}"
        )

    terms: dict[str, list[Term]] = {}
    for module, parts in groups.items():
        target_module = mapping[module]
        for which in ("weight", "bias", "modulation"):
            down, up = parts.get(("down", which)), parts.get(("up", which))
            diff, alpha = parts.get(("diff", which)), parts.get(("alpha", which))
            if down is None and up is None and diff is None:
                if alpha is not None and which == "weight":
                    raise LX2VError(f"{source}: {module}.alpha without lora_down/lora_up")
                continue
            name = _target_name(target_module, which, params)
            if name not in params:
                raise LX2VError(f"{source}: {module} has no {which} to change in this model")
            shape = params[name]
            if diff is not None:
                if diff.numel() != shape.numel():
                    raise LX2VError(f"{source}: {module} difference has shape "
                                    f"{tuple(diff.shape)}, the model's {name} {tuple(shape)}")  # fmt: skip
                terms.setdefault(name, []).append(Diff(diff, strength))
            if down is None and up is None:
                continue
            if down is None or up is None:
                raise LX2VError(f"{source}: {module} has only one of lora_down/lora_up (A/B)")
            rank = down.shape[0]
            if (
                up.dim() < 2
                or up.shape[1] != rank
                or up.shape[0] != shape[0]
                or (down[0].numel() != shape.numel() // shape[0])
            ):
                raise LX2VError(
                    f"{source}: {module} LoRA shapes down {tuple(down.shape)} / up "
                    f"{tuple(up.shape)} do not fit the model's {name} {tuple(shape)}"
                )
            a = rank if alpha is None else float(alpha.float().reshape(-1)[0])
            terms.setdefault(name, []).append(LowRank(down, up, strength * a / rank))
    return terms


def collect_terms(
    specs: Sequence[LoraSpec], params: dict[str, torch.Size]
) -> dict[str, list[Term]]:
    """Terms of every LoRA, by official parameter name (all files are checked first)."""
    out: dict[str, list[Term]] = {}
    for spec in specs:
        tensors = read_lora_file(spec.path)
        for name, ts in lora_terms(tensors, params, spec.strength, f"--lora {spec.path}").items():
            out.setdefault(name, []).extend(ts)
    return out


def _sum_delta(terms: list[Term], shape: torch.Size, device) -> torch.Tensor:
    delta = terms[0].delta(shape, device)
    for term in terms[1:]:
        delta += term.delta(shape, device)
    return delta


# ---------------------------------------------------------------------------------------
# merging


def official_shapes(arch) -> dict[str, torch.Size]:
    """Official parameter names and shapes of a WanDiT of `arch` (built on the meta device)."""
    from lightx2v.models.wan.dit import WanDiT

    with torch.device("meta"):
        ref = WanDiT(arch)
    return {k: v.shape for k, v in ref.state_dict().items()}


@torch.no_grad()
def _add_(t: torch.Tensor, delta: torch.Tensor) -> None:
    """t += delta with the sum in fp32, stored back in t's dtype."""
    t.copy_((t.float() + delta).to(t.dtype))


def merge_loras_into_state(
    state: dict[str, torch.Tensor], specs: Sequence[LoraSpec]
) -> dict[str, torch.Tensor]:
    """Merge into an official-named, unquantized state dict, in place; returns it."""
    params = {k: v.shape for k, v in state.items()}
    terms = collect_terms(specs, params)
    for name, ts in terms.items():
        w = state[name]
        new = w.float() + _sum_delta(ts, w.shape, w.device)
        state[name] = new.to(w.dtype)
    return state


def _slot(model: nn.Module, name: str) -> tuple[nn.Module, str, slice | None]:
    """Where official parameter `name` lives in a (possibly fused/quantized) model:
    (owning module, attribute, rows of the attribute or None for all)."""
    path, _, leaf = name.rpartition(".")
    try:
        owner = model.get_submodule(path)
    except AttributeError:
        owner = None
    if owner is not None and getattr(owner, leaf, None) is not None:
        return owner, leaf, None
    # fused projections (lightx2v.quant.linear): blocks.N.self_attn.q → blocks.N.self_attn.qkv rows
    from lightx2v.quant.linear import FUSED_LINEARS

    m = re.fullmatch(r"(blocks\.\d+)\.(.+)", path)
    if m:
        block = model.get_submodule(m[1])
        for fused, parts in FUSED_LINEARS.items():
            if m[2] in parts and len(parts) > 1:
                try:
                    mod = block.get_submodule(fused)
                except AttributeError:
                    continue
                n = mod.out_features // len(parts)
                i = parts.index(m[2])
                return mod, leaf, slice(i * n, (i + 1) * n)
    raise LX2VError(f"LoRA target {name} is not in this model")


@torch.no_grad()
def merge_loras(model: nn.Module, specs: Sequence[LoraSpec | str]) -> list[str]:
    """Merge LoRAs into a built WanDiT in place; returns the official names changed.

    Works on plain, fused (quantize_dit "bf16") and quantized (FP8 / INT8 QuantLinear)
    models: quantized rows are dequantized, merged in fp32 and requantized.
    """
    specs = [LoraSpec.parse(s) if isinstance(s, str) else s for s in specs]
    if not specs:
        return []
    params = official_shapes(model.arch)
    terms = collect_terms(specs, params)
    slots = {name: _slot(model, name) for name in terms}  # every target found before any change
    for name, ts in terms.items():
        owner, leaf, rows = slots[name]
        _apply(owner, leaf, rows, _sum_delta(ts, params[name], getattr(owner, leaf).device))
    log.info("merged %d LoRA file(s) into %d tensors", len(specs), len(terms))
    return sorted(terms)


def _apply(owner: nn.Module, leaf: str, rows: slice | None, delta: torch.Tensor) -> None:
    t = getattr(owner, leaf)
    if leaf == "weight" and hasattr(owner, "weight_scale"):  # a QuantLinear (quant/linear.py)
        requantize_rows_(owner, rows or slice(None), delta)
    elif rows is None:
        _add_(t, delta)
    else:
        _add_(t[rows], delta)


def requantize_rows_(q: nn.Module, rows: slice, delta: torch.Tensor) -> None:
    """QuantLinear rows: dequantize → += delta (fp32) → requantize, with new row scales."""
    from lightx2v.quant.fp8 import dequantize_weight, quantize_weight

    w = dequantize_weight(q.weight[rows], q.weight_scale[rows]) + delta
    new_q, new_s = quantize_weight(w, q.scheme)
    q.weight[rows] = new_q
    q.weight_scale[rows] = new_s


def parse_lora_args(values: Iterable[str] | None) -> list[LoraSpec]:
    """`--lora` values (repeatable) → specs, each file checked to exist now."""
    values = list(values or ())
    specs = [LoraSpec.parse(v) for v in values]
    for text, s in zip(values, specs, strict=True):
        if s.path.is_file():
            continue
        head, sep, tail = text.rpartition(":")
        if sep and head and Path(head).is_file():
            raise LX2VError(f"--lora {text}: strength {tail!r} is not a number")
        raise LX2VError(
            f"--lora {s.path}: " + ("not a file" if s.path.exists() else "file not found")
        )
    return specs


__all__ = [
    "Diff",
    "LoraSpec",
    "LowRank",
    "collect_terms",
    "lora_terms",
    "merge_loras",
    "merge_loras_into_state",
    "official_shapes",
    "parse_lora_args",
    "read_lora_file",
    "requantize_rows_",
]
