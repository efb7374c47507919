"""ADE20K (SceneParsing ADEChallengeData2016, 150 classes), part of the in-context mix.

Layout (``root`` = ADEChallengeData2016, or a folder holding it)::

    root/images/{training,validation}/ADE_*.jpg
    root/annotations/{training,validation}/ADE_*.png   0 = other/unlabelled, 1..150 classes
    root/objectInfo150.txt (optional; class names, else the standard list below)

Class ids 0..149 = label values 1..150. Masks: 1 = the class, 0 = another class,
255 = label 0 ("other", ignored as in the standard benchmark).
The class -> images index is derived by scanning the PNGs (an image lists a class when
it has >= ``min_pixels`` pixels of it) and cached on disk: the first scan of the 20k
training PNGs takes a while. No standard folds: ``fold`` may be None (all classes,
the in-context setting) or an interleaved fold over ``num_folds`` (default 4).
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from .base import (
    IndexedSource,
    check_split,
    label_to_binary,
    list_files,
    load_rgb,
    read_label_png,
    require_dir,
    scan_label_index,
)

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door",
    "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
    "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan",
    "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)
SPLIT_DIRS = {"train": "training", "val": "validation"}
LAYOUT = (
    "  <root>/images/{training,validation}/*.jpg\n"
    "  <root>/annotations/{training,validation}/*.png (0 = other, 1..150 = classes)"
)


def read_object_info(path: Path) -> list[str] | None:
    """Class names from ``objectInfo150.txt``/``.csv`` (first synonym of each 'Name' cell)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    lines = text.splitlines()
    if not lines:
        return None
    delim = "\t" if "\t" in lines[0] else ","
    rows = list(csv.DictReader(lines, delimiter=delim))
    names = [re.split(r"[;,]", r.get("Name") or "")[0].strip() for r in rows]
    return names if len(names) == 150 and all(names) else None


class Ade20k(IndexedSource):
    """ADE20K split ``split`` ("train" = training, "val" = validation).

    Args:
        root: ADEChallengeData2016 folder (or its parent).
        split: "train" or "val".
        fold: None (all 150 classes) or 0..num_folds-1 (interleaved).
        mode: "train" or "test".
        num_folds: folds when ``fold`` is given (default 4).
        min_pixels, index_cache: see ``scan_label_index``.
    """

    name = "ade20k"

    def __init__(self, root, split: str = "train", fold: int | None = None, mode: str = "train",
                 *, num_folds: int = 4, min_pixels: int = 1,
                 index_cache: str | os.PathLike | bool | None = None):
        root = Path(root)
        if not (root / "images").is_dir() and (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        self.root = require_dir(root, self.name, LAYOUT)
        self.split = check_split(split, SPLIT_DIRS, self.name)
        sub = SPLIT_DIRS[self.split]
        self.image_dir = require_dir(root / "images" / sub, self.name, LAYOUT)
        self.label_dir = require_dir(root / "annotations" / sub, self.name, LAYOUT)
        self.num_folds = num_folds
        names = None
        for f in ("objectInfo150.txt", "objectInfo150.csv"):
            if (root / f).is_file():
                names = read_object_info(root / f)
                break
        self.num_classes = 150
        self.class_names = dict(enumerate(names or ADE20K_CLASSES))
        images = {p.stem: p for p in list_files(self.image_dir, (".jpg", ".jpeg"))}
        labels = {p.stem: p for p in list_files(self.label_dir, (".png",))}
        keys = sorted(set(images) & set(labels))
        if not keys:
            raise ValueError(f"{self.name}: no image with a label PNG under {str(root)!r}. "
                             f"Expected layout:\n{LAYOUT}")
        self._images = {k: images[k] for k in keys}
        self._labels = {k: labels[k] for k in keys}
        self._index = scan_label_index(self._labels, self.num_classes, value_offset=1,
                                       min_pixels=min_pixels, cache=index_cache,
                                       cache_tag=f"ade20k-{self.split}")
        self._set_classes(range(self.num_classes), fold, mode, num_folds, "interleaved")

    def load_image(self, key: str) -> Image.Image:
        return load_rgb(self._images[key])

    def load_mask(self, key: str, class_id: int) -> np.ndarray:
        return label_to_binary(read_label_png(self._labels[key]), int(class_id) + 1, (0,))
