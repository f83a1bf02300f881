"""`lx2v`: run | convert | verify | info. One place for every command and flag."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import logging
import os
import platform
import sys

from lightx2v import __version__
from lightx2v.config import RESOLUTIONS, RUN_PRESETS, RunConfig
from lightx2v.errors import LX2VError

log = logging.getLogger("lightx2v")

# Defaults of the embedded tiny model: small enough for a 2-core CPU in well under a minute.
EMBEDDED_DEFAULTS = {"width": 160, "height": 96, "frames": 9, "steps": 8}


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size {text!r} is not WIDTHxHEIGHT (e.g. 832x480)"
        ) from None


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `lx2v: error: ...` and a pointer to --help, instead of
    the usage block (subcommand parsers inherit this class)."""

    def error(self, message: str):
        self.exit(2, f"lx2v: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lx2v", description="Fast inference for Wan2.1 text/image-to-video models.")
    p.add_argument("--version", action="version", version=f"lightx2v {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser(
        "run",
        help="generate a video",
        description="Generate a video. Without --model, runs the embedded tiny default model "
        "(random weights: the video is noise) to show the whole pipeline works.",
    )
    r.add_argument(
        "--model", help="checkpoint directory: official Wan2.1, diffusers, or `lx2v convert` output"
    )
    r.add_argument(
        "--task",
        choices=["t2v", "i2v"],
        help="checked against the checkpoint; picks the embedded model (default i2v) when --model is absent",
    )
    r.add_argument("--config", help="JSON file with run settings; flags given here override it")
    r.add_argument(
        "--resolution",
        choices=sorted(RESOLUTIONS),
        help="official size (480p = 832x480, 720p = 1280x720, 81 frames); --size/--frames override it",
    )
    r.add_argument(
        "--preset",
        choices=sorted(RUN_PRESETS),
        help="a named speed/memory configuration (the rows of `lx2v bench`): bf16, bf16-int8attn, "
        "fp8 (FP8 weights + 8-bit attention), fp8-teacache, distill (4-step distilled models), "
        "low-vram (block offload), rtx4090 (fits 24 GB); the last two run CFG one after the "
        "other; other flags override it",
    )
    r.add_argument("--prompt", help="text prompt")
    r.add_argument("--negative-prompt", help="negative prompt (default: the official Wan2.1 one)")
    r.add_argument("--image", help="input image for i2v (jpg/png)")
    r.add_argument(
        "--size",
        type=parse_size,
        metavar="WxH",
        help="video size, divisible by 16 (default 832x480)",
    )
    r.add_argument("--frames", type=int, help="number of frames, 4n+1 (default 81 = 5 s at 16 fps)")
    r.add_argument(
        "--steps",
        type=int,
        help="sampling steps (default: 40 for I2V, 50 for T2V, as the official code)",
    )
    r.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale; 1 disables CFG (default 5)"
    )
    r.add_argument(
        "--shift",
        type=float,
        help="timestep shift of the flow schedule (default: 3 for I2V at 480P, else 5, as the official code)",
    )
    r.add_argument("--seed", type=int, help="random seed (default 42)")
    r.add_argument(
        "--sampler",
        choices=["unipc", "euler", "distill4"],
        help="sampler (default unipc, as the official code); distill4: the 4-step schedule of "
        "step-distilled models (LightX2V's distilled checkpoints, or a base model with a "
        "distillation --lora), which runs 4 steps without CFG",
    )
    r.add_argument(
        "--teacache",
        type=float,
        metavar="THRESH",
        help="TeaCache: skip the block stack on steps whose input changed little (threshold "
        "0.1-0.3 trades quality for speed; default 0 = off); skipped steps are printed",
    )
    r.add_argument(
        "--teacache-variant",
        choices=["e0", "e"],
        help="TeaCache indicator: e0 = modulation, first 5 steps always run (default); "
        "e = time embedding, first and last steps always run",
    )
    r.add_argument(
        "--lora",
        action="append",
        metavar="PATH[:STRENGTH]",
        help="merge a LoRA (.safetensors) into the DiT at load, strength default 1; repeatable",
    )
    r.add_argument("--fps", type=int, help="frames per second of the written video (default 16)")
    r.add_argument("-o", "--output", help="output .mp4 path (default output.mp4)")
    r.add_argument("--save-frames", metavar="DIR", help="also write every frame as PNG into DIR")
    r.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    r.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp32"],
        help="DiT precision (auto: bf16 on GPU, fp32 on CPU)",
    )
    cfg_mode = r.add_mutually_exclusive_group()
    cfg_mode.add_argument(
        "--cfg-sequential",
        action="store_true",
        help="run cond and uncond one after the other (less memory) instead of as a batch of 2 "
        "(the low-vram and rtx4090 presets do)",
    )
    cfg_mode.add_argument(
        "--cfg-batched",
        action="store_true",
        help="run cond and uncond as one batch of 2 (the default, except in the low-vram and "
        "rtx4090 presets)",
    )
    r.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="regional torch.compile of the DiT blocks (default: on for CUDA, off on CPU); compiled kernels are cached across runs",
    )
    r.add_argument(
        "--gpus",
        type=int,
        help="GPUs for one video (default 1); N > 1 starts N ranks through torchrun",
    )
    r.add_argument(
        "--ulysses",
        type=int,
        help="Ulysses sequence-parallel degree (default: GPUs/2 with CFG parallel, else GPUs); "
        "must divide the model's head count",
    )
    r.add_argument(
        "--cfg-parallel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cond and uncond on different halves of the GPUs (default: on for an even GPU "
        "count when CFG is used)",
    )
    r.add_argument(
        "--offload",
        choices=["none", "block", "disk", "auto"],
        help="DiT weights: none = all on the GPU; block = in pinned RAM, each block copied in "
        "while the previous one computes; disk = streamed from the checkpoint files (less RAM "
        "than the model); auto (default) = resident as far as they fit, the rest streamed",
    )
    r.add_argument(
        "--max-vram",
        type=float,
        metavar="GB",
        help="GPU memory budget for --offload auto and --vae-tiling auto",
    )
    r.add_argument(
        "--vae-tiling",
        nargs="?",
        const="on",
        choices=["auto", "on", "off"],
        help="VAE decode in spatial tiles (less memory, slower): auto (default) tiles only when "
        "the untiled decode would not fit the GPU memory then free (or --max-vram), with the "
        "largest tile that fits; on (also a bare --vae-tiling) = always, 256 px tiles; off = never. "
        "With --gpus N, auto and off decode in bands split across the ranks instead",
    )
    r.add_argument(
        "--attention",
        help="attention backend: sdpa (default), lx2v-int8-int8 (our 8-bit kernel: INT8 Q·Kᵀ and P·V), lx2v-int8-int8-ws (the same in a warp-specialised CUDA kernel), lx2v-int8 (bf16 P·V), lx2v-int8-fp8, fa4 (flash-attn-4), sage, flash, flashinfer-fp8, auto (fastest that passes a self-check); `lx2v info` lists them",
    )
    r.add_argument(
        "--attention-exact-steps",
        type=int,
        metavar="N",
        help="run the first and last N steps with exact bf16 attention (sdpa) whatever "
        "--attention says (default 0)",
    )
    r.add_argument(
        "--quant",
        choices=["none", "fp8", "int8"],
        help="quantize the DiT's linear layers at load (default none; a converted checkpoint is already quantized)",
    )
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    c = sub.add_parser("convert", help="convert a checkpoint into per-block FP8/INT8/bf16 shards",
                       description="Convert an official or diffusers Wan2.1 checkpoint into lightx2v's layout.")  # fmt: skip
    c.add_argument("--model", required=True, help="source checkpoint directory")
    c.add_argument(
        "--out", required=True, help="destination directory (written as OUT.partial, then renamed)"
    )
    c.add_argument(
        "--quant",
        choices=["fp8", "int8", "bf16"],
        default="fp8",
        help="weight format (default fp8)",
    )
    c.add_argument(
        "--keep-high-precision",
        default=None,
        metavar="BLOCKS",
        help="comma-separated block indices kept in bf16, e.g. 0,39",
    )
    c.add_argument("--force", action="store_true", help="replace an existing OUT")
    c.add_argument("--report", action="store_true", help="print per-layer quantization error")

    v = sub.add_parser(
        "verify", help="check every file of a converted checkpoint against its sha256"
    )
    v.add_argument("path", help="converted checkpoint directory")

    sub.add_parser("info", help="versions, devices and which backends/kernels are active")

    b = sub.add_parser(
        "bench",
        help="time the 14B I2V DiT at real shapes (random weights) in LightX2V's configurations",
        description="Random weights at the real shapes, no checkpoint needed: one DiT forward per "
        "configuration (bf16, 8-bit attention, FP8, TeaCache, 4-step distilled, block offload) "
        "beside diffusers' WanTransformer3DModel in the same process; encode/decode measured at "
        "their real configurations; projected seconds per video.",
    )
    b.add_argument("--sizes", default="480p", help="comma list of 480p, 720p (default 480p)")
    b.add_argument(
        "--arch", default="i2v-14b", choices=["i2v-14b", "tiny"], help="tiny: a CPU dry run"
    )
    b.add_argument("--frames", type=int, help="default 81 (tiny: 5)")
    b.add_argument("--repeat", type=int, default=2, help="timed calls per configuration (median)")
    b.add_argument("--device", help="default cuda (tiny: auto)")
    b.add_argument(
        "--time-budget", type=float, default=480.0, help="seconds; later rows are skipped"
    )
    b.add_argument("--json", help="write the rows as JSON here")
    b.add_argument("--markdown", help="write the table as markdown here")
    return p


# ---------------------------------------------------------------------------------------


def cmd_run(args) -> int:
    """One process, or N torchrun ranks when --gpus N > 1 (this process then launches them).
    Every check that needs no weights runs here first, before any rank starts."""
    if args.gpus is not None and args.gpus < 1:
        raise LX2VError(f"--gpus {args.gpus}: must be at least 1")
    if args.ulysses is not None and args.ulysses < 1:
        raise LX2VError(f"--ulysses {args.ulysses}: must be at least 1")
    if (args.ulysses or args.cfg_parallel) and not (args.gpus and args.gpus > 1):
        raise LX2VError("--ulysses and --cfg-parallel need --gpus N with N > 1")
    from lightx2v.runtime import launch

    prepared = _prepare_run(args)
    if launch.wants_relaunch(args.gpus):
        from lightx2v.runtime.parallel import ParallelConfig

        ckpt, req = prepared[0], prepared[1]
        ParallelConfig.choose(args.gpus, ckpt.arch.num_heads, args.ulysses, args.cfg_parallel,
                              uses_cfg=req.guidance != 1.0)  # fmt: skip
        return launch.relaunch(args.gpus, args.argv, check_gpus=args.device != "cpu")
    if launch.in_torchrun():
        return launch.run_rank(lambda: _execute_run(args, *prepared, parallel=True))
    return _execute_run(args, *prepared, parallel=False)


def _prepare_run(args):
    """Settings from config file, preset and flags, checked before any weight is loaded.
    → (checkpoint, request, runtime options, output path)."""
    from lightx2v.io import check_output_path, demo_image
    from lightx2v.pipeline import WanPipeline

    cfg = RunConfig.from_file(args.config) if args.config else RunConfig()
    req, rt = cfg.request, cfg.runtime
    model = args.model or cfg.model
    task = args.task or cfg.task
    embedded = model is None
    if embedded:
        from lightx2v.models.wan.tiny import embedded_checkpoint

        task = task or "i2v"
        for k, v in EMBEDDED_DEFAULTS.items():
            if k not in cfg.request_keys:
                setattr(req, k, v)
        print(
            f"lx2v: no --model given: using the embedded tiny {task.upper()} model. Its weights are "
            "RANDOM, so the video is noise; it shows the pipeline works end to end. Pass "
            "--model DIR with a real Wan2.1 checkpoint for real videos.",
            file=sys.stderr,
        )
        model = str(embedded_checkpoint(task))
    if args.resolution:
        for k, v in RESOLUTIONS[args.resolution].items():
            setattr(req, k, v)
    if args.preset:
        preset = RUN_PRESETS[args.preset]
        for k, v in preset.get("request", {}).items():
            setattr(req, k, v)
        for k, v in preset.get("runtime", {}).items():
            setattr(rt, k, v)
    overrides = {
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "image": args.image,
        "frames": args.frames, "steps": args.steps, "guidance": args.guidance,
        "shift": args.shift, "seed": args.seed, "sampler": args.sampler, "fps": args.fps,
        "teacache": args.teacache, "teacache_variant": args.teacache_variant,
    }  # fmt: skip
    for k, v in overrides.items():
        if v is not None:
            setattr(req, k, v)
    if args.size:
        req.width, req.height = args.size
    if args.device:
        rt.device = args.device
    if args.dtype:
        rt.dtype = args.dtype
    if args.cfg_sequential or args.cfg_batched:
        rt.cfg_batch = args.cfg_batched
    if args.vae_tiling is not None:
        rt.vae_tiling = args.vae_tiling
    if args.compile is not None:
        rt.compile = args.compile
    if args.offload:
        rt.offload = args.offload
    if args.max_vram is not None:
        rt.max_vram = args.max_vram
    if args.save_frames:
        rt.save_frames = args.save_frames
    if args.lora:
        rt.loras = [*rt.loras, *args.lora]
    if args.output == "":
        raise LX2VError("-o/--output is empty: give a .mp4 path")
    output = args.output or cfg.output
    if args.attention:
        rt.attention = args.attention
    if args.quant:
        rt.quant = args.quant
    if args.attention_exact_steps is not None:
        if args.attention_exact_steps < 0:
            raise LX2VError(f"--attention-exact-steps {args.attention_exact_steps}: must be >= 0")
        rt.attention_exact_steps = args.attention_exact_steps

    # Everything checkable is checked before any weight is loaded.
    check_output_path(output)
    rt.validate()
    from lightx2v.ops.attention import set_attention_backend

    set_attention_backend(rt.attention)
    from lightx2v.models.wan.formats import LX2V, open_checkpoint

    ckpt = open_checkpoint(model)
    if task and task != ckpt.task:
        raise LX2VError(f"--task {task} but {ckpt.root} holds a {ckpt.task.upper()} model")
    if ckpt.layout == LX2V and rt.quant not in ("none", ckpt.quant_scheme):
        raise LX2VError(
            f"{ckpt.root} is already converted ({ckpt.quant_scheme}); --quant {rt.quant} cannot "
            f"change that: convert the source again with --quant {rt.quant}"
        )
    if embedded and ckpt.task == "i2v" and req.image is None:
        req.image = demo_image(req.height, req.width)
    from lightx2v.models.wan.lora import parse_lora_args

    parse_lora_args(rt.loras)  # a missing LoRA file → error now, not after loading the model
    from lightx2v.schedule import is_step_distilled

    if is_step_distilled(req.sampler):  # unset steps/guidance are no user choice to warn about
        given = cfg.request_keys
        if args.guidance is None and "guidance" not in given:
            req.guidance = 1.0
        if args.steps is None and "steps" not in given:
            req.steps = None
    req = WanPipeline.resolve_request(req)
    req.validate(ckpt.task)
    if isinstance(req.image, str):
        from lightx2v.io import load_image

        load_image(req.image)  # unreadable image → error now, not after loading 30 GB
    return ckpt, req, rt, output


def _execute_run(args, ckpt, req, rt, output, parallel: bool) -> int:
    from lightx2v.pipeline import WanPipeline

    if args.quiet:  # also the loading bars of the encoder/VAE libraries
        import diffusers.utils.logging
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.disable_progress_bar()
    rank0 = True
    if parallel:
        from lightx2v.runtime import launch

        groups, device = launch.setup_parallel(
            ckpt.arch.num_heads, args.gpus, args.ulysses, args.cfg_parallel,
            uses_cfg=req.guidance != 1.0,
        )  # fmt: skip
        pipe = launch.ParallelWanPipeline(ckpt, rt, groups, device)
        rank0 = launch.is_rank0()
    else:
        pipe = WanPipeline(ckpt, rt)
    if rank0:
        print(f"lx2v: {ckpt.task.upper()} {ckpt.layout} checkpoint {ckpt.root} on {pipe.device} "
              f"({str(pipe.dtype).removeprefix('torch.')}), {req.width}x{req.height}, "
              f"{req.frames} frames, {req.steps} steps", file=sys.stderr)  # fmt: skip
    result = pipe.generate(req, progress=not args.quiet and rank0)
    if not rank0:  # only the first rank writes the video
        return 0
    out = result.save(output, rt.save_frames)
    print(f"lx2v: wrote {out} ({req.frames} frames, {req.width}x{req.height}, {req.fps} fps)")
    print(f"lx2v: {result.summary()}")
    return 0


def cmd_convert(args) -> int:
    from lightx2v.quant.convert import convert

    try:
        text = args.keep_high_precision
        keep = [] if text is None else [int(b) for b in text.split(",")]
    except ValueError:
        raise LX2VError(
            f"--keep-high-precision {args.keep_high_precision!r}: expected block indices like 0,39"
        ) from None
    out = convert(args.model, args.out, quant=args.quant, keep_high_precision=keep,
                  force=args.force, report=args.report, progress=True)  # fmt: skip
    print(f"lx2v: wrote {out}")
    return 0


def cmd_verify(args) -> int:
    from lightx2v.quant.layout import verify

    verify(args.path)
    print(f"lx2v: {args.path}: every file matches its manifest hash")
    return 0


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args) -> int:
    import torch

    from lightx2v.ops.attention import attention_backend, available_attention_backends

    print(f"lightx2v {__version__}  python {platform.python_version()}  {platform.platform()}")
    for pkg in ("torch", "triton", "diffusers", "transformers", "safetensors", "tokenizers", "av"):
        print(f"  {pkg:<13} {_version(pkg)}")
    print(f"  cuda (torch)  {torch.version.cuda or 'none (CPU build)'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            print(f"  gpu {i}: {prop.name}, compute capability {prop.major}.{prop.minor}, "
                  f"{prop.total_memory / 2**30:.0f} GiB")  # fmt: skip
    else:
        print("  gpu: none")
    print("optional backends (found / not found):")
    for mod in ("sageattention", "flash_attn", "sgl_kernel", "flashinfer"):
        found = importlib.util.find_spec(mod) is not None
        print(f"  {mod:<13} {'found' if found else 'not found'}")
    ext = importlib.util.find_spec("lightx2v._C") is not None
    print(f"lightx2v._C (CUDA ops): {'built' if ext else 'not built (pure-Python install)'}")
    print(
        f"attention: active {attention_backend()}; available {', '.join(available_attention_backends())}"
    )
    from lightx2v.ops.dispatch import kernel_report
    from lightx2v.quant.linear import available_backends

    rep = kernel_report()
    why = f" ({rep['reason']})" if rep["reason"] else ""
    print(f"fused ops ({', '.join(rep['ops'])}): {rep['backend']}{why}")
    print(f"FP8 GEMM epilogues (GELU, gated residual): {rep['fp8_gemm_epilogues']}")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for scheme in ("fp8", "int8"):
        print(f"{scheme} linear backends on {dev}: {', '.join(available_backends(scheme, dev))}")
    return 0


def cmd_bench(args) -> int:
    from lightx2v.bench import main_bench

    return main_bench(args)


COMMANDS = {
    "run": cmd_run,
    "convert": cmd_convert,
    "verify": cmd_verify,
    "info": cmd_info,
    "bench": cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # for re-launching under torchrun
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="lx2v: %(message)s", stream=sys.stderr)  # fmt: skip
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[args.command](args)
    except LX2VError as e:
        print(f"lx2v: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lx2v: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            print("lx2v: error: GPU out of memory; try a smaller --size or --frames, "
                  "--cfg-sequential, --vae-tiling, or a converted FP8 checkpoint", file=sys.stderr)  # fmt: skip
            return 3
        if isinstance(e, (RuntimeError, MemoryError)) and (
            isinstance(e, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(e)
        ):
            print("lx2v: error: out of host (CPU) memory; try a smaller --size or --frames",
                  file=sys.stderr)  # fmt: skip
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
