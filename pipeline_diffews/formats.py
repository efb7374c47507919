"""The annotation files of a set of results, in the formats people train on; one place for `diffews segment` and the
demo's download.

    coco            annotations.json             COCO, one RLE mask per image and class (`coco.coco_dataset`)
    coco-polygons   annotations_polygons.json    COCO, the same annotations as polygons, holes joined by cuts
    yolo            data.yaml, labels/....txt    YOLO segmentation (`yolo.yolo_dataset`), beside the images/ folder
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import coco, polygons, yolo
from .writers import json_text

COCO_POLYGONS_FILE = "annotations_polygons.json"
ANNOTATION_FORMATS = ("coco", "coco-polygons", "yolo")


def annotation_files(entries: Sequence[tuple[str, np.ndarray]], categories: Sequence[tuple[int, str]],
                     formats: Sequence[str] = ANNOTATION_FORMATS) -> dict[str, bytes]:
    """The files to write, relative path (with `/`) -> bytes, for each of `formats`.

    entries: (file name of the image as it lies under images/, label map int [H, W]: 0 = background, 255 = ignored,
        else a class id) per image; a bool mask is class 1.
    categories: (class id in 1..254, name) per class; their order gives the YOLO indices.
    formats: any of "coco", "coco-polygons", "yolo".
    Raises ValueError for an unknown format or a class id that `categories` does not name; ImportError with the
    install command when pycocotools (COCO) or OpenCV (polygons) is missing.
    """
    unknown = [name for name in formats if name not in ANNOTATION_FORMATS]
    if unknown:
        raise ValueError(f"formats: {unknown[0]!r} is not one of {ANNOTATION_FORMATS}.")
    entries = [(name, np.asarray(labels).astype(np.uint8)) for name, labels in entries]
    files = {}
    if "coco" in formats:
        files[coco.COCO_FILE] = json_text(coco.coco_dataset(entries, categories)).encode()
    if "coco-polygons" in formats:
        data = coco.coco_dataset(entries, categories, segmentation="polygons")
        files[COCO_POLYGONS_FILE] = json_text(data, indent=None).encode()  # one line: thousands of numbers
    if "yolo" in formats:
        files.update((path, text.encode()) for path, text in yolo.yolo_dataset(entries, categories).items())
    return files


def check_available(formats: Sequence[str]) -> None:
    """Raises ImportError with the install command when a library that `formats` need is missing."""
    if "coco" in formats or "coco-polygons" in formats:
        coco.check_available()
    if "coco-polygons" in formats or "yolo" in formats:
        polygons.check_available()
