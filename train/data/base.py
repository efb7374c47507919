"""Common base of every few-shot data source.

A :class:`FewShotSource` is one benchmark split on disk (for example COCO-20i, ``val``
split, fold 0, test classes), restricted to a set of class ids. It answers three questions:

* which images contain class ``c``  -> :meth:`FewShotSource.images_of_class`
* the RGB image of key ``k``         -> :meth:`FewShotSource.load_image`
* the binary mask of ``c`` in ``k``  -> :meth:`FewShotSource.load_mask`, uint8 HxW with
  0 = background, 1 = the class, 255 = ignore (VOC borders, CamVid "Unlabelled", ...).

Episode sampling (``train.data.episodes``, ``train.data.training_episodes``) is built on these three methods, and on
:meth:`FewShotSource.evaluation_plan`, which says how the benchmark's reference code draws
its test episodes (a default, HSNet's COCO-20i loop, serves every source).

This module also holds the small helpers the concrete sources share: fold selection,
label-map -> binary mask conversion, and a class -> images index built by scanning
label PNGs, cached on disk (scanning ADE20K's 20k PNGs takes minutes; the cache makes
the second run instant).
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from .protocol import EpisodePlan, fold_class_ids

IGNORE = 255
"""Mask value of pixels that no metric or loss should count."""

MODES = ("train", "test")


class FewShotSource(abc.ABC):
    """One benchmark split, restricted to a set of classes (abstract).

    Attributes:
        name: short dataset name (``"coco20i"``, ``"camvid"``, ...).
        num_classes: number of classes of the whole benchmark; every class id is in
            ``0 .. num_classes - 1`` whatever the fold (use it to size metrics).
        class_ids: the classes this source serves after the fold split, sorted.
        class_names: ``{class_id: name}`` for at least every id in ``class_ids``.

    Subclasses implement :meth:`images_of_class`, :meth:`load_image` and
    :meth:`load_mask`. Image keys are strings, unique within a source.
    """

    name: str = "source"
    num_classes: int = 0
    class_ids: list[int]
    class_names: dict[int, str]

    # ------------------------------------------------------------------ abstract API
    @abc.abstractmethod
    def images_of_class(self, class_id: int) -> list[str]:
        """Keys of the images that contain ``class_id``: sorted, deterministic."""

    @abc.abstractmethod
    def load_image(self, key: str) -> Image.Image:
        """The image ``key`` as an RGB ``PIL.Image.Image`` (its own size)."""

    @abc.abstractmethod
    def load_mask(self, key: str, class_id: int) -> np.ndarray:
        """Mask of ``class_id`` in image ``key``.

        Returns:
            ``np.ndarray`` uint8 of shape (H, W) (the image's size) with values
            0 (background), 1 (class) and 255 (ignore).
        """

    # ------------------------------------------------------------------ helpers
    def class_weights(self, class_ids: Sequence[int]) -> np.ndarray | None:
        """Sampling probabilities of ``class_ids`` for training episodes.

        ``None`` (the default) means uniform over classes. Mixtures override this
        (see ``train.data.incontext``).
        """
        return None

    def evaluation_plan(self, shots: int) -> EpisodePlan:
        """How the benchmark's reference code draws its test episodes (protocol ``"hsnet"``).

        This default is HSNet's COCO-20i loop on this source: the class is drawn among the
        classes with at least 2 images (others are skipped with a warning: HSNet's loop
        would never end on them), the query and supports from :meth:`images_of_class`,
        1000 episodes. Benchmarks with a reference loader override it (PASCAL-5i, COCO-20i,
        FSS-1000, LVIS-92i).

        Args:
            shots: supports per episode (Matcher's LVIS-92i folds depend on it).
        Returns:
            a :class:`train.data.protocol.EpisodePlan`.
        """
        classes = self.usable_classes(2)
        if not classes:
            raise ValueError(f"{self.name}: no class has the 2 images (a query and another image) an "
                             f"episode needs (classes: {self.class_ids})")
        return EpisodePlan("drawn", tuple(classes), {c: tuple(self.images_of_class(c)) for c in classes},
                           num_episodes=1000, reference="HSNet data/coco.py")

    def usable_classes(self, min_images: int) -> list[int]:
        """The classes of :attr:`class_ids` with at least ``min_images`` images.

        An episode needs 1 query + ``shots`` distinct supports of its class, so call
        this with ``min_images = 1 + shots``. Skipped classes are reported ONCE per
        ``min_images`` with a ``warnings.warn`` naming them (never an endless loop, the
        released LVIS bug). The result is memoised.
        """
        if not isinstance(min_images, (int, np.integer)) or min_images < 1:
            raise ValueError(f"min_images must be an integer >= 1, got {min_images!r}")
        memo = self.__dict__.setdefault("_usable_memo", {})
        if min_images in memo:
            return list(memo[min_images])
        usable, skipped = [], []
        for c in self.class_ids:
            n = len(self.images_of_class(c))
            (usable if n >= min_images else skipped).append((c, n))
        if skipped:
            listed = ", ".join(
                f"{c} {self.class_names.get(c, '?')!r} ({n} image{'s' if n != 1 else ''})"
                for c, n in skipped
            )
            warnings.warn(
                f"{self.name}: skipping {len(skipped)} class(es) with fewer than "
                f"{min_images} images (1 query + {min_images - 1} support(s) needed): {listed}",
                UserWarning,
                stacklevel=2,
            )
        memo[min_images] = [c for c, _ in usable]
        return list(memo[min_images])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, classes={len(self.class_ids)}"
            f"/{self.num_classes})"
        )


class IndexedSource(FewShotSource):
    """A source backed by a ``{class_id: [keys]}`` index built by the subclass.

    Subclasses set ``self._index`` (all classes of the split), ``num_classes``,
    ``class_names`` and call :meth:`_set_classes`.
    """

    _index: dict[int, list[str]]

    def _set_classes(self, all_ids: Sequence[int], fold, mode, num_folds, rule) -> None:
        self.class_ids = select_fold_classes(
            all_ids, fold=fold, mode=mode, num_folds=num_folds, rule=rule, source=self.name
        )

    def images_of_class(self, class_id: int) -> list[str]:
        class_id = int(class_id)
        if class_id not in self.class_names:
            raise ValueError(
                f"{self.name}: unknown class_id {class_id}; valid ids are 0..{self.num_classes - 1}"
            )
        return list(self._index.get(class_id, ()))


# ---------------------------------------------------------------------- validation


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def check_split(split: str, allowed: Mapping[str, str] | Sequence[str], source: str) -> str:
    """Validate ``split`` (with a few aliases: ``trn`` -> ``train``, ``validation`` -> ``val``)."""
    alias = {"trn": "train", "training": "train", "validation": "val"}
    s = alias.get(split, split) if isinstance(split, str) else split
    if s not in allowed:
        raise ValueError(f"{source}: split must be one of {sorted(allowed)}, got {split!r}")
    return s


def require_dir(path: Path, what: str, layout: str) -> Path:
    """Raise a ValueError naming ``path`` and the expected layout when it is not a folder."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{what}: folder {str(path)!r} not found. Expected layout:\n{layout}")
    return path


def require_file(path: Path, what: str, layout: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what}: file {str(path)!r} not found. Expected layout:\n{layout}")
    return path


def select_fold_classes(
    all_ids: Sequence[int],
    fold: int | None,
    mode: str,
    num_folds: int,
    rule: str,
    source: str = "source",
) -> list[int]:
    """Classes served for ``fold``/``mode`` out of the benchmark's ``all_ids``.

    ``fold=None``: every class (``mode`` is then only validated). Otherwise the fold
    split of :func:`train.data.protocol.fold_class_ids` is applied to the positions of
    ``all_ids`` (which are contiguous ids 0..n-1 for every benchmark here): ``mode="train"``
    gives the fold's training classes, ``mode="test"`` its held-out classes.
    """
    check_mode(mode)
    all_ids = sorted(int(c) for c in all_ids)
    if fold is None:
        return all_ids
    train_pos, test_pos = fold_class_ids(len(all_ids), fold, num_folds, rule)
    chosen = train_pos if mode == "train" else test_pos
    return [all_ids[p] for p in chosen]


# ---------------------------------------------------------------------- masks


def label_to_binary(label: np.ndarray, value: int, ignore_values: Iterable[int] = ()) -> np.ndarray:
    """Binary mask of ``label == value``, with ``ignore_values`` mapped to 255.

    Args:
        label: integer array (H, W) of per-pixel label values.
        value: the label value of the class.
        ignore_values: label values that become 255 (ignore).
    Returns:
        uint8 (H, W), values in {0, 1, 255}.
    """
    out = (label == value).astype(np.uint8)
    ign = [v for v in ignore_values if v != value]
    if ign:
        out[np.isin(label, ign)] = IGNORE
    return out


def read_label_png(path: Path) -> np.ndarray:
    """Read a single-channel label PNG (mode L, P or I) as an integer array (H, W).

    Palette ("P") PNGs are read as their indices, as VOC expects.
    """
    with Image.open(path) as im:
        if im.mode in ("L", "P", "I", "I;16", "1"):
            arr = np.array(im)
        else:
            raise ValueError(
                f"label PNG {str(path)!r} has mode {im.mode!r}; expected a single-channel "
                "(L or palette P) image of class ids"
            )
    return arr.astype(np.int64) if arr.dtype != np.uint8 else arr


def load_rgb(path: Path) -> Image.Image:
    """Open ``path`` as an RGB ``PIL.Image.Image`` (fully loaded, file closed)."""
    with Image.open(path) as im:
        return im.convert("RGB")


# ---------------------------------------------------------------------- index cache


def default_cache_dir() -> Path:
    """``$DIFFEWS_CACHE_DIR`` or ``~/.cache/diffews/index``."""
    env = os.environ.get("DIFFEWS_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "diffews" / "index"


def scan_label_index(
    files: Mapping[str, Path],
    num_classes: int,
    value_offset: int,
    min_pixels: int = 1,
    cache: str | os.PathLike | bool | None = None,
    cache_tag: str = "",
    workers: int | None = None,
) -> dict[int, list[str]]:
    """Build ``{class_id: sorted keys}`` by scanning label PNGs.

    Pixel value ``v`` counts for class ``v - value_offset`` when that lies in
    ``0 .. num_classes - 1``; an image lists a class when it has at least ``min_pixels``
    such pixels.

    Args:
        files: ``{key: label_png_path}``.
        cache: ``None`` -> :func:`default_cache_dir`; a path -> that folder; ``False``
            -> no cache. The cache file name hashes ``cache_tag``, the parameters and
            every file's name, size and mtime, so a changed dataset is rescanned.
        workers: threads used for decoding (default: CPU count).
    """
    if min_pixels < 1:
        raise ValueError(f"min_pixels must be >= 1, got {min_pixels}")
    keys = sorted(files)
    cache_path = None
    if cache is not False:
        h = hashlib.sha1()
        h.update(f"v1|{cache_tag}|{num_classes}|{value_offset}|{min_pixels}|".encode())
        for k in keys:
            st = os.stat(files[k])
            h.update(f"{k}|{files[k]}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        folder = default_cache_dir() if cache in (None, True) else Path(cache)
        cache_path = folder / f"{cache_tag or 'labels'}-{h.hexdigest()[:20]}.json"
        if cache_path.is_file():
            try:
                data = json.loads(cache_path.read_text())
                return {int(c): list(v) for c, v in data.items()}
            except (OSError, ValueError):
                pass  # corrupt cache: rebuild

    def present(key: str) -> tuple[str, np.ndarray]:
        arr = read_label_png(files[key])
        counts = np.bincount(arr.ravel(), minlength=num_classes + value_offset)
        counts = counts[value_offset : value_offset + num_classes]
        return key, np.flatnonzero(counts >= min_pixels)

    index: dict[int, list[str]] = {}
    with ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1)) as pool:
        for key, classes in pool.map(present, keys):
            for c in classes:
                index.setdefault(int(c), []).append(key)
    index = {c: sorted(v) for c, v in sorted(index.items())}

    if cache_path is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({str(c): v for c, v in index.items()}, f)
            os.replace(tmp, cache_path)
        except OSError as e:
            warnings.warn(f"could not write the label index cache {str(cache_path)!r}: {e}")
    return index


def build_index(pairs: Iterable[tuple[int, str]]) -> dict[int, list[str]]:
    """``{class_id: sorted unique keys}`` from ``(class_id, key)`` pairs."""
    index: dict[int, set[str]] = {}
    for c, k in pairs:
        index.setdefault(int(c), set()).add(k)
    return {c: sorted(v) for c, v in sorted(index.items())}


def list_files(folder: Path, exts: Sequence[str]) -> list[Path]:
    """Files of ``folder`` (not recursive) whose suffix (lower-case) is in ``exts``, sorted."""
    exts = tuple(e.lower() for e in exts)
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in exts)

