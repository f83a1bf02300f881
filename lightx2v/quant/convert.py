"""`lx2v convert`: a Wan2.1 checkpoint (official or diffusers) → our layout, streamed.

Output (see layout.py for reading it back):

    DST/lx2v.json                    manifest: format version, arch, scheme, files + sha256 …
    DST/dit/block-000.safetensors    one shard per block: fused/quantized linears, norms …
    DST/dit/rest.safetensors         embeddings, time/text/image projections, head
    DST/text_encoder/ tokenizer/ vae/ [image_encoder/ image_processor/]   (diffusers-style)

Memory: nothing ever holds a whole tensor, let alone a block. Each shard is planned first
(names, dtypes, shapes → the safetensors header), then produced row-chunk by row-chunk
(CHUNK_BYTES of source at a time; per-output-channel quantization needs whole rows only)
through three threads joined by small bounded queues: read (positioned reads, no mmap) →
quantize → write + sha256. Peak RSS is the interpreter and torch plus a few chunks in
flight, independent of the model's size (well under the target "two largest tensors +
1 GB"; tests/test_convert.py measures it).

Safety: everything is written under DST.partial/ and renamed to DST at the end; each shard
is written to a .tmp file, fsynced, renamed, and recorded with its sha256 in
DST.partial/lx2v.progress.json, so an interrupted run resumes by re-hashing and reusing
the shards it finished (when the source fingerprint and options are unchanged).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import lightx2v
from lightx2v.config import WanArch
from lightx2v.errors import CheckpointError, LX2VError
from lightx2v.fileio import writable_folder_problem
from lightx2v.models.wan.formats import (
    DIFFUSERS,
    LX2V,
    Checkpoint,
    diffusers_to_official,
    open_checkpoint,
    open_safetensors,
)
from lightx2v.quant.fp8 import FP8_DTYPE, SCHEMES, quantize_rows_fp8, quantize_rows_int8
from lightx2v.quant.linear import block_linears
from lightx2v.quant.stio import OutTensor, RawReader, TensorInfo, build_header, index_file

log = logging.getLogger("lightx2v.quant")

FORMAT_VERSION = 1
MANIFEST = "lx2v.json"
PROGRESS = "lx2v.progress.json"
CHUNK_BYTES = 32 << 20  # source bytes per read/quantize step
QUEUE_DEPTH = 2  # chunks waiting between two stages
_HASH_BLOCK = 8 << 20

# test hook: called with the shard's relative path after each shard is durably written
_on_shard_written: Callable[[str], None] | None = None


def block_shard(i: int) -> str:
    return f"dit/block-{i:03d}.safetensors"


REST_SHARD = "dit/rest.safetensors"


# ---------------------------------------------------------------------------------------
# small utilities


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_BLOCK):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def source_fingerprint(ckpt: Checkpoint) -> str:
    """sha256 over the DiT files' sizes, safetensors headers, 16 × 64 KiB samples of each
    file's data and the config: cheap (no full read of tens of GB) and changes whenever
    the files are replaced, re-saved or edited in any but a contrived way."""
    h = hashlib.sha256()
    for cfg in (ckpt.root / "config.json", ckpt.root / "transformer" / "config.json"):
        if cfg.exists():
            h.update(cfg.read_bytes())
    for f in ckpt.dit_files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, size)))
            start = 8 + n
            for k in range(16):
                fh.seek(start + (size - start) * k // 16)
                h.update(fh.read(64 << 10))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# the source, indexed (no data read)


def index_source(ckpt: Checkpoint) -> dict[str, TensorInfo]:
    """Official-named DiT tensors → where they are, checked against the architecture."""
    from lightx2v.models.wan.dit import WanDiT

    rename = diffusers_to_official if ckpt.layout == DIFFUSERS else (lambda k: k)
    index: dict[str, TensorInfo] = {}
    unmapped = []
    for f in ckpt.dit_files:
        for raw, info in index_file(f).items():
            name = rename(raw)
            if name is None:
                unmapped.append(raw)
            else:
                index[name] = info
    if unmapped:
        raise CheckpointError(
            f"DiT weights in {ckpt.root} have keys with no meaning here: {', '.join(unmapped[:8])}"
        )
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in WanDiT(ckpt.arch).state_dict().items()}
    missing = sorted(set(expected) - set(index))
    extra = sorted(set(index) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:8])}")
        if extra:
            parts.append(f"unexpected {len(extra)} key(s): {', '.join(extra[:8])}")
        raise CheckpointError(f"DiT weights in {ckpt.root} do not match the architecture: "
                              + "; ".join(parts))  # fmt: skip
    for k, shape in expected.items():
        if index[k].shape != shape:
            raise CheckpointError(
                f"{index[k].file}: tensor {k} has shape {index[k].shape}, expected {shape}"
            )
    return index


# ---------------------------------------------------------------------------------------
# planning the shards


@dataclass
class Shard:
    rel: str
    tensors: list[OutTensor]
    metadata: dict[str, str]
    header: bytes = b""

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


@dataclass
class Plan:
    shards: list[Shard]
    quantized: list[str]  # names of quantized linears (module paths)
    high_precision: list[str]  # module path patterns kept in bf16/fp32
    errors: dict[str, list[float]] = field(default_factory=dict)  # name → [Σ err², Σ w²]


def _row_steps(info: TensorInfo, fn: Callable) -> list:
    per = max(1, CHUNK_BYTES // max(info.row_bytes, 1))
    return [((info, r0, min(r0 + per, info.rows)), fn) for r0 in range(0, info.rows, per)]


def _identity(x):
    return x


def _to_bf16(x):
    return x.to(torch.bfloat16)


def _quant_fn(scheme: str, scales: list, acc: list[float] | None):
    qrows = quantize_rows_fp8 if scheme == "fp8" else quantize_rows_int8

    def fn(x: torch.Tensor) -> torch.Tensor:
        q, s = qrows(x)
        scales.append(s)
        if acc is not None:
            w = x.float()
            acc[0] += (w - q.float() * s[:, None]).pow(2).sum().item()
            acc[1] += w.pow(2).sum().item()
        return q

    return fn


def _linear_tensors(name: str, infos_w, infos_b, scheme: str | None, acc) -> list[OutTensor]:
    """A (fused) linear: weight [(+ weight_scale)] [+ bias]; scheme None = plain bf16."""
    n = sum(i.shape[0] for i in infos_w)
    k = infos_w[0].shape[1]
    out = []
    if scheme is None:
        steps = [s for i in infos_w for s in _row_steps(i, _to_bf16)]
        out.append(OutTensor(f"{name}.weight", torch.bfloat16, (n, k), steps))
    else:
        scales: list[torch.Tensor] = []
        fn = _quant_fn(scheme, scales, acc)
        steps = [s for i in infos_w for s in _row_steps(i, fn)]
        qdtype = FP8_DTYPE if scheme == "fp8" else torch.int8
        out.append(OutTensor(f"{name}.weight", qdtype, (n, k), steps))

        def emit_scales(_):
            s = torch.cat(scales)
            scales.clear()
            return s

        out.append(OutTensor(f"{name}.weight_scale", torch.float32, (n,), [(None, emit_scales)]))
    if infos_b:
        dt = infos_b[0].dtype
        fn = _identity if all(i.dtype == dt for i in infos_b) else (lambda x, dt=dt: x.to(dt))
        steps = [s for i in infos_b for s in _row_steps(i, fn)]
        out.append(OutTensor(f"{name}.bias", dt, (n,), steps))
    return out


def _passthrough(name: str, info: TensorInfo) -> OutTensor:
    return OutTensor(name, info.dtype, info.shape, _row_steps(info, _identity))


def _pattern(name: str) -> str:
    """Tensor name → layer name for the manifest ("blocks.3.norm3.weight" → "blocks.*.norm3")."""
    if name.endswith((".weight", ".bias")):
        name = name.rsplit(".", 1)[0]
    parts = name.split(".")
    if parts[0] == "blocks":
        parts[1] = "*"
    return ".".join(parts)


def plan(arch: WanArch, index: dict[str, TensorInfo], scheme: str, keep: list[int],
         report: bool) -> Plan:  # fmt: skip
    meta = {"format": "pt", "lx2v_format_version": str(FORMAT_VERSION), "lx2v_quant": scheme}
    shards, quantized, hp = [], [], set()
    errors: dict[str, list[float]] = {}
    linears = block_linears(arch.is_i2v)
    for i in range(arch.num_layers):
        prefix = f"blocks.{i}."
        used: set[str] = set()
        tensors: list[OutTensor] = []
        q = scheme if scheme in ("fp8", "int8") and i not in keep else None
        for name, parts in linears.items():
            ws = [index[f"{prefix}{p}.weight"] for p in parts]
            bs = [index[f"{prefix}{p}.bias"] for p in parts if f"{prefix}{p}.bias" in index]
            used.update(f"{prefix}{p}.{s}" for p in parts for s in ("weight", "bias"))
            full = prefix + name
            acc = errors.setdefault(full, [0.0, 0.0]) if (report and q) else None
            tensors += _linear_tensors(full, ws, bs, q, acc)
            if q:
                quantized.append(full)
        for key in sorted(k for k in index if k.startswith(prefix) and k not in used):
            tensors.append(_passthrough(key, index[key]))
            hp.add(_pattern(key))
        shards.append(Shard(block_shard(i), tensors, {**meta, "lx2v_block": str(i)}))
    rest = [_passthrough(k, index[k]) for k in sorted(index) if not k.startswith("blocks.")]
    hp.update(_pattern(t.name) for t in rest)
    shards.append(Shard(REST_SHARD, rest, meta))
    for s in shards:
        s.header = build_header(s.tensors, s.metadata)
    return Plan(shards, quantized, sorted(hp), errors)


# ---------------------------------------------------------------------------------------
# the pipeline: read → quantize → write


class _End:
    """Marks the end of a shard's data in the queues."""


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _reader(shards: list[Shard], out: queue.Queue, stop: threading.Event) -> None:
    rr = RawReader()
    try:
        for shard in shards:
            for t in shard.tensors:
                for read, fn in t.steps:
                    data = rr.read_rows(*read) if read is not None else None
                    if not _put(out, (fn, data), stop):
                        return
            if not _put(out, _End, stop):
                return
        _put(out, None, stop)  # no more shards
    except BaseException as e:  # noqa: BLE001 - handed to the writer, re-raised there
        _put(out, _Failed(e), stop)
    finally:
        rr.close()


def _quantizer(inp: queue.Queue, out: queue.Queue, stop: threading.Event) -> None:
    try:
        while not stop.is_set():
            try:
                item = inp.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is None:
                return
            if item is _End or isinstance(item, _Failed):
                if not _put(out, item, stop) or isinstance(item, _Failed):
                    return
                continue
            fn, data = item
            with torch.no_grad():
                piece = fn(data)
            if not _put(out, piece.contiguous().reshape(-1).view(torch.uint8), stop):
                return
    except BaseException as e:  # noqa: BLE001
        _put(out, _Failed(e), stop)


def _write_shards(shards: list[Shard], root: Path, done: Callable[[Shard, str], None],
                  pbar) -> None:  # fmt: skip
    stop = threading.Event()
    q1: queue.Queue = queue.Queue(QUEUE_DEPTH)
    q2: queue.Queue = queue.Queue(QUEUE_DEPTH)
    threads = [
        threading.Thread(target=_reader, args=(shards, q1, stop), daemon=True, name="lx2v-read"),
        threading.Thread(target=_quantizer, args=(q1, q2, stop), daemon=True, name="lx2v-quant"),
    ]
    for t in threads:
        t.start()
    try:
        for shard in shards:
            path = root / shard.rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            h = hashlib.sha256(shard.header)
            written = len(shard.header)
            with open(tmp, "wb") as f:
                f.write(shard.header)
                while True:
                    item = q2.get()
                    if item is _End:
                        break
                    if isinstance(item, _Failed):
                        raise item.exc
                    mv = memoryview(item.numpy())
                    f.write(mv)
                    h.update(mv)
                    written += len(mv)
                    if pbar is not None:
                        pbar.update(len(mv))
                f.flush()
                os.fsync(f.fileno())
            if written != shard.size:
                raise RuntimeError(f"{shard.rel}: wrote {written} bytes, planned {shard.size}")
            os.replace(tmp, path)
            done(shard, h.hexdigest())
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)


# ---------------------------------------------------------------------------------------
# components (encoders, VAE, tokenizers) in the diffusers sub-layout


def convert_components(ckpt: Checkpoint, root: Path) -> dict[str, str]:
    """Write what the pipeline needs besides the DiT; returns {component: relative path}.

    A diffusers source already stores safetensors folders: they are copied file by file
    (convert() has checked them first: check_component_files). An official source's .pth
    encoders and VAE are loaded with the encoders/VAE modules and saved as safetensors
    folders.
    """
    names = _component_names(ckpt)
    if ckpt.component_layout == DIFFUSERS:
        out = {}
        for name in names:
            srcdir = getattr(ckpt, name)
            if srcdir is None or not srcdir.is_dir():
                log.warning("source has no %s/; the converted checkpoint will lack it", name)
                continue
            _copy_tree(srcdir, root / name)
            out[name] = name
        return out
    return _components_from_official(ckpt, root, names)


_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".pkl", ".ckpt")


def _component_names(ckpt: Checkpoint) -> list[str]:
    names = ["text_encoder", "tokenizer", "vae"]
    return names + ["image_encoder", "image_processor"] if ckpt.arch.is_i2v else names


def check_component_files(ckpt: Checkpoint) -> None:
    """Before any work, for a diffusers source: its component folders hold no pickle file
    and every .safetensors file opens (header and length agree), so a conversion cannot
    fail late or record a corrupt file in the manifest."""
    if ckpt.component_layout != DIFFUSERS:
        return  # official .pth components are loaded (weights-only) when converted
    for name in _component_names(ckpt):
        folder = getattr(ckpt, name)
        if folder is None or not folder.is_dir():
            continue
        for p in sorted(folder.rglob("*")):
            if p.suffix in _PICKLE_SUFFIXES:
                raise CheckpointError(
                    f"{p} is a pickle file; convert the source to safetensors first "
                    "(the converted layout holds no pickle)"
                )
            if p.suffix == ".safetensors":
                with open_safetensors(p):
                    pass


def _copy_tree(src: Path, dst: Path) -> None:
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if p.is_dir():
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target)


def _components_from_official(ckpt: Checkpoint, root: Path, names: list[str]) -> dict[str, str]:
    """Official .pth encoders/VAE → diffusers-style safetensors folders, through the
    loaders of encoders.py / vae.py (torch.load(weights_only=True) inside them)."""
    from lightx2v.models.wan import encoders, vae

    out: dict[str, str] = {}
    if ckpt.text_encoder.exists() and ckpt.tokenizer.exists():
        te = encoders.TextEncoder.from_official(ckpt.text_encoder, ckpt.tokenizer,
                                                dtype=torch.bfloat16)  # fmt: skip
        te.model.save_pretrained(root / "text_encoder", safe_serialization=True)
        te.tokenizer.save_pretrained(root / "tokenizer")
        out.update(text_encoder="text_encoder", tokenizer="tokenizer")
        del te
    else:
        log.warning("source lacks the text encoder or tokenizer; not converted")
    if ckpt.vae.exists():
        v = vae.WanVAE.from_official(ckpt.vae)
        v.model.save_pretrained(root / "vae", safe_serialization=True)
        out["vae"] = "vae"
        del v
    else:
        log.warning("source lacks the VAE; not converted")
    if ckpt.arch.is_i2v:
        if ckpt.image_encoder is not None and ckpt.image_encoder.exists():
            _clip_from_official(ckpt.image_encoder, root)
            out.update(image_encoder="image_encoder", image_processor="image_processor")
        else:
            log.warning("source lacks the image encoder; not converted")
    return out


def _clip_from_official(pth: Path, root: Path) -> None:
    """The whole CLIP vision tower (ImageEncoder drops its last block when it loads, so
    the diffusers folder must hold all of them) and a CLIPImageProcessor config."""
    from lightx2v.models.wan import encoders as E

    model = E.load_official_clip_vision(pth, torch.float16)
    config = model.config
    model.save_pretrained(root / "image_encoder", safe_serialization=True)
    size = config.image_size
    (root / "image_processor").mkdir(parents=True, exist_ok=True)
    (root / "image_processor" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True,
        "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
        "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(E.CLIP_MEAN),
        "image_std": list(E.CLIP_STD), "do_convert_rgb": True,
    }, indent=1))  # fmt: skip


# ---------------------------------------------------------------------------------------
# the entry point


def _job_key(ckpt: Checkpoint, fingerprint: str, quant: str, keep: list[int]) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "tool_version": lightx2v.__version__,
        "source_fingerprint": fingerprint,
        "quant": quant,
        "keep_high_precision": keep,
        "chunk_bytes": CHUNK_BYTES,
    }


def _load_progress(partial: Path, job: dict, force: bool) -> dict[str, dict]:
    """Finished shards recorded by an earlier, interrupted run of the same job."""
    prog_path = partial / PROGRESS
    if not partial.exists():
        partial.mkdir(parents=True)
        return {}
    try:
        prog = json.loads(prog_path.read_text())
    except (OSError, json.JSONDecodeError):
        prog = None
    if prog is None:
        if any(partial.iterdir()) and not force:
            raise LX2VError(
                f"{partial} exists but is not a conversion in progress; remove it or pass --force"
            )
        shutil.rmtree(partial)
        partial.mkdir(parents=True)
        return {}
    if prog.get("job") != job:
        log.warning("%s is from a conversion with other inputs or options; starting over", partial)
        shutil.rmtree(partial)
        partial.mkdir(parents=True)
        return {}
    return prog.get("done", {})


def convert(
    src: str | Path,
    dst: str | Path,
    quant: str = "fp8",
    keep_high_precision: list[int] | tuple[int, ...] = (),
    force: bool = False,
    report: bool = False,
    progress: bool = True,
    components: bool = True,
) -> Path:
    """Convert the checkpoint at `src` into our layout at `dst`; returns dst.

    quant: "fp8" | "int8" | "bf16" (bf16: fused, unquantized). keep_high_precision: block
    indices whose linears stay bf16. force: replace an existing dst. report: print the
    per-layer weight error table (and store its summary in the manifest).
    """
    from tqdm import tqdm

    if quant not in SCHEMES:
        raise LX2VError(f"--quant {quant!r}: expected one of {', '.join(SCHEMES)}")
    t0 = time.perf_counter()
    ckpt = open_checkpoint(src)
    if ckpt.layout == LX2V:
        raise LX2VError(f"{src} is already a converted checkpoint")
    dst = Path(dst).expanduser()
    d, s = dst.resolve(), ckpt.root.resolve()
    if d == s or d in s.parents or s in d.parents:
        raise LX2VError(f"--out {dst} must be outside --model {src} (and not contain it)")
    if dst.exists() and not force:
        raise LX2VError(f"{dst} already exists; pass --force to overwrite it")
    if dst.exists() and not dst.is_dir():
        raise LX2VError(f"--out {dst} exists and is not a directory")
    here = dst.absolute().parent  # missing folders are created: probe the deepest existing one
    while not here.exists():
        here = here.parent
    if why := writable_folder_problem(here) if here.is_dir() else "not a folder":
        raise LX2VError(f"--out {dst}: cannot write in {here} ({why})")
    if dst.exists() and any(dst.iterdir()) and not (dst / MANIFEST).is_file():
        # --force replaces a converted checkpoint, never an arbitrary folder
        raise LX2VError(f"--out {dst} is a non-empty folder that is not a converted checkpoint; "
                        "refusing to replace it")  # fmt: skip
    keep = sorted(set(int(i) for i in keep_high_precision))
    bad = [i for i in keep if not 0 <= i < ckpt.arch.num_layers]
    if bad:
        raise LX2VError(
            f"--keep-high-precision: block(s) {bad} out of range 0..{ckpt.arch.num_layers - 1}"
        )
    if quant == "bf16":
        keep = []

    if components:
        check_component_files(ckpt)
    index = index_source(ckpt)
    fingerprint = source_fingerprint(ckpt)
    the_plan = plan(ckpt.arch, index, quant, keep, report)
    partial = dst.with_name(dst.name + ".partial")
    job = _job_key(ckpt, fingerprint, quant, keep)
    recorded = _load_progress(partial, job, force)

    done: dict[str, dict] = {}
    todo: list[Shard] = []
    for shard in the_plan.shards:
        rec = recorded.get(shard.rel)
        path = partial / shard.rel
        if (rec and path.exists() and path.stat().st_size == rec["size"] == shard.size
                and sha256_file(path) == rec["sha256"]):  # fmt: skip
            done[shard.rel] = rec
        else:
            todo.append(shard)
    if done:
        log.info("resuming: %d of %d shards reused", len(done), len(the_plan.shards))

    def record(shard: Shard, digest: str) -> None:
        done[shard.rel] = {"size": shard.size, "sha256": digest}
        atomic_write_json(partial / PROGRESS, {"job": job, "done": done})
        if _on_shard_written is not None:
            _on_shard_written(shard.rel)

    total = sum(s.size for s in todo)
    pbar = tqdm(total=total, unit="B", unit_scale=True, desc="convert DiT", disable=not progress)
    try:
        _write_shards(todo, partial, record, pbar)
    finally:
        pbar.close()
    dit_s = time.perf_counter() - t0

    comps = convert_components(ckpt, partial) if components else {}

    files = dict(done)
    for name in comps.values():
        for p in sorted((partial / name).rglob("*")):
            if p.is_file():
                rel = str(p.relative_to(partial))
                files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}

    summary = None
    if report:
        from lightx2v.quant.report import format_table, summarize

        errs = {k: (v[0] / v[1]) ** 0.5 if v[1] > 0 else 0.0 for k, v in the_plan.errors.items()}
        summary = summarize(errs, quant)
        print(format_table(errs, summary))

    manifest = {
        "format": "lx2v",
        "format_version": FORMAT_VERSION,
        "tool": {"name": "lightx2v", "version": lightx2v.__version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "arch": ckpt.arch.to_json(),
        "quant": {
            "scheme": quant,
            "weight": {
                "fp8": "float8_e4m3fn, per-output-channel fp32 scale = amax/448",
                "int8": "int8 in [-127, 127], per-output-channel fp32 scale = amax/127",
                "bf16": "bfloat16",
            }[quant],
            "activation": "per-token dynamic" if quant != "bf16" else "none",
            "fused": {k: list(v) for k, v in block_linears(ckpt.arch.is_i2v).items()},
            "quantized_layers": len(the_plan.quantized),
        },
        "high_precision": {"blocks": keep, "layers": the_plan.high_precision},
        "dit": {
            "blocks": [block_shard(i) for i in range(ckpt.arch.num_layers)],
            "rest": REST_SHARD,
        },
        "components": {"layout": DIFFUSERS, **comps} if comps else {},
        "source": {
            "path": str(ckpt.root.resolve()),
            "layout": ckpt.layout,
            "fingerprint": fingerprint,
        },  # fmt: skip
        "files": files,
    }
    if summary is not None:
        manifest["report"] = summary
    atomic_write_json(partial / MANIFEST, manifest)
    (partial / PROGRESS).unlink(missing_ok=True)
    _fsync_dir(partial)

    if dst.exists():  # force: swap in the new one, then delete the old
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
        old.rmdir()  # a fresh name of our own: never an existing user folder
        os.replace(dst, old)
        os.replace(partial, dst)
        shutil.rmtree(old)
    else:
        os.replace(partial, dst)
    _fsync_dir(dst.parent)
    size = sum(v["size"] for v in files.values())
    log.info("converted %s → %s (%s, %.2f GB) in %.1f s (DiT %.1f s)", ckpt.root, dst, quant,
             size / 1e9, time.perf_counter() - t0, dit_s)  # fmt: skip
    return dst


def verify(dst: str | Path) -> None:
    """Check every file listed in DST/lx2v.json against its size and sha256 (raises)."""
    from lightx2v.quant.layout import verify as _verify

    _verify(dst)


__all__ = ["convert", "verify", "FORMAT_VERSION", "MANIFEST"]
