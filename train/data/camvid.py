"""CamVid (11 classes), the small real dataset of the project's tests and learning benchmark.

Layout (``root``, e.g. ``../shared/data/camvid``; read only, never copied)::

    root/{train,val}/images/<stem>.jpg
    root/{train,val}/labels/<stem>.png   8-bit class ids 0..10, 11 = Unlabelled

Masks: 1 = the class, 0 = other classes, 255 = Unlabelled (id 11).
Folds: interleaved, 4 folds over the 11 classes (fold 0 test = Sky, Pavement, Car).
Image keys are file stems. The class -> images index is built by scanning the label PNGs
(an image lists a class when it has >= ``min_pixels`` pixels of it), cached on disk.
"""

from __future__ import annotations

import os
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

CAMVID_CLASSES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)
UNLABELLED = 11
LAYOUT = (
    "  <root>/{train,val}/images/<stem>.jpg\n"
    "  <root>/{train,val}/labels/<stem>.png  (class ids 0..10, 11 = Unlabelled)"
)


class CamVid(IndexedSource):
    """CamVid split ``split`` ("train" or "val"), fold classes per ``fold``/``mode``.

    Args:
        root: folder holding ``train/`` and ``val/``.
        split: "train" or "val".
        fold: 0..3 or None (all 11 classes).
        mode: "train" (the fold's 7-8 training classes) or "test" (its 2-3 held-out ones).
        min_pixels: pixels of a class an image needs to be listed for it (default 1).
        index_cache: see :func:`train.data.base.scan_label_index` (None = default folder,
            False = no cache, or a folder).
    """

    name = "camvid"
    num_folds = 4

    def __init__(self, root, split: str = "train", fold: int | None = None, mode: str = "train",
                 *, min_pixels: int = 1, index_cache: str | os.PathLike | bool | None = None):
        self.root = Path(root)
        self.split = check_split(split, ("train", "val"), self.name)
        base = require_dir(self.root / self.split, self.name, LAYOUT)
        self.image_dir = require_dir(base / "images", self.name, LAYOUT)
        self.label_dir = require_dir(base / "labels", self.name, LAYOUT)
        self.num_classes = len(CAMVID_CLASSES)
        self.class_names = dict(enumerate(CAMVID_CLASSES))
        images = {p.stem: p for p in list_files(self.image_dir, (".jpg", ".jpeg", ".png"))}
        labels = {p.stem: p for p in list_files(self.label_dir, (".png",))}
        missing = sorted(set(images) - set(labels))
        if missing:
            raise ValueError(f"{self.name}: {len(missing)} image(s) in {str(self.image_dir)!r} "
                             f"have no label PNG in {str(self.label_dir)!r}, e.g. {missing[0]!r}")
        if not images:
            raise ValueError(f"{self.name}: no images in {str(self.image_dir)!r}. Expected layout:\n{LAYOUT}")
        self._images = images
        self._labels = {k: labels[k] for k in images}
        self._index = scan_label_index(self._labels, self.num_classes, value_offset=0,
                                       min_pixels=min_pixels, cache=index_cache,
                                       cache_tag=f"camvid-{self.split}")
        self._set_classes(range(self.num_classes), fold, mode, self.num_folds, "interleaved")

    def load_image(self, key: str) -> Image.Image:
        return load_rgb(self._images[key])

    def load_mask(self, key: str, class_id: int) -> np.ndarray:
        return label_to_binary(read_label_png(self._labels[key]), int(class_id), (UNLABELLED,))
