"""encode → denoise → decode → save, with timings and progress.

pipe = WanPipeline.from_pretrained("Wan2.1-I2V-14B-480P")
result = pipe.generate(GenerationRequest(prompt="...", image="cat.jpg"))
result.save("out.mp4")
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from lightx2v.config import DEFAULT_NEGATIVE_PROMPT, GenerationRequest, RuntimeOptions
from lightx2v.errors import LX2VError
from lightx2v.io import load_image, resize_image, to_uint8_frames, write_png_frames, write_video
from lightx2v.models.wan.formats import LX2V, OFFICIAL, Checkpoint, load_dit, open_checkpoint
from lightx2v.ops.attention import (
    attention_backend_override,
    fit_attention_backend,
    set_attention_backend,
)
from lightx2v.runtime.offload import (
    BlockOffloadRunner,
    apply_offload,
    load_dit_offloaded,
    offloader_of,
)
from lightx2v.runtime.runner import DiTRunner, compile_blocks
from lightx2v.runtime.teacache import TeaCacheMixin, with_teacache
from lightx2v.schedule import distill_settings, make_sampler

log = logging.getLogger("lightx2v")

VAE_STRIDE = (4, 8, 8)  # latent frames / height / width downsampling


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LX2VError(
            f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LX2VError(f"--device {name}: CUDA was asked for but no CUDA GPU is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LX2VError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) present")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise LX2VError(f"--dtype {name!r}: expected auto, bf16 or fp32")
    return table[name]


def latent_shape(req: GenerationRequest, z_dim: int = 16) -> tuple[int, int, int, int]:
    return (
        z_dim,
        (req.frames - 1) // VAE_STRIDE[0] + 1,
        req.height // VAE_STRIDE[1],
        req.width // VAE_STRIDE[2],
    )


@dataclass
class GenerationResult:
    video: torch.Tensor  # [3, F, H, W] in [-1, 1], float32, CPU
    latents: torch.Tensor  # [16, F_lat, H/8, W/8] final latents, float32, CPU
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_gb: float | None = None
    fps: int = 16
    teacache: str | None = None  # which steps TeaCache skipped, when it was on

    def frames(self):
        """[F, H, W, 3] uint8."""
        return to_uint8_frames(self.video)

    def save(self, path: str | Path, png_folder: str | Path | None = None) -> Path:
        frames = self.frames()
        out = write_video(frames, path, fps=self.fps)
        if png_folder:
            write_png_frames(frames, png_folder)
        return out

    def summary(self) -> str:
        t = self.timings
        parts = [f"encode {t['encode']:.2f}s", f"denoise {t['denoise']:.2f}s "
                 f"({t['s_per_step']:.3f} s/step)", f"decode {t['decode']:.2f}s",
                 f"total {t['total']:.2f}s"]  # fmt: skip
        if self.peak_memory_gb is not None:
            parts.append(f"peak GPU memory {self.peak_memory_gb:.2f} GB")
        if self.teacache:
            parts.append(self.teacache)
        return ", ".join(parts)


class WanPipeline:
    """A Wan2.1 checkpoint loaded for generation (T2V or I2V, decided by the checkpoint)."""

    def __init__(self, ckpt: Checkpoint, runtime: RuntimeOptions | None = None):
        self.ckpt = ckpt
        self.runtime = runtime or RuntimeOptions()
        self.device = resolve_device(self.runtime.device)
        self.dtype = resolve_dtype(self.runtime.dtype, self.device)
        ckpt.check_files()
        self.text_encoder, self.image_encoder, self.vae = self._load_components()
        self.dit = self._load_dit()
        set_attention_backend(self.runtime.attention)
        arch = ckpt.arch
        fit_attention_backend(arch.dim // arch.num_heads, self.dtype)
        self.teacache_summary: str | None = None
        compile_on = self.runtime.compile
        if compile_on is None:  # auto: on for CUDA, where it pays; CPU compile is slow to start
            compile_on = self.device.type == "cuda"
        if compile_on:
            compile_blocks(self.dit)

    def _load_dit(self):
        """The DiT with LoRAs merged (FP8 rows are requantized), quantized at load if asked
        (a converted checkpoint already is), then offloaded as asked."""
        rt, dev = self.runtime, self.device
        if rt.quant not in ("none", "fp8", "int8"):
            raise LX2VError(f"--quant {rt.quant!r}: expected none, fp8 or int8")
        quantize = rt.quant != "none" and self.ckpt.layout != LX2V
        if not (rt.loras or quantize):
            return load_dit_offloaded(self.ckpt, self.dtype, dev, rt.offload, rt.max_vram)
        if rt.offload == "disk":
            raise LX2VError("--offload disk streams the checkpoint's own weights: it cannot be "
                            "combined with --lora or --quant (convert the checkpoint instead)")  # fmt: skip
        stream = dev.type == "cuda" and rt.offload in ("block", "auto")
        dit = load_dit(self.ckpt, self.dtype, "cpu" if stream else dev)
        if rt.loras:
            from lightx2v.models.wan.lora import merge_loras, parse_lora_args

            merge_loras(dit, parse_lora_args(rt.loras))
        if quantize:
            from lightx2v.quant.linear import quantize_dit

            quantize_dit(dit, rt.quant, device=dev)
        if stream:  # weights are final now: move the blocks to pinned memory
            apply_offload(dit, rt.offload, dev, max_vram_gb=rt.max_vram)
        return dit

    @classmethod
    def from_pretrained(
        cls, path: str | Path, runtime: RuntimeOptions | None = None
    ) -> WanPipeline:
        return cls(open_checkpoint(path), runtime)

    @property
    def task(self) -> str:
        return self.ckpt.task

    def _load_components(self):
        from lightx2v.models.wan.encoders import ImageEncoder, TextEncoder
        from lightx2v.models.wan.vae import WanVAE

        c = self.ckpt
        on_gpu = self.device.type == "cuda"
        # Encoders run once per video: keep them in cheap dtypes on GPU (as the official
        # code: umT5 bf16, CLIP fp16), fp32 on CPU where half precision is slow.
        t5_dtype = torch.bfloat16 if on_gpu else torch.float32
        clip_dtype = torch.float16 if on_gpu else torch.float32
        vae_dtype = torch.bfloat16 if on_gpu else torch.float32
        if c.component_layout == OFFICIAL:
            text = TextEncoder.from_official(c.text_encoder, c.tokenizer, dtype=t5_dtype)
            vae = WanVAE.from_official(c.vae, dtype=vae_dtype)
            image = (
                ImageEncoder.from_official(c.image_encoder, dtype=clip_dtype)
                if c.arch.is_i2v
                else None
            )
        else:
            text = TextEncoder.from_diffusers(c.text_encoder, c.tokenizer, dtype=t5_dtype)
            vae = WanVAE.from_diffusers(c.vae, dtype=vae_dtype)
            image = (
                ImageEncoder.from_diffusers(c.image_encoder, c.image_processor, dtype=clip_dtype)
                if c.arch.is_i2v
                else None
            )
        return text, image, vae.to(self.device)

    # -- stages ------------------------------------------------------------------------

    def _on_device(self, enc):
        enc.to(self.device)
        return enc

    def _park(self, enc):
        if self.runtime.offload_encoders and self.device.type == "cuda":
            enc.to("cpu")

    @torch.no_grad()
    def encode(self, req: GenerationRequest):
        """→ (context [B, 512, text_dim], clip tokens [B, 257, image_dim] | None, y | None)."""
        off = offloader_of(self.dit)
        if off is not None and off.auto:  # room for the encoders on a small card
            off.release()
        prompts = [req.prompt]
        if req.guidance != 1.0:
            neg = DEFAULT_NEGATIVE_PROMPT if req.negative_prompt is None else req.negative_prompt
            prompts.append(neg)
        te = self._on_device(self.text_encoder)
        context = te.encode(prompts).to(self.device)
        self._park(te)
        clip = y = None
        if self.task == "i2v":
            image = load_image(req.image) if isinstance(req.image, (str, Path)) else req.image
            ie = self._on_device(self.image_encoder)
            # the official code gives CLIP the input image as loaded, the VAE the resized one
            clip = ie.encode(image[None].to(self.device)).expand(len(prompts), -1, -1)
            self._park(ie)
            cond = resize_image(image, req.height, req.width).to(self.device)
            y = self.vae.i2v_condition(cond, req.frames)[None].expand(len(prompts), -1, -1, -1, -1)
        return context, clip, y

    # -- what a parallel or offloaded pipeline overrides ----------------------------------

    def runner_class(self) -> type[DiTRunner]:
        return BlockOffloadRunner if offloader_of(self.dit) is not None else DiTRunner

    def runner_args(self) -> tuple:
        return ()

    def make_runner(self, req: GenerationRequest) -> DiTRunner:
        cls, args = self.runner_class(), self.runner_args()
        if req.teacache > 0:
            return with_teacache(cls)(self.dit, *args, threshold=req.teacache, steps=req.steps,
                                      variant=req.teacache_variant, size=(req.width, req.height))  # fmt: skip
        return cls(self.dit, *args)

    def initial_noise(self, req: GenerationRequest, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(latent_shape(req), generator=gen, device=self.device)  # fp32

    @torch.no_grad()
    def denoise(
        self, req, context, clip, y, progress: bool = True
    ) -> tuple[torch.Tensor, list[float]]:
        gen = torch.Generator(device=self.device).manual_seed(req.seed)
        latents = self.initial_noise(req, gen)
        # a step-distilled sampler re-noises from the stream that drew the latents
        sampler = make_sampler(req.sampler, req.steps, req.shift, generator=gen)
        cfg = context.shape[0] == 2
        if cfg and not self.runtime.cfg_batch:  # cond and uncond one after the other
            runners = [self.make_runner(req), self.make_runner(req)]
            for i, r in enumerate(runners):
                r.begin(context[i : i + 1], None if clip is None else clip[i : i + 1])
            ys = [None if y is None else y[i : i + 1] for i in (0, 1)]
        else:
            runner = self.make_runner(req)
            runner.begin(context, clip)
            runners = [runner]
        step_times = []
        steps = tqdm(sampler.timesteps, desc="denoise", unit="step", disable=not progress,
                     file=sys.stderr, leave=False)  # fmt: skip
        exact = self.runtime.attention_exact_steps
        for i, t in enumerate(steps):
            t0 = time.perf_counter()
            tt = t.to(self.device)
            guard = exact and (i < exact or i >= len(sampler.timesteps) - exact)
            with attention_backend_override("sdpa") if guard else contextlib.nullcontext():
                if cfg and self.runtime.cfg_batch:
                    x = latents[None].expand(2, -1, -1, -1, -1)
                    v_cond, v_uncond = runner(x, tt.expand(2), y).unbind(0)
                elif cfg:
                    v_cond, v_uncond = (
                        r(latents[None], tt[None], yy)[0] for r, yy in zip(runners, ys, strict=True)
                    )
                else:
                    v_cond = runner(latents[None], tt[None], y)[0]
            v = v_uncond + req.guidance * (v_cond - v_uncond) if cfg else v_cond
            latents = sampler.step(v, latents)
            self._sync()
            step_times.append(time.perf_counter() - t0)
        if isinstance(runners[0], TeaCacheMixin):
            # sequential CFG runs two caches; they usually agree, and when not, say both
            sums = [r.teacache_summary() for r in runners]
            self.teacache_summary = (
                sums[0] if len(set(sums)) == 1 else f"cond {sums[0]}; uncond {sums[1]}"
            )
        return latents, step_times

    @staticmethod
    def resolve_request(req: GenerationRequest) -> GenerationRequest:
        """The request as it will run: a step-distilled sampler fixes steps, guidance, and
        (when unset) the shift; what the user set and cannot apply is logged."""
        steps, guidance, shift, notes = distill_settings(
            req.sampler, req.steps, req.guidance, req.shift
        )
        for note in notes:
            log.warning(note)
        return dataclasses.replace(req, steps=steps, guidance=guidance, shift=shift)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Untiled or tiled as `vae_tiling` says; auto decides from the memory free now."""
        z = latents[None]
        plan = self.vae.plan_decode(z.shape, self.runtime.vae_tiling, self.runtime.max_vram)
        log.info(plan.describe())
        video = self.vae.decode(z, **plan.decode_kwargs())
        return video[0].float().cpu()

    def release_dit_memory(self) -> None:
        """Before the decode: with offload auto, the DiT's resident blocks leave the GPU so
        the decode has their room. Costs nothing: the next generation's encode releases them
        anyway, and its first step brings them back. (Freed memory stays in torch's cache,
        which the decode's budget counts; no empty_cache needed.)"""
        off = offloader_of(self.dit)
        if off is not None and off.auto:
            off.release()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def generate(self, req: GenerationRequest, progress: bool = True) -> GenerationResult:
        req = self.resolve_request(req)
        req.validate(self.task)
        self.teacache_summary = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        context, clip, y = self.encode(req)
        self._sync()
        t1 = time.perf_counter()
        latents, step_times = self.denoise(req, context, clip, y, progress)
        t2 = time.perf_counter()
        del context, clip, y  # the DiT's inputs: the decode needs none of them
        self.release_dit_memory()
        video = self.decode(latents)
        t3 = time.perf_counter()
        peak = None
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 1e9
        timings = {
            "encode": t1 - t0,
            "denoise": t2 - t1,
            "s_per_step": sum(step_times) / max(len(step_times), 1),
            "decode": t3 - t2,
            "total": t3 - t0,
        }
        return GenerationResult(video, latents.float().cpu(), timings, peak, req.fps,
                                self.teacache_summary)  # fmt: skip
