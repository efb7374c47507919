"""FSS-1000 (1000 classes of 10 images each), HSNet's split.

Layout::

    root/fewshot_data/<class>/<n>.jpg + <n>.png    (the release; or root/<class>/... directly)
    root/splits/fss/{trn,val,test}.txt              HSNet's class lists, one name per line
                                                    (or ``splits_dir``)

Masks: PNG read as grey levels, >= 128 -> 1 (HSNet), otherwise 0; there is no ignore.

Classes (as HSNet): each split's names sorted; train = ids 0..519, val = 520..759,
test = 760..999 (ids follow trn, val, test order, so a class id is the same whatever the
split). ``split="all"`` serves every class folder, sorted, ids 0..N-1, and needs no split
files. FSS-1000 has no folds: ``fold`` must be None, and ``mode`` does not change the
classes (the split picks them). Image keys are ``"<class>/<n>.jpg"``.

Evaluation episodes (:meth:`Fss1000.evaluation_plan`): HSNet's. Every image of the split is
the query once, classes in name order and each class's images in file-name order
("1.jpg", "10.jpg", "2.jpg", ...): 2400 episodes on the test split. Supports are drawn from
the class's images in numeric order (HSNet draws from ``range(1, 11)``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .base import IndexedSource, check_mode, check_split, load_rgb, require_dir, require_file
from .protocol import EpisodePlan

HSNET_SPLITS = {"train": "trn", "val": "val", "test": "test"}
LAYOUT = (
    "  <root>/fewshot_data/<class>/<n>.jpg and <n>.png (or <root>/<class>/...)\n"
    "  <root>/splits/fss/{trn,val,test}.txt (class names, one per line; not needed for split='all')"
)


def numeric_order(key: str) -> tuple:
    """Sort key of ``"<class>/<n>.jpg"``: by the number ``n`` (``2`` before ``10``), names that are
    not numbers after all numbers, by name."""
    stem = Path(key).stem
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


class Fss1000(IndexedSource):
    """FSS-1000 classes of ``split`` ("train", "val", "test" or "all").

    Args:
        root: see the module docstring.
        split: "train", "val", "test" (HSNet split files) or "all".
        fold: must be None.
        mode: "train" or "test" (validated only).
        splits_dir: folder holding ``{trn,val,test}.txt`` (default ``root/splits/fss``).
    """

    name = "fss1000"

    def __init__(self, root, split: str = "test", fold: int | None = None, mode: str = "test",
                 *, splits_dir: str | os.PathLike | None = None):
        root = require_dir(Path(root), self.name, LAYOUT)
        self.split = check_split(split, ("train", "val", "test", "all"), self.name)
        check_mode(mode)
        if fold is not None:
            raise ValueError(f"{self.name}: fold must be None (FSS-1000 has no folds; the split "
                             f"picks the classes), got {fold!r}")
        self.root = root
        self.data_dir = root / "fewshot_data" if (root / "fewshot_data").is_dir() else root
        sdir = Path(splits_dir) if splits_dir is not None else root / "splits" / "fss"

        if self.split == "all":
            names = sorted(p.name for p in self.data_dir.iterdir() if p.is_dir() and p.name != "splits")
            order = names
            served = names
        else:
            lists = {}
            for s, f in HSNET_SPLITS.items():
                path = sdir / f"{f}.txt"
                if s == self.split:
                    require_file(path, self.name, LAYOUT)
                if path.is_file():
                    lists[s] = sorted(n.strip() for n in path.read_text().splitlines() if n.strip())
            # ids in HSNet's order: trn, val, test (missing lists leave no gap)
            order = [n for s in ("train", "val", "test") for n in lists.get(s, [])]
            served = lists[self.split]
        self.num_classes = len(order)
        self.class_names = dict(enumerate(order))
        ids = {n: i for i, n in enumerate(order)}
        self._index = {}
        for n in served:
            folder = require_dir(self.data_dir / n, self.name, LAYOUT)
            jpgs = sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".jpg")
            self._index[ids[n]] = [f"{n}/{j}" for j in jpgs]
        self.class_ids = sorted(ids[n] for n in served)

    def evaluation_plan(self, shots: int) -> EpisodePlan:
        """HSNet's FSS-1000 episodes (``data/fss.py``); see the module docstring."""
        queries = tuple((key, c) for c in self.class_ids for key in self._index[c])
        if not queries:
            raise ValueError(f"{self.name}: the {self.split} split has no image")
        pools = {c: tuple(sorted(self._index[c], key=numeric_order)) for c in self.class_ids}
        return EpisodePlan("listed", tuple(self.class_ids), pools, num_episodes=len(queries),
                           reference="HSNet data/fss.py", queries=queries)

    def load_image(self, key: str) -> Image.Image:
        return load_rgb(self.data_dir / key)

    def load_mask(self, key: str, class_id: int) -> np.ndarray:
        path = (self.data_dir / key).with_suffix(".png")
        if not path.is_file():
            raise ValueError(f"{self.name}: mask {str(path)!r} not found for image {key!r}")
        cls = key.split("/")[0]
        with Image.open(path) as im:
            grey = np.array(im.convert("L"))
        if self.class_names.get(int(class_id)) != cls:  # each image holds only its own class
            return np.zeros(grey.shape, dtype=np.uint8)
        return (grey >= 128).astype(np.uint8)
