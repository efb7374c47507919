"""Label maps as a COCO-format dataset (instance annotations with RLE or polygon masks), and back.

`coco_dataset` makes the JSON that `diffews segment --format coco` (or `coco-polygons`) writes beside its masks and
that the demo puts in its download: one annotation per (image, class present), whose mask is the class's whole area
in that image, with its bounding box and area, `iscrowd` 0. The mask is either a compressed RLE
(`pycocotools.mask.encode`, counts as a string) or polygons: one per piece of the area, its holes joined in by
zero-width cuts (`polygons.mask_to_polygons`: pixel-edge outlines, which pycocotools fills back to the same pixels).
pycocotools (`COCO(...).annToMask`) and annotation tools read both back; `masks_from_coco` does so without
pycocotools' index.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from . import polygons
from .image_processor_diffews import IGNORE_INDEX

COCO_FILE = "annotations.json"
SEGMENTATION_FORMS = ("rle", "polygons")
INSTALL_HINT = "COCO output needs pycocotools: pip install 'pipeline-diffews[coco]' (or pip install pycocotools)"


def category_name(class_id: int, name: str | None, multiclass: bool) -> str:
    """A COCO category's name: the class's own name, else `class_ID` (several classes) or `object` (one class)."""
    return name or (f"class_{class_id}" if multiclass else "object")


def coco_dataset(entries: Iterable[tuple[str, np.ndarray]], categories: Sequence[tuple[int, str]],
                 description: str = "DiffewS few-shot segmentation", segmentation: str = "rle") -> dict:
    """A COCO instances dataset (dict, JSON-ready) of label maps.

    entries: (file_name, label map int [H, W]) per image: 0 = background, 255 = ignored, else a class id.
    categories: (class id in 1..254, name) per class, in the order they are listed.
    segmentation: "rle" (default: a compressed RLE per annotation) or "polygons" (a list of [x1, y1, x2, y2, ...] in
        pixel-corner coordinates, one per piece, holes joined in by zero-width cuts; needs OpenCV).
    Images get ids 1, 2, ... in the order of `entries`; annotations ids 1, 2, ... Area and box are those of the mask
    (the polygons fill back to the same pixels). Raises ValueError for a class id of a label map that `categories`
    does not name, a malformed entry or an unknown `segmentation`.
    """
    if segmentation not in SEGMENTATION_FORMS:
        raise ValueError(f"segmentation: expected one of {SEGMENTATION_FORMS}, got {segmentation!r}.")
    mask_utils = _mask_utils()
    if segmentation == "polygons":
        polygons.check_available()
    names = {}
    for class_id, name in categories:
        if not isinstance(class_id, (int, np.integer)) or not 1 <= class_id <= 254:
            raise ValueError(f"categories: class ids must be integers in 1..254, got {class_id!r}.")
        names[int(class_id)] = str(name)
    images, annotations = [], []
    for image_id, (file_name, label_map) in enumerate(entries, start=1):
        labels = np.asarray(label_map)
        if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{file_name}: a label map must be an integer array [H, W], got {labels.dtype} "
                             f"{tuple(labels.shape)}.")
        height, width = labels.shape
        images.append({"id": image_id, "file_name": file_name, "width": int(width), "height": int(height)})
        present = [int(v) for v in np.unique(labels) if v not in (0, IGNORE_INDEX)]
        unnamed = [v for v in present if v not in names]
        if unnamed:
            raise ValueError(f"{file_name}: class id {unnamed[0]} is not among the categories {sorted(names)}.")
        for class_id in names:
            if class_id not in present:
                continue
            mask = labels == class_id
            rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
            if segmentation == "rle":
                shape = {"size": [int(height), int(width)], "counts": rle["counts"].decode("ascii")}
            else:
                shape = [polygons.flat(polygon) for polygon in polygons.mask_to_polygons(mask)]
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": class_id,
                "segmentation": shape,
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            })
    return {
        "info": {"description": description},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": class_id, "name": name} for class_id, name in names.items()],
    }


def masks_from_coco(data: dict) -> dict[str, np.ndarray]:
    """file_name -> uint8 label map [H, W] (0 where no annotation, else its category id) of a dataset whose masks are
    RLE (compressed, as `coco_dataset` writes them, or uncompressed) or polygons (united, each filled by pycocotools);
    later annotations of an image paint over earlier ones."""
    mask_utils = _mask_utils()
    label_maps, file_names = {}, {}
    for image in data["images"]:
        file_names[image["id"]] = image["file_name"]
        label_maps[image["file_name"]] = np.zeros((image["height"], image["width"]), np.uint8)
    for annotation in data["annotations"]:
        labels = label_maps[file_names[annotation["image_id"]]]
        if isinstance(annotation["segmentation"], list):  # polygons, each filled, then united
            if annotation["segmentation"]:
                shapes = mask_utils.frPyObjects(annotation["segmentation"], *labels.shape)
                labels[mask_utils.decode(mask_utils.merge(shapes)).astype(bool)] = annotation["category_id"]
            continue
        segmentation = dict(annotation["segmentation"])
        if isinstance(segmentation["counts"], str):
            segmentation["counts"] = segmentation["counts"].encode("ascii")
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE, as some tools write it
            segmentation = mask_utils.frPyObjects(segmentation, *segmentation["size"])
        labels[mask_utils.decode(segmentation).astype(bool)] = annotation["category_id"]
    return label_maps


def check_available() -> None:
    """Raises ImportError with the install command when pycocotools is missing."""
    _mask_utils()


def _mask_utils():
    try:
        from pycocotools import mask
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return mask
