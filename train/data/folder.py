"""A user's own few-shot dataset: one folder per class.

Layout::

    root/<class_name>/images/<stem>.{jpg,jpeg,png}
    root/<class_name>/masks/<stem>.png        grey or colour; any value > 0 = the object

If ``root/<split>/`` exists and is not itself a class folder, it is used as the root (so
``root/train/<class>/...`` and ``root/val/<class>/...`` work); otherwise ``split`` is a
label only. Images without a mask are skipped with a warning. Masks hold no ignore value.

Classes: the class folders sorted by name get ids 0..N-1, or ``classes`` (a list of
names) fixes the ids (position in the list); a listed class with no folder has no images.
Folds need that fixed order: ``fold`` must be None unless ``classes`` is given; then
``num_folds`` (default 4) and ``rule`` (default "interleaved") apply.
Image keys are ``"<class_name>/<image file name>"``; each image belongs to its folder's
class only.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .base import IndexedSource, check_mode, list_files, load_rgb, require_dir

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
LAYOUT = (
    "  <root>/<class_name>/images/<stem>.{jpg,jpeg,png}\n"
    "  <root>/<class_name>/masks/<stem>.png (value > 0 = object)"
)


class FolderSource(IndexedSource):
    """A custom dataset in ``root/<class>/{images,masks}``.

    Args:
        root: the dataset folder.
        split: optional sub-folder name (see the module docstring); None for none.
        fold: None, or a fold index when ``classes`` is given.
        mode: "train" or "test".
        classes: class names in id order (optional).
        num_folds, rule: fold split when ``fold`` is given.
    """

    name = "folder"

    def __init__(self, root, split: str | None = None, fold: int | None = None, mode: str = "train",
                 *, classes: Sequence[str] | None = None, num_folds: int = 4,
                 rule: str = "interleaved"):
        root = require_dir(Path(root), self.name, LAYOUT)
        check_mode(mode)
        if split and (root / split).is_dir() and not (root / split / "images").is_dir():
            root = root / split
        self.root, self.split = root, split
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "images").is_dir())
        if classes is None:
            if fold is not None:
                raise ValueError(f"{self.name}: fold must be None unless `classes` fixes the class "
                                 f"order, got fold={fold!r}")
            if not found:
                raise ValueError(f"{self.name}: no class folder with an images/ sub-folder in "
                                 f"{str(root)!r}. Expected layout:\n{LAYOUT}")
            names = found
        else:
            names = [str(c) for c in classes]
            if len(set(names)) != len(names) or not names:
                raise ValueError(f"classes must be a non-empty list of distinct names, got {classes!r}")
        self.num_classes = len(names)
        self.class_names = dict(enumerate(names))
        self._index, self._masks = {}, {}
        skipped = []
        for cid, n in enumerate(names):
            if not (root / n / "images").is_dir():
                continue
            keys = []
            for img in list_files(root / n / "images", IMAGE_EXTS):
                mask = root / n / "masks" / f"{img.stem}.png"
                if mask.is_file():
                    key = f"{n}/{img.name}"
                    keys.append(key)
                    self._masks[key] = mask
                else:
                    skipped.append(str(img))
            self._index[cid] = sorted(keys)
        if skipped:
            warnings.warn(f"{self.name}: {len(skipped)} image(s) without a mask skipped, e.g. "
                          f"{skipped[0]!r} (expected <class>/masks/<stem>.png)", stacklevel=2)
        self._set_classes(range(self.num_classes), fold, mode, num_folds, rule)

    def load_image(self, key: str) -> Image.Image:
        cls, _, file = key.partition("/")
        return load_rgb(self.root / cls / "images" / file)

    def load_mask(self, key: str, class_id: int) -> np.ndarray:
        with Image.open(self._masks[key]) as im:
            if im.mode in ("L", "P", "1", "I", "I;16"):
                arr = np.array(im)
            else:  # colour: any non-black pixel is object
                arr = np.array(im.convert("RGB")).max(axis=2)
        if self.class_names.get(int(class_id)) != key.partition("/")[0]:
            return np.zeros(arr.shape[:2], dtype=np.uint8)
        return (arr > 0).astype(np.uint8)
