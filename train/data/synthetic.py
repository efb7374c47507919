"""Generated few-shot episodes: scenes of coloured, textured shapes where only the support says what to segment.

No files: every scene is drawn (numpy + PIL) from its key and the source's seed, so the same seed gives the same
pixels on every machine. A scene of ``size`` x ``size`` pixels (default 128) takes a few milliseconds.

**Kinds** (the classes): a kind is a combination of a shape family (:data:`SHAPES`), a colour family
(:data:`COLOUR_FAMILIES`) and a surface texture (:data:`TEXTURES`); class id = ``(shape * colours + colour) *
textures + texture``, 8 x 10 x 4 = 320 kinds. Each *instance* of a kind gets its own size, aspect ratio, rotation,
position, colour jitter and shading, so two pictures of one kind differ in everything but the kind.

**Scenes**: a background (a gradient, smooth noise, a stripe or check texture, or photo-like clutter of soft blobs
and strokes in muted colours), 1-2 instances of the scene's kind, then 1-2 instances of each of 3-7 *distractor*
kinds. Every kind of a scene has its own colour family, so a scene holds several objects of other kinds that a model
cannot tell from the target without the support. Objects may overlap; masks are what stays visible.

**Held-out kinds**: every kind of the colour family ``"purple"`` or the shape family ``"star"`` (68 kinds). They are
the classes of ``mode="test"`` and never appear in a ``mode="train"`` scene, not even as distractors. ``mode="train"``
serves the other 252 kinds.

**Splits**: ``"train"`` and ``"val"`` draw different scenes (the split is part of every scene's seed). The usual use
is ``split="train", mode="train"`` for training and ``split="val", mode="test"`` (held-out kinds) for evaluation.

Keys: ``"<split>/<class_id>/<index>"``; ``images_of_class(c)`` lists ``scenes_per_kind`` scenes whose kind is ``c``.
``load_mask(key, c)`` also answers for the distractor kinds of a scene (their masks; 0 when ``c`` is absent).

    source = SyntheticSource(None, "val", mode="test", seed=0)
    image, mask = source.load_image("val/3/0"), source.load_mask("val/3/0", 3)
"""

from __future__ import annotations

import colorsys
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .base import FewShotSource, check_mode, check_split

SHAPES = ("disc", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon")
COLOUR_FAMILIES = {  # name: (hue in degrees, saturation, value)
    "red": (0, 0.85, 0.85), "orange": (28, 0.9, 0.95), "yellow": (54, 0.85, 0.95), "lime": (88, 0.75, 0.8),
    "green": (135, 0.75, 0.6), "teal": (172, 0.8, 0.65), "sky": (200, 0.7, 0.95), "blue": (228, 0.85, 0.75),
    "purple": (275, 0.7, 0.7), "pink": (322, 0.6, 0.95),
}
TEXTURES = ("plain", "stripes", "dots", "checks")
HELD_OUT_COLOURS = ("purple",)
HELD_OUT_SHAPES = ("star",)
SPLITS = {"train": 1, "val": 2}
BACKGROUNDS = ("gradient", "noise", "stripes", "checks", "clutter")


@dataclass(frozen=True)
class Kind:
    """One class: a shape family, a colour family and a texture (indices into SHAPES, COLOUR_FAMILIES, TEXTURES)."""

    shape: int
    colour: int
    texture: int

    @property
    def class_id(self) -> int:
        return (self.shape * len(COLOUR_FAMILIES) + self.colour) * len(TEXTURES) + self.texture

    @classmethod
    def from_id(cls, class_id: int) -> Kind:
        rest, texture = divmod(int(class_id), len(TEXTURES))
        shape, colour = divmod(rest, len(COLOUR_FAMILIES))
        return cls(shape, colour, texture)

    @property
    def name(self) -> str:
        return f"{list(COLOUR_FAMILIES)[self.colour]} {TEXTURES[self.texture]} {SHAPES[self.shape]}"

    @property
    def held_out(self) -> bool:
        return list(COLOUR_FAMILIES)[self.colour] in HELD_OUT_COLOURS or SHAPES[self.shape] in HELD_OUT_SHAPES


NUM_KINDS = len(SHAPES) * len(COLOUR_FAMILIES) * len(TEXTURES)
ALL_KINDS = tuple(Kind.from_id(c) for c in range(NUM_KINDS))
HELD_OUT_IDS = tuple(k.class_id for k in ALL_KINDS if k.held_out)
TRAIN_IDS = tuple(k.class_id for k in ALL_KINDS if not k.held_out)


# ---------------------------------------------------------------------- drawing primitives


def kind_colour(kind: Kind, rng: np.random.Generator) -> np.ndarray:
    """RGB in [0, 1] of one instance: the family's colour with a little hue, saturation and value jitter."""
    hue, sat, val = list(COLOUR_FAMILIES.values())[kind.colour]
    h = ((hue + rng.uniform(-7, 7)) % 360) / 360
    s = float(np.clip(sat + rng.uniform(-0.1, 0.1), 0.3, 1))
    v = float(np.clip(val + rng.uniform(-0.1, 0.08), 0.3, 1))
    return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32)


def shape_outline(shape: str) -> list[tuple[float, float]] | None:
    """Polygon of a shape family in unit coordinates (radius about 1), or None for the round ones (disc, ring)."""
    if shape in ("disc", "ring"):
        return None
    if shape == "square":
        return [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    if shape == "diamond":
        return [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)]
    if shape == "hexagon":
        return [(math.cos(a), math.sin(a)) for a in np.deg2rad(np.arange(0, 360, 60))]
    if shape == "star":
        return [((1.0 if i % 2 == 0 else 0.45) * math.cos(a), (1.0 if i % 2 == 0 else 0.45) * math.sin(a))
                for i, a in enumerate(np.deg2rad(np.arange(-90, 270, 36)))]
    if shape == "cross":
        w = 0.33
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
                (-w, -w)]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def smooth_noise(size: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency noise [size, size] in [-1, 1] (bicubic upsampling of a random grid)."""
    grid = (rng.uniform(0, 255, (cells, cells))).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), np.float32) / 127.5 - 1


def texture_pattern(texture: str, shape: tuple[int, int], period: float, angle: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Brightness factor of a surface texture over an array of ``shape`` (H, W), around 1."""
    if texture == "plain":
        return np.ones(shape, np.float32)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    phase = rng.uniform(0, period, 2)
    if texture == "stripes":
        return np.where(((u + phase[0]) // (period / 2)) % 2 == 0, 1.2, 0.62).astype(np.float32)
    if texture == "checks":
        parity = ((u + phase[0]) // (period / 2) + (v + phase[1]) // (period / 2)) % 2
        return np.where(parity == 0, 1.2, 0.62).astype(np.float32)
    if texture == "dots":
        du = (u + phase[0]) % period - period / 2
        dv = (v + phase[1]) % period - period / 2
        return np.where(du**2 + dv**2 < (period * 0.28) ** 2, 0.45, 1.12).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")


def background(size: int, rng: np.random.Generator, style: str | None = None) -> np.ndarray:
    """A background [size, size, 3] in [0, 1]: muted colours, so that objects stand out by colour family."""
    style = style or BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]

    def muted() -> np.ndarray:
        return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.95)), np.float32)

    if style == "gradient":
        t = np.linspace(0, 1, size, dtype=np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None])
        ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
        rgb = (1 - ramp[..., None]) * muted() + ramp[..., None] * muted()
        return rgb + 0.04 * smooth_noise(size, 6, rng)[..., None]
    if style == "noise":
        base = muted()
        return base + 0.12 * np.stack([smooth_noise(size, int(rng.integers(4, 16)), rng) for _ in range(3)], -1)
    if style in ("stripes", "checks"):
        pattern = texture_pattern(style, (size, size), rng.uniform(10, 40), rng.uniform(0, math.pi), rng)
        return muted() * (0.85 + 0.15 * (pattern - 0.62) / 0.58)[..., None]
    if style == "clutter":
        image = Image.fromarray((muted() * 255).astype(np.uint8)[None, None].repeat(size, 0).repeat(size, 1))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(15, 40))):
            c = tuple(int(v * 255) for v in muted())
            x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size / 30, size / 7)
            if rng.uniform() < 0.5:
                draw.ellipse((x - r, y - r * rng.uniform(0.4, 1), x + r, y + r), fill=c)
            else:
                draw.line((x, y, x + rng.uniform(-3, 3) * r, y + rng.uniform(-3, 3) * r), fill=c,
                          width=max(1, int(r / 3)))
        blurred = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.5))))
        return np.asarray(blurred, np.float32) / 255 + 0.03 * smooth_noise(size, 8, rng)[..., None]
    raise ValueError(f"unknown background style {style!r}; expected one of {BACKGROUNDS}")


def instance_alpha(shape: str, box: tuple[int, int, int, int], cx: float, cy: float, radius: float, aspect: float,
                   angle: float, supersample: int = 2) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one instance over the pixel window ``box`` = (x0, y0, x1, y1).

    Drawn at ``supersample`` x and reduced; returns [y1 - y0, x1 - x0]. (cx, cy) are image coordinates.
    """
    x0, y0, x1, y1 = box
    s = supersample
    canvas = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    draw = ImageDraw.Draw(canvas)
    c, d = math.cos(angle), math.sin(angle)
    rx, ry = radius * aspect, radius / aspect
    outline = shape_outline(shape)
    points = outline or [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 40, endpoint=False)]

    def place(scale: float) -> list[tuple[float, float]]:
        return [((cx - x0 + scale * (rx * u * c - ry * v * d)) * s, (cy - y0 + scale * (rx * u * d + ry * v * c)) * s)
                for u, v in points]

    draw.polygon(place(1.0), fill=255)
    if shape == "ring":
        draw.polygon(place(0.5), fill=0)
    return np.asarray(canvas.resize((x1 - x0, y1 - y0), Image.BOX), np.float32) / 255


# ---------------------------------------------------------------------- scenes


@dataclass
class SyntheticScene:
    """A drawn scene. image: uint8 [H, W, 3]; labels: int16 [H, W], the class id seen at each pixel (-1 background)."""

    image: np.ndarray
    labels: np.ndarray

    def mask(self, class_id: int) -> np.ndarray:
        """uint8 [H, W]: 1 where ``class_id`` is visible, else 0."""
        return (self.labels == int(class_id)).astype(np.uint8)


def paint_instance(rgb: np.ndarray, labels: np.ndarray, kind_id: int, cx: float, cy: float, radius: float,
                   aspect: float, angle: float, rng: np.random.Generator) -> None:
    """Draws one instance of kind ``kind_id`` in place.

    Args:
        rgb: float32 [H, W, 3] in [0, 1], painted over.
        labels: int16 [H, W], set to ``kind_id`` where the instance covers at least half a pixel.
        cx, cy, radius: centre and size in pixels; aspect: width / height stretch (about 0.75-1.33); angle: radians.
        rng: draws the instance's colour jitter, texture phase and scale, and lighting.
    """
    kind = ALL_KINDS[int(kind_id)]
    height, width = labels.shape
    reach = radius * max(aspect, 1 / aspect) + 2
    x0, y0 = max(0, int(cx - reach)), max(0, int(cy - reach))
    x1, y1 = min(width, int(math.ceil(cx + reach))), min(height, int(math.ceil(cy + reach)))
    if x1 <= x0 or y1 <= y0:
        return
    alpha = instance_alpha(SHAPES[kind.shape], (x0, y0, x1, y1), cx, cy, radius, aspect, angle)[..., None]
    colour = kind_colour(kind, rng)
    pattern = texture_pattern(TEXTURES[kind.texture], (y1 - y0, x1 - x0), radius * rng.uniform(0.5, 0.8),
                              rng.uniform(0, math.pi), rng)
    light = rng.uniform(-1, 1, 2)
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    shade = np.clip(1 + 0.18 * ((x - cx) * light[0] + (y - cy) * light[1]) / radius, 0.7, 1.3)
    layer = np.clip(colour * (pattern * shade)[..., None], 0, 1)
    rgb[y0:y1, x0:x1] = rgb[y0:y1, x0:x1] * (1 - alpha) + layer * alpha
    labels[y0:y1, x0:x1][alpha[..., 0] >= 0.5] = kind.class_id


def draw_scene(kind_ids: list[int], counts: list[int], size: int, rng: np.random.Generator) -> SyntheticScene:
    """Draws ``counts[i]`` instances of kind ``kind_ids[i]`` on a random background, in a random order.

    Instances have a radius of 9-17 % of ``size`` and are placed mostly apart (centres at least 0.75 x the sum of
    radii apart when 20 tries allow it), so that each stays mostly visible.
    """
    rgb = background(size, rng).astype(np.float32)
    labels = np.full((size, size), -1, np.int16)
    instances = [k for k, n in zip(kind_ids, counts) for _ in range(n)]
    placed: list[tuple[float, float, float]] = []
    for i in rng.permutation(len(instances)):
        radius = rng.uniform(0.09, 0.17) * size
        for _ in range(20):
            cx, cy = rng.uniform(radius * 0.8, size - radius * 0.8, 2)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (0.75 * (radius + r)) ** 2 for x, y, r in placed):
                break
        placed.append((cx, cy, radius))
        paint_instance(rgb, labels, instances[i], cx, cy, radius, rng.uniform(0.75, 1.33), rng.uniform(0, 2 * math.pi),
                       rng)
    image = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    return SyntheticScene(image, labels)


# ---------------------------------------------------------------------- the source


class SyntheticSource(FewShotSource):
    """Generated few-shot scenes (see the module docstring).

    Args:
        root: ignored (no files); None or any value.
        split: "train" or "val" (different scenes).
        fold: None or 0 (one split of kinds: held-out kinds vs the others).
        mode: "train" (the 252 training kinds) or "test" (the 68 held-out kinds).
        seed: seed of every scene (int >= 0).
        size: scene width and height in pixels (>= 32).
        scenes_per_kind: scenes listed per kind (>= 2).
        distractor_kinds: (min, max) number of distractor kinds per scene, at most 8 (one colour family each).
        cache_size: scenes kept in memory (an episode reads a scene's image and mask separately).
    """

    name = "synthetic"

    def __init__(self, root=None, split: str = "train", fold: int | None = None, mode: str = "train", *,
                 seed: int = 0, size: int = 128, scenes_per_kind: int = 1000,
                 distractor_kinds: tuple[int, int] = (3, 7), cache_size: int = 64):
        self.split = check_split(split, SPLITS, self.name)
        self.mode = check_mode(mode)
        if fold not in (None, 0):
            raise ValueError(f"{self.name}: fold must be None or 0 (one split of kinds), got {fold!r}")
        for arg, value, low in (("seed", seed, 0), ("size", size, 32), ("scenes_per_kind", scenes_per_kind, 2),
                                ("cache_size", cache_size, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{self.name}: {arg} must be an integer >= {low}, got {value!r}")
        lo, hi = (distractor_kinds if isinstance(distractor_kinds, (tuple, list)) and len(distractor_kinds) == 2
                  else (None, None))
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= len(COLOUR_FAMILIES) - 2):
            raise ValueError(f"{self.name}: distractor_kinds must be (min, max) with 0 <= min <= max <= "
                             f"{len(COLOUR_FAMILIES) - 2}, got {distractor_kinds!r}")
        self.seed, self.size, self.scenes_per_kind = int(seed), int(size), int(scenes_per_kind)
        self.distractor_kinds = (lo, hi)
        self.num_classes = NUM_KINDS
        self.class_names = {k.class_id: k.name for k in ALL_KINDS}
        self.class_ids = sorted(HELD_OUT_IDS if self.mode == "test" else TRAIN_IDS)
        # Distractors of training scenes come from the training kinds only; held-out scenes may show any kind.
        self._distractor_pool = TRAIN_IDS if self.mode == "train" else tuple(range(NUM_KINDS))
        self._cache: OrderedDict[str, SyntheticScene] = OrderedDict()
        self._cache_size = int(cache_size)

    # ------------------------------------------------------------------ FewShotSource API
    def images_of_class(self, class_id: int) -> list[str]:
        class_id = int(class_id)
        if class_id not in self.class_ids:
            raise ValueError(f"{self.name}: class_id {class_id} is not served here ({self.mode} kinds); valid ids "
                             f"are {self.class_ids[0]}..{self.class_ids[-1]} of {self.num_classes}")
        return [f"{self.split}/{class_id}/{i}" for i in range(self.scenes_per_kind)]

    def load_image(self, key: str) -> Image.Image:
        return Image.fromarray(self.scene(key).image, "RGB")

    def load_mask(self, key: str, class_id: int) -> np.ndarray:
        return self.scene(key).mask(class_id)

    # ------------------------------------------------------------------ scenes
    def parse_key(self, key: str) -> tuple[int, int]:
        """``"<split>/<class_id>/<index>"`` -> (class_id, index); ValueError for keys of another split or kind."""
        parts = str(key).split("/")
        if len(parts) != 3 or parts[0] != self.split or not parts[1].isdigit() or not parts[2].isdigit():
            raise ValueError(f"{self.name}: key must be '{self.split}/<class_id>/<index>', got {key!r}")
        class_id, index = int(parts[1]), int(parts[2])
        if class_id not in self.class_ids:
            raise ValueError(f"{self.name}: key {key!r} names kind {class_id}, not one of this source's kinds")
        return class_id, index

    def scene_kinds(self, key: str) -> tuple[list[int], list[int], np.random.Generator]:
        """(kind ids, instance counts, the scene's drawing generator) of ``key``; the first kind is the key's."""
        class_id, index = self.parse_key(key)
        rng = np.random.default_rng([self.seed, SPLITS[self.split], class_id, index])
        target = ALL_KINDS[class_id]
        n = int(rng.integers(self.distractor_kinds[0], self.distractor_kinds[1] + 1))
        candidates = [c for c in self._distractor_pool if ALL_KINDS[c].colour != target.colour]
        kinds, colours = [class_id], {target.colour}
        for c in rng.permutation(candidates):
            if len(kinds) > n:
                break
            if ALL_KINDS[int(c)].colour not in colours:
                kinds.append(int(c))
                colours.add(ALL_KINDS[int(c)].colour)
        counts = [int(rng.integers(1, 3)) for _ in kinds]
        return kinds, counts, rng

    def scene(self, key: str) -> SyntheticScene:
        """The drawn scene of ``key`` (cached)."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        kinds, counts, rng = self.scene_kinds(key)
        scene = draw_scene(kinds, counts, self.size, rng)
        self._cache[key] = scene
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return scene
