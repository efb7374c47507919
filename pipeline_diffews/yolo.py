"""Label maps as a YOLO segmentation dataset, laid out as ultralytics reads it.

A dataset root holds

    data.yaml          names: {0: NAME, 1: NAME, ...}; train and val: images (the same images: no split is made)
    images/FILE        the images (the caller puts them there)
    labels/FILE.txt    per image, one line per piece of each class present: `INDEX x1 y1 x2 y2 ...`

ultralytics finds an image's labels by replacing the last `images` folder of its path with `labels` and its extension
with `.txt` (`label_path` does the same). An image where nothing was found gets an empty file: a background image.

Class ids map to YOLO's 0-based indices in the order of the categories: the first category (whatever its id) is 0,
the next 1, and so on; `names` in data.yaml says which is which. For binary masks the one category (class 1) is 0.

Each line is one piece of a class (an 8-connected area; several pieces are several instances, as a YOLO line is one
object), its outline along the pixels' edges (`polygons.mask_to_polygons`) divided by the image's width and height,
so x and y are in [0, 1] with 0 the top-left corner and 1 the far edge; holes are joined to the outline by zero-width
cuts, as ultralytics' own COCO converter merges an object's parts, so its even-odd fill (`cv2.fillPoly`) leaves them
out. These are the coordinates ultralytics' converter makes from the same COCO polygons (x / width).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import PurePosixPath

import numpy as np

from . import polygons

DATA_FILE = "data.yaml"
IMAGES_FOLDER = "images"
LABELS_FOLDER = "labels"


def label_path(image_path: str) -> str:
    """The labels file ultralytics reads for an image of the dataset: `images/a/b.jpg` -> `labels/a/b.txt`
    (the last `images` folder of the path becomes `labels`). Paths are relative to the root, with `/`."""
    head, found, tail = ("/" + image_path).rpartition(f"/{IMAGES_FOLDER}/")
    if not found:
        raise ValueError(f"{image_path}: expected a path under {IMAGES_FOLDER}/.")
    return (head + f"/{LABELS_FOLDER}/" + str(PurePosixPath(tail).with_suffix(".txt"))).lstrip("/")


def label_lines(label_map: np.ndarray, indices: dict[int, int]) -> str:
    """The text of one image's labels file ("" when no class is present).

    label_map: int [H, W]: 0 = background, 255 = ignored, else a class id (a bool mask is class 1).
    indices: class id -> YOLO index (0-based); a class id present in the map and missing here raises ValueError.
    """
    labels = np.asarray(label_map)
    if labels.ndim != 2:
        raise ValueError(f"label_map: expected a 2-D array [H, W], got shape {tuple(labels.shape)}.")
    height, width = labels.shape
    scale = np.array([width, height], np.float64)
    lines = []
    for class_id in (int(v) for v in np.unique(labels) if v not in (0, 255)):
        if class_id not in indices:
            raise ValueError(f"class id {class_id} has no YOLO index (the categories are {sorted(indices)}).")
        for polygon in polygons.mask_to_polygons(labels == class_id):
            values = " ".join(_number(v) for v in (polygon / scale).reshape(-1))
            lines.append(f"{indices[class_id]} {values}\n")
    return "".join(lines)


def data_yaml(categories: Sequence[tuple[int, str]]) -> str:
    """The dataset YAML: `train` and `val` (both `images`) and `names` (YOLO index -> category name, in the order of
    `categories`). It has no `path`: ultralytics then takes the YAML's own folder as the root, so the folder can be
    moved or unzipped anywhere."""
    import yaml

    data = {"train": IMAGES_FOLDER, "val": IMAGES_FOLDER,
            "names": {index: str(name) for index, (_, name) in enumerate(categories)}}
    header = ("# YOLO segmentation dataset: labels/ beside images/, one line per object: INDEX x1 y1 x2 y2 ...\n"
              "# (normalised polygon). train and val are the same images; split them before judging a model.\n")
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def yolo_dataset(entries: Iterable[tuple[str, np.ndarray]], categories: Sequence[tuple[int, str]]) -> dict[str, str]:
    """The text files of a YOLO dataset of label maps: relative path (with `/`) -> contents.

    entries: (file name under images/, e.g. "a.jpg" or "day1/b.png"; label map int [H, W] as in `label_lines`).
    categories: (class id in 1..254, name) per class; their order gives the YOLO indices 0, 1, ...
    Returns `labels/...txt` per entry and `data.yaml`. Raises ValueError as `label_lines` does, for a repeated
    class id, and for two images that would share a labels file (`a.jpg` and `a.png`).
    """
    polygons.check_available()
    indices = {int(class_id): index for index, (class_id, _) in enumerate(categories)}
    if len(indices) != len(categories):
        raise ValueError(f"categories: a class id is listed twice in {[c for c, _ in categories]}.")
    files, owners = {}, {}
    for file_name, label_map in entries:
        path = label_path(f"{IMAGES_FOLDER}/{file_name}")
        if path in owners:
            raise ValueError(f"{owners[path]} and {file_name} would share {path}: give the images different names.")
        owners[path] = file_name
        try:
            files[path] = label_lines(label_map, indices)
        except ValueError as error:
            raise ValueError(f"{file_name}: {error}") from error
    files[DATA_FILE] = data_yaml(categories)
    return files


def _number(value: float) -> str:
    """A coordinate in [0, 1] with 6 decimals, trailing zeros dropped: 0.25, 1, 0.333333."""
    return f"{value:.6f}".rstrip("0").rstrip(".") or "0"
