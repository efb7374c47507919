"""What the DiffewS demo does besides drawing the page: reading inputs, the session's example set, drawing results,
the download.

Nothing here imports Gradio. Mistakes a person can make raise `InputError` (a ValueError) with a message meant to be
shown as it is. Mask files are read by the package's one reader and one rule (`load_mask`,
`DiffewSImageProcessor.is_label_map`); overlays and palettes are the package's (`pipeline_diffews.writers`,
`DiffewSImageProcessor.default_palette`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageColor
import torch

from pipeline_diffews import DiffewSImageProcessor, DiffewSPipeline, DiffewSSupport, load_mask
from pipeline_diffews.coco import COCO_FILE, category_name
from pipeline_diffews.formats import annotation_files
from pipeline_diffews.image_processor_diffews import IGNORE_INDEX
from pipeline_diffews.inputs import MASK_SUFFIX, find_support_pairs
from pipeline_diffews.writers import border, json_text, mask_to_image, overlay_classes

# The brush colours of the editors: colour k - 1 paints class k. The first is the one-class colour (magenta: far from
# the colours of skies, plants, skin and red or orange objects).
CLASS_COLORS = ("#ff00ff", "#00b3ff", "#ffcc00", "#33cc33", "#9966ff", "#ff7f00", "#00e6b8", "#8b4513")
BRUSH_OPACITY = 0.5  # painted layers are see-through: the object stays visible under the paint
STRONG_ALPHA = 100  # paint at least this opaque (of 255) says which brush colours are used; fainter is stroke edges
OVERLAY_ALPHA = 0.45  # tint of the result overlays
IGNORE = IGNORE_INDEX  # label value of pixels that are neither background nor a class
# The editors' canvas before an image is shown: no image is smaller. The editor places a layer in the middle of the
# largest canvas it has shown since it was last cleared, so a layer is given at least this size (`editor_value`).
EDITOR_CANVAS = (64, 64)
OUTPUT_MAX_AGE_S = 3600  # result files older than this are deleted
MAX_SAVED_SET_BYTES = 512 << 20  # the most an opened saved set may hold, uncompressed


class InputError(ValueError):
    """A mistake in what a person gave the demo; the message says how to fix it."""


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    """"#rrggbb" -> (r, g, b)."""
    return PIL.ImageColor.getrgb(color)[:3]


OVERLAY_RGB = hex_to_rgb(CLASS_COLORS[0])  # colour of the object of one-class results


def count_of(count: int, noun: str) -> str:
    """"1 image", "2 images"."""
    return f"{count} {noun}{'s' if count != 1 else ''}"


# ---------------------------------------------------------------------------------------------- inputs


def open_image(path: str | Path, what: str, kinds: str = "a PNG or JPEG file") -> PIL.Image.Image:
    """A file -> PIL image (EXIF orientation applied, pixels loaded, mode kept: `load_mask`). Raises InputError naming
    `what` and asking for `kinds` if it is not an image."""
    try:
        return load_mask(path)
    except ValueError as error:
        raise InputError(f"{what} ({Path(path).name}) is not an image that can be read: upload {kinds}.") from error


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL image -> RGB; transparent pixels become white."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


def _load_mask(path: str | Path, size: tuple[int, int], what: str) -> PIL.Image.Image:
    """`load_mask` with the demo's messages; checked against its image's size (W, H)."""
    mask = open_image(path, what, "a PNG file")
    if mask.size != tuple(size):
        raise InputError(
            f"{what} is {mask.width}x{mask.height} pixels but its image is {size[0]}x{size[1]}: "
            "a mask must have the size of its image."
        )
    return mask


def read_mask(path: str | Path, size: tuple[int, int], what: str) -> np.ndarray:
    """A mask file -> bool [H, W] (one class: white object, alpha, or palette indices other than 0 and 255), checked
    against its image's size (W, H)."""
    return DiffewSImageProcessor.to_binary_mask(_load_mask(path, size, what), what)


def read_label_map(path: str | Path, size: tuple[int, int], what: str) -> np.ndarray:
    """A mask file -> uint8 label map [H, W] (0 = background, 1..254 = class ids, 255 = ignored), checked against
    its image's size (W, H). Label map or one class (then 1 = the object): `DiffewSImageProcessor.is_label_map`."""
    mask = _load_mask(path, size, what)
    if DiffewSImageProcessor.is_label_map(mask):
        return DiffewSImageProcessor.to_label_map(mask, what).astype(np.uint8)
    return DiffewSImageProcessor.to_binary_mask(mask, what).astype(np.uint8)


def file_palette(path: str | Path | None) -> list[int] | None:
    """The palette (768 ints, RGB per index) of a palette-PNG mask file, else None."""
    if path is None:
        return None
    return DiffewSImageProcessor.palette_of(load_mask(path))


def class_ids(labels: np.ndarray) -> list[int]:
    """The class ids (1..254) a label map or bool mask holds, ascending."""
    values = np.unique(np.asarray(labels, np.uint8))
    return [int(v) for v in values if 0 < v < IGNORE]


def label_map_from_layers(layers: list[np.ndarray], shape: tuple[int, int], colors=CLASS_COLORS) -> np.ndarray:
    """The painted RGBA layers of an editor -> uint8 label map [H, W]: 0 where nothing is painted, else k + 1 for the
    brush colour `colors[k]` nearest to the paint.

    The classes are the colours of the well-covered paint (alpha >= STRONG_ALPHA); faint pixels (anti-aliased stroke
    edges) take the nearest of those colours, so the edges of one colour's strokes never make a class of their own.
    """
    palette = np.array([hex_to_rgb(c) for c in colors], np.int32)  # [C, 3]
    painted = np.zeros(shape, bool)
    rgb = np.zeros((*shape, 3), np.int32)
    strong = np.zeros(shape, bool)
    for layer in layers:  # later layers paint over earlier ones
        if layer.ndim != 3 or layer.shape[2] != 4:
            continue
        layer = layer[: shape[0], : shape[1]]
        alpha = layer[..., 3]
        rgb[alpha > 0] = layer[..., :3][alpha > 0]
        painted |= alpha > 0
        strong |= alpha >= STRONG_ALPHA
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


def support_from_editor(
    value: dict | None, number: int, mask_path: str | Path | None = None, ids: list[int] | None = None
) -> tuple[PIL.Image.Image, np.ndarray] | None:
    """A `gr.ImageEditor` value (type="numpy", RGBA) -> (RGB image, uint8 label map [H, W]), or None if it has no
    image.

    The label map is read from `mask_path` when given (`read_label_map`), else from the painted layers, one class per
    brush colour (`label_map_from_layers`): brush colour k paints class `ids[k - 1]` when the layer was drawn from a
    label map with those ids (`editor_value`), else class k; a brush colour beyond those ids paints a new class, the
    next id after the largest.
    """
    if not value or value.get("background") is None:
        if mask_path is not None:
            raise InputError(f"Example {number} has a mask file but no image: upload the image above its mask.")
        return None
    background = np.asarray(value["background"])
    image = editor_image(value)
    if mask_path is not None:
        return image, read_label_map(mask_path, image.size, f"The mask file of example {number}")
    layers = [np.asarray(layer) for layer in value.get("layers") or []]
    for layer in layers:  # a layer given by `editor_value` may extend beyond the image, to the right and below
        if layer.shape[0] < background.shape[0] or layer.shape[1] < background.shape[1]:
            raise InputError(
                f"Example {number}: the painted layer is {layer.shape[1]}x{layer.shape[0]} but the image is "
                f"{background.shape[1]}x{background.shape[0]}: upload the image again and repaint the object."
            )
    labels = label_map_from_layers(layers, background.shape[:2])
    if not labels.any():
        raise InputError(
            f"Example {number} has no mask: paint over the object with the brush, or upload its mask file."
        )
    if ids:
        lookup = np.zeros(256, np.uint8)
        colour_ids = [*ids, *range(max(ids) + 1, IGNORE)][: len(CLASS_COLORS)]
        lookup[1 : len(colour_ids) + 1] = colour_ids
        labels = lookup[labels]
    return image, labels


def editor_image(value: dict) -> PIL.Image.Image:
    """The RGB image of a `gr.ImageEditor` value (type="numpy") that has one."""
    return to_rgb(PIL.Image.fromarray(np.asarray(value["background"]).astype(np.uint8)))


def paint_layer(labels: np.ndarray, ids: list[int] | None = None) -> np.ndarray:
    """uint8 label map or bool mask [H, W] -> RGBA layer [H', W', 4] (H' >= H, W' >= W: at least EDITOR_CANVAS),
    class `ids[k - 1]` (default: k) painted in brush colour k at BRUSH_OPACITY with an opaque 2-pixel border,
    transparent elsewhere."""
    labels = np.asarray(labels).astype(np.uint8)
    ids = ids or class_ids(labels)
    height, width = labels.shape
    layer = np.zeros((max(height, EDITOR_CANVAS[1]), max(width, EDITOR_CANVAS[0]), 4), np.uint8)
    edge = border(labels, 2)
    for rank, class_id in enumerate(ids):
        color = hex_to_rgb(CLASS_COLORS[rank % len(CLASS_COLORS)])
        region = labels == class_id
        layer[:height, :width][region] = (*color, round(255 * BRUSH_OPACITY))
        layer[:height, :width][region & edge] = (*color, 255)
    return layer



def editor_value(image: PIL.Image.Image, labels: np.ndarray | None = None, ids: list[int] | None = None) -> dict:
    """The value that shows `image` in an editor with `labels` (uint8 label map or bool mask [H, W]) as its painted
    layer (`paint_layer`); `ids` are the class ids of brush colours 1, 2, ... (default: those of `labels`).

    The editor draws a given layer centred in the largest canvas it has shown since it was last cleared; so a page
    clears an editor before it shows such a value, and the layer spans at least the empty canvas (EDITOR_CANVAS),
    extending to the right and below a smaller image.
    """
    rgb = np.asarray(to_rgb(image))
    layers = [paint_layer(labels, ids)] if labels is not None else []
    return {"background": rgb, "layers": layers, "composite": None}


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


# ---------------------------------------------------------------------------------------------- the model


def _update_with_pixels(digest, image: PIL.Image.Image) -> None:
    pixels = np.asarray(image.convert("RGB"))
    digest.update(repr(pixels.shape).encode())
    digest.update(pixels.tobytes())


def image_digest(image: PIL.Image.Image) -> str:
    """A digest of an image's RGB pixels: the same picture uploaded again (under any name) has the same digest."""
    digest = hashlib.sha256()
    _update_with_pixels(digest, image)
    return digest.hexdigest()


def support_key(images: list[PIL.Image.Image], masks: list[np.ndarray], resolution: int) -> str:
    """A digest of the support pixels, masks and processing resolution (the key of a cached support)."""
    digest = hashlib.sha256(f"{resolution}".encode())
    for image, mask in zip(images, masks):
        _update_with_pixels(digest, image)
        digest.update(np.packbits(mask).tobytes() if mask.dtype == bool else b"labels" + mask.tobytes())
    return digest.hexdigest()


class SupportCache:
    """A small LRU of encoded supports (`DiffewSSupport`), keyed by `support_key`: one per session (gr.State)."""

    def __init__(self, max_items: int = 4):
        self.max_items = max_items
        self._items: dict[str, DiffewSSupport] = {}

    def get(self, key: str) -> DiffewSSupport | None:
        if key not in self._items:
            return None
        self._items[key] = self._items.pop(key)  # most recently used last
        return self._items[key]

    def put(self, key: str, support: DiffewSSupport) -> None:
        self._items.pop(key, None)
        self._items[key] = support
        while len(self._items) > self.max_items:
            self._items.pop(next(iter(self._items)))

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

    def labels(self, index: int) -> np.ndarray:
        """Query `index`'s result as a uint8 label map [H, W] (one class: 1 = the object)."""
        if self.label_maps is not None:
            return self.label_maps[index]
        return self.masks[index].astype(np.uint8)

    def take(self, index: int, other: Segmentation, position: int) -> None:
        """Query `index`'s result becomes `other`'s result of its query `position`."""
        self.masks[index], self.probabilities[index] = other.masks[position], other.probabilities[position]
        if self.label_maps is not None:
            self.label_maps[index] = other.label_maps[position]
            self.class_probabilities[index] = other.class_probabilities[position]

    def confirm(self, index: int, labels: np.ndarray) -> None:
        """Query `index`'s result becomes `labels` (uint8 label map or bool mask [H, W]), certain: its probabilities
        are its mask (per class: its class's pixels)."""
        labels = np.asarray(labels).astype(np.uint8)
        self.masks[index] = (labels > 0) & (labels < IGNORE)
        self.probabilities[index] = self.masks[index].astype(np.float32)
        if self.label_maps is not None:
            self.label_maps[index] = labels
            self.class_probabilities[index] = np.stack([labels == k for k in self.class_ids]).astype(np.float32)


def combine(
    count: int,
    predicted: Segmentation | None,
    positions: list[int],
    confirmed: dict[int, np.ndarray],
    support: DiffewSSupport,
    class_ids: list[int] | None,
) -> Segmentation:
    """One result for `count` queries: query `positions[j]` gets `predicted`'s result j, query i of `confirmed` its
    confirmed labels. class_ids: the classes of a several-class result (None: one class)."""
    several = class_ids is not None
    result = Segmentation(
        masks=[None] * count, probabilities=[None] * count, support=support,
        support_seconds=predicted.support_seconds if predicted else 0.0,
        query_seconds=predicted.query_seconds if predicted else 0.0,
        label_maps=[None] * count if several else None, class_probabilities=[None] * count if several else None,
        class_ids=list(class_ids) if several else None,
    )
    for position, index in enumerate(positions):
        result.take(index, predicted, position)
    for index, labels in confirmed.items():
        result.confirm(index, labels)
    return result


@dataclasses.dataclass
class UncachedSupport:
    """The shots of a model whose design cannot cache a support (`qkv_fusion`: the support side depends on the
    query): kept as they are and passed with every call. Stands where a `DiffewSSupport` stands in the demo."""

    images: list[PIL.Image.Image]
    masks: list[np.ndarray]
    multiclass: bool

    @property
    def num_shots(self) -> int:
        return len(self.images)

    def to(self, *args, **kwargs) -> "UncachedSupport":
        return self

    def grown(self, image: PIL.Image.Image, mask: np.ndarray) -> "UncachedSupport":
        return UncachedSupport([*self.images, image], [*self.masks, mask], self.multiclass)


def encode_set(
    pipe: DiffewSPipeline, images: list[PIL.Image.Image], masks: list[np.ndarray], multiclass: bool
) -> tuple[DiffewSSupport | UncachedSupport, float]:
    """The supports encoded once, on the CPU (to be kept between requests, and between GPU leases on Spaces); for a
    design that cannot cache them, the shots themselves. Returns (support, seconds it took)."""
    start = time.perf_counter()
    if not pipe.design.cacheable:
        return UncachedSupport(list(images), list(masks), multiclass), 0.0
    support = pipe.encode_support(images, masks, multiclass=multiclass).to("cpu")
    return support, time.perf_counter() - start


def support_arguments(support: DiffewSSupport | UncachedSupport, support_token_sampling: bool) -> dict:
    """The pipeline call's support arguments: the cache, or the shots themselves; with support-token sampling, its
    generator (seed 0, so a page shows the same result for the same inputs)."""
    arguments = {"support": support}
    if isinstance(support, UncachedSupport):
        arguments = {"support_images": support.images, "support_masks": support.masks,
                     "multiclass": support.multiclass}
    if support_token_sampling:
        arguments.update(support_token_sampling=True, generator=torch.Generator().manual_seed(0))
    return arguments


def segment(
    pipe: DiffewSPipeline,
    support_images: list[PIL.Image.Image],
    support_masks: list[np.ndarray],
    queries: list[PIL.Image.Image],
    threshold_mode: str,
    threshold: float,
    support: DiffewSSupport | None = None,
    multiclass: bool = False,
    support_token_sampling: bool = False,
) -> Segmentation:
    """Encodes the supports (unless `support` is given) and segments the queries. Returns CPU results.

    support_masks: bool [H, W] per support (one class), or with `multiclass` uint8 label maps (0 = background,
    1..254 = classes, 255 = ignored), each class segmented on its own.
    The returned support lives on the CPU, so it can be kept between requests (and between GPU leases on Spaces).
    """
    support_seconds = 0.0
    if support is None:
        support, support_seconds = encode_set(pipe, support_images, support_masks, multiclass)
    start = time.perf_counter()
    out = pipe(queries, threshold_mode=threshold_mode, threshold=threshold, output_type="np",
               **support_arguments(support, support_token_sampling))
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


def extend_support(
    pipe: DiffewSPipeline, support: DiffewSSupport, image: PIL.Image.Image, mask: np.ndarray, multiclass: bool
) -> tuple[DiffewSSupport, float]:
    """`support` grown by one shot (image, mask: bool [H, W], or a uint8 label map with `multiclass`): only the new
    shot's support pass runs. Returns (the grown support on the CPU, seconds it took)."""
    start = time.perf_counter()
    if isinstance(support, UncachedSupport):
        return support.grown(image, mask), 0.0
    grown = pipe.encode_support([image], [mask], multiclass=multiclass, extend=support)
    return grown.to("cpu"), time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- the session


@dataclasses.dataclass
class ExampleSet:
    """The examples (shots) of one browser session and their encoding.

    images: RGB shots, in order: those of the example editors, then the kept ones (corrected results added as
    examples, and the shots of an opened saved set). masks: per shot, bool [H, W] (one class) or, with `multiclass`,
    a uint8 label map. names: per shot, the file stem it is exported under. num_given: how many shots came from the
    editors (the first ones). key: the `support_key` of those shots (None when none did).
    support: all shots encoded (CPU; None until the set is first used). palette: a mask file's palette, for the
    output colours (or None). last_added_seconds: what adding the last shot cost (None before any was added).
    opened: the file name of the saved set it was opened from (or None). num_added: the shots added from corrected
    results.
    """

    images: list[PIL.Image.Image]
    masks: list[np.ndarray]
    names: list[str]
    num_given: int
    multiclass: bool
    key: str | None
    support: DiffewSSupport | None
    palette: list[int] | None = None
    last_added_seconds: float | None = None
    opened: str | None = None
    num_added: int = 0

    @property
    def num_shots(self) -> int:
        return len(self.images)

    @property
    def num_kept(self) -> int:
        """The shots that did not come from the editors."""
        return self.num_shots - self.num_given

    def index_of(self, image: PIL.Image.Image) -> int | None:
        """The position of the shot showing `image` (the same pixels), else None."""
        digest = image_digest(image)
        return next((i for i, shot in enumerate(self.images) if image_digest(shot) == digest), None)

    def add(self, image: PIL.Image.Image, mask: np.ndarray, support: DiffewSSupport, seconds: float) -> None:
        """One more shot (a confirmed result), with the support already grown by it in `seconds`."""
        number = self.num_shots + 1
        while f"example_{number}" in self.names:
            number += 1
        self.images.append(image)
        self.masks.append(mask)
        self.names.append(f"example_{number}")
        self.support, self.last_added_seconds = support, seconds
        self.num_added += 1


def set_masks(labels: list[np.ndarray]) -> tuple[list[np.ndarray], bool]:
    """The shots' label maps (uint8, or bool masks) -> (the set's masks, multiclass): uint8 label maps when the shots
    mark several classes together, else bool masks."""
    labels = [np.asarray(m).astype(np.uint8) for m in labels]
    multiclass = len({k for m in labels for k in class_ids(m)}) > 1
    return (labels if multiclass else [(m > 0) & (m < IGNORE) for m in labels]), multiclass


def build_set(
    images: list[PIL.Image.Image],
    labels: list[np.ndarray],
    max_shots: int,
    key: str | None = None,
    palette: list[int] | None = None,
    kept: ExampleSet | None = None,
    names: list[str] | None = None,
    opened: str | None = None,
) -> ExampleSet:
    """A checked example set (`check_support_set`, not yet encoded): the shots `images`, `labels` (uint8 label maps or
    bool masks), then the shots `kept` holds beyond its editors' ones. key: the `support_key` of `images` when they
    come from the editors, None when they do not (an opened saved set).
    names: the shots' file stems (default `example_1`, `example_2`, ...; kept shots keep theirs)."""
    kept_images = kept.images[kept.num_given :] if kept else []
    kept_masks = kept.masks[kept.num_given :] if kept else []
    kept_names = kept.names[kept.num_given :] if kept else []
    names = names or [f"example_{i}" for i in range(1, len(images) + 1)]
    masks, multiclass = set_masks([*labels, *kept_masks])
    all_images = [*images, *kept_images]
    check_support_set(all_images, masks, max_shots)
    return ExampleSet(
        images=all_images, masks=masks, names=unique_stems([*names, *kept_names]),
        num_given=len(images) if key is not None else 0,
        multiclass=multiclass, key=key, support=None, palette=palette or (kept.palette if kept else None),
        opened=opened or (kept.opened if kept else None), num_added=kept.num_added if kept else 0,
    )


@dataclasses.dataclass
class Session:
    """What one browser session holds between clicks (a gr.State): its example set; the images it segmented (RGB,
    file names, and each file's bytes as uploaded: the session's own copy, readable as long as the session lives),
    their results and which of them the person confirmed; the class names; which result is open for correction;
    whether everything was downloaded since the last change."""

    examples: ExampleSet | None = None
    queries: list[PIL.Image.Image] = dataclasses.field(default_factory=list)
    names: list[str] = dataclasses.field(default_factory=list)
    files: list[bytes] = dataclasses.field(default_factory=list)
    result: Segmentation | None = None
    confirmed: list[bool] = dataclasses.field(default_factory=list)
    class_names: dict[int, str] = dataclasses.field(default_factory=dict)
    editing: int | None = None
    saved: bool = True
    support_token_sampling: bool = False

    def stored(self, name: str) -> tuple[PIL.Image.Image, bytes] | None:
        """The session's own copy (RGB image, file bytes) of the image it segmented under file name `name`."""
        return next(((q, f) for q, n, f in zip(self.queries, self.names, self.files) if n == name), None)

    def carry_confirmed(
        self, queries: list[PIL.Image.Image], names: list[str], files: list[bytes]
    ) -> tuple[list[PIL.Image.Image], list[str], list[bytes], dict[int, np.ndarray]]:
        """The images of a new request: `queries` (with their file names and bytes), then the confirmed images of
        the session they do not show. Returns those lists and, per position of a confirmed image (the same pixels),
        its confirmed labels (uint8)."""
        kept = {
            image_digest(q): (q, n, f, self.result.labels(i))
            for i, (q, n, f) in enumerate(zip(self.queries, self.names, self.files)) if self.confirmed[i]
        }
        queries, names, files, confirmed = list(queries), list(names), list(files), {}
        for index, query in enumerate(list(queries)):
            entry = kept.pop(image_digest(query), None)
            if entry is not None:
                confirmed[index] = entry[3]
        for query, name, data, labels in kept.values():
            confirmed[len(queries)] = labels
            queries.append(query)
            names.append(name)
            files.append(data)
        return queries, names, files, confirmed

    def next_to_correct(self, after: int) -> int | None:
        """The first result after `after` (going round) that is not confirmed, else None."""
        count = len(self.queries)
        return next((i % count for i in range(after + 1, after + count) if not self.confirmed[i % count]), None)

    def unsaved(self) -> str:
        """What a reload would lose, in one sentence ("" when everything was downloaded)."""
        if self.saved or (self.result is None and self.examples is None):
            return ""
        return "The masks and examples of this page were not downloaded."


# ---------------------------------------------------------------------------------------------- outputs


def overlay(image: PIL.Image.Image, labels: np.ndarray, palette: list[int], max_side: int = 1024) -> PIL.Image.Image:
    """RGB image (at most `max_side` pixels on its longer side) with each class of `labels` (uint8 label map or bool
    mask [H, W]) tinted and outlined in its `palette` colour (768 ints): `pipeline_diffews.writers.overlay_classes`."""
    label_image = PIL.Image.fromarray(np.asarray(labels).astype(np.uint8))
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image, label_image = image.resize(size, PIL.Image.BILINEAR), label_image.resize(size, PIL.Image.NEAREST)
    return overlay_classes(image, np.asarray(label_image), palette, alpha=OVERLAY_ALPHA)


COLOR_SCALE = np.array([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]], np.float32)


def colorize(probability: np.ndarray) -> PIL.Image.Image:
    """float [H, W] in [0, 1] -> RGB heat map along COLOR_SCALE (0 dark blue -> purple -> orange -> 1 yellow)."""
    position = np.clip(probability, 0, 1) * (len(COLOR_SCALE) - 1)
    low = np.floor(position).astype(int).clip(0, len(COLOR_SCALE) - 2)
    t = (position - low)[..., None]
    rgb = COLOR_SCALE[low] * (1 - t) + COLOR_SCALE[low + 1] * t
    return PIL.Image.fromarray(rgb.round().astype(np.uint8))


def color_scale_html() -> str:
    """The probability maps' colour scale as HTML: a bar from 0 to 1 in COLOR_SCALE's colours, with ticks."""
    stops = ", ".join("#{:02x}{:02x}{:02x}".format(*map(int, c)) for c in COLOR_SCALE)
    ticks = "".join(f"<span>{v}</span>" for v in ("0", "0.25", "0.5", "0.75", "1"))
    return (
        '<div id="color-scale-bar" style="height:14px;border-radius:3px;'
        f'background:linear-gradient(to right, {stops})"></div>'
        f'<div style="display:flex;justify-content:space-between;font-size:12px">{ticks}</div>'
        '<div style="font-size:12px;text-align:center">probability of the object (per class: of that class)</div>'
    )


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


def probability_image(probability: np.ndarray) -> PIL.Image.Image:
    """float [H, W] in [0, 1] -> L image, 0..255."""
    return PIL.Image.fromarray((np.clip(probability, 0, 1) * 255).round().astype(np.uint8), "L")


def save_results(
    names: list[str], masks: list[np.ndarray], probabilities: list[np.ndarray], folder: Path
) -> tuple[list[str], list[str]]:
    """Writes `<name>_mask.png` (L, 0/255, the query's size) and `<name>_probability.png` (L, 0..255) per query."""
    mask_paths, probability_paths = [], []
    for stem, mask, probability in zip(unique_stems(names), masks, probabilities):
        mask_path, probability_path = folder / f"{stem}_mask.png", folder / f"{stem}_probability.png"
        mask_to_image(mask).save(mask_path)
        probability_image(probability).save(probability_path)
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
) -> tuple[list[str], list[list[str]]]:
    """Writes per query `<name>_labels.png` (index PNG, mode "P" with `palette`, the query's size: 0 = background,
    k = class k) and per query and class `<name>_class<k>_probability.png` (L, 0..255), classes in the order of
    `ids`. Returns (label map paths, per query the probability paths of its classes)."""
    label_paths, probability_paths = [], []
    for stem, labels, probabilities in zip(unique_stems(names), label_maps, class_probabilities):
        DiffewSImageProcessor.label_map_to_image(labels, palette).save(folder / f"{stem}_labels.png")
        label_paths.append(str(folder / f"{stem}_labels.png"))
        paths = []
        for class_id, probability in zip(ids, probabilities):
            path = folder / f"{stem}_class{class_id}_probability.png"
            probability_image(probability).save(path)
            paths.append(str(path))
        probability_paths.append(paths)
    return label_paths, probability_paths


def unique_stems(names: list[str]) -> list[str]:
    """The file stems of `names`, made unique by `_2`, `_3`, ... suffixes."""
    stems, used = [], set()
    for name in names:
        stem, candidate, number = Path(name).stem or "image", Path(name).stem or "image", 2
        while candidate in used:
            candidate, number = f"{stem}_{number}", number + 1
        used.add(candidate)
        stems.append(candidate)
    return stems


def mask_file_image(labels: np.ndarray, multiclass: bool, palette: list[int]) -> PIL.Image.Image:
    """A result or example mask as it is written: binary L (0/255) for one class, else an index PNG ("P")."""
    if multiclass:
        return DiffewSImageProcessor.label_map_to_image(labels, palette)
    return mask_to_image(np.asarray(labels) > 0)


def save_masks(
    names: list[str], labels: list[np.ndarray], multiclass: bool, palette: list[int], folder: Path
) -> list[str]:
    """Writes each result as the download holds it (`mask_files`): `<folder>/masks/<stem>.png`. Returns the paths."""
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in mask_files(names, labels, multiclass, palette):
        (folder / name).write_bytes(data)
        paths.append(str(folder / name))
    return paths


def mask_files(names: list[str], labels: list[np.ndarray], multiclass: bool, palette: list[int]):
    """(`masks/<stem>.png`, PNG bytes) per result: the file name of its image's stem (made unique), the mask at the
    image's size (`mask_file_image`). The page's mask list and the download name and hold the same files."""
    for file_name, result in zip(unique_names(names), labels):
        yield f"masks/{Path(file_name).stem}.png", _png(mask_file_image(result, multiclass, palette))


def export_zip(session: Session, palette: list[int], folder: Path) -> Path:
    """Everything the session made, as one zip `diffews_masks.zip` in `folder`:

    - `masks/<query stem>.png`: each result at its image's size (binary L 0/255, or an index PNG for several classes);
    - `images/<query file>`: the images segmented, as they were uploaded (the session's own copies);
    - `examples/<name>.png` + `examples/<name>_mask.png`: the example set (the layout `diffews segment --support-dir`
      reads, and the demo opens again);
    - the annotation files of every format (`pipeline_diffews.formats.annotation_files`; file names are those under
      `images/`, categories named from the class names): `annotations.json` (COCO, RLE masks) and
      `annotations_polygons.json` (COCO, polygons), each image and annotation saying whether its mask was confirmed
      by the person or predicted (`mark_confirmed`); `data.yaml` + `labels/<query stem>.txt` (YOLO segmentation:
      the zip is a YOLO dataset root).
    """
    result, examples = session.result, session.examples
    if result is None and examples is None:
        raise InputError("Segment some images first: the download holds their masks.")
    multiclass = examples.multiclass
    path = folder / "diffews_masks.zip"
    file_names = [Path(n).name for n in unique_names(session.names)]
    labels = [result.labels(i) for i in range(len(file_names))] if result else []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in mask_files(session.names, labels, multiclass, palette):
            archive.writestr(name, data)
        for file_name, data in zip(file_names, session.files):
            archive.writestr(f"images/{file_name}", data)
        for name, image, mask in zip(examples.names, examples.images, examples.masks):
            archive.writestr(f"examples/{name}.png", _png(image))
            archive.writestr(f"examples/{name}_mask.png", _png(mask_file_image(mask, multiclass, palette)))
        ids = sorted({k for mask in labels for k in class_ids(mask)} | set(class_ids_of(examples)))
        categories = [(k, category_name(k, session.class_names.get(k), multiclass)) for k in ids]
        for name, data in annotation_files(list(zip(file_names, labels)), categories).items():
            archive.writestr(name, _with_confirmed(name, data, session.confirmed))
    return path


def _with_confirmed(name: str, data: bytes, confirmed: list[bool]) -> bytes:
    """An annotation file of the download: a COCO file (JSON) says which masks were confirmed (`mark_confirmed`)."""
    if not name.endswith(".json"):
        return data
    return json_text(mark_confirmed(json.loads(data), confirmed), indent=None).encode()


def mark_confirmed(dataset: dict, confirmed: list[bool]) -> dict:
    """A COCO dataset of the session's images (ids 1, 2, ... in order) with `"confirmed": true` on each image whose
    mask the person confirmed (false: predicted), and the same in each of its annotations' `attributes`."""
    for image in dataset["images"]:
        image["confirmed"] = bool(confirmed[image["id"] - 1])
    for annotation in dataset["annotations"]:
        annotation.setdefault("attributes", {})["confirmed"] = bool(confirmed[annotation["image_id"] - 1])
    return dataset


def unique_names(names: list[str]) -> list[str]:
    """File names made unique by `_2`, `_3`, ... suffixes on their stems (extensions kept)."""
    return [stem + Path(name).suffix for stem, name in zip(unique_stems(names), names)]


def class_ids_of(examples: ExampleSet) -> list[int]:
    """The class ids the example set marks."""
    return sorted({k for mask in examples.masks for k in class_ids(mask)})


def _png(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- saved sets


@dataclasses.dataclass
class SavedSet:
    """An example set read back from a zip: RGB images, uint8 label maps (one class: 1 = the object), file stems, the
    first palette mask's palette (or None), the class names its COCO file gives ({id: name})."""

    images: list[PIL.Image.Image]
    labels: list[np.ndarray]
    names: list[str]
    palette: list[int] | None
    class_names: dict[int, str]


def read_saved_set(path: str | Path) -> SavedSet:
    """The example set of a zip the demo downloaded (its `examples/`), or of any zip of `NAME.png` + `NAME_mask.png`
    pairs in one folder (`pipeline_diffews.inputs.find_support_pairs`, as `diffews segment --support-dir` reads).
    Raises InputError naming the zip for anything else."""
    name = Path(path).name
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise InputError(f"{name} is not a zip file: open a zip this page downloaded, or one of NAME.png + "
                         f"NAME{MASK_SUFFIX}.png pairs.") from error
    with archive, tempfile.TemporaryDirectory() as temporary:
        if sum(member.file_size for member in archive.infolist()) > MAX_SAVED_SET_BYTES:
            raise InputError(f"{name} holds more than {MAX_SAVED_SET_BYTES >> 20} MB: open an example set alone.")
        archive.extractall(temporary)
        folder = _pairs_folder(Path(temporary), name)
        try:
            pairs = find_support_pairs(folder)
        except ValueError as error:
            where = name if folder == Path(temporary) else f"{name} ({folder.relative_to(temporary)})"
            raise InputError(str(error).replace(f"--support-dir {folder}", where)) from None
        images, labels = [], []
        for image_path, mask_path in pairs:
            images.append(to_rgb(open_image(image_path, f"{name}: {image_path.name}")))
            labels.append(read_label_map(mask_path, images[-1].size, f"{name}: {mask_path.name}"))
        palette = next((p for p in (file_palette(mask) for _, mask in pairs) if p is not None), None)
        return SavedSet(images, labels, [image.stem for image, _ in pairs], palette,
                        _category_names(Path(temporary) / COCO_FILE))


def _pairs_folder(root: Path, name: str) -> Path:
    """The folder of an extracted zip that holds its example pairs: `examples/` (as the demo downloads it), else the
    one folder with `NAME_mask.*` files."""
    if (root / "examples").is_dir():
        return root / "examples"
    folders = sorted({p.parent for p in root.rglob(f"*{MASK_SUFFIX}.*") if "__MACOSX" not in p.parts})
    if len(folders) != 1:
        found = "no" if not folders else f"{len(folders)} folders of"
        raise InputError(f"{name} has {found} example pairs: open a zip this page downloaded, or one folder of "
                         f"NAME.png + NAME{MASK_SUFFIX}.png pairs.")
    return folders[0]


def _category_names(path: Path) -> dict[int, str]:
    """{class id: name} of the categories a COCO file names otherwise than by default (`category_name`)."""
    if not path.is_file():
        return {}
    try:
        categories = json.loads(path.read_text()).get("categories", [])
    except (ValueError, AttributeError):
        return {}
    defaults = {category_name(c.get("id", 0), None, multiclass) for c in categories for multiclass in (False, True)}
    return {int(c["id"]): str(c["name"]) for c in categories if c.get("name") and c["name"] not in defaults}


# ---------------------------------------------------------------------------------------------- classes and text


def default_color(class_id: int) -> tuple[int, int, int]:
    """The colour of class `class_id` (1..254) when no palette names one: its brush colour (CLASS_COLORS), beyond
    those the default palette's (`DiffewSImageProcessor.default_palette`)."""
    if 1 <= class_id <= len(CLASS_COLORS):
        return hex_to_rgb(CLASS_COLORS[class_id - 1])
    return tuple(DiffewSImageProcessor.default_palette()[3 * class_id : 3 * class_id + 3])


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


def _shares(entries: list[dict], label_maps: list[np.ndarray]) -> list[float]:
    pixels = sum(m.size for m in label_maps) or 1
    return [100 * sum(int((m == e["id"]).sum()) for m in label_maps) / pixels for e in entries]


def legend_markdown(entries: list[dict], label_maps: list[np.ndarray]) -> str:
    """The legend as one Markdown line: a square in the class colour, its name, id and share of the queries' pixels."""
    parts = [
        f'<span style="color:{e["color"]}">■</span> **{e["name"]}** (id {e["id"]}, {share:.1f}%)'
        for e, share in zip(entries, _shares(entries, label_maps))
    ]
    return "Classes: " + " · ".join(parts)


def legend_text(entries: list[dict], label_maps: list[np.ndarray]) -> str:
    """The legend as plain text: "Classes: road (id 1, 40.2%), car (id 2, 3.1%)."."""
    parts = [f'{e["name"]} (id {e["id"]}, {share:.1f}%)' for e, share in zip(entries, _shares(entries, label_maps))]
    return "Classes: " + ", ".join(parts) + "."


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


def describe_set(examples: ExampleSet | None, max_shots: int) -> str:
    """The example set in one line: how many examples it holds (and may hold), how many shots are cached, what
    adding the last one cost."""
    if examples is None:
        return f"Example set: empty (up to {max_shots} examples)."
    cached = examples.support.num_shots if examples.support is not None else 0
    opened = f"opened from {examples.opened}; " if examples.opened else ""
    text = (
        f"Example set: **{examples.num_shots}** example{'s' if examples.num_shots != 1 else ''} "
        f"(up to {max_shots}; {opened}{examples.num_added} added from corrected results), "
        f"{cached} shot{'s' if cached != 1 else ''} cached."
    )
    if examples.last_added_seconds is not None:
        text += f" Adding the last one took {examples.last_added_seconds:.2f} s (its support pass only)."
    return text
