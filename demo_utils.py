"""What the DiffewS demo does besides drawing the page: reading inputs, caching supports, drawing results.

Nothing here imports Gradio. Mistakes a person can make raise `InputError` (a ValueError) with a message meant to be
shown as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageFilter
import PIL.ImageOps
import torch

from pipeline_diffews import DiffewSPipeline, DiffewSSupport

OVERLAY_RGB = (255, 0, 102)  # colour of the object in overlays
OUTPUT_MAX_AGE_S = 3600  # result files older than this are deleted


class InputError(ValueError):
    """A mistake in what a person gave the demo; the message says how to fix it."""


# ---------------------------------------------------------------------------------------------- model


def load_pipeline(model: str, device: str | None = None) -> DiffewSPipeline:
    """Loads a saved pipeline folder or Hub repo id: fp16 on CUDA, fp32 on CPU. Errors propagate to the caller."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if not os.path.isdir(model) and (os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model)):
        raise FileNotFoundError(f"no pipeline folder at {model}")
    pipe = DiffewSPipeline.from_pretrained(model, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ---------------------------------------------------------------------------------------------- inputs


def open_image(path: str | Path, what: str) -> PIL.Image.Image:
    """A file -> PIL image (EXIF orientation applied, pixels loaded). Raises InputError if it is not an image."""
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return PIL.ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise InputError(
            f"{what} ({Path(path).name}) is not an image that can be read: upload a PNG or JPEG file."
        ) from error


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL image -> RGB; transparent pixels become white."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


def mask_from_image(mask: PIL.Image.Image) -> np.ndarray:
    """A mask image -> bool [H, W]: alpha > 0 for images with transparency, else bright pixels (>= 128) or palette
    indices other than 0 and 255."""
    if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
        alpha = np.asarray(mask.convert("RGBA").getchannel("A"))
        if alpha.min() < 255:  # a real transparency channel: painted strokes
            return alpha > 0
    if mask.mode == "P":
        index = np.asarray(mask)
        return (index != 0) & (index != 255)
    return np.asarray(mask.convert("L")) >= 128


def read_mask(path: str | Path, size: tuple[int, int], what: str) -> np.ndarray:
    """A mask file -> bool [H, W], checked against its image's size (W, H)."""
    mask = mask_from_image(open_image(path, what))
    if mask.shape != (size[1], size[0]):
        raise InputError(
            f"{what} is {mask.shape[1]}x{mask.shape[0]} pixels but its image is {size[0]}x{size[1]}: "
            "a mask must have the size of its image."
        )
    return mask


def support_from_editor(
    value: dict | None, number: int, mask_path: str | Path | None = None
) -> tuple[PIL.Image.Image, np.ndarray] | None:
    """A `gr.ImageEditor` value (type="numpy", RGBA) -> (RGB image, bool mask [H, W]), or None if it has no image.

    The mask is read from `mask_path` when given, else it is the union of the painted layers (alpha > 0).
    """
    if not value or value.get("background") is None:
        if mask_path is not None:
            raise InputError(f"Example {number} has a mask file but no image: upload the image above its mask.")
        return None
    background = np.asarray(value["background"])
    image = to_rgb(PIL.Image.fromarray(background.astype(np.uint8)))
    if mask_path is not None:
        return image, read_mask(mask_path, image.size, f"The mask file of example {number}")
    mask = np.zeros(background.shape[:2], bool)
    for layer in value.get("layers") or []:
        layer = np.asarray(layer)
        if layer.shape[:2] != mask.shape:
            raise InputError(
                f"Example {number}: the painted layer is {layer.shape[1]}x{layer.shape[0]} but the image is "
                f"{mask.shape[1]}x{mask.shape[0]}: upload the image again and repaint the object."
            )
        if layer.ndim == 3 and layer.shape[2] == 4:
            mask |= layer[..., 3] > 0
    if not mask.any():
        raise InputError(
            f"Example {number} has no mask: paint over the object with the brush, or upload its mask file."
        )
    return image, mask


def check_support_set(images: list[PIL.Image.Image], masks: list[np.ndarray], max_shots: int) -> None:
    """Raises InputError unless there are 1..max_shots supports, each with a non-empty mask of its image's size."""
    if not images:
        raise InputError("Add at least one example image and paint the object in it.")
    if len(images) > max_shots:
        raise InputError(f"Use at most {max_shots} example images, got {len(images)}.")
    for number, (image, mask) in enumerate(zip(images, masks), 1):
        if mask.shape != (image.height, image.width):
            raise InputError(
                f"The mask of example {number} is {mask.shape[1]}x{mask.shape[0]} pixels but its image is "
                f"{image.width}x{image.height}: a mask must have the size of its image."
            )
        if not mask.any():
            raise InputError(
                f"The mask of example {number} is empty: mark the object (white on black, or painted strokes)."
            )


# ---------------------------------------------------------------------------------------------- support cache


def support_key(images: list[PIL.Image.Image], masks: list[np.ndarray], resolution: int) -> str:
    """A digest of the support pixels, masks and processing resolution (the support cache's key)."""
    digest = hashlib.sha256(f"{resolution}".encode())
    for image, mask in zip(images, masks):
        pixels = np.asarray(image.convert("RGB"))
        digest.update(repr(pixels.shape).encode())
        digest.update(pixels.tobytes())
        digest.update(np.packbits(mask).tobytes())
    return digest.hexdigest()


class SupportCache:
    """A thread-safe LRU of encoded supports (`DiffewSSupport`), keyed by `support_key`."""

    def __init__(self, max_items: int = 8):
        self.max_items = max_items
        self._items: OrderedDict[str, DiffewSSupport] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> DiffewSSupport | None:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: str, support: DiffewSSupport) -> None:
        with self._lock:
            self._items[key] = support
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclasses.dataclass
class Segmentation:
    """The result of one demo request.

    masks: bool [H, W] per query, at the query's size. probabilities: float32 [H, W] in [0, 1] per query.
    support: the encoded supports, on the CPU. support_seconds: time spent encoding them (0 when cached).
    query_seconds: time spent on the queries.
    """

    masks: list[np.ndarray]
    probabilities: list[np.ndarray]
    support: DiffewSSupport
    support_seconds: float
    query_seconds: float


def segment(
    pipe: DiffewSPipeline,
    support_images: list[PIL.Image.Image],
    support_masks: list[np.ndarray],
    queries: list[PIL.Image.Image],
    threshold_mode: str,
    threshold: float,
    support: DiffewSSupport | None = None,
) -> Segmentation:
    """Encodes the supports (unless `support` is given) and segments the queries. Returns CPU results.

    The returned support lives on the CPU, so it can be kept between requests (and between GPU leases on Spaces).
    """
    start = time.perf_counter()
    if support is None:
        support = pipe.encode_support(support_images, support_masks)
        support = dataclasses.replace(support, key_values=support.key_values.to("cpu"))
        support_seconds = time.perf_counter() - start
    else:
        support_seconds = 0.0
    start = time.perf_counter()
    out = pipe(queries, support=support, threshold_mode=threshold_mode, threshold=threshold, output_type="np")
    return Segmentation(
        masks=[np.asarray(m, bool) for m in out.masks],
        probabilities=[np.asarray(p, np.float32) for p in out.probabilities],
        support=support,
        support_seconds=support_seconds,
        query_seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------- outputs


def overlay(image: PIL.Image.Image, mask: np.ndarray, max_side: int = 1024) -> PIL.Image.Image:
    """RGB image with the mask tinted and outlined in OVERLAY_RGB, at most `max_side` pixels on its longer side."""
    mask_image = PIL.Image.fromarray(mask.astype(np.uint8) * 255)
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image, mask_image = image.resize(size, PIL.Image.BILINEAR), mask_image.resize(size, PIL.Image.NEAREST)
    inside = np.asarray(mask_image) >= 128
    eroded = np.asarray(mask_image.filter(PIL.ImageFilter.MinFilter(5))) >= 128
    rgb = np.asarray(image.convert("RGB"), np.float32)
    color = np.array(OVERLAY_RGB, np.float32)
    rgb[inside] = 0.55 * rgb[inside] + 0.45 * color
    rgb[inside & ~eroded] = color
    return PIL.Image.fromarray(rgb.round().astype(np.uint8))


def colorize(probability: np.ndarray) -> PIL.Image.Image:
    """float [H, W] in [0, 1] -> RGB heat map (dark blue -> purple -> orange -> yellow)."""
    anchors = np.array([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]], np.float32)
    position = np.clip(probability, 0, 1) * (len(anchors) - 1)
    low = np.floor(position).astype(int).clip(0, len(anchors) - 2)
    t = (position - low)[..., None]
    rgb = anchors[low] * (1 - t) + anchors[low + 1] * t
    return PIL.Image.fromarray(rgb.round().astype(np.uint8))


def output_folder(root: str | Path | None = None) -> Path:
    """A fresh folder for one request's files; folders older than OUTPUT_MAX_AGE_S under the same root are removed."""
    root = Path(root or Path(tempfile.gettempdir()) / "diffews_demo")
    root.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in root.iterdir():
        try:
            if old.is_dir() and now - old.stat().st_mtime > OUTPUT_MAX_AGE_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    return Path(tempfile.mkdtemp(dir=root))


def save_results(
    names: list[str], masks: list[np.ndarray], probabilities: list[np.ndarray], folder: Path
) -> tuple[list[str], list[str]]:
    """Writes `<name>_mask.png` (L, 0/255, the query's size) and `<name>_probability.png` (L, 0..255) per query."""
    mask_paths, probability_paths, used = [], [], set()
    for name, mask, probability in zip(names, masks, probabilities):
        stem = _unique(Path(name).stem or "image", used)
        mask_path, probability_path = folder / f"{stem}_mask.png", folder / f"{stem}_probability.png"
        PIL.Image.fromarray(mask.astype(np.uint8) * 255, "L").save(mask_path)
        PIL.Image.fromarray((np.clip(probability, 0, 1) * 255).round().astype(np.uint8), "L").save(probability_path)
        mask_paths.append(str(mask_path))
        probability_paths.append(str(probability_path))
    return mask_paths, probability_paths


def _unique(stem: str, used: set[str]) -> str:
    candidate, number = stem, 2
    while candidate in used:
        candidate, number = f"{stem}_{number}", number + 1
    used.add(candidate)
    return candidate


def describe(result: Segmentation, support_masks: list[np.ndarray], cached: bool, device: Any) -> str:
    """One status line: what was segmented, how long it took, whether the supports came from the cache."""
    count = len(result.masks)
    coverage = ", ".join(f"{100 * m.mean():.1f}%" for m in support_masks)
    support = (
        "example features reused from the cache"
        if cached
        else f"example features computed in {result.support_seconds:.2f} s"
    )
    return (
        f"Segmented {count} image{'s' if count != 1 else ''} in {result.support_seconds + result.query_seconds:.2f} s "
        f"on {device} ({support}; {result.query_seconds:.2f} s for the images). "
        f"Examples: {len(support_masks)} (mask area {coverage})."
    )
