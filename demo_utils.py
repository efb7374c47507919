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

from pipeline_diffews import DiffewSPipeline, DiffewSSupport, resolve_model

OVERLAY_RGB = (255, 0, 102)  # colour of the object in overlays
# The brush colours of the example editors: colour k - 1 paints class k. The first is the one-class colour.
CLASS_COLORS = ("#ff0066", "#00b3ff", "#ffcc00", "#33cc33", "#9966ff", "#ff7f00", "#00e6b8", "#8b4513")
IGNORE = 255  # label value of pixels that are neither background nor a class
MAX_INDEX_MASK_VALUE = 31  # a grey mask whose values (but 255) are all <= this is read as class ids, not brightness
OUTPUT_MAX_AGE_S = 3600  # result files older than this are deleted


class InputError(ValueError):
    """A mistake in what a person gave the demo; the message says how to fix it."""


# ---------------------------------------------------------------------------------------------- model


def load_pipeline(model: str, device: str | None = None) -> DiffewSPipeline:
    """Loads an official name (`incontext`, `coco-fold0`..3: downloaded and converted the first time), a saved pipeline
    folder or a Hub repo id: fp16 on CUDA, fp32 on CPU. Errors propagate to the caller."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if not os.path.isdir(model) and (os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model)):
        raise FileNotFoundError(f"no pipeline folder at {model}")
    pipe = DiffewSPipeline.from_pretrained(resolve_model(model), dtype=dtype)
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


def read_label_map(path: str | Path, size: tuple[int, int], what: str) -> np.ndarray:
    """A mask file -> uint8 label map [H, W] (0 = background, 1..254 = class ids, 255 = ignored), checked against
    its image's size (W, H).

    A palette ("P") PNG gives its indices; a grey PNG whose values other than 255 are all <= MAX_INDEX_MASK_VALUE gives
    those values (an index mask); any other mask is one class, read as `mask_from_image` (1 = the object).
    """
    image = open_image(path, what)
    if image.size != tuple(size):
        raise InputError(
            f"{what} is {image.width}x{image.height} pixels but its image is {size[0]}x{size[1]}: "
            "a mask must have the size of its image."
        )
    if image.mode == "P" and "transparency" not in image.info:
        return np.asarray(image, np.uint8).copy()
    if image.mode in ("L", "I", "I;16"):
        values = np.asarray(image)
        labels = values[values != IGNORE]
        if labels.size and labels.min() >= 0 and 0 < labels.max() <= MAX_INDEX_MASK_VALUE:
            return values.astype(np.uint8)
    return mask_from_image(image).astype(np.uint8)


def file_palette(path: str | Path | None) -> list[int] | None:
    """The palette (768 ints, RGB per index) of a palette-PNG mask file, else None."""
    if path is None:
        return None
    with PIL.Image.open(path) as image:
        if image.mode != "P" or "transparency" in image.info:
            return None
        palette = image.getpalette() or []
    return (palette + [0] * 768)[:768]


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    """"#rrggbb" -> (r, g, b)."""
    color = color.lstrip("#")
    return tuple(int(color[i : i + 2], 16) for i in (0, 2, 4))


def label_map_from_layers(layers: list[np.ndarray], shape: tuple[int, int], colors=CLASS_COLORS) -> np.ndarray:
    """The painted RGBA layers of an editor -> uint8 label map [H, W]: 0 where nothing is painted, else k + 1 for the
    brush colour `colors[k]` nearest to the paint.

    The classes are the colours of the opaque paint (alpha >= 128); faint pixels (anti-aliased stroke edges) take the
    nearest of those colours, so the edges of one colour's strokes never make a class of their own.
    """
    palette = np.array([hex_to_rgb(c) for c in colors], np.int32)  # [C, 3]
    painted = np.zeros(shape, bool)
    rgb = np.zeros((*shape, 3), np.int32)
    strong = np.zeros(shape, bool)
    for layer in layers:  # later layers paint over earlier ones
        if layer.ndim != 3 or layer.shape[2] != 4:
            continue
        alpha = layer[..., 3]
        rgb[alpha > 0] = layer[..., :3][alpha > 0]
        painted |= alpha > 0
        strong |= alpha >= 128
    labels = np.zeros(shape, np.uint8)
    if not painted.any():
        return labels
    colors_used, pixel_color = np.unique(rgb[painted], axis=0, return_inverse=True)  # [U, 3], [P]
    distance = ((colors_used[:, None, :] - palette[None]) ** 2).sum(-1)  # [U, C]
    nearest = distance.argmin(1)[pixel_color.reshape(-1)]  # [P]
    present = np.unique(nearest[strong[painted]]) if strong.any() else np.unique(nearest)
    choice = present[distance[:, present].argmin(1)]  # [U]
    labels[painted] = (choice[pixel_color.reshape(-1)] + 1).astype(np.uint8)
    return labels


def class_ids(labels: np.ndarray) -> list[int]:
    """The class ids (1..254) a label map or bool mask holds, ascending."""
    values = np.unique(np.asarray(labels, np.uint8))
    return [int(v) for v in values if 0 < v < IGNORE]


def support_from_editor(
    value: dict | None, number: int, mask_path: str | Path | None = None
) -> tuple[PIL.Image.Image, np.ndarray] | None:
    """A `gr.ImageEditor` value (type="numpy", RGBA) -> (RGB image, uint8 label map [H, W]), or None if it has no
    image.

    The label map is read from `mask_path` when given (`read_label_map`), else from the painted layers, one class per
    brush colour (`label_map_from_layers`; painting with one colour gives 1 on the object, 0 elsewhere).
    """
    if not value or value.get("background") is None:
        if mask_path is not None:
            raise InputError(f"Example {number} has a mask file but no image: upload the image above its mask.")
        return None
    background = np.asarray(value["background"])
    image = to_rgb(PIL.Image.fromarray(background.astype(np.uint8)))
    if mask_path is not None:
        return image, read_label_map(mask_path, image.size, f"The mask file of example {number}")
    layers = [np.asarray(layer) for layer in value.get("layers") or []]
    for layer in layers:
        if layer.shape[:2] != background.shape[:2]:
            raise InputError(
                f"Example {number}: the painted layer is {layer.shape[1]}x{layer.shape[0]} but the image is "
                f"{background.shape[1]}x{background.shape[0]}: upload the image again and repaint the object."
            )
    labels = label_map_from_layers(layers, background.shape[:2])
    if not labels.any():
        raise InputError(
            f"Example {number} has no mask: paint over the object with the brush, or upload its mask file."
        )
    return image, labels


def check_support_set(images: list[PIL.Image.Image], masks: list[np.ndarray], max_shots: int) -> None:
    """Raises InputError unless there are 1..max_shots supports, each with a non-empty mask (bool, or a uint8 label
    map holding a class) of its image's size."""
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
        if not class_ids(mask):
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
        digest.update(np.packbits(mask).tobytes() if mask.dtype == bool else b"labels" + mask.tobytes())
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
    Several classes (else None): label_maps, uint8 [H, W] per query (0 = background, else the class id);
    class_probabilities, float32 [K, H, W] in [0, 1] per query; class_ids, the K ids in that order.
    """

    masks: list[np.ndarray]
    probabilities: list[np.ndarray]
    support: DiffewSSupport
    support_seconds: float
    query_seconds: float
    label_maps: list[np.ndarray] | None = None
    class_probabilities: list[np.ndarray] | None = None
    class_ids: list[int] | None = None


def segment(
    pipe: DiffewSPipeline,
    support_images: list[PIL.Image.Image],
    support_masks: list[np.ndarray],
    queries: list[PIL.Image.Image],
    threshold_mode: str,
    threshold: float,
    support: DiffewSSupport | None = None,
    multiclass: bool = False,
) -> Segmentation:
    """Encodes the supports (unless `support` is given) and segments the queries. Returns CPU results.

    support_masks: bool [H, W] per support (one class), or with `multiclass` uint8 label maps (0 = background,
    1..254 = classes, 255 = ignored), each class segmented on its own.
    The returned support lives on the CPU, so it can be kept between requests (and between GPU leases on Spaces).
    """
    start = time.perf_counter()
    if support is None:
        if multiclass:
            support = pipe.encode_support(support_images, support_masks, multiclass=True)
        else:
            support = pipe.encode_support(support_images, support_masks)
        support = on_cpu(support)
        support_seconds = time.perf_counter() - start
    else:
        support_seconds = 0.0
    start = time.perf_counter()
    out = pipe(queries, support=support, threshold_mode=threshold_mode, threshold=threshold, output_type="np")
    several = getattr(out, "label_maps", None) is not None
    return Segmentation(
        masks=[np.asarray(m, bool) for m in out.masks],
        probabilities=[np.asarray(p, np.float32) for p in out.probabilities],
        support=support,
        support_seconds=support_seconds,
        query_seconds=time.perf_counter() - start,
        label_maps=[np.asarray(m, np.uint8) for m in out.label_maps] if several else None,
        class_probabilities=[np.asarray(p, np.float32) for p in out.class_probabilities] if several else None,
        class_ids=[int(c) for c in out.class_ids] if several else None,
    )


def on_cpu(value: Any) -> Any:
    """A copy of an encoded support (or anything made of dataclasses, lists, tuples and dicts of tensors and objects
    with `.to`) whose tensors live on the CPU."""
    if isinstance(value, torch.Tensor) or (hasattr(value, "to") and hasattr(value, "layers")):
        return value.to("cpu")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: on_cpu(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------- outputs


def overlay(
    image: PIL.Image.Image, mask: np.ndarray, max_side: int = 1024, colors: dict[int, tuple[int, int, int]] | None = None
) -> PIL.Image.Image:
    """RGB image with each class tinted and outlined in its colour, at most `max_side` pixels on its longer side.

    mask: bool [H, W] (one class, drawn in OVERLAY_RGB) or a uint8 label map (class k drawn in `colors[k]`; 0 and 255
    are left as they are).
    """
    labels = np.asarray(mask).astype(np.uint8)
    colors = colors or {1: OVERLAY_RGB}
    label_image = PIL.Image.fromarray(labels)
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image, label_image = image.resize(size, PIL.Image.BILINEAR), label_image.resize(size, PIL.Image.NEAREST)
    labels = np.asarray(label_image)
    smallest = np.asarray(label_image.filter(PIL.ImageFilter.MinFilter(5)))
    largest = np.asarray(label_image.filter(PIL.ImageFilter.MaxFilter(5)))
    edge = (smallest != labels) | (largest != labels)
    rgb = np.asarray(image.convert("RGB"), np.float32).copy()
    for class_id in class_ids(labels):
        inside = labels == class_id
        color = np.array(colors.get(class_id, default_color(class_id)), np.float32)
        rgb[inside] = 0.55 * rgb[inside] + 0.45 * color
        rgb[inside & edge] = color
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


def save_label_maps(
    names: list[str],
    label_maps: list[np.ndarray],
    class_probabilities: list[np.ndarray],
    ids: list[int],
    palette: list[int],
    folder: Path,
) -> tuple[list[str], list[str]]:
    """Writes per query `<name>_labels.png` (index PNG, mode "P" with `palette`, the query's size: 0 = background,
    k = class k) and per query and class `<name>_class<k>_probability.png` (L, 0..255), query by query, classes in the
    order of `ids`. Returns (label map paths, probability paths)."""
    label_paths, probability_paths, used = [], [], set()
    for name, labels, probabilities in zip(names, label_maps, class_probabilities):
        stem = _unique(Path(name).stem or "image", used)
        image = PIL.Image.fromarray(np.asarray(labels, np.uint8), "L").convert("P")
        image.putpalette(palette)
        image.save(folder / f"{stem}_labels.png")
        label_paths.append(str(folder / f"{stem}_labels.png"))
        for class_id, probability in zip(ids, probabilities):
            path = folder / f"{stem}_class{class_id}_probability.png"
            PIL.Image.fromarray((np.clip(probability, 0, 1) * 255).round().astype(np.uint8), "L").save(path)
            probability_paths.append(str(path))
    return label_paths, probability_paths


def _unique(stem: str, used: set[str]) -> str:
    candidate, number = stem, 2
    while candidate in used:
        candidate, number = f"{stem}_{number}", number + 1
    used.add(candidate)
    return candidate


def describe(result: Segmentation, support_masks: list[np.ndarray], cached: bool, device: Any) -> str:
    """One status line: what was segmented, how long it took, whether the supports came from the cache."""
    count = len(result.masks)
    coverage = ", ".join(f"{100 * ((m > 0) & (m < IGNORE)).mean():.1f}%" for m in support_masks)
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


# ---------------------------------------------------------------------------------------------- several classes


def default_color(class_id: int) -> tuple[int, int, int]:
    """The colour of class `class_id` (1..254) when no palette names one: its brush colour (CLASS_COLORS), beyond
    those the PASCAL VOC colour map's."""
    if 1 <= class_id <= len(CLASS_COLORS):
        return hex_to_rgb(CLASS_COLORS[class_id - 1])
    rgb, code = [0, 0, 0], class_id
    for bit in range(8):
        for channel in range(3):
            rgb[channel] |= ((code >> channel) & 1) << (7 - bit)
        code >>= 3
    return tuple(rgb)


def class_colors(ids: list[int], palette: list[int] | None = None) -> dict[int, tuple[int, int, int]]:
    """Class id -> RGB: the colour of index k in `palette` (768 ints, an uploaded palette mask's), else
    `default_color(k)`."""
    if palette is None:
        return {k: default_color(k) for k in ids}
    return {k: tuple(palette[3 * k : 3 * k + 3]) for k in ids}


def output_palette(colors: dict[int, tuple[int, int, int]], palette: list[int] | None = None) -> list[int]:
    """The palette of the index PNGs (768 ints): `palette` if given, else black for 0, `colors[k]` (or
    `default_color(k)`) for each class k, white for IGNORE."""
    if palette is not None:
        return list(palette)
    rgb = [(0, 0, 0)] + [colors.get(k, default_color(k)) for k in range(1, IGNORE)] + [(255, 255, 255)]
    return [value for color in rgb for value in color]


def parse_class_names(text: str | None, ids: list[int]) -> dict[int, str]:
    """Class names typed by a person -> {class id: name} for `ids` (ids without a name are left out).

    "road, car" names class 1 and class 2 (the brush colours' order); "1: road, 8: car" names ids explicitly.
    """
    names = {}
    items = [item.strip() for item in (text or "").replace("\n", ",").split(",")]
    for position, item in enumerate((i for i in items if i), 1):
        if ":" in item:
            number, name = (part.strip() for part in item.split(":", 1))
            if not number.isdigit() or not 1 <= int(number) < IGNORE:
                raise InputError(
                    f"Class names: {item!r} does not start with a class id in 1..254 "
                    "(write `road, car` for the brush colours in order, or `1: road, 8: car`)."
                )
            class_id = int(number)
        else:
            class_id, name = position, item
        if class_id in ids and name:
            names[class_id] = name
    return names


def legend(ids: list[int], names: dict[int, str], colors: dict[int, tuple[int, int, int]]) -> list[dict]:
    """[{"id": k, "name": name or "class k", "color": "#rrggbb"}] for each class id in `ids`, in that order."""
    return [
        {"id": k, "name": names.get(k, f"class {k}"), "color": "#{:02x}{:02x}{:02x}".format(*colors[k])} for k in ids
    ]


def legend_markdown(entries: list[dict], label_maps: list[np.ndarray]) -> str:
    """The legend as one Markdown line: a square in the class colour, its name, id and share of the queries' pixels."""
    pixels = sum(m.size for m in label_maps) or 1
    parts = []
    for entry in entries:
        share = 100 * sum(int((m == entry["id"]).sum()) for m in label_maps) / pixels
        parts.append(
            f'<span style="color:{entry["color"]}">■</span> **{entry["name"]}** (id {entry["id"]}, {share:.1f}%)'
        )
    return "Classes: " + " · ".join(parts)

