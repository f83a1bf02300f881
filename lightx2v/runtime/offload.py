"""DiT block offload: weights in pinned host memory (or on disk), streamed to the GPU.

Modes (`--offload`):
  none   every weight resident on the GPU (what `load_dit` gives).
  block  the blocks' weights live in pinned host memory; two GPU slots hold the block that
         computes and the next one, copied on a side stream while the first computes.
  disk   as block, but the host copy is the checkpoint itself: reader threads read each
         block's tensors (positioned reads, no mmap) into a ring of pinned staging buffers,
         from which the side stream copies into the slots. For hosts with less RAM than the
         model. Converted checkpoints have one shard per block, so a block is one file.
  auto   as block, but keeps as many blocks resident as fit the card's free memory (or
         `--max-vram GB`), chosen at the first step when the token count is known; the
         streamed ones are spread evenly so each copy has the most compute to hide behind.

How (the hot path has no device-wide synchronisation and no pageable copy):
- Each block's parameters AND buffers (bf16 nn.Linear weights, FP8 weights + fp32 scales,
  norms, modulation) are laid out in one flat byte range, every tensor 256-byte aligned.
  The host copy of a block is that range inside a pinned arena; a GPU slot is a flat
  uint8 buffer as large as the largest block. A copy is one `cudaMemcpyAsync` per block.
- Binding a block = pointing its modules' tensors at typed views of the slot (cached), so
  the block's own code runs unchanged (eager or regionally compiled: same shapes, dtypes,
  strides, alignment). Outside their turn, streamed blocks point at their host copies
  (block/auto; calling one then fails loudly with a device mismatch) or at meta tensors
  (disk), never at a slot whose contents may have changed.
- Ordering, per slot s: copy into s waits (on the copy stream) for the event recorded
  after the last block that computed from s; the compute stream waits for the event
  recorded after the copy into s. Disk staging buffer j is refilled (by a reader thread)
  only after the event recorded after the copy out of j has completed.
- The transformation replaces `dit.blocks` with a `StreamedBlocks` ModuleList whose
  iteration does the above. Every loop over `dit.blocks` therefore streams: WanDiT.forward,
  DiTRunner.begin (the per-generation cross-attention k,v of every block: one pass of
  copies, ~0.3 s for 14B FP8) and run_blocks, and runners layered on them (TeaCache,
  sequence parallel). Nothing in the model knows about offload. The prefetch is cyclic:
  the last block of a step starts the copy of the first block of the next step.

Rules: apply offload last (after quantization, LoRA merging and `compile_blocks`): the
weights are treated as immutable from then on. Don't `.to()` an offloaded model; call
`remove_offload` first.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lightx2v.errors import CheckpointError, LX2VError
from lightx2v.fileio import atomic_file
from lightx2v.quant.stio import OutTensor, TensorInfo, build_header, index_file
from lightx2v.runtime.runner import DiTRunner

log = logging.getLogger("lightx2v")

MODES = ("none", "block", "disk", "auto")
ALIGN = 256  # bytes; every tensor in a slot starts on this boundary
GIB = 1 << 30


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _nbytes(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ---------------------------------------------------------------------------------------
# block layout: where each tensor of a block lives inside its flat byte range


@dataclass
class _Entry:
    module: nn.Module
    attr: str
    is_param: bool
    key: str  # state-dict name, e.g. "blocks.3.ffn.0.weight"
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class BlockLayout:
    """Every parameter and buffer of one block at an aligned offset in one byte range."""

    def __init__(self, block: nn.Module, prefix: str):
        self.entries: list[_Entry] = []
        off = 0
        seen: set[int] = set()
        for mname, mod in block.named_modules():
            for kind, table in (("p", mod._parameters), ("b", mod._buffers)):
                for attr, t in table.items():
                    if t is None:
                        continue
                    if id(t) in seen:
                        raise LX2VError(f"offload: tensor {prefix}{mname}.{attr} is shared")
                    seen.add(id(t))
                    key = f"{prefix}{mname + '.' if mname else ''}{attr}"
                    n = t.numel() * t.element_size()
                    self.entries.append(_Entry(mod, attr, kind == "p", key, t.dtype,
                                               tuple(t.shape), off, n))  # fmt: skip
                    off = _align(off + n)
        self.nbytes = max(off, ALIGN)

    def current(self) -> list[torch.Tensor]:
        """The tensors the modules hold now."""
        return [(e.module._parameters if e.is_param else e.module._buffers)[e.attr]
                for e in self.entries]  # fmt: skip

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of a uint8 tensor laid out like this block (as module-ready objects)."""
        out = []
        for e in self.entries:
            v = flat.narrow(0, e.offset, e.nbytes).view(e.dtype).view(e.shape)
            out.append(nn.Parameter(v, requires_grad=False) if e.is_param else v)
        return out

    def placeholders(self) -> list[torch.Tensor]:
        """Meta tensors of the right shapes/dtypes (resting state of disk-streamed blocks)."""
        out = []
        for e in self.entries:
            t = torch.empty(e.shape, dtype=e.dtype, device="meta")
            out.append(nn.Parameter(t, requires_grad=False) if e.is_param else t)
        return out

    def bind(self, tensors: list[torch.Tensor]) -> None:
        for e, t in zip(self.entries, tensors, strict=True):
            if e.is_param:
                e.module._parameters[e.attr] = t
            else:
                e.module._buffers[e.attr] = t


# ---------------------------------------------------------------------------------------
# stream/event backends: CUDA, and a host fake for the CPU tests


class _CudaSync:
    def __init__(self, device: torch.device):
        self.device = device
        self.copy_stream = torch.cuda.Stream(device=device)

    def event(self):
        return torch.cuda.Event()

    def _current(self):
        return torch.cuda.current_stream(self.device)

    def record(self, ev) -> None:
        ev.record(self._current())

    def wait(self, ev) -> None:
        self._current().wait_event(ev)

    def host_wait(self, ev) -> None:
        ev.synchronize()  # releases the GIL; used by reader threads, never the hot path

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after, done: list) -> None:
        """dst ← src on the copy stream, after event `after`; records every event of `done`."""
        with torch.cuda.stream(self.copy_stream):
            if after is not None:
                self.copy_stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            for ev in done:
                ev.record(self.copy_stream)

    def join(self) -> None:
        """The current stream waits for every copy issued so far (before freeing slots)."""
        self._current().wait_stream(self.copy_stream)


class _FakeEvent:
    __slots__ = ("seq",)

    def __init__(self):
        self.seq: int | None = None  # position in the fake copy queue; None: complete


class HostSync:
    """A CPU stand-in for _CudaSync with the same ordering contract, for tests.

    Compute is synchronous on the CPU. Copies form one FIFO queue (as one copy stream):
    `lazy=False` runs each copy when issued (catches a copy into a slot still in use),
    `lazy=True` runs copies only when an event after them is waited on (catches a missing
    wait: the block would compute from a slot whose copy has not happened).
    """

    def __init__(self, lazy: bool = False):
        self.lazy = lazy
        self._queue: list = []
        self._done = 0  # queue entries run so far
        self._lock = threading.RLock()
        self.copies = 0

    def event(self):
        return _FakeEvent()

    def record(self, ev) -> None:
        ev.seq = None

    def _run_to(self, seq: int) -> None:
        with self._lock:
            while self._done <= seq:
                self._queue[self._done]()
                self._queue[self._done] = None
                self._done += 1

    def wait(self, ev) -> None:
        if ev.seq is not None:
            self._run_to(ev.seq)

    host_wait = wait

    def copy(self, dst, src, after, done) -> None:
        with self._lock:
            self.copies += 1
            if not self.lazy:
                dst.copy_(src)
                for ev in done:
                    ev.seq = None
                return
            self._queue.append(lambda: dst.copy_(src))
            seq = len(self._queue) - 1
            for ev in done:
                ev.seq = seq

    def join(self) -> None:
        with self._lock:
            if self._queue:
                self._run_to(len(self._queue) - 1)


# ---------------------------------------------------------------------------------------
# host memory


def pack_arenas(sizes: list[int], pinned: bool) -> tuple[int, list[tuple[int, int]], list[int]]:
    """Place byte ranges (whole blocks) into arenas; returns (arena size, [(arena, offset)], arena sizes).

    torch's pinned allocator rounds every allocation up to a power of two, so arenas are
    powers of two; the arena size among the few candidates that wastes least is chosen
    (14B FP8 blocks of 404 MB: 5 per 2 GiB arena, 6% waste, instead of 27% one per block).
    """
    biggest = _next_pow2(max(sizes))
    best = None
    for k in range(4 if pinned else 1):
        arena = biggest << k
        place, used = [], [0]
        for n in sizes:
            if used[-1] + n > arena:
                used.append(0)
            place.append((len(used) - 1, used[-1]))
            used[-1] += _align(n)
        cost = sum(_next_pow2(u) if pinned else u for u in used)
        if best is None or cost < best[0]:
            best = (cost, arena, place, used)
    _, arena, place, used = best
    return arena, place, used


def _empty_host(nbytes: int, pinned: bool) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)


# ---------------------------------------------------------------------------------------
# reading safetensors tensors into memory we own


# Where one tensor's bytes are (file, byte range, stored dtype and shape): the converter's
# safetensors index entry.
TensorSource = TensorInfo


def index_safetensors(files, rename=lambda k: k) -> dict[str, TensorSource]:
    """Tensor name (after `rename`; None drops it) → TensorSource, over safetensors files."""
    out: dict[str, TensorSource] = {}
    for f in files:
        for raw, info in index_file(Path(f)).items():
            name = rename(raw)
            if name is not None:
                out[name] = info
    return out


class TensorReader:
    """Positioned reads (os.preadv, GIL released) into caller-owned CPU memory, by threads."""

    CHUNK = 32 << 20  # large tensors are read in pieces, in parallel

    def __init__(self, threads: int = 4):
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="lx2v-offload-read")
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"cannot open {path}: {e}") from None
            return fd

    def _pread(self, src: TensorSource, off: int, dst: memoryview) -> None:
        fd, done, n = self._fd(src.file), 0, len(dst)
        while done < n:
            try:
                got = os.preadv(fd, [dst[done:]], src.begin + off + done)
            except OSError as e:
                raise CheckpointError(f"cannot read {src.file}: {e}") from None
            if got <= 0:
                raise CheckpointError(f"{src.file} ended early (truncated checkpoint?)")
            done += got

    def read_tasks(self, src: TensorSource, dst_u8: torch.Tensor, dtype, shape, before=None):
        """Callables that fill dst_u8 (a CPU uint8 range) with the tensor, converting its
        dtype if the file's differs from `dtype`. `before()` runs first in each."""
        if tuple(src.shape) != tuple(shape):
            raise CheckpointError(
                f"{src.file}: tensor has shape {tuple(src.shape)}, expected {tuple(shape)}"
            )
        if src.dtype == dtype:
            mv = memoryview(dst_u8.numpy())
            n = src.end - src.begin
            tasks = []
            for off in range(0, n, self.CHUNK) if n else ():
                piece = mv[off : min(n, off + self.CHUNK)]

                def task(off=off, piece=piece):
                    if before is not None:
                        before()
                    self._pread(src, off, piece)

                tasks.append(task)
            return tasks
        if src.dtype in (torch.float8_e4m3fn, torch.int8) or dtype in (torch.float8_e4m3fn,
                                                                        torch.int8):  # fmt: skip
            raise CheckpointError(f"{src.file}: tensor is {src.dtype}, expected {dtype}")

        def convert():
            if before is not None:
                before()
            tmp = torch.empty(src.end - src.begin, dtype=torch.uint8)
            self._pread(src, 0, memoryview(tmp.numpy()))
            dst_u8.view(dtype).view(shape).copy_(tmp.view(src.dtype).view(shape))

        return [convert]

    def read(self, src: TensorSource, dtype, shape) -> torch.Tensor:
        """A fresh CPU tensor (synchronous)."""
        buf = torch.empty(_nbytes(dtype, shape), dtype=torch.uint8)
        for fn in self.read_tasks(src, buf, dtype, shape):
            fn()
        return buf.view(dtype).view(shape)

    def submit(self, tasks) -> list[Future]:
        return [self.pool.submit(fn) for fn in tasks]

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _wait_all(futures: list[Future]) -> None:
    err = None
    for f in futures:
        try:
            f.result()
        except BaseException as e:  # noqa: BLE001  (re-raised below, first one wins)
            err = err or e
    if err is not None:
        raise err


# ---------------------------------------------------------------------------------------
# where streamed blocks come from


class _PinnedSource:
    """Every block's bytes in pinned host arenas (block / auto modes)."""

    kind = "block"

    def __init__(self, layouts: list[BlockLayout], pinned: bool):
        _, place, used = pack_arenas([lay.nbytes for lay in layouts], pinned)
        self.arenas = [_empty_host(max(u, ALIGN), pinned) for u in used]
        self.host = [self.arenas[a].narrow(0, off, lay.nbytes)
                     for (a, off), lay in zip(place, layouts, strict=True)]  # fmt: skip
        self.host_bytes = sum(a.numel() for a in self.arenas)

    def fill_from_modules(self, i: int, layout: BlockLayout) -> None:
        for t, v in zip(layout.current(), layout.views(self.host[i]), strict=True):
            v.data.copy_(t.detach())

    def resting(self, i: int, layout: BlockLayout) -> list[torch.Tensor]:
        return layout.views(self.host[i])

    def set_order(self, order: list[int]) -> None:
        pass

    def fetch(self, sync, i: int, dst: torch.Tensor, after, done) -> None:
        sync.copy(dst, self.host[i], after, [done])

    def load_sync(self, i: int, dst: torch.Tensor) -> None:
        dst.copy_(self.host[i], non_blocking=dst.is_cuda)

    def close(self) -> None:
        self.arenas, self.host = [], []


@dataclass
class _Pending:
    block: int
    staging: int
    futures: list[Future]


class _DiskSource:
    """Blocks read from the checkpoint by reader threads into a ring of pinned staging buffers."""

    kind = "disk"

    def __init__(self, layouts: list[BlockLayout], sources: dict[str, TensorSource],
                 sync, pinned: bool, readers: int = 4, depth: int = 3):  # fmt: skip
        missing = [e.key for lay in layouts for e in lay.entries if e.key not in sources]
        if missing:
            raise CheckpointError(f"disk offload: no file holds {len(missing)} block tensor(s), "
                                  f"e.g. {', '.join(missing[:4])}")  # fmt: skip
        for lay in layouts:
            for e in lay.entries:
                s = sources[e.key]
                if tuple(s.shape) != e.shape:
                    raise CheckpointError(f"{s.file}: tensor {e.key} has shape {tuple(s.shape)}, "
                                          f"expected {e.shape}")  # fmt: skip
        self.layouts = layouts
        self.sources = sources
        self.sync = sync
        self.depth = max(2, depth)
        size = max(lay.nbytes for lay in layouts)
        self.staging = [_empty_host(size, pinned) for _ in range(self.depth)]
        self.host_bytes = size * self.depth
        self._staging_done = [sync.event() for _ in range(self.depth)]
        self._next_staging = 0
        self.reader = TensorReader(readers)
        self._order: list[int] = []
        self._cursor = 0
        self._ready: deque[_Pending] = deque()
        self.reads = 0  # blocks read (for tests/stats)

    def resting(self, i: int, layout: BlockLayout) -> list[torch.Tensor]:
        return layout.placeholders()

    def _read(self, i: int, j: int) -> list[Future]:
        ev = self._staging_done[j]
        gate = threading.Event()
        gate_lock = threading.Lock()

        def before():  # the staging buffer's last copy to the GPU must be done
            if gate.is_set():
                return
            with gate_lock:
                if not gate.is_set():
                    self.sync.host_wait(ev)
                    gate.set()

        tasks = []
        buf = self.staging[j]
        for e in self.layouts[i].entries:
            tasks += self.reader.read_tasks(self.sources[e.key], buf.narrow(0, e.offset, e.nbytes),
                                            e.dtype, e.shape, before)  # fmt: skip
        self.reads += 1
        return self.reader.submit(tasks)

    def _top_up(self) -> None:
        if not self._order:
            return
        while len(self._ready) < self.depth - 1:
            i = self._order[self._cursor % len(self._order)]
            self._cursor += 1
            j = self._next_staging
            self._next_staging = (j + 1) % self.depth
            self._ready.append(_Pending(i, j, self._read(i, j)))

    def _drain(self) -> None:
        while self._ready:
            p = self._ready.popleft()
            for f in p.futures:
                f.cancel()
            try:
                _wait_all([f for f in p.futures if not f.cancelled()])
            except Exception:  # noqa: BLE001  (a read we no longer need)
                pass

    def set_order(self, order: list[int]) -> None:
        self._drain()
        self._order = list(order)
        self._cursor = 0

    def _take(self, i: int) -> _Pending:
        if not self._ready or self._ready[0].block != i:
            self._drain()  # off the expected order (first use, plan change, broken loop)
            self._cursor = self._order.index(i) if i in self._order else 0
            if i not in self._order:
                j = self._next_staging
                self._next_staging = (j + 1) % self.depth
                self._ready.append(_Pending(i, j, self._read(i, j)))
            self._top_up()
        return self._ready.popleft()

    def fetch(self, sync, i: int, dst: torch.Tensor, after, done) -> None:
        p = self._take(i)
        try:
            _wait_all(p.futures)
        except BaseException:
            self._drain()
            raise
        n = self.layouts[i].nbytes
        sync.copy(dst, self.staging[p.staging].narrow(0, 0, n), after,
                  [done, self._staging_done[p.staging]])  # fmt: skip
        self._top_up()

    def load_sync(self, i: int, dst: torch.Tensor) -> None:
        """Read block i straight into dst (remove_offload); not on the hot path."""
        self._drain()
        lay = self.layouts[i]
        tmp = torch.empty(lay.nbytes, dtype=torch.uint8)
        tasks = []
        for e in lay.entries:
            tasks += self.reader.read_tasks(self.sources[e.key], tmp.narrow(0, e.offset, e.nbytes),
                                            e.dtype, e.shape)  # fmt: skip
        _wait_all(self.reader.submit(tasks))
        dst.copy_(tmp)

    def close(self) -> None:
        self._drain()
        self.reader.close()
        self.staging = []


# ---------------------------------------------------------------------------------------
# planning (auto)


def activation_bytes(arch, batch: int, tokens: int) -> int:
    """A generous bound on the GPU memory one block's forward needs beyond the weights.

    Counted from WanBlock.forward in eager mode: the fp32 residual in and out (8 B/elem of
    B·L·D), the fp32 and bf16 modulated input kept alive across the sub-layer (6), fused
    q/k/v (6), normed q/k (4), RoPE's fp32 temporaries (8), attention and projection outputs
    (4): ~36 bytes per B·L·D element; plus the FFN hidden layer and its GELU in bf16 and
    its FP8 copy (5 bytes per B·L·F). Compiled blocks need less.
    """
    return batch * tokens * (36 * arch.dim + 5 * arch.ffn_dim)


def spread(n: int, count: int) -> list[int]:
    """`count` indices of range(n), evenly spread (for the streamed blocks)."""
    if count <= 0:
        return []
    return sorted({min(n - 1, int((j + 0.5) * n / count)) for j in range(count)})


def plan_resident(block_bytes: list[int], avail: int, slot_bytes: int) -> set[int]:
    """Which blocks stay resident when `avail` bytes are free for block weights and slots.

    All of them if they fit (then no slots are needed); else the most that fit beside the
    two slots, with the streamed ones spread evenly over the stack.
    """
    n = len(block_bytes)
    if sum(block_bytes) <= avail:
        return set(range(n))
    room = avail - 2 * slot_bytes
    for streamed in range(1, n + 1):
        s = set(spread(n, streamed))
        resident = set(range(n)) - s
        if sum(block_bytes[i] for i in resident) <= room:
            return resident
    return set()


# ---------------------------------------------------------------------------------------
# the offloader


class BlockOffloader:
    """Owns where every block's weights are; `stream()` yields blocks ready to compute.

    Build it with `apply_offload`. `plan(batch, tokens)` (auto mode) picks the resident set.
    `trace`, when a list, receives ("copy", block, slot) / ("run", block, slot|None) in
    order (tests).
    """

    def __init__(self, blocks: nn.ModuleList, device: torch.device, source, layouts,
                 sync, *, auto: bool = False, max_vram_bytes: int | None = None):  # fmt: skip
        self.blocks = list(blocks._modules.values())
        self.device = device
        self.source = source
        self.layouts: list[BlockLayout] = layouts
        self.sync = sync
        self.auto = auto
        self.max_vram_bytes = max_vram_bytes
        self.block_bytes = [lay.nbytes for lay in layouts]
        self.slot_bytes = max(self.block_bytes)
        self.trace: list | None = None
        n = len(self.blocks)
        self._resting = [source.resting(i, lay) for i, lay in enumerate(layouts)]
        self._resident: dict[int, tuple[torch.Tensor, list]] = {}  # block → (buffer, views)
        self._streamed = list(range(n))
        self._slots: list[torch.Tensor] | None = None
        self._slot_block: list[int | None] = [None, None]
        self._slot_used = [0, 0]
        self._tick = 0
        self._views: dict[tuple[int, int], list] = {}
        self._copy_done = [sync.event(), sync.event()]
        self._compute_done = [sync.event(), sync.event()]
        self._active = False
        self._planned_for: tuple | None = None
        for i, lay in enumerate(layouts):
            lay.bind(self._resting[i])
        source.set_order(self._streamed)

    # -- bookkeeping --------------------------------------------------------------------

    @property
    def resident_blocks(self) -> list[int]:
        return sorted(self._resident)

    @property
    def streamed_blocks(self) -> list[int]:
        return list(self._streamed)

    def gpu_bytes(self) -> int:
        """Block weights on the GPU now: resident blocks plus the two slots."""
        slots = 0 if self._slots is None else 2 * self.slot_bytes
        return slots + sum(self.block_bytes[i] for i in self._resident)

    def _ensure_slots(self) -> None:
        if self._slots is None:
            self._slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
                           for _ in range(2)]  # fmt: skip
            self._slot_block = [None, None]
            # the slots' memory may have been in use by kernels still queued on this
            # stream: the first copies into them (on the copy stream) must wait for those
            for ev in self._compute_done:
                self.sync.record(ev)

    def _free_slots(self) -> None:
        if self._slots is not None:
            self.sync.join()
            self._slots = None
            self._views.clear()
            self._slot_block = [None, None]

    def _slot_views(self, s: int, i: int) -> list:
        key = (s, i)
        v = self._views.get(key)
        if v is None:
            v = self._views[key] = self.layouts[i].views(self._slots[s])
        return v

    def _fetch(self, i: int, avoid: int | None) -> int:
        for s in (0, 1):
            if self._slot_block[s] == i:
                return s
        free = [s for s in (0, 1) if s != avoid]
        s = min(free, key=lambda x: self._slot_used[x])
        self._slot_block[s] = i
        self._tick += 1
        self._slot_used[s] = self._tick
        dst = self._slots[s].narrow(0, 0, self.block_bytes[i])
        self.source.fetch(self.sync, i, dst, self._compute_done[s], self._copy_done[s])
        if self.trace is not None:
            self.trace.append(("copy", i, s))
        return s

    # -- the loop -----------------------------------------------------------------------

    def stream(self) -> Iterator[nn.Module]:
        if self._active:
            raise RuntimeError("offloaded blocks are already being iterated (nested loop?)")
        self._active = True
        try:
            yield from self._stream()
        finally:
            self._active = False

    def _stream(self) -> Iterator[nn.Module]:
        streamed = self._streamed
        if not streamed:
            for i, block in enumerate(self.blocks):
                if self.trace is not None:
                    self.trace.append(("run", i, None))
                yield block
            return
        self._ensure_slots()
        pos = {b: k for k, b in enumerate(streamed)}
        self._fetch(streamed[0], avoid=None)
        for i, block in enumerate(self.blocks):
            if i not in pos:
                if self.trace is not None:
                    self.trace.append(("run", i, None))
                yield block
                continue
            s = self._fetch(i, avoid=None)  # normally prefetched already: a lookup
            self.sync.wait(self._copy_done[s])
            self.layouts[i].bind(self._slot_views(s, i))
            self._tick += 1
            self._slot_used[s] = self._tick
            nxt = streamed[(pos[i] + 1) % len(streamed)]
            self._fetch(nxt, avoid=s)  # overlaps with this block's compute
            if self.trace is not None:
                self.trace.append(("run", i, s))
            try:
                yield block
            finally:
                self.sync.record(self._compute_done[s])
                self.layouts[i].bind(self._resting[i])

    # -- residency ----------------------------------------------------------------------

    def set_resident(self, resident: set[int]) -> None:
        """Make exactly `resident` blocks permanently GPU-resident; stream the rest."""
        if self._active:
            raise RuntimeError("cannot change residency while blocks are being iterated")
        if resident and self.source.kind == "disk":
            raise LX2VError("disk offload streams every block (no resident set)")
        for i in sorted(set(self._resident) - resident):
            self.layouts[i].bind(self._resting[i])
            del self._resident[i]
        if len(resident) == len(self.blocks):
            self._free_slots()  # before promoting, so the peak never holds both
        for i in sorted(resident - set(self._resident)):
            buf = torch.empty(self.block_bytes[i], dtype=torch.uint8, device=self.device)
            self.source.load_sync(i, buf)
            views = self.layouts[i].views(buf)
            self.layouts[i].bind(views)
            self._resident[i] = (buf, views)
        # a slot may still hold a block that is now resident: stale but harmless, as the
        # weights never change
        self._streamed = [i for i in range(len(self.blocks)) if i not in self._resident]
        self.source.set_order(self._streamed)

    def release(self) -> None:
        """Free every block weight on the GPU (resident blocks, slots), e.g. while the text
        encoder runs on a small card; auto's next plan() brings the resident set back."""
        self.set_resident(set())
        self._free_slots()
        self._planned_for = None

    def budget_bytes(self) -> int:
        """Bytes torch may hold on the device: free + already reserved (capped by max_vram)."""
        if self.device.type != "cuda":
            return self.max_vram_bytes if self.max_vram_bytes is not None else 1 << 62
        free, _total = torch.cuda.mem_get_info(self.device)
        have = free + torch.cuda.memory_reserved(self.device)
        return have if self.max_vram_bytes is None else min(have, self.max_vram_bytes)

    def plan(self, arch, batch: int, tokens: int, budget: int | None = None,
             allocated: int | None = None) -> None:  # fmt: skip
        """auto: choose the resident set for this batch and token count (cached per shape).

        budget: bytes the process may hold on the device (default: budget_bytes());
        allocated: bytes held now (default: torch.cuda.memory_allocated()), which counts the
        non-block weights, the cross-attention k,v cache, latents and the VAE.
        """
        if not self.auto or self._planned_for == (batch, tokens):
            return
        if budget is None:
            budget = self.budget_bytes()
        if allocated is None:
            allocated = (torch.cuda.memory_allocated(self.device)
                         if self.device.type == "cuda" else 0)  # fmt: skip
        fixed = allocated - self.gpu_bytes()
        act = activation_bytes(arch, batch, tokens)
        margin = max(GIB // 2, budget // 20)  # allocator fragmentation, cuBLAS workspaces
        avail = budget - fixed - act - margin
        resident = plan_resident(self.block_bytes, avail, self.slot_bytes)
        self.set_resident(resident)
        self._planned_for = (batch, tokens)
        log.info("offload auto: %d of %d blocks resident (%.1f GB), %d streamed; budget %.1f GB, "
                 "other %.1f GB, activations ~%.1f GB", len(resident), len(self.blocks),
                 sum(self.block_bytes[i] for i in resident) / 1e9, len(self._streamed),
                 budget / 1e9, fixed / 1e9, act / 1e9)  # fmt: skip

    # -- teardown -----------------------------------------------------------------------

    def restore(self) -> None:
        """Every block back on the device as ordinary tensors; frees slots and host copies.

        One block at a time, so the device never holds more than one extra block.
        """
        self.sync.join()
        for i, lay in enumerate(self.layouts):
            if i in self._resident:
                views = self._resident.pop(i)[1]
            else:
                buf = torch.empty(self.block_bytes[i], dtype=torch.uint8, device=self.device)
                self.source.load_sync(i, buf)
                views = lay.views(buf)
                del buf
            lay.bind([nn.Parameter(v.data.clone(), requires_grad=False)
                      if isinstance(v, nn.Parameter) else v.clone() for v in views])  # fmt: skip
            del views
        self._resting = []  # host views keep the pinned arenas alive
        self._free_slots()
        self.source.close()

    def close(self) -> None:
        self._free_slots()
        self.source.close()


class StreamedBlocks(nn.ModuleList):
    """dit.blocks after `apply_offload`: iterating it streams the blocks (see module doc).

    Indexing, len(), named_modules() and state_dict() see the blocks as they rest (host
    or meta tensors for streamed ones); only iteration binds them to the GPU.
    """

    def __iter__(self):
        off = self.__dict__.get("offloader")
        if off is None:
            return super().__iter__()
        return off.stream()


# ---------------------------------------------------------------------------------------
# applying it


def _sync_for(device: torch.device, sync):
    if sync is not None:
        return sync
    return _CudaSync(device) if device.type == "cuda" else HostSync()


def _retarget_quant_backends(dit: nn.Module, device: torch.device) -> None:
    """Quantized linears built for the CPU (ref backend) get the device's fastest backend."""
    try:
        from lightx2v.quant.linear import QuantLinear, select_backend
    except ImportError:
        return
    for m in dit.modules():
        if isinstance(m, QuantLinear) and m.backend == "ref" and device.type == "cuda":
            m.backend = select_backend(m.scheme, device)


def apply_offload(dit, mode: str, device, *, max_vram_gb: float | None = None,
                  sources: dict[str, TensorSource] | None = None, readers: int = 4,
                  staging: int = 3, sync=None, pinned: bool | None = None):  # fmt: skip
    """Offload a built WanDiT's blocks; returns the BlockOffloader (None for mode "none").

    The non-block layers (embeddings, head) go to `device`. block/auto: the blocks' weights
    move into pinned host memory (from wherever they are: GPU, CPU). disk: `sources` maps
    every block tensor's state-dict name to its bytes in a safetensors file
    (`index_safetensors`, `write_block_shards`); the blocks' current tensors are dropped.
    `sync`/`pinned` are for tests (a HostSync fake, unpinned memory).
    """
    if mode not in MODES:
        raise LX2VError(f"--offload {mode!r}: expected one of {', '.join(MODES)}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if mode == "none":
        return None
    if isinstance(dit.blocks, StreamedBlocks) and "offloader" in dit.blocks.__dict__:
        raise LX2VError("this model's blocks are already offloaded")
    if pinned is None:
        pinned = device.type == "cuda"
    sync = _sync_for(device, sync)
    for name, child in dit.named_children():
        if name != "blocks":
            child.to(device)
    for p in dit._parameters.values():
        if p is not None:
            p.data = p.data.to(device)
    _retarget_quant_backends(dit, device)
    blocks = dit.blocks
    layouts = [BlockLayout(b, f"blocks.{i}.") for i, b in enumerate(blocks)]
    if mode == "disk":
        if sources is None:
            raise LX2VError("--offload disk needs the checkpoint's tensor index (sources)")
        source = _DiskSource(layouts, sources, sync, pinned, readers=readers, depth=staging)
    else:
        source = _PinnedSource(layouts, pinned)
        for i, lay in enumerate(layouts):
            if any(t.is_meta for t in lay.current()):
                raise LX2VError(f"block {i} has no weights (meta): use --offload disk")
            source.fill_from_modules(i, lay)
            lay.bind(source.resting(i, lay))  # frees the block's original (GPU) tensors
    max_vram = None if max_vram_gb is None else int(max_vram_gb * 1e9)
    off = BlockOffloader(blocks, device, source, layouts, sync, auto=mode == "auto",
                         max_vram_bytes=max_vram)  # fmt: skip
    sb = StreamedBlocks(off.blocks)
    sb.offloader = off
    dit.blocks = sb
    dit.offloader = off
    log.info("offload %s: %d blocks, %.2f GB each (max), %.1f GB host memory%s", mode,
             len(layouts), off.slot_bytes / 1e9, source.host_bytes / 1e9,
             " pinned" if pinned else "")  # fmt: skip
    return off


def remove_offload(dit) -> None:
    """Undo apply_offload: every block back on the device, dit.blocks a plain ModuleList."""
    off = dit.__dict__.get("offloader")
    if off is None:
        return
    off.restore()
    dit.blocks = nn.ModuleList(off.blocks)
    del dit.offloader


def offloader_of(dit) -> BlockOffloader | None:
    return dit.__dict__.get("offloader")


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file (our own writer: FP8 dtypes need no particular safetensors version)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = build_header([OutTensor(k, t.dtype, tuple(t.shape), []) for k, t in cpu.items()],
                          {"format": "pt"})  # fmt: skip
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        for t in cpu.values():
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def write_block_shards(dit, folder: str | Path) -> dict[str, TensorSource]:
    """One safetensors file per block (as `lx2v convert` writes), for disk offload of a model
    built in memory (benchmarks, tests); returns the index for `apply_offload(sources=)`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, block in enumerate(dit.blocks._modules.values()):
        f = folder / f"block-{i:03d}.safetensors"
        write_safetensors(f, {f"blocks.{i}.{k}": v for k, v in block.state_dict().items()})
        files.append(f)
    return index_safetensors(files)


# ---------------------------------------------------------------------------------------
# loading a checkpoint straight into its offloaded form


def dit_bytes(dit) -> tuple[int, int]:
    """(block weights, other weights) in bytes."""
    blocks = sum(t.numel() * t.element_size() for b in dit.blocks._modules.values()
                 for t in [*b.parameters(), *b.buffers()])  # fmt: skip
    total = sum(t.numel() * t.element_size() for t in [*dit.parameters(), *dit.buffers()])
    return blocks, total - blocks


def _meta_dit(ckpt, dtype, device):
    """The DiT as load_dit builds it (quantized/fused for converted checkpoints), on meta."""
    from lightx2v.models.wan.dit import WanDiT
    from lightx2v.models.wan.formats import LX2V

    with torch.device("meta"):
        model = WanDiT(ckpt.arch)
    if ckpt.layout == LX2V:
        from lightx2v.quant.layout import read_manifest
        from lightx2v.quant.linear import quantize_dit

        m = getattr(ckpt, "manifest", None) or read_manifest(ckpt.root)
        keep = m.get("high_precision", {}).get("blocks", [])
        quantize_dit(model, m["quant"]["scheme"], keep_blocks=keep, device=device)
    return model.cast(dtype)


def _checkpoint_sources(ckpt) -> dict[str, TensorSource]:
    from lightx2v.models.wan.formats import DIFFUSERS, diffusers_to_official

    rename = diffusers_to_official if ckpt.layout == DIFFUSERS else (lambda k: k)
    return index_safetensors(ckpt.dit_files, rename)


def load_dit_offloaded(ckpt, dtype: torch.dtype, device, mode: str = "auto",
                       max_vram_gb: float | None = None, readers: int = 4):  # fmt: skip
    """Load a checkpoint's DiT ready to run under `mode` (the pipeline's one call).

    none (or auto on a CPU device): `load_dit` as it is. auto: resident as well when the whole DiT
    plus a 480P working set fits the budget (most 80 GB cards), else as block. block: the
    non-block layers are read to the device and every block straight from the files into
    pinned memory (no second host copy). disk: only the non-block layers are read; blocks
    are read per step. Returns the WanDiT; its offloader is `offloader_of(dit)`.
    """
    from lightx2v.models.wan.formats import load_dit

    if mode not in MODES:
        raise LX2VError(f"--offload {mode!r}: expected one of {', '.join(MODES)}")
    device = torch.device(device)
    if mode == "none" or (mode == "auto" and device.type != "cuda"):
        return load_dit(ckpt, dtype, device)
    model = _meta_dit(ckpt, dtype, device)
    if mode == "auto":
        blk, rest = dit_bytes(model)
        free, _ = torch.cuda.mem_get_info(device)
        budget = free + torch.cuda.memory_reserved(device)
        if max_vram_gb is not None:
            budget = min(budget, int(max_vram_gb * 1e9))
        work = activation_bytes(ckpt.arch, 2, 32760) + 2 * GIB  # 480P, CFG batch, k/v, margin
        if blk + rest + work <= budget:
            log.info(
                "offload auto: the DiT (%.1f GB) fits; all blocks resident", (blk + rest) / 1e9
            )
            return load_dit(ckpt, dtype, device)
    sources = _checkpoint_sources(ckpt)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    missing = sorted(set(expected) - set(sources))
    extra = sorted(set(sources) - set(expected))
    if missing or extra:
        raise CheckpointError(f"DiT weights in {ckpt.root} do not match the architecture: "
                              f"missing {missing[:6]}, unexpected {extra[:6]}")  # fmt: skip
    reader = TensorReader(readers)
    try:
        state = {}
        for name, ref in expected.items():
            if name.startswith("blocks."):
                continue
            state[name] = reader.read(sources[name], ref.dtype, tuple(ref.shape)).to(device)
        model.load_state_dict(state, strict=False, assign=True)
        model.eval().requires_grad_(False)
        if mode == "disk":
            apply_offload(model, "disk", device, sources=sources, readers=readers)
            return model
        # block / auto: read every block straight into its place in the pinned arenas
        layouts = [BlockLayout(b, f"blocks.{i}.") for i, b in enumerate(model.blocks)]
        pinned = _PinnedSource(layouts, pinned=device.type == "cuda")
        futures = []
        for i, lay in enumerate(layouts):
            for e in lay.entries:
                tasks = reader.read_tasks(sources[e.key], pinned.host[i].narrow(0, e.offset, e.nbytes),
                                          e.dtype, e.shape)  # fmt: skip
                futures += reader.submit(tasks)
        _wait_all(futures)
    finally:
        reader.close()
    return _apply_prefilled(model, mode, device, layouts, pinned, max_vram_gb)


def _apply_prefilled(dit, mode, device, layouts, source, max_vram_gb):
    """apply_offload for blocks whose pinned host copies were filled by the loader."""
    sync = _sync_for(device, None)
    for name, child in dit.named_children():
        if name != "blocks":
            child.to(device)
    max_vram = None if max_vram_gb is None else int(max_vram_gb * 1e9)
    off = BlockOffloader(dit.blocks, device, source, layouts, sync, auto=mode == "auto",
                         max_vram_bytes=max_vram)  # fmt: skip
    sb = StreamedBlocks(off.blocks)
    sb.offloader = off
    dit.blocks = sb
    dit.offloader = off
    return dit


# ---------------------------------------------------------------------------------------
# the runner


def _tokens(dit, x: torch.Tensor) -> int:
    pf, ph, pw = dit.arch.patch_size
    f, h, w = x.shape[-3:]
    return (f // pf) * (h // ph) * (w // pw)


class BlockOffloadRunner(DiTRunner):
    """DiTRunner for an offloaded DiT: plans the resident set (auto) at the first step.

    The streaming itself happens in `dit.blocks` (StreamedBlocks), so begin() (cross k,v
    of every block) and run_blocks() stream without being overridden, and mixins that wrap
    run_blocks (TeaCacheMixin) compose: `class X(TeaCacheMixin, BlockOffloadRunner)`.
    """

    def __init__(self, dit, *args, **kwargs):
        super().__init__(dit, *args, **kwargs)
        self.offloader = offloader_of(dit)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        if self.offloader is not None:
            self.offloader.plan(self.dit.arch, x.shape[0], _tokens(self.dit, x))
        return super().__call__(x, t, y)


def make_runner(dit) -> DiTRunner:
    """BlockOffloadRunner for an offloaded DiT, else a plain DiTRunner."""
    return BlockOffloadRunner(dit) if offloader_of(dit) is not None else DiTRunner(dit)
