"""Streaming safetensors I/O with bounded memory (used by the converter).

Why not `safetensors.safe_open` / `save_file`:
- safe_open memory-maps the file; every page a conversion touches stays resident (and is
  counted in the process's RSS) until the handle closes, so reading a 28 GB checkpoint
  through one handle grows RSS to 28 GB. Here tensors are read with plain positioned reads
  into buffers we own, a row range at a time.
- save_file needs every tensor of a shard in memory at once (and copies each to bytes).
  Here the header is computed from shapes first and the data is streamed after it.

The format (https://github.com/huggingface/safetensors): u64 little-endian header length,
a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}
padded with spaces to a multiple of 8, then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lightx2v.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    key: str  # the name inside the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the data in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def row_bytes(self) -> int:
        """Bytes per index of dim 0 (the whole tensor for a 0-d one)."""
        rows = self.shape[0] if self.shape else 1
        return self.nbytes // max(rows, 1)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, data start offset) of a safetensors file; CheckpointError if malformed."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path} is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path} is corrupt or truncated (header length {n})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is corrupt (safetensors header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt (safetensors header is not an object)")
    return header, 8 + n


def index_file(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file, checked against the file's size."""
    header, start = read_header(path)
    size = path.stat().st_size
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            b, e = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} is corrupt (bad header entry for {key!r})") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if e - b != math.prod(shape) * itemsize or start + e > size:
            raise CheckpointError(f"{path} is corrupt or truncated (tensor {key!r})")
        out[key] = TensorInfo(path, key, dtype, shape, start + b, start + e)
    return out


class RawReader:
    """Positioned reads of row ranges into fresh buffers; one open file per path."""

    def __init__(self):
        self._fds: dict[Path, int] = {}

    def read_rows(self, info: TensorInfo, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of a tensor (dim 0), in its dtype and shape."""
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        nbytes = (r1 - r0) * info.row_bytes
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        off, done = info.begin + r0 * info.row_bytes, 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], off + done)
            if got <= 0:
                raise CheckpointError(f"{info.file} ended early while reading {info.key!r}")
            done += got
        shape = (r1 - r0, *info.shape[1:]) if info.shape else ()
        return buf.view(info.dtype).reshape(shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass
class OutTensor:
    """One tensor of a shard being written: header facts plus how to make its bytes.

    `steps` run in order (in the producer threads); each is (read, fn): `read` is
    (TensorInfo, r0, r1) or None, fn maps the read rows (or None) to the next piece of this
    tensor's data, as any tensor whose bytes are the piece.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    steps: list[tuple[tuple[TensorInfo, int, int] | None, Callable]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def build_header(tensors: list[OutTensor], metadata: dict[str, str]) -> bytes:
    """The header bytes (length prefix included) for tensors stored in list order."""
    h: dict = {"__metadata__": metadata}
    off = 0
    for t in tensors:
        h[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [off, off + t.nbytes]}  # fmt: skip
        off += t.nbytes
    body = json.dumps(h, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body
