"""Label Studio regions and masks, both ways: an annotation's brush masks and polygons -> one mask per label, and the
masks a prediction found -> `brushlabels` and `polygonlabels` results.

Brush masks are Label Studio's own RLE (the run-length-packed bytes of an RGBA image of the original size; the mask
is the alpha channel), encoded and decoded by Label Studio's SDK (`label_studio_sdk.converter.brush`, the
`label-studio` extra). Polygon points are percentages of the original width and height; polygons are filled with
PIL's rasteriser, and predicted masks are traced by `pipeline_diffews.polygons`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import PIL.ImageDraw

from .config import LabelConfig

INSTALL_HINT = "the Label Studio backend needs label-studio-sdk: pip install 'pipeline-diffews[label-studio]'"
POLYGON_TOLERANCE = 1.0  # pixels: predicted outlines are simplified to within a pixel (fewer vertices to edit)


def sdk_brush():
    try:
        from label_studio_sdk.converter import brush
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from error
    return brush


def rle_to_mask(rle: list[int], width: int, height: int) -> np.ndarray:
    """Label Studio's brush RLE -> bool mask [height, width] (alpha >= 128). Raises ValueError when the RLE does not
    hold width x height RGBA pixels."""
    flat = np.asarray(sdk_brush().decode_rle(list(rle)), dtype=np.uint8)
    if flat.size != width * height * 4:
        raise ValueError(f"its RLE holds {flat.size} values, not {width} x {height} x 4 (RGBA)")
    return flat.reshape(height, width, 4)[:, :, 3] >= 128


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """bool mask [H, W] -> Label Studio's brush RLE (an RGBA image whose four channels are 255 on the object)."""
    return [int(v) for v in sdk_brush().mask2rle(np.asarray(mask, dtype=bool).astype(np.uint8) * 255)]


def polygon_to_mask(points: list, width: int, height: int) -> np.ndarray:
    """Polygon points [[x %, y %], ...] (percent of the original width and height) -> bool mask [height, width]."""
    corners = [(float(x) * width / 100, float(y) * height / 100) for x, y in points]
    image = PIL.Image.new("1", (width, height))
    if len(corners) >= 3:
        PIL.ImageDraw.Draw(image).polygon(corners, fill=1)
    return np.asarray(image, dtype=bool)


@dataclass
class AnnotationMasks:
    """The masks of one annotation: `size` (width, height) of the original image, `masks` {label: bool [H, W]} (only
    labels with object pixels, in the config's label order), and `problems`: one line per region that was skipped."""

    size: tuple[int, int] | None
    masks: dict[str, np.ndarray]
    problems: list[str] = field(default_factory=list)


def annotation_masks(result: list, config: LabelConfig) -> AnnotationMasks:
    """One mask per label from an annotation's `result` list: the union of the label's brush masks and polygons in
    the config's brush and polygon controls. Regions of other controls are ignored; empty or unreadable regions are
    skipped and named in `problems`."""
    masks, problems, size = {}, [], None
    for index, region in enumerate(result or []):
        if not isinstance(region, dict):
            continue
        control = config.control(region.get("from_name"))
        kind = region.get("type")
        if control is None or kind != control.type:
            continue
        value = region.get("value") or {}
        labels = [label for label in value.get(kind) or [] if label in control.labels]
        where = f"region {region.get('id', index)} ({', '.join(labels) or 'no label'})"
        try:
            width, height = int(region["original_width"]), int(region["original_height"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{where}: no original_width / original_height")
            continue
        if size is not None and size != (width, height):
            problems.append(f"{where}: drawn on a {width} x {height} image, the others on {size[0]} x {size[1]}")
            continue
        if not labels:
            problems.append(f"{where}: none of its labels is a label of {control.name!r}")
            continue
        try:
            if kind == "brushlabels":
                mask = rle_to_mask(value["rle"], width, height)
            else:
                mask = polygon_to_mask(value["points"], width, height)
        except (KeyError, TypeError, ValueError) as error:
            problems.append(f"{where}: unreadable ({type(error).__name__}: {error})")
            continue
        if not mask.any():
            problems.append(f"{where}: the mask is empty")
            continue
        size = (width, height)
        for label in labels:
            masks[label] = masks[label] | mask if label in masks else mask
    ordered = {label: masks[label] for label in config.labels if label in masks}
    return AnnotationMasks(size, ordered, problems)


def prediction_results(masks: dict[str, np.ndarray], scores: dict[str, float], config: LabelConfig) -> list[dict]:
    """Label Studio results for the masks found in one image: for every control that has the label, a `brushlabels`
    region (RLE at the image's size) or `polygonlabels` regions (one per piece of the mask, in percent), each with
    the label's score.

    masks: {label: bool [H, W]} at the image's original size; empty masks give no region. scores: {label: float in
    [0, 1]}.
    """
    results = []
    for control in config.controls:
        for label in control.labels:
            mask = masks.get(label)
            if mask is None or not mask.any():
                continue
            height, width = mask.shape
            common = {"from_name": control.name, "to_name": control.to_name, "type": control.type,
                      "original_width": width, "original_height": height, "image_rotation": 0,
                      "score": float(scores.get(label, 0.0)), "readonly": False}
            if control.type == "brushlabels":
                value = {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}
                results.append({"id": f"{control.name}-{label}", **common, "value": value})
                continue
            from ..polygons import mask_to_polygons

            for piece, polygon in enumerate(mask_to_polygons(mask, POLYGON_TOLERANCE)):
                points = [[float(x) * 100 / width, float(y) * 100 / height] for x, y in polygon]
                value = {"points": points, "closed": True, "polygonlabels": [label]}
                results.append({"id": f"{control.name}-{label}-{piece}", **common, "value": value})
    return results
