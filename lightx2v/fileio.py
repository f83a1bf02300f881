"""Safe reading and atomic writing of files, shared by every loader and writer.

- `load_pth`: weights-only `torch.load` (never unpickles arbitrary objects), mmap'd.
- `atomic_file` / `atomic_dir`: write to a temporary sibling, rename into place on
  success, remove the temporary on failure: nothing is ever left half-written.
- `short_list`: names for a one-line error message.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lightx2v.errors import CheckpointError


def short_list(names: Iterable[str], limit: int = 8) -> str:
    """Sorted, truncated, comma-separated names for a one-line error."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def key_mismatch(missing: Iterable[str], unexpected: Iterable[str]) -> str | None:
    """'missing N key(s): ...; unexpected M key(s): ...' for a state-dict check, or None."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): {short_list(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): {short_list(unexpected)}")
    return "; ".join(parts) or None


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def writable_folder_problem(folder: str | Path) -> str | None:
    """None if a file can be created in `folder`, else why not. A probe file is made and
    removed at once: permission bits say nothing for root or on file systems like /proc."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".lx2v-probe-", dir=folder)
    except OSError as e:
        return e.strerror or type(e).__name__
    os.close(fd)
    os.unlink(probe)
    return None


def load_pth(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A plain {name: tensor} dict from a `.pth` file, read weights-only and mmap'd.

    Files in PyTorch's legacy (pre-1.6, non-zip) format cannot be mmap'd; they are read
    weights-only without mmap instead.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} checkpoint not found: {path}")
    try:
        try:
            sd = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            sd = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(_load_error(err, what, path)) from err
    if not isinstance(sd, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise CheckpointError(f"{what} checkpoint {path} is not a plain dict of tensors")
    return sd


def _load_error(err: Exception, what: str, path: Path) -> str:
    """One line for a failed weights-only torch.load. torch's own message opens with advice
    to load with weights_only=False, which we never do: keep only its diagnosis."""
    text = str(err)
    if found := re.search(r"Unsupported global: GLOBAL (\S+)", text):
        return (f"{what} checkpoint {path} holds a non-tensor object ({found.group(1)}); "
                "refused (checkpoints are read weights-only, never unpickled)")  # fmt: skip
    if "Weights only load failed" in text:
        found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        detail = found.group(1).strip() if found else "unknown content"
        return f"cannot read {what} checkpoint {path}: not a tensor file torch can read ({detail})"
    return f"cannot read {what} checkpoint {path}: {first_line(err)}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(target: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `target`; it becomes `target` only on success."""
    target = Path(target)
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a normal file is not
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; it replaces `target` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a normal folder is not
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_torch_save(state: dict[str, torch.Tensor], target: str | Path) -> None:
    with atomic_file(target) as tmp:
        torch.save(state, tmp)
