"""`lx2v bench`: speed and memory at the real shapes, with random weights, no checkpoint.

Builds the Wan2.1 I2V-14B architecture with random weights and times one DiT forward in
the configurations of LightX2V's published benchmark table, with diffusers'
`WanTransformer3DModel` (bf16, eager) as the baseline row in the same process, on the
same weights and inputs. Encode (umT5-XXL, CLIP ViT-H/14, VAE encode of the I2V
condition) and VAE decode are measured once per size with random weights at their real
configurations. Each row reports:

    s/forward        median of timed calls, batch 1 (one of cond/uncond); in the row with
                     CFG as one batch of 2 (`lx2v run`'s default), half a measured step
    s/step           2 × s/forward with CFG (cond + uncond, one after the other, as
                     diffusers' pipeline runs them), 1 × without; the batched-CFG row's
                     is one measured forward of batch 2
    projected s/video  encode + steps × (1 − TeaCache skip fraction) × s/step + decode
    peak GB          peak GPU memory allocated during the forward

A TeaCache row projects a stated skip fraction (random weights make TeaCache's own
decisions meaningless); every other number is measured.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch

from lightx2v.config import ARCH_PRESETS, WanArch
from lightx2v.errors import LX2VError

SIZES = {"480p": (832, 480), "720p": (1280, 720)}


@dataclass
class BenchRow:
    name: str
    impl: str = "lx2v"  # "lx2v" or "diffusers"
    quant: str = "bf16"  # "bf16" or "fp8" (weights; FP8 also quantizes activations per token)
    attention: str = "sdpa"
    compile: bool = True
    offload: str = "none"
    max_vram: float | None = None  # GB: the budget of offload "auto" (the RTX 4090 row: 24)
    steps: int = 40
    cfg: bool = True
    teacache_skip: float = 0.0  # stated fraction of steps TeaCache skips (projection)
    preset: str | None = None  # the `lx2v run --preset` that runs this configuration
    batch: int = 1  # 2: cond and uncond timed as one batch (CFG batched, lx2v run's default)
    # measured
    s_per_forward: float | None = None
    first_call_s: float | None = None
    peak_gb: float | None = None
    s_per_step: float | None = None
    s_per_video: float | None = None
    vs_baseline: float | None = None
    note: str = ""
    size: str = ""


# the 8-bit attention of the LightX2V rows: INT8 Q·Kᵀ and INT8 P·V, our fastest kernel that
# passes the accuracy gate (docs/BENCHMARKS.md, attention section): the warp-specialised
# CUDA kernel where lightx2v._C_sm90 has it (H100/H200), else the Triton kernel. The
# bf16-int8attn row names the Triton kernel, as its preset does.
ATTN8 = "lx2v-int8-int8"
ATTN8_WS = "lx2v-int8-int8-ws"


def attention_8bit() -> str:
    from lightx2v.ops import attention as A

    return ATTN8_WS if A._try_load(ATTN8_WS) else ATTN8


def default_rows() -> list[BenchRow]:
    """LightX2V's table: bf16; + 8-bit attention; FP8 + 8-bit attention; + TeaCache;
    4-step distilled; block offload. Ordered so each transformation is applied once, with
    one exception: where lightx2v._C_sm90 has the CUDA attention kernel, the FP8 rows use it
    and the bf16 + 8-bit row keeps the Triton kernel (its preset's), so the step from that
    row to FP8 also changes the attention kernel (same arithmetic, 3-5% faster)."""
    attn8 = attention_8bit()
    return [
        BenchRow("diffusers bf16 (baseline)", impl="diffusers", compile=False),
        BenchRow("lx2v bf16 + sdpa", preset="bf16"),
        BenchRow("lx2v bf16 + 8-bit attention", attention=ATTN8, preset="bf16-int8attn"),
        BenchRow("lx2v FP8 + 8-bit attention", quant="fp8", attention=attn8, preset="fp8"),
        # the same with cond and uncond as one batch of 2, as `lx2v run --preset fp8` runs
        # them (the row above times one of the two, as diffusers' pipeline runs them)
        BenchRow(
            "lx2v FP8 + 8-bit attention, CFG as one batch of 2",
            quant="fp8",
            attention=attn8,
            preset="fp8",
            batch=2,
        ),  # fmt: skip
        BenchRow(
            "lx2v FP8 + 8-bit attention + TeaCache",
            quant="fp8",
            attention=attn8,
            teacache_skip=0.4,
            preset="fp8-teacache",
        ),  # fmt: skip
        BenchRow(
            "lx2v 4-step distilled, FP8 + 8-bit attention",
            quant="fp8",
            attention=attn8,
            steps=4,
            cfg=False,
            preset="distill",
        ),  # fmt: skip
        BenchRow(
            "lx2v FP8 + 8-bit attention, block offload",
            quant="fp8",
            attention=attn8,
            offload="block",
            preset="low-vram",
        ),  # fmt: skip
        # LightX2V's RTX 4090 rows: the same run under a 24 GB budget (offload auto keeps
        # what fits resident). Memory is comparable with a 4090's; the time is this GPU's.
        # Batch 1, as the preset runs CFG (one after the other, like low-vram's).
        BenchRow(
            "lx2v FP8 + 8-bit attention, --max-vram 24 (RTX 4090 memory)",
            quant="fp8",
            attention=attn8,
            offload="auto",
            max_vram=24.0,
            preset="rtx4090",
        ),  # fmt: skip
    ]


# The runtime issue's targets, set for one H100/H200 running the defaults here (14B I2V, 81
# frames), keyed by (size, preset). Bounds: an upper bound on s/forward, s/video or peak GB;
# "forward_speedup" a lower bound on diffusers' s/forward over the row's (same size and run);
# "x_resident" an upper bound on s/forward over the resident FP8 row's.
TARGET_CARDS = ("H100", "H200")
TARGETS = {
    ("480p", "fp8"): {"s_per_forward": 1.6, "forward_speedup": 2.0, "s_per_video": 135.0},
    ("480p", "distill"): {"s_per_video": 9.0},
    ("720p", "fp8"): {"s_per_video": 540.0},
    ("480p", "low-vram"): {"peak_gb": 12.0, "x_resident": 1.10},
}
_TARGET_TEXT = {
    "s_per_forward": ("≤ {:g} s/forward", "{:.3f} s"),
    "forward_speedup": ("≥ {:g}× diffusers per forward", "{:.2f}×"),
    "s_per_video": ("≤ {:g} s/video", "{:.1f} s"),
    "peak_gb": ("≤ {:g} GB peak", "{:.1f} GB"),
    "x_resident": ("≤ {:g}× the resident FP8 row", "{:.2f}×"),
}


def annotate_targets(rows: list[BenchRow], card: str) -> None:
    """Add to each row's note its verdict against `TARGETS`: "met" or "missed by N%", with
    the measured value. Only on the cards the targets were set for (H100/H200); on any other
    card, and for rows without a target, the notes are left as they are."""
    if not any(c in card for c in TARGET_CARDS):
        return
    for r in rows:
        targets = TARGETS.get((r.size, r.preset))
        if not targets or not r.s_per_forward:
            continue
        same = [o for o in rows if o.size == r.size and o.s_per_forward]
        base = next((o for o in same if o.impl == "diffusers"), None)
        resident = next((o for o in same if o.preset == "fp8" and o.batch == 1), None)
        values = {
            "s_per_forward": r.s_per_forward,
            "s_per_video": r.s_per_video,
            "peak_gb": r.peak_gb,
            "forward_speedup": base.s_per_forward / r.s_per_forward if base else None,
            "x_resident": r.s_per_forward / resident.s_per_forward if resident else None,
        }
        verdicts = []
        for key, bound in targets.items():
            value = values[key]
            if value is None:
                continue
            want_fmt, got_fmt = _TARGET_TEXT[key]
            want, got = want_fmt.format(bound), got_fmt.format(value)
            lower = key == "forward_speedup"  # a lower bound; the others are upper bounds
            miss = bound / value - 1 if lower else value / bound - 1
            verdict = (
                "met" if miss <= 0 else "missed by <1%" if miss < 0.01 else f"missed by {miss:.0%}"
            )
            verdicts.append(f"target {want}: {got}, {verdict}")
        if verdicts:
            note = "; ".join(verdicts)
            r.note = f"{r.note}; {note}" if r.note else note


# ---------------------------------------------------------------------------------------
# random models at real shapes


def diffusers_dit(arch: WanArch, device, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """diffusers' WanTransformer3DModel for `arch`, built on `device` in `dtype` (built in
    place rather than moved: its RoPE tables are buffers). Weights: its own init."""
    from diffusers import WanTransformer3DModel

    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            m = WanTransformer3DModel(
                patch_size=arch.patch_size,
                num_attention_heads=arch.num_heads,
                attention_head_dim=arch.head_dim,
                in_channels=arch.in_dim,
                out_channels=arch.out_dim,
                text_dim=arch.text_dim,
                freq_dim=arch.freq_dim,
                ffn_dim=arch.ffn_dim,
                num_layers=arch.num_layers,
                cross_attn_norm=True,
                qk_norm="rms_norm_across_heads",
                eps=arch.eps,
                image_dim=arch.image_dim if arch.is_i2v else None,
                added_kv_proj_dim=arch.dim if arch.is_i2v else None,
            )
    finally:
        torch.set_default_dtype(torch.float32)
    return m.eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """In place: matrices ~ N(0, 1/fan_in), norm weights 1, other vectors N(0, 0.02)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2 and "scale_shift_table" not in name and "modulation" not in name:
            p.normal_(0, p[0].numel() ** -0.5, generator=g)
        elif "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.normal_(0, 0.02, generator=g)


@torch.no_grad()
def random_dit(arch: WanArch, device, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """Our WanDiT with random weights (randomize_), built in place on `device`."""
    from lightx2v.models.wan.dit import WanDiT

    with torch.device("meta"):
        m = WanDiT(arch)
    m.cast(dtype).to_empty(device=device)
    randomize_(m, seed)
    return m.eval().requires_grad_(False)


def dit_inputs(arch: WanArch, frames: int, height: int, width: int, device, seed: int = 0,
               batch: int = 1):  # fmt: skip
    """(x, t, context, clip tokens, y) for one forward."""
    g = torch.Generator(device=device).manual_seed(seed)
    lat = ((frames - 1) // 4 + 1, height // 8, width // 8)
    x = torch.randn(batch, 16, *lat, generator=g, device=device)
    y = (torch.randn(batch, arch.in_dim - 16, *lat, generator=g, device=device)
         if arch.is_i2v else None)  # fmt: skip
    ctx = torch.randn(batch, 512, arch.text_dim, generator=g, device=device)
    clip = (torch.randn(batch, 257, arch.image_dim, generator=g, device=device)
            if arch.is_i2v else None)  # fmt: skip
    t = torch.full((batch,), 500.0, device=device)
    return x, t, ctx, clip, y


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, repeat: int, device) -> tuple[float, float, object]:
    """(median seconds of `repeat` calls after one warm-up call, warm-up seconds, output)."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first, out


# ---------------------------------------------------------------------------------------
# encode / decode at real configurations


def _umt5_xxl(device, dtype):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                     num_heads=64, feed_forward_proj="gated-gelu")  # fmt: skip
    with torch.device("meta"):
        m = UMT5EncoderModel(cfg)
    m.to_empty(device=device).to(dtype)
    randomize_(m, 1)
    return m.eval()


def _clip_vit_h(device, dtype):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=16, image_size=224, patch_size=14,
                           hidden_act="gelu")  # fmt: skip
    with torch.device("meta"):
        m = CLIPVisionModel(cfg)
    m.to_empty(device=device).to(dtype)
    randomize_(m, 2)
    from lightx2v.models.wan.encoders import clip_tower_prefix  # differs across transformers

    emb = m.get_submodule(clip_tower_prefix(m) + "embeddings")
    emb.register_buffer("position_ids", torch.arange(emb.num_positions, device=device)[None],
                        persistent=False)  # fmt: skip
    return m.eval()


def _wan_vae(device, dtype):
    from diffusers import AutoencoderKLWan

    from lightx2v.models.wan.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WanVAE

    with torch.device("meta"):
        m = AutoencoderKLWan()  # the Wan2.1 VAE's own configuration (base_dim 96, z_dim 16)
    m.to_empty(device=device)
    randomize_(m, 3)
    return WanVAE(m, WAN21_LATENTS_MEAN, WAN21_LATENTS_STD).to(device, dtype)


@torch.no_grad()
def encode_decode_seconds(width: int, height: int, frames: int, device, log=print) -> dict:
    """Measured seconds of the per-video stages with random weights at real sizes."""
    out = {}
    dtype = torch.bfloat16
    t5 = _umt5_xxl(device, dtype)
    ids = torch.randint(0, 256384, (2, 512), device=device)
    mask = torch.ones_like(ids)
    out["text_encode"], _, _ = timed(partial(t5, input_ids=ids, attention_mask=mask), 2, device)
    del t5
    clip = _clip_vit_h(device, torch.float16)
    px = torch.randn(1, 3, 224, 224, device=device, dtype=torch.float16)
    run_clip = partial(clip, pixel_values=px, output_hidden_states=True)
    out["image_encode"], _, _ = timed(run_clip, 2, device)
    del run_clip
    del clip
    vae = _wan_vae(device, dtype)
    img = torch.rand(3, height, width, device=device) * 2 - 1
    out["vae_encode_condition"], _, _ = timed(partial(vae.i2v_condition, img, frames), 1, device)
    lat = torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, device=device)
    out["vae_decode"], _, _ = timed(partial(vae.decode, lat), 1, device)
    del vae
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    out["encode"] = out["text_encode"] + out["image_encode"] + out["vae_encode_condition"]
    log(
        f"encode/decode at {width}x{height}x{frames}: "
        + ", ".join(f"{k} {v:.2f}s" for k, v in out.items())
    )
    return out


# ---------------------------------------------------------------------------------------
# the run


def _config_key(row: BenchRow) -> tuple:
    """What a row's forward depends on (rows that differ only in steps/CFG share it)."""
    return (row.impl, row.quant, row.attention, row.compile, row.offload, row.max_vram,
            row.batch)  # fmt: skip


def _measure(row, fn, size, stages, measured, repeat, dev, t_start, budget_s, log) -> None:
    """Time fn for row (once per configuration: rows that differ only in steps, CFG or
    TeaCache share it) and fill the row's numbers, or its note when it fails."""
    key = _config_key(row)
    if key not in measured:
        if time.perf_counter() - t_start > budget_s:
            row.note = "skipped: time budget"
            return
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            sec, first, _ = timed(fn, repeat, dev)
        except Exception as e:  # reported in the table; the other rows still run
            msg = str(e).splitlines()[0][:160] if str(e) else ""
            row.note = f"failed: {type(e).__name__}: {msg}"
            log(f"{row.name} [{size}]: {row.note}")
            return
        peak = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None
        measured[key] = (sec, first, peak)
    sec, first, row.peak_gb = measured[key]
    row.first_call_s = first
    if row.batch == 2:  # one call is the whole CFG step; per forward = per sample
        row.s_per_forward, row.s_per_step = sec / 2, sec
    else:
        row.s_per_forward, row.s_per_step = sec, sec * (2 if row.cfg else 1)
    steps = row.steps * (1 - row.teacache_skip)
    row.s_per_video = stages["encode"] + steps * row.s_per_step + stages["vae_decode"]
    log(f"{row.name} [{size}]: {sec:.3f} s/forward, first {first:.1f} s, "
        f"projected {row.s_per_video:.1f} s/video")  # fmt: skip


def run_bench(
    sizes: list[str],
    rows: list[BenchRow] | None = None,
    arch_name: str = "i2v-14b",
    frames: int = 81,
    repeat: int = 2,
    device: str = "cuda",
    time_budget_s: float = 480.0,
    log: Callable[[str], None] = print,
    real_stages: bool = True,
) -> list[BenchRow]:
    """Time every row at every size; a row that fails or does not fit the time budget is
    reported with its reason instead of a number."""
    from lightx2v.models.wan.dit import WanDiT
    from lightx2v.models.wan.formats import diffusers_to_official
    from lightx2v.ops.attention import fit_attention_backend, set_attention_backend
    from lightx2v.runtime.runner import compile_blocks

    t_start = time.perf_counter()
    arch = ARCH_PRESETS[arch_name] if isinstance(arch_name, str) else arch_name
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LX2VError("lx2v bench needs a CUDA GPU (or --device cpu with --arch tiny)")
    for r in rows or []:
        if r.batch not in (1, 2) or (r.batch == 2 and (not r.cfg or r.impl != "lx2v")):
            raise LX2VError(f"bench row {r.name!r}: batch {r.batch} (1, or 2 for lx2v CFG rows)")
    results: list[BenchRow] = []
    for size in sizes:
        width, height = SIZES[size]
        if real_stages:
            stages = encode_decode_seconds(width, height, frames, dev, log)
        else:  # a tiny dry run: the real encoders would not fit a small machine
            stages = {"encode": 0.0, "vae_decode": 0.0}
        x, t, ctx, clip, y = dit_inputs(arch, frames, height, width, dev)
        batched = dit_inputs(arch, frames, height, width, dev, batch=2)  # CFG as one batch
        template = rows or default_rows()
        size_rows = [BenchRow(**{**asdict(r), "size": size}) for r in template]
        ref = diffusers_dit(arch, dev)
        randomize_(ref, 0)
        state = dict(ref.state_dict())  # ours reuses the same tensors: no second copy

        measured: dict[tuple, tuple[float, float, float | None]] = {}
        ctx_ = (size, stages, measured, repeat, dev, t_start, time_budget_s, log)

        with torch.no_grad():
            for row in [r for r in size_rows if r.impl == "diffusers"]:
                hid = (torch.cat([x, y], 1) if y is not None else x).bfloat16()
                c, cl = ctx.bfloat16(), None if clip is None else clip.bfloat16()
                fn = partial(ref, hid, t, c, encoder_hidden_states_image=cl, return_dict=False)
                _measure(row, fn, *ctx_)
                del fn
            del ref
            gc.collect()
            with torch.device("meta"):
                ours = WanDiT(arch)
            ours.load_state_dict(
                {diffusers_to_official(k): v for k, v in state.items()}, assign=True
            )
            act_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
            ours.cast(act_dtype).eval()
            del state
            quantized, offloaded = False, ("none", None, 1)
            for row in [r for r in size_rows if r.impl == "lx2v"]:
                if row.quant == "bf16" and quantized:
                    row.note = "skipped: model already quantized (order the rows bf16 first)"
                    continue
                if row.quant != "bf16" and not quantized:
                    from lightx2v.quant.linear import quantize_dit

                    quantize_dit(ours, row.quant)
                    quantized = True
                    gc.collect()
                if (row.offload, row.max_vram, row.batch) != offloaded:
                    from lightx2v.runtime.offload import (
                        _tokens,
                        apply_offload,
                        offloader_of,
                        remove_offload,
                    )

                    remove_offload(ours)  # (no-op when nothing is offloaded)
                    apply_offload(ours, row.offload, dev, max_vram_gb=row.max_vram)
                    offloaded = (row.offload, row.max_vram, row.batch)
                    off = offloader_of(ours)
                    if row.offload == "auto" and off is not None:
                        # what lx2v run's runner does before the first step: pick the
                        # resident set under the budget, for the batch the row times (1:
                        # as `--cfg-sequential`; batched CFG plans for 2, fewer blocks)
                        off.plan(ours.arch, row.batch, _tokens(ours, x))
                        row.note = (
                            f"{len(off.resident_blocks)} of {len(ours.blocks)} blocks "
                            f"resident (batch {row.batch})"
                        )
                try:
                    set_attention_backend(row.attention)
                    # the backend must take the model's heads (the tiny model's are 32 wide)
                    fit_attention_backend(arch.dim // arch.num_heads, act_dtype)
                except LX2VError as e:
                    if real_stages:  # a real run reports it; a tiny dry run goes on with sdpa
                        row.note = f"skipped: {e}"
                        continue
                    set_attention_backend("sdpa")
                    note = (
                        f"dry run: {row.attention} unavailable or cannot run this model, sdpa used"
                    )
                    row.note = f"{row.note}; {note}" if row.note else note
                key = _config_key(row)
                if row.compile and dev.type == "cuda" and key not in measured:
                    torch._dynamo.reset()
                    ours.blocks_compiled = False
                    compile_blocks(ours)
                inputs = batched if row.batch == 2 else (x, t, ctx, clip, y)
                _measure(row, partial(ours, *inputs), *ctx_)
            set_attention_backend("sdpa")
            del ours
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        base = next((r for r in size_rows if r.impl == "diffusers" and r.s_per_video), None)
        for r in size_rows:
            if base is not None and r.s_per_video:
                r.vs_baseline = base.s_per_video / r.s_per_video
        results.extend(size_rows)
    return results


def markdown_table(rows: list[BenchRow], header: str) -> str:
    lines = [header, "", "| size | configuration | preset | s/forward | s/step | projected s/video | "
             "peak GB | × baseline | note |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def f(v, fmt):
        return format(v, fmt) if v is not None else "—"

    for r in rows:
        steps = (
            f"{r.steps} steps"
            + (", CFG" if r.cfg else "")
            + (" as one batch of 2" if r.batch == 2 else "")
            + (f", {r.teacache_skip:.0%} skipped (stated)" if r.teacache_skip else "")
        )
        lines.append(
            f"| {r.size} | {r.name} ({steps}) | {r.preset or '—'} | {f(r.s_per_forward, '.3f')} | "
            f"{f(r.s_per_step, '.3f')} | {f(r.s_per_video, '.1f')} | {f(r.peak_gb, '.1f')} | "
            f"{f(r.vs_baseline, '.2f')} | {r.note} |"
        )
    return "\n".join(lines)


def main_bench(args) -> int:
    """Entry point of `lx2v bench` (argparse namespace from cli.py)."""
    from lightx2v.fileio import atomic_file
    from lightx2v.io import check_output_folder

    if args.repeat < 1:
        raise LX2VError(f"--repeat {args.repeat}: must be at least 1")
    tiny = args.arch == "tiny"
    if args.frames is None:
        args.frames = 5 if tiny else 81
    if args.frames < 1 or (args.frames - 1) % 4:
        raise LX2VError(f"--frames {args.frames}: must be 4n+1")
    for path in (args.json, args.markdown):
        if path:
            check_output_folder(path)
    if not args.time_budget > 0:
        raise LX2VError(f"--time-budget {args.time_budget}: must be a positive number of seconds")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not sizes:
        raise LX2VError(f"--sizes {args.sizes!r}: name at least one size ({', '.join(SIZES)})")
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        raise LX2VError(
            f"--sizes {args.sizes}: unknown {', '.join(bad)} (known: {', '.join(SIZES)})"
        )
    from lightx2v.pipeline import resolve_device

    dev = str(resolve_device(args.device or ("auto" if tiny else "cuda")))
    arch = args.arch
    if arch == "tiny":  # a CPU dry run of the whole procedure
        from lightx2v.models.wan.tiny import tiny_arch

        arch = tiny_arch("i2v")
    rows = run_bench(sizes, arch_name=arch, frames=args.frames, repeat=args.repeat, device=dev,
                     time_budget_s=args.time_budget, real_stages=args.arch != "tiny",
                     log=lambda m: print(m, file=sys.stderr, flush=True))  # fmt: skip
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    if args.arch == "i2v-14b" and args.frames == 81:  # the shapes the targets were set for
        annotate_targets(rows, gpu)
    head = (f"{arch if isinstance(arch, str) else 'tiny'} I2V, {args.frames} frames, random weights, "
            f"{gpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    table = markdown_table(rows, head)
    print(table)
    if args.json:
        with atomic_file(args.json, ".json") as tmp:
            tmp.write_text(
                json.dumps({"header": head, "rows": [asdict(r) for r in rows]}, indent=2)
            )
    if args.markdown:
        with atomic_file(args.markdown, ".md") as tmp:
            tmp.write_text(table + "\n")
    return 0
