"""COCO-20i (COCO 2014, 80 classes, 4 interleaved folds), HSNet's protocol.

Two on-disk layouts are read (``layout="auto"`` picks PNG when its mask folder exists,
since those are the masks HSNet scores against, else JSON):

JSON (the official COCO 2014 release)::

    root/train2014/*.jpg, root/val2014/*.jpg
    root/annotations/instances_{train,val}2014.json

  Masks are rasterised with ``pycocotools.mask`` from polygons, uncompressed RLE and
  compressed RLE. The categories, sorted by COCO category id, get the contiguous ids 0..79.
  Crowd regions (``iscrowd=1``, stored as RLE): ``crowd="foreground"`` (default) counts
  them as the class, like HSNet's masks, which paint every annotation of the class;
  ``crowd="ignore"`` marks them 255 where no non-crowd instance of the class lies (and
  an image then lists the class only if it has a non-crowd instance of it).

HSNet's PNG layout::

    root/train2014/*.jpg, root/val2014/*.jpg
    root/annotations/{train2014,val2014}/<stem>.png   pixel = class id + 1, 0 background
    root/splits/coco/{trn,val}/fold{f}.pkl (optional; or ``splits_dir``)

  The pickles map class id -> image names (``"train2014/<stem>.jpg"``); they are read
  with a restricted unpickler (plain containers, strings and numbers only). Without
  them the class -> images index is derived by scanning the PNGs (cached on disk).
  Mask value 255 counts as background, as in HSNet's loader (no ignore label).

Evaluation episodes (:meth:`Coco20i.evaluation_plan`): HSNet's, drawn from the split
pickles' lists in their own order; the pickles are read in both layouts when present.

Image keys are ``"<train|val>2014/<file name>"`` (HSNet's names) in both layouts.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .base import (
    IGNORE,
    IndexedSource,
    build_index,
    check_split,
    label_to_binary,
    list_files,
    load_rgb,
    read_label_png,
    require_dir,
    require_file,
    scan_label_index,
)
from .protocol import EpisodePlan

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)
LAYOUT = (
    "  JSON: <root>/{train2014,val2014}/*.jpg and <root>/annotations/instances_{train,val}2014.json\n"
    "  or HSNet PNG: <root>/{train2014,val2014}/*.jpg and <root>/annotations/{train2014,val2014}/*.png\n"
    "        (+ optional <root>/splits/coco/{trn,val}/fold<f>.pkl)"
)


# ---------------------------------------------------------------------- COCO-style JSON


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """Rasterise one COCO/LVIS ``segmentation`` (polygons, RLE or compressed RLE).

    Returns:
        bool array (height, width).
    """
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):  # polygons [[x1, y1, x2, y2, ...], ...]
        polys = [p for p in segm if len(p) >= 6]  # fewer than 3 points: no area
        if not polys:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segm, height, width)
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), (str, bytes)):
        counts = segm["counts"]
        rle = {"size": list(segm["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"unsupported segmentation of type {type(segm).__name__}")
    with warnings.catch_warnings():  # pycocotools' numpy-2 copy=False notice
        warnings.simplefilter("ignore", DeprecationWarning)
        m = mask_utils.decode(rle)
    if m.ndim == 3:
        m = m.max(axis=2)
    if m.shape != (height, width):
        raise ValueError(f"segmentation of size {m.shape} does not match the image size {(height, width)}")
    return m.astype(bool)


class InstanceAnnotations:
    """Class -> images index and per-class masks of a COCO-style instances JSON.

    Args:
        data: the loaded JSON (``images``, ``annotations``, ``categories``).
        image_key: function ``image_record -> key`` (the key also locates the file).
        crowd: "foreground" or "ignore" (see the module docstring).

    Attributes:
        cat_ids: category ids sorted ascending; class id = position in this list.
        names: ``{class_id: category name}``.
        index: ``{class_id: sorted keys}``.
        image_count: ``{class_id: number of images}`` (same as ``len(index[c])``).
    """

    def __init__(self, data: dict, image_key, crowd: str = "foreground"):
        if crowd not in ("foreground", "ignore"):
            raise ValueError(f"crowd must be 'foreground' or 'ignore', got {crowd!r}")
        for field in ("images", "annotations", "categories"):
            if field not in data:
                raise ValueError(f"instances JSON lacks the {field!r} field")
        self.crowd = crowd
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids = [int(c["id"]) for c in cats]
        cat_pos = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.names = {i: str(c.get("name", c["id"])) for i, c in enumerate(cats)}
        self.images: dict[str, dict] = {}
        key_of_id: dict[int, str] = {}
        for im in data["images"]:
            key = image_key(im)
            key_of_id[int(im["id"])] = key
            self.images[key] = {"height": int(im["height"]), "width": int(im["width"])}
        self.anns: dict[tuple[str, int], list[tuple[Any, bool]]] = {}
        pairs = []
        for a in data["annotations"]:
            key = key_of_id.get(int(a["image_id"]))
            c = cat_pos.get(int(a["category_id"]))
            if key is None or c is None or not a.get("segmentation"):
                continue
            is_crowd = bool(a.get("iscrowd", 0))
            self.anns.setdefault((key, c), []).append((a["segmentation"], is_crowd))
            if crowd == "foreground" or not is_crowd:
                pairs.append((c, key))
        self.index = build_index(pairs)

    def mask(self, key: str, class_id: int) -> np.ndarray:
        """uint8 (H, W): 1 = class, 0 = background, 255 = crowd (``crowd="ignore"`` only)."""
        info = self.images[key]
        h, w = info["height"], info["width"]
        fg = np.zeros((h, w), dtype=bool)
        crowd = np.zeros((h, w), dtype=bool)
        for segm, is_crowd in self.anns.get((key, int(class_id)), ()):
            m = decode_segmentation(segm, h, w)
            if is_crowd and self.crowd == "ignore":
                crowd |= m
            else:
                fg |= m
        out = fg.astype(np.uint8)
        out[crowd & ~fg] = IGNORE
        return out


def load_json(path: Path) -> dict:
    with open(path, "rb") as f:
        return json.load(f)


# ---------------------------------------------------------------------- safe pickle


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for split files: containers, strings and numbers, nothing executable."""

    _ALLOWED = {
        ("collections", "OrderedDict"), ("collections", "defaultdict"),
        ("builtins", "list"), ("builtins", "dict"), ("builtins", "set"), ("builtins", "int"),
        ("builtins", "str"), ("builtins", "tuple"),
        ("numpy", "dtype"), ("numpy", "ndarray"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a split file")


def safe_load_pickle(path: Path) -> Any:
    """Load a split pickle without executing code (only data types are allowed)."""
    return _SafeUnpickler(io.BytesIO(Path(path).read_bytes())).load()


# ---------------------------------------------------------------------- the source


class Coco20i(IndexedSource):
    """COCO-20i split ``split`` ("train" = train2014, "val" = val2014).

    Args:
        root: COCO 2014 folder (see the module docstring for both layouts).
        split: "train" or "val".
        fold: 0..3 or None (all classes).
        mode: "train" (the fold's 60 classes) or "test" (its 20: ``{fold + 4k}``).
        layout: "auto", "json" or "png".
        crowd: JSON layout, "foreground" (default, HSNet) or "ignore".
        splits_dir: folder holding HSNet's ``{trn,val}/fold*.pkl`` (PNG layout; default
            ``root/splits/coco`` when present).
        min_pixels, index_cache: for scanning PNGs when there are no split pickles.
    """

    name = "coco20i"
    num_folds = 4

    def __init__(self, root, split: str = "train", fold: int | None = None, mode: str = "train",
                 *, layout: str = "auto", crowd: str = "foreground",
                 splits_dir: str | os.PathLike | None = None, min_pixels: int = 1,
                 index_cache: str | os.PathLike | bool | None = None):
        self.root = Path(root)
        self.split = check_split(split, ("train", "val"), self.name)
        require_dir(self.root, self.name, LAYOUT)
        tag = f"{self.split}2014"
        self.image_dir = self.root / tag
        png_dir = self.root / "annotations" / tag
        json_path = self.root / "annotations" / f"instances_{tag}.json"
        if layout not in ("auto", "json", "png"):
            raise ValueError(f"layout must be 'auto', 'json' or 'png', got {layout!r}")
        if layout == "auto":
            layout = "png" if png_dir.is_dir() else "json"
        self.layout = layout
        require_dir(self.image_dir, self.name, LAYOUT)
        self._ann: InstanceAnnotations | None = None
        self._split_files, self._split_lists = self._read_split_pickles(fold, splits_dir)

        if layout == "json":
            data = load_json(require_file(json_path, self.name, LAYOUT))
            self._ann = InstanceAnnotations(data, lambda im: f"{tag}/{im['file_name']}", crowd=crowd)
            del data
            self.num_classes = len(self._ann.cat_ids)
            self.class_names = dict(self._ann.names)
            self._index = self._ann.index
        else:
            self.png_dir = require_dir(png_dir, self.name, LAYOUT)
            self.num_classes = len(COCO_CLASSES)
            self.class_names = dict(enumerate(COCO_CLASSES))
            self._index = self._png_index(min_pixels, index_cache)
        if self._split_files:
            self.split_source = ", ".join(str(f) for f in self._split_files)
        self._set_classes(range(self.num_classes), fold, mode, self.num_folds, "interleaved")

    def _read_split_pickles(self, fold, splits_dir) -> tuple[list[Path], dict[int, list[str]]]:
        """HSNet's ``<trn|val>/fold<f>.pkl`` (all folds when ``fold`` is None): the files and
        ``{class id: image keys}`` in the pickles' own order (duplicates across files dropped)."""
        tag = f"{self.split}2014"
        sdir = Path(splits_dir) if splits_dir is not None else self.root / "splits" / "coco"
        sub = sdir / ("trn" if self.split == "train" else "val")
        if splits_dir is not None:
            require_dir(sub, self.name, LAYOUT)
        if fold is not None and (sub / f"fold{fold}.pkl").is_file():
            files = [sub / f"fold{fold}.pkl"]
        else:
            files = sorted(sub.glob("fold*.pkl")) if sub.is_dir() else []
        lists: dict[int, list[str]] = {}
        for f in files:
            data = safe_load_pickle(f)
            if not isinstance(data, dict):
                raise ValueError(f"{self.name}: {str(f)!r} is not a dict class id -> image names")
            for c, names in data.items():  # names are "<split>2014/<file>.jpg" (bare files accepted)
                keys = lists.setdefault(int(c), [])
                seen = set(keys)
                for n in names:
                    key = str(n) if "/" in str(n) else f"{tag}/{n}"
                    if key not in seen:
                        keys.append(key)
                        seen.add(key)
        return files, lists

    def _png_index(self, min_pixels, index_cache) -> dict[int, list[str]]:
        tag = f"{self.split}2014"
        if self._split_files:
            return build_index((c, k) for c, keys in self._split_lists.items() for k in keys)
        labels = {f"{tag}/{p.stem}.jpg": p for p in list_files(self.png_dir, (".png",))}
        if not labels:
            raise ValueError(f"{self.name}: no PNG masks in {str(self.png_dir)!r}. Expected layout:\n{LAYOUT}")
        self.split_source = str(self.png_dir)
        return scan_label_index(labels, self.num_classes, value_offset=1, min_pixels=min_pixels,
                                cache=index_cache, cache_tag=f"coco-{tag}")

    def evaluation_plan(self, shots: int) -> EpisodePlan:
        """HSNet's COCO-20i episodes (``data/coco.py``), from its split pickles.

        Per episode: the class is drawn from the fold's classes (``fold, fold + 4, ...``), the
        query from that class's list in the pickle's own order, then the supports from the same
        list; 1000 episodes. Without the pickles the lists are :meth:`images_of_class` (sorted),
        with a warning: the rule is HSNet's, the episodes are not.
        """
        if not self._split_files:
            warnings.warn(f"{self.name}: HSNet's split pickles (splits/coco/<trn|val>/fold<f>.pkl) were not found "
                          f"under {str(self.root)!r}: HSNet's rule on sorted image lists, not HSNet's episodes",
                          UserWarning, stacklevel=2)
            return super().evaluation_plan(shots)
        classes = tuple(self.class_ids)
        pools = {c: tuple(self._split_lists.get(c, ())) for c in classes}
        empty = [c for c in classes if not pools[c]]
        if empty:
            raise ValueError(f"{self.name}: class(es) {empty} have no image in "
                             f"{', '.join(str(f) for f in self._split_files)}")
        return EpisodePlan("drawn", classes, pools, num_episodes=1000, reference="HSNet data/coco.py")

    def load_image(self, key: str) -> Image.Image:
        return load_rgb(self.root / key)

    def load_mask(self, key: str, class_id: int) -> np.ndarray:
        if self._ann is not None:
            if key not in self._ann.images:
                raise KeyError(f"{self.name}: unknown image key {key!r}")
            return self._ann.mask(key, int(class_id))
        stem = Path(key).stem
        label = read_label_png(self.png_dir / f"{stem}.png")
        return label_to_binary(label, int(class_id) + 1)  # 255 is background, as HSNet's loader
