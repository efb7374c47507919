"""Overlays (`overlay`, `overlay_classes`: the one way the command line and the demo draw results on images), and
writing masks, overlays and videos atomically: to a temporary file beside the target, then `os.replace`.

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
import PIL.ImageFilter

from .image_processor_diffews import IGNORE_INDEX, DiffewSImageProcessor

OVERLAY_COLOR = (255, 32, 32)
OVERLAY_ALPHA = 0.5
# RGB distance below which a tint is lost on the object's mean colour: the tint is then replaced (`contrasting_color`)
MIN_CONTRAST = 96.0
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


def overlay(image: PIL.Image.Image, mask: np.ndarray, color: tuple[int, int, int] = OVERLAY_COLOR,
            alpha: float = OVERLAY_ALPHA) -> PIL.Image.Image:
    """The image with the object (mask bool [H, W] True) tinted with `color` and outlined: see `overlay_classes`."""
    palette = [0, 0, 0, *color] + [0] * (768 - 6)
    return overlay_classes(image, np.asarray(mask, dtype=bool).astype(np.uint8), palette, alpha)


def overlay_classes(image: PIL.Image.Image, label_map: np.ndarray, palette: list[int] | None = None,
                    alpha: float = OVERLAY_ALPHA) -> PIL.Image.Image:
    """The image (RGB, its size) with each class of `label_map` (uint8 [H, W], ids 1..254; 0 = background and 255 =
    ignored are left as they are) tinted and outlined, so that it stays visible on any colour:

    - tint: a pixel of class k becomes (1 - alpha) * pixel + alpha * c_k, where c_k is the class's colour (`palette`,
      768 ints; None: the default palette), or `contrasting_color` of it when that colour is close to the class's
      mean colour in the image (a red object under a red tint);
    - outline, 2 px inside the class's border: the outer pixel black or white (whichever stands out from c_k), the
      inner one c_k at full strength. The two tones differ, so the border shows on any background.
    """
    labels = np.asarray(label_map)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    if labels.shape != pixels.shape[:2]:
        raise ValueError(f"label_map is {labels.shape[::-1]} (WxH) but the image is {image.size}: they must match.")
    labels = labels.astype(np.uint8)
    colors = np.asarray(list(palette or DiffewSImageProcessor.default_palette()) + [0] * 768, np.float32)[:768]
    colors = colors.reshape(256, 3)
    border_1px, border_2px = border(labels, 1), border(labels, 2)
    out = pixels.copy()
    for class_id in np.unique(labels):
        if class_id in (0, IGNORE_INDEX):
            continue
        region = labels == class_id
        tint = contrasting_color(colors[class_id], pixels[region].mean(axis=0))
        out[region] = (1 - alpha) * pixels[region] + alpha * tint
        out[region & border_2px] = tint
        out[region & border_1px] = outline_tone(tint)
    return PIL.Image.fromarray(np.round(out).astype(np.uint8), mode="RGB")


def contrasting_color(color: np.ndarray, background: np.ndarray) -> np.ndarray:
    """`color` (RGB [3]) when it stands out from `background` (RGB distance >= MIN_CONTRAST), else whichever of its
    complement (255 - color), black and white is farthest from `background`."""
    color, background = np.asarray(color, np.float32), np.asarray(background, np.float32)
    if np.linalg.norm(color - background) >= MIN_CONTRAST:
        return color
    candidates = [255 - color, np.zeros(3, np.float32), np.full(3, 255, np.float32)]
    return max(candidates, key=lambda candidate: float(np.linalg.norm(candidate - background)))


def outline_tone(color: np.ndarray) -> np.ndarray:
    """Black for a light `color` (RGB [3], luma > 140), else white: the outer line of an outline in `color`."""
    luma = float(np.dot(np.asarray(color, np.float32), (0.299, 0.587, 0.114)))
    return np.zeros(3, np.float32) if luma > 140 else np.full(3, 255, np.float32)


def border(labels: np.ndarray, width: int) -> np.ndarray:
    """bool [H, W]: pixels with a pixel of another label within `width` pixels (a (2 width + 1) square); the image's
    edge is no border."""
    image = PIL.Image.fromarray(labels)
    size = 2 * width + 1
    smallest = np.asarray(image.filter(PIL.ImageFilter.MinFilter(size)))
    largest = np.asarray(image.filter(PIL.ImageFilter.MaxFilter(size)))
    return (smallest != labels) | (largest != labels)


def save_png(image: PIL.Image.Image, path: str | Path) -> None:
    """Writes a PNG atomically."""
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


def json_text(data, indent: int | None = 2) -> str:
    """`data` as the JSON files are written: indented (or on one line with `indent=None`), non-ASCII characters kept,
    a final newline."""
    return json.dumps(data, indent=indent, ensure_ascii=False) + "\n"


def save_json(data, path: str | Path) -> None:
    """Writes `data` as indented UTF-8 JSON, atomically."""
    write_bytes(json_text(data).encode("utf-8"), path)


def write_bytes(content: bytes, path: str | Path) -> None:
    """Writes a file atomically, making its folder."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(content)


def link_or_copy(source: str | Path, target: str | Path) -> None:
    """Puts a copy of `source` at `target`: a hard link where the file system allows (no space used), else a copy;
    an existing `target` is replaced, atomically."""
    import shutil

    with atomic_path(target) as temporary:
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)


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
