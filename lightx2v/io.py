"""Images in, video out.

Video is written with PyAV: its wheels ship FFmpeg with libx264 inside, so H.264 works on
a fresh machine with no system ffmpeg, and frames go to the encoder from memory (no
subprocess, no temporary PNGs). imageio-ffmpeg would do too but pipes raw frames to a
bundled ffmpeg binary, and its wheel is twice the size.

Every file is written to a temporary name in the target folder and renamed at the end,
so an interrupted run never leaves a half-written video.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lightx2v.errors import LX2VError
from lightx2v.fileio import atomic_file, writable_folder_problem


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file → [3, H, W] float32 in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise LX2VError(
            f"image {p} is a folder, not a file" if p.is_dir() else f"image not found: {p}"
        )
    try:
        with Image.open(p) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    except (UnidentifiedImageError, OSError) as e:
        raise LX2VError(f"cannot read image {p}: {e}") from None
    return torch.from_numpy(rgb).permute(2, 0, 1) / 127.5 - 1.0


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[3, h, w] → [3, height, width]: scale to cover, then centre-crop (keeps aspect)."""
    _, h, w = image.shape
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    out = torch.nn.functional.interpolate(
        image[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True
    )[0]
    top, left = (nh - height) // 2, (nw - width) // 2
    return out[:, top : top + height, left : left + width].clamp(-1, 1)


def demo_image(height: int = 480, width: int = 832) -> torch.Tensor:
    """The built-in demo image: a sunset-like gradient with a disc, [3, H, W] in [-1, 1]."""
    yy = torch.linspace(0, 1, height)[:, None].expand(height, width)
    xx = torch.linspace(0, 1, width)[None, :].expand(height, width)
    r = 0.9 - 0.3 * yy
    g = 0.3 + 0.4 * yy * (1 - xx)
    b = 0.2 + 0.6 * yy
    disc = (((xx - 0.65) * width / height) ** 2 + (yy - 0.4) ** 2) < 0.02
    rgb = torch.stack([r, g, b]).clone()
    rgb[:, disc] = torch.tensor([1.0, 0.85, 0.3])[:, None]
    return rgb * 2 - 1


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] → [F, H, W, 3] uint8."""
    v = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def check_output_path(path: str | Path) -> Path:
    """Fail before any work if the video cannot be written there."""
    p = Path(path)
    if p.suffix.lower() != ".mp4":
        raise LX2VError(f"output {p}: only .mp4 is supported")
    return check_output_folder(p)


def check_output_folder(path: str | Path) -> Path:
    """Fail before any work if a file cannot be written at `path`."""
    p = Path(path)
    if p.is_dir():
        raise LX2VError(f"output {p} is a directory")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise LX2VError(f"output folder does not exist: {folder}")
    if why := writable_folder_problem(folder):
        raise LX2VError(f"output folder is not writable: {folder} ({why})")
    return p


def write_video(frames: np.ndarray, path: str | Path, fps: int = 16, crf: int = 18) -> Path:
    """Write [F, H, W, 3] uint8 frames as H.264 yuv420p mp4, atomically."""
    import av

    path = check_output_path(path)
    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise LX2VError(f"yuv420p needs even frame sizes, got {w}x{h}")
    with atomic_file(path, ".mp4") as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    return path


def read_video(path: str | Path) -> tuple[np.ndarray, float, str, str]:
    """Decode a video → (frames [F, H, W, 3] uint8, fps, codec name, pixel format)."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        return frames, float(s.average_rate), s.codec_context.name, s.codec_context.pix_fmt


def write_png_frames(frames: np.ndarray, folder: str | Path) -> None:
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        target = folder / f"frame_{i:04d}.png"
        with atomic_file(target, ".png") as tmp:
            Image.fromarray(frame).save(tmp, format="PNG")
