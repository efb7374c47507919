"""LVIS-92i (LVIS v1, 10 interleaved folds, from Matcher), for out-of-domain evaluation.

Layout::

    root/lvis_v1_train.json, root/lvis_v1_val.json   (or under root/annotations/)
    root/train2017/*.jpg, root/val2017/*.jpg         (COCO 2017 images)

LVIS images carry a ``coco_url`` (``http://images.cocodataset.org/<dir>/<file>``); the
image is read from ``root/<dir>/<file>`` and its key is ``"<dir>/<file>"`` (LVIS val
images come from both COCO train2017 and val2017). Masks are rasterised from the
polygons (or RLE) with ``pycocotools.mask``; LVIS has no crowd regions.

Classes: the LVIS categories sorted by category id get the contiguous ids
``0 .. num_classes - 1`` (1203 in LVIS v1). Folds as Matcher: the candidate classes are
the categories with more than one image (``>= min_images``, default 2) in the VAL json,
in id order; fold ``f`` tests candidates ``f, f + 10, f + 20, ...`` (the
``len(candidates) // 10`` first of them, dropping the remainder as Matcher does); the
training classes are all other categories. The fold split therefore needs
``lvis_v1_val.json`` even for the train split. Matcher's 5-shot protocol keeps classes
with more than 5 images: pass ``min_images=6``.

Matcher's layout (``layout="matcher"``, picked by ``"auto"`` when ``root/lvis_val.pkl``
exists): ``root`` is Matcher's ``LVIS`` folder, with ``lvis_{train,val}.pkl`` (a dict
category -> dict image name -> ``{"annotations": [{"segmentation": ...}, ...]}``) and the
images under ``root/coco/<image name>``. Class ids are the positions of the categories in
the val pickle's key order (then the train pickle's other keys); names are the keys as
text; a mask is the union of the image's annotations of the class, as Matcher's loader.

Evaluation episodes (:meth:`Lvis92i.evaluation_plan`): Matcher's (``matcher/data/lvis.py``).
The fold's classes are Matcher's for the number of shots (candidates with more than
``shots`` val images, whatever ``min_images``); episode ``i`` takes class ``i mod n`` of
the fold, in order, and draws its query, then its supports (until they differ from the
query), from the class's images with HSNet's draw; 2300 episodes. The image lists are in
the pickle's order (Matcher's layout, Matcher's exact episodes) or in key order (json).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from .base import IndexedSource, check_mode, check_split, load_rgb, require_dir, require_file
from .coco20i import InstanceAnnotations, decode_segmentation, load_json, safe_load_pickle
from .protocol import EpisodePlan

LAYOUT = (
    "  <root>/lvis_v1_{train,val}.json (or <root>/annotations/lvis_v1_{train,val}.json)\n"
    "  <root>/train2017/*.jpg, <root>/val2017/*.jpg\n"
    "  or Matcher's: <root>/lvis_{train,val}.pkl and <root>/coco/{train2017,val2017}/*.jpg"
)
LAYOUTS = ("auto", "json", "matcher")


def lvis_image_key(image: dict) -> str:
    """``"<dir>/<file>"`` of an LVIS image record (from ``coco_url``, else ``file_name``)."""
    url = image.get("coco_url")
    if url:
        parts = urlparse(url).path.strip("/").split("/")
        if len(parts) >= 2:
            return f"{parts[-2]}/{parts[-1]}"
    name = image.get("file_name")
    if name:
        return name
    raise ValueError(f"LVIS image {image.get('id')} has neither coco_url nor file_name")


def _find_json(root: Path, split: str) -> Path:
    for cand in (root / f"lvis_v1_{split}.json", root / "annotations" / f"lvis_v1_{split}.json"):
        if cand.is_file():
            return cand
    raise ValueError(f"lvis92i: file {str(root / f'lvis_v1_{split}.json')!r} not found "
                     f"(nor under annotations/). Expected layout:\n{LAYOUT}")


def lvis_fold_classes(val_counts: dict[int, int], num_classes: int, fold: int,
                      num_folds: int = 10, min_images: int = 2) -> tuple[list[int], list[int]]:
    """Matcher's LVIS-92i split.

    Args:
        val_counts: ``{class_id: images in the val json}``.
        num_classes: all categories.
    Returns:
        ``(train_ids, test_ids)``.
    """
    if not isinstance(fold, int) or not 0 <= fold < num_folds:
        raise ValueError(f"fold must be an integer in 0..{num_folds - 1}, got {fold!r}")
    cands = [c for c in range(num_classes) if val_counts.get(c, 0) >= min_images]
    per_fold = len(cands) // num_folds
    if per_fold == 0:
        raise ValueError(f"lvis92i: only {len(cands)} classes have >= {min_images} val images; "
                         f"cannot make {num_folds} folds")
    test = [cands[fold + num_folds * v] for v in range(per_fold)]
    held = set(test)
    return [c for c in range(num_classes) if c not in held], sorted(test)


class Lvis92i(IndexedSource):
    """LVIS-92i split ``split`` ("train" or "val").

    Args:
        root: see the module docstring.
        split: "train" or "val".
        fold: 0..9 or None (every category).
        mode: "train" (the other categories) or "test" (the fold's ~92).
        min_images: fold candidates need this many val images (Matcher: shots + 1).
        num_folds: 10.
        layout: "auto", "json" or "matcher" (see the module docstring).
    """

    name = "lvis92i"

    def __init__(self, root, split: str = "val", fold: int | None = None, mode: str = "test",
                 *, min_images: int = 2, num_folds: int = 10, layout: str = "auto"):
        self.root = require_dir(Path(root), self.name, LAYOUT)
        self.split = check_split(split, ("train", "val"), self.name)
        check_mode(mode)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if layout == "auto":
            layout = "matcher" if (self.root / "lvis_val.pkl").is_file() else "json"
        self.layout, self.num_folds, self.fold, self.mode = layout, num_folds, fold, mode
        self._val_counts: dict[int, int] = {}
        self._records: dict[int, dict] = {}  # Matcher's layout: {class id: {image name: record}}, pickle order
        if layout == "matcher":
            self._read_matcher_pickles()
        else:
            self._read_jsons()
        if fold is None:
            self.class_ids = list(range(self.num_classes))
        else:
            train_ids, test_ids = lvis_fold_classes(self._val_counts, self.num_classes, fold, num_folds, min_images)
            self.class_ids = train_ids if mode == "train" else test_ids

    def _read_matcher_pickles(self) -> None:
        val = _read_matcher_pickle(self.root / "lvis_val.pkl")
        data = val if self.split == "val" else _read_matcher_pickle(self.root / "lvis_train.pkl")
        keys = list(val) + [k for k in data if k not in val]
        position = {k: i for i, k in enumerate(keys)}
        self.num_classes = len(keys)
        self.class_names = {i: str(k) for i, k in enumerate(keys)}
        self._records = {position[k]: v for k, v in data.items()}
        self._index = {c: sorted(v) for c, v in self._records.items()}
        self._val_counts = {position[k]: len(v) for k, v in val.items()}
        self.image_root = self.root / "coco" if (self.root / "coco").is_dir() else self.root

    def _read_jsons(self) -> None:
        data = load_json(_find_json(self.root, self.split))
        self._ann = InstanceAnnotations(data, lvis_image_key, crowd="foreground")
        cat_ids = self._ann.cat_ids
        del data
        self.num_classes = len(cat_ids)
        self.class_names = dict(self._ann.names)
        self._index = self._ann.index
        self.image_root = self.root
        if self.fold is not None:
            if self.split == "val":
                val = self._ann
            else:
                val = InstanceAnnotations(load_json(_find_json(self.root, "val")), lvis_image_key)
                if val.cat_ids != cat_ids:
                    raise ValueError("lvis92i: the train and val jsons have different categories")
            self._val_counts = {c: len(v) for c, v in val.index.items()}

    def evaluation_plan(self, shots: int) -> EpisodePlan:
        """Matcher's LVIS-92i episodes; see the module docstring.

        For the test classes of a fold of the val split the classes are Matcher's fold for
        ``shots``; otherwise (no fold, or training classes) the classes of the source with
        more than ``shots`` images, the others skipped with a warning.
        """
        if self.fold is not None and self.mode == "test" and self.split == "val":
            _, classes = lvis_fold_classes(self._val_counts, self.num_classes, self.fold, self.num_folds,
                                           min_images=shots + 1)
        else:
            classes = self.usable_classes(shots + 1)
            if not classes:
                raise ValueError(f"{self.name}: no class has more than {shots} images")
        if self._records:  # Matcher's pickles: their own order
            pools = {c: tuple(self._records.get(c, ())) for c in classes}
        else:
            pools = {c: tuple(self.images_of_class(c)) for c in classes}
        return EpisodePlan("cycled", tuple(classes), pools, num_episodes=2300, reference="Matcher matcher/data/lvis.py")

    def load_image(self, key: str) -> Image.Image:
        return load_rgb(self.image_root / key)

    def load_mask(self, key: str, class_id: int) -> np.ndarray:
        if self.layout == "matcher":
            return self._matcher_mask(key, int(class_id))
        if key not in self._ann.images:
            raise KeyError(f"{self.name}: unknown image key {key!r}")
        return self._ann.mask(key, int(class_id))

    def _matcher_mask(self, key: str, class_id: int) -> np.ndarray:
        """Union of the image's annotations of the class (Matcher's loader), at the image's size."""
        path = self.image_root / key
        if not path.is_file():
            raise KeyError(f"{self.name}: unknown image key {key!r} (no file {str(path)!r})")
        with Image.open(path) as im:
            width, height = im.size
        mask = np.zeros((height, width), dtype=bool)
        record = self._records.get(class_id, {}).get(key)
        for ann in (record or {}).get("annotations", ()):
            mask |= decode_segmentation(ann["segmentation"], height, width)
        return mask.astype(np.uint8)


def _read_matcher_pickle(path: Path) -> dict:
    """Matcher's ``lvis_<split>.pkl``: ``{category: {image name: {"annotations": [...]}}}``, order kept."""
    data = safe_load_pickle(require_file(path, "lvis92i", LAYOUT))
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"lvis92i: {str(path)!r} is not a dict category -> dict image name -> record (Matcher's)")
    return data
