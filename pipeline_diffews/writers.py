"""Writing masks, overlays and videos atomically: to a temporary file beside the target, then `os.replace`.

A run that is interrupted leaves either a complete output or none (at worst a hidden `.<name>.<pid>.tmp<ext>` file),
so `--resume` can trust every output that exists.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np
import PIL.Image

OVERLAY_COLOR = (255, 32, 32)
OVERLAY_ALPHA = 0.5
VIDEO_CODECS = ("libx264", "h264", "mpeg4")


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path beside `path` (same extension); on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def mask_to_image(mask: np.ndarray) -> PIL.Image.Image:
    """bool [H, W] -> 8-bit grayscale image, 255 = object, 0 = background."""
    return PIL.Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255, mode="L")


def label_map_to_image(label_map: np.ndarray, palette: list[int]) -> PIL.Image.Image:
    """Class ids uint8 [H, W] -> palette ("P") image; palette: 768 ints, the RGB colour of ids 0..255."""
    image = PIL.Image.fromarray(np.asarray(label_map, dtype=np.uint8))
    image.putpalette(palette)
    return image


def overlay(image: PIL.Image.Image, mask: np.ndarray, color: tuple[int, int, int] = OVERLAY_COLOR,
            alpha: float = OVERLAY_ALPHA) -> PIL.Image.Image:
    """The image with the object tinted: pixels where mask [H, W] is True become (1 - alpha) * pixel + alpha * color."""
    return _tint(image, np.asarray(mask, dtype=bool), np.asarray(color, dtype=np.float32), alpha)


def overlay_classes(image: PIL.Image.Image, label_map: np.ndarray, palette: list[int],
                    alpha: float = OVERLAY_ALPHA) -> PIL.Image.Image:
    """The image with each class tinted by its colour: a pixel of class k > 0 (label_map [H, W]) becomes
    (1 - alpha) * pixel + alpha * palette colour k; background (0) is left as it is."""
    label_map = np.asarray(label_map)
    colors = np.asarray(palette, dtype=np.float32).reshape(-1, 3)
    mask = label_map > 0
    return _tint(image, mask, colors[label_map[mask]], alpha)


def _tint(image: PIL.Image.Image, mask: np.ndarray, colors: np.ndarray, alpha: float) -> PIL.Image.Image:
    """colors: one RGB [3] for every masked pixel, or [M, 3] for the M pixels where mask [H, W] is True."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    if mask.shape != pixels.shape[:2]:
        raise ValueError(f"mask is {mask.shape[::-1]} (WxH) but the image is {image.size}: they must match.")
    tinted = pixels.copy()
    tinted[mask] = (1 - alpha) * pixels[mask] + alpha * colors
    return PIL.Image.fromarray(np.round(tinted).astype(np.uint8), mode="RGB")


def save_png(image: PIL.Image.Image, path: str | Path) -> None:
    """Writes a PNG atomically."""
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


def save_json(data, path: str | Path) -> None:
    """Writes `data` as indented UTF-8 JSON, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_video(frames: Iterable[PIL.Image.Image], path: str | Path, fps: Fraction | float) -> int:
    """Encodes images (all of one size) as an H.264 (or MPEG-4) video, atomically. Returns the number of frames.

    The video is 4:2:0, so an odd width or height is padded with one black column or row.
    """
    import av

    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001000)
    count = 0
    with atomic_path(path) as temporary, av.open(str(temporary), mode="w", format=_container_format(path)) as container:
        stream = None
        for image in frames:
            image = image.convert("RGB")
            if stream is None:
                stream = _add_video_stream(container, rate, image.width + image.width % 2, image.height + image.height % 2)
            if image.size != (stream.width, stream.height):
                padded = PIL.Image.new("RGB", (stream.width, stream.height))
                padded.paste(image, (0, 0))
                image = padded
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
            count += 1
        if stream is None:
            raise ValueError(f"No frames to write to {path}.")
        for packet in stream.encode():
            container.mux(packet)
    return count


def _container_format(path: Path) -> str:
    return {".mkv": "matroska", ".mov": "mov", ".avi": "avi", ".webm": "webm"}.get(path.suffix.lower(), "mp4")


def _add_video_stream(container, rate: Fraction, width: int, height: int):
    import av

    for codec in VIDEO_CODECS:
        if codec not in av.codecs_available:
            continue
        options = {"crf": "18"} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "mpeg4":
            stream.bit_rate = 8_000_000
        return stream
    raise RuntimeError(f"PyAV has none of the video encoders {VIDEO_CODECS}.")
