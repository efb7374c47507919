"""PASCAL-5i (VOC 2012, 20 classes, 4 consecutive folds), HSNet's protocol.

Layout (``root`` = the VOC2012 folder; a ``root`` holding ``VOCdevkit/VOC2012`` or
``VOC2012`` is followed)::

    root/JPEGImages/<name>.jpg
    root/SegmentationClassAug/<name>.png   (SBD-augmented, as HSNet; preferred when present)
    root/SegmentationClass/<name>.png      (palette PNG; read as indices)
    root/splits/pascal/{trn,val}/fold{0..3}.txt    HSNet split files, lines "<name>__<1..20>"
    root/ImageSets/Segmentation/{train,val}.txt   fallback image lists

Label values: 0 background, 1..20 the VOC classes, 255 object borders / difficult regions.
Class ids 0..19 = VOC classes 1..20. Masks: 1 = the class, 0 = background or another class,
255 = label 255 (ignored, as HSNet/PFENet).

Index: with HSNet's split files (in ``root/splits/pascal`` or ``splits_dir``) every
``fold*.txt`` of the split ("trn" for train, "val" for val) is read and the (image, class)
pairs are used as they are (HSNet filtered them); otherwise the images of
``ImageSets/Segmentation/<split>.txt`` are scanned and an image lists a class when it has
>= ``min_pixels`` pixels of it (cached, see ``scan_label_index``).

Evaluation episodes (:meth:`Pascal5i.evaluation_plan`): HSNet's, which need the split
files: episode ``i``'s query is line ``i mod n`` of ``val/fold<f>.txt`` (not drawn), its
supports are drawn from that class's lines of the file, in file order.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .base import (
    IndexedSource,
    build_index,
    check_split,
    label_to_binary,
    load_rgb,
    require_dir,
    require_file,
    scan_label_index,
)
from .protocol import EpisodePlan

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
LAYOUT = (
    "  <root>/JPEGImages/<name>.jpg\n"
    "  <root>/SegmentationClassAug/<name>.png or <root>/SegmentationClass/<name>.png\n"
    "  <root>/splits/pascal/{trn,val}/fold<f>.txt (HSNet) or "
    "<root>/ImageSets/Segmentation/{train,val}.txt"
)


def voc_colormap() -> np.ndarray:
    """The VOC palette: (256, 3) uint8, row i = colour of label i."""
    cmap = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def read_voc_label(path: Path) -> np.ndarray:
    """Label indices (H, W) uint8 of a VOC mask: palette/L PNG as is, RGB via the VOC palette."""
    with Image.open(path) as im:
        if im.mode in ("P", "L"):
            return np.array(im)
        rgb = np.array(im.convert("RGB"), dtype=np.uint32)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    cmap = voc_colormap().astype(np.uint32)
    lut = {int((r << 16) | (g << 8) | b): i for i, (r, g, b) in enumerate(cmap) if i <= 20 or i == 255}
    out = np.full(code.shape, 255, dtype=np.uint8)  # unknown colours -> ignore
    for value, idx in lut.items():
        out[code == value] = idx
    return out


def resolve_voc_root(root: Path) -> Path:
    root = Path(root)
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    return root


def fold_number(path: Path) -> int:
    """``3`` for ``fold3.txt`` (files sort by fold number, not by name)."""
    digits = Path(path).stem.removeprefix("fold")
    return int(digits) if digits.isdigit() else -1


def read_split_file(path: Path, source: str = "pascal5i") -> list[tuple[str, int]]:
    """HSNet's ``fold<f>.txt``: lines ``<name>__<class 1..20>`` -> ``[(name, class id 0..19)]`` in file order."""
    pairs = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        name, _, cls = line.strip().rpartition("__")
        if not name or not cls.isdigit() or not 1 <= int(cls) <= 20:
            raise ValueError(f"{source}: bad line {line!r} in {str(path)!r}; expected '<name>__<class 1..20>'")
        pairs.append((name, int(cls) - 1))
    return pairs


class Pascal5i(IndexedSource):
    """PASCAL-5i split ``split`` ("train" or "val").

    Args:
        root: VOC2012 folder (see the module docstring).
        split: "train" or "val".
        fold: 0..3 or None (all 20 classes).
        mode: "train" (15 classes) or "test" (the fold's 5: ``5*fold .. 5*fold+4``).
        splits_dir: folder holding HSNet's ``{trn,val}/fold*.txt`` (default:
            ``root/splits/pascal`` when present).
        min_pixels, index_cache: for the fallback scan (see ``scan_label_index``).
    """

    name = "pascal5i"
    num_folds = 4

    def __init__(self, root, split: str = "train", fold: int | None = None, mode: str = "train",
                 *, splits_dir: str | os.PathLike | None = None, min_pixels: int = 1,
                 index_cache: str | os.PathLike | bool | None = None):
        self.root = resolve_voc_root(Path(root))
        self.split = check_split(split, ("train", "val"), self.name)
        self.image_dir = require_dir(self.root / "JPEGImages", self.name, LAYOUT)
        aug, plain = self.root / "SegmentationClassAug", self.root / "SegmentationClass"
        self.label_dir = aug if aug.is_dir() else require_dir(plain, self.name, LAYOUT)
        self.num_classes = len(VOC_CLASSES)
        self.class_names = dict(enumerate(VOC_CLASSES))

        hsnet_split = "trn" if self.split == "train" else "val"
        sdir = Path(splits_dir) if splits_dir is not None else self.root / "splits" / "pascal"
        if splits_dir is not None:
            require_dir(sdir / hsnet_split, self.name, LAYOUT)
        fold_files = sorted((sdir / hsnet_split).glob("fold*.txt")) if (sdir / hsnet_split).is_dir() else []
        self._split_lines: list[tuple[str, int]] = []  # HSNet's (name, class id) lines, in file order
        if fold_files:
            for f in sorted(fold_files, key=fold_number):
                self._split_lines += read_split_file(f, self.name)
            self._index = build_index((c, name) for name, c in self._split_lines)
            self.split_source = str(sdir / hsnet_split)
        else:
            lst = require_file(self.root / "ImageSets" / "Segmentation" / f"{self.split}.txt",
                               self.name, LAYOUT)
            names = sorted({n.strip() for n in lst.read_text().split() if n.strip()})
            files = {n: self.label_dir / f"{n}.png" for n in names}
            missing = [str(p) for p in files.values() if not p.is_file()]
            if missing:
                raise ValueError(f"{self.name}: {len(missing)} label PNG(s) listed in {str(lst)!r} "
                                 f"are missing, e.g. {missing[0]!r}")
            self._index = scan_label_index(files, self.num_classes, value_offset=1,
                                           min_pixels=min_pixels, cache=index_cache,
                                           cache_tag=f"pascal-{self.split}")
            self.split_source = str(lst)
        self._set_classes(range(self.num_classes), fold, mode, self.num_folds, "consecutive")

    def evaluation_plan(self, shots: int) -> EpisodePlan:
        """HSNet's PASCAL-5i episodes (``data/pascal.py``), from its split files.

        Episode ``i``'s query is line ``i mod n`` of the split files (the fold's
        ``val/fold<f>.txt`` for the test classes), in file order; its supports are drawn
        from the images listed for its class in those lines, in file order; 1000 episodes.
        Without split files, the episodes cannot be HSNet's: the default draw is used, with
        a warning.
        """
        held = set(self.class_ids)
        lines = tuple((name, c) for name, c in self._split_lines if c in held)
        if not lines:
            warnings.warn(f"{self.name}: HSNet's split files (splits/pascal/<trn|val>/fold<f>.txt) are not in "
                          f"{self.split_source!r}: the episodes are drawn by the default rule, not HSNet's",
                          UserWarning, stacklevel=2)
            return super().evaluation_plan(shots)
        pools: dict[int, list[str]] = {c: [] for c in self.class_ids}
        for name, c in lines:
            pools[c].append(name)
        return EpisodePlan("listed", tuple(self.class_ids), pools, num_episodes=1000,
                           reference="HSNet data/pascal.py", queries=lines)

    def load_image(self, key: str) -> Image.Image:
        return load_rgb(self.image_dir / f"{key}.jpg")

    def load_mask(self, key: str, class_id: int) -> np.ndarray:
        label = read_voc_label(self.label_dir / f"{key}.png")
        return label_to_binary(label, int(class_id) + 1, (255,))
