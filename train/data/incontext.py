"""Mixtures of sources, and the in-context training mix (COCO + ADE20K + PASCAL VOC).

:class:`ConcatSource` puts several sources side by side:

* class ids are offset so they never collide: the k-th source's ids are shifted by the
  sum of the previous sources' ``num_classes`` (whatever their folds), so
  COCO 0..79, ADE20K 80..229, VOC 230..249 in the in-context mix;
* class names are prefixed with the part's name (``"coco/person"``) and image keys too
  (``"coco:train2014/COCO_train2014_000000000009.jpg"``);
* training episodes (``train.data.training_episodes.draw_training_spec``) draw the class with
  ``class_weights``: ``weighting="classes"`` (default) is uniform over all classes, so a
  dataset is drawn in proportion to its number of classes (80 : 150 : 20);
  ``weighting="uniform"`` gives every dataset the same probability, then a uniform class
  in it; ``weighting={"camvid": 0.5, "synthetic": 0.5}`` gives each dataset its share
  (any positive numbers, normalised), then a uniform class in it (``train/train.py
  --mix-dataset``). (Evaluation episodes always draw classes uniformly, HSNet's rule.)

:class:`InContextSource` builds the paper's in-context mix from ``root``:

* a dict ``{"coco": path, "ade20k": path, "voc": path}`` (any non-empty subset), or
* a folder with the sub-folders ``coco/`` (COCO 2014), ``ade20k/`` (ADEChallengeData2016)
  and ``voc/`` (VOC2012), all three required.

The split is passed to each part ("train": train2014, training, VOC train). The
in-context setting trains on every class, so ``fold`` must be None.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from .base import FewShotSource, check_mode

WEIGHTINGS = ("classes", "uniform")
INCONTEXT_PARTS = ("coco", "ade20k", "voc")


class ConcatSource(FewShotSource):
    """Several sources as one (see the module docstring).

    Args:
        sources: ``{part_name: source}`` in order (names without ":" or "/").
        weighting: "classes", "uniform", or ``{part_name: share}`` naming every part (shares > 0).
    """

    name = "concat"

    def __init__(self, sources: Mapping[str, FewShotSource], weighting: str | Mapping[str, float] = "classes"):
        if not sources:
            raise ValueError("sources must hold at least one source")
        if isinstance(weighting, Mapping):
            weighting = _check_shares(weighting, list(sources))
        elif weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS} or a dict of shares, got {weighting!r}")
        for n in sources:
            if not n or ":" in n or "/" in n:
                raise ValueError(f"source names must be non-empty without ':' or '/', got {n!r}")
        self.weighting = weighting
        self.parts: list[tuple[str, FewShotSource]] = list(sources.items())
        self.offsets: list[int] = []
        self.class_ids, self.class_names = [], {}
        offset = 0
        for n, s in self.parts:
            self.offsets.append(offset)
            self.class_ids += [offset + c for c in s.class_ids]
            self.class_names.update({offset + c: f"{n}/{nm}" for c, nm in s.class_names.items()})
            offset += s.num_classes
        self.num_classes = offset
        self._by_name = {n: (i, s) for i, (n, s) in enumerate(self.parts)}
        self._images: dict[int, list[str]] = {}

    def part_of(self, class_id: int) -> tuple[str, FewShotSource, int]:
        """``(part name, part source, local class id)`` of a global class id."""
        class_id = int(class_id)
        if not 0 <= class_id < self.num_classes:
            raise ValueError(f"{self.name}: class_id {class_id} out of range 0..{self.num_classes - 1}")
        i = bisect.bisect_right(self.offsets, class_id) - 1
        n, s = self.parts[i]
        return n, s, class_id - self.offsets[i]

    def _split_key(self, key: str) -> tuple[str, FewShotSource, str]:
        n, sep, local = key.partition(":")
        if not sep or n not in self._by_name:
            raise KeyError(f"{self.name}: key {key!r} is not '<part>:<key>' with part in {list(self._by_name)}")
        return n, self._by_name[n][1], local

    def images_of_class(self, class_id: int) -> list[str]:
        class_id = int(class_id)
        if class_id not in self._images:
            n, s, local = self.part_of(class_id)
            self._images[class_id] = [f"{n}:{k}" for k in s.images_of_class(local)]
        return list(self._images[class_id])

    def load_image(self, key: str) -> Image.Image:
        _, s, local = self._split_key(key)
        return s.load_image(local)

    def load_mask(self, key: str, class_id: int) -> np.ndarray:
        n, s, local_key = self._split_key(key)
        pn, _, local_c = self.part_of(class_id)
        if pn != n:
            raise ValueError(f"{self.name}: class {class_id} belongs to {pn!r}, key {key!r} to {n!r}")
        return s.load_mask(local_key, local_c)

    def class_weights(self, class_ids: Sequence[int]) -> np.ndarray | None:
        if self.weighting == "classes":
            return None
        parts = [self.part_of(c)[0] for c in class_ids]
        counts = {p: parts.count(p) for p in set(parts)}
        shares = self.weighting if isinstance(self.weighting, dict) else dict.fromkeys(counts, 1.0)
        w = np.array([shares[p] / counts[p] for p in parts])
        return w / w.sum()


def _check_shares(shares: Mapping[str, float], parts: list[str]) -> dict[str, float]:
    """``shares`` as ``{part: float}`` after checking it names exactly ``parts`` with finite positive numbers."""
    if sorted(shares) != sorted(parts):
        raise ValueError(f"weighting shares must name every part {parts}, got {sorted(shares)}")
    checked = {}
    for part, share in shares.items():
        try:
            value = float(share)
        except (TypeError, ValueError):
            value = float("nan")
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"weighting share of {part!r} must be a positive number, got {share!r}")
        checked[part] = value
    return checked


class InContextSource(ConcatSource):
    """The in-context training mix (see the module docstring).

    Args:
        root: dict ``{"coco"|"ade20k"|"voc": path}`` or a folder with those sub-folders.
        split: "train" or "val", passed to every part.
        fold: must be None.
        mode: "train" or "test" (validated; every class is served).
        weighting: "classes" (default) or "uniform".
        coco_kwargs, ade20k_kwargs, voc_kwargs: extra keyword arguments of each part.
    """

    name = "incontext"

    def __init__(self, root, split: str = "train", fold: int | None = None, mode: str = "train",
                 *, weighting: str = "classes", coco_kwargs: dict | None = None,
                 ade20k_kwargs: dict | None = None, voc_kwargs: dict | None = None):
        from .ade20k import Ade20k
        from .coco20i import Coco20i
        from .pascal5i import Pascal5i

        check_mode(mode)
        if fold is not None:
            raise ValueError(f"incontext: fold must be None (the in-context mix trains on every "
                             f"class), got {fold!r}")
        if isinstance(root, Mapping):
            unknown = set(root) - set(INCONTEXT_PARTS)
            if unknown or not root:
                raise ValueError(f"root dict keys must be a non-empty subset of {INCONTEXT_PARTS}, "
                                 f"got {sorted(root)}")
            paths = {k: Path(root[k]) for k in INCONTEXT_PARTS if k in root}
        else:
            base = Path(root)
            paths = {k: base / k for k in INCONTEXT_PARTS}
            missing = [str(p) for p in paths.values() if not p.is_dir()]
            if missing:
                raise ValueError(f"incontext: folder(s) {missing} not found. Expected layout:\n"
                                 f"  <root>/coco/ (COCO 2014), <root>/ade20k/ (ADEChallengeData2016), "
                                 f"<root>/voc/ (VOC2012)\n  or pass root as a dict of those paths")
        builders = {"coco": (Coco20i, coco_kwargs), "ade20k": (Ade20k, ade20k_kwargs),
                    "voc": (Pascal5i, voc_kwargs)}
        sources = {k: builders[k][0](p, split, None, mode, **(builders[k][1] or {}))
                   for k, p in paths.items()}
        super().__init__(sources, weighting=weighting)
