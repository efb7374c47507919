"""Masks as polygons: the outline of each piece along the pixels' edges, holes joined in by zero-width cuts.

Coordinates are pixel coordinates with the origin at the image's top-left corner: pixel (row i, column j) is the
square [j, j + 1] x [i, i + 1], so a polygon's vertices lie on pixel corners (integers), an image W pixels wide spans
x in [0, W], and a rasteriser that keeps the pixels whose centre lies inside (pycocotools, COCO's own) gives the mask
back exactly. This is COCO's convention for polygons, and dividing by the image's width and height gives YOLO's
normalised coordinates in [0, 1] and Label Studio's percentages (x 100).

A piece is an 8-connected set of object pixels (two pixels touching at a corner belong to one piece, which then
touches itself at that corner). Polygon formats have no holes, so each hole is joined to its piece's outline by a
cut: from the nearest vertex of the outline built so far to the hole's top-left vertex, once around the hole, and back
along the same segment. The cut has no width, so the even-odd rule (pycocotools, `cv2.fillPoly`) fills the piece
without its holes; this is how ultralytics merges the parts of a COCO object into one YOLO polygon. Objects inside a
hole are pieces of their own.

Contours are traced by OpenCV (`cv2.findContours`, two-level hierarchy) on a grid three times finer than the mask,
where every pixel is a 4 x 4 block sharing its border with its neighbours: there the traced border runs along the
pixels' edges, and rounding the vertices to whole pixels gives the exact outline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INSTALL_HINT = "Polygons need OpenCV: pip install 'pipeline-diffews[formats]' (or pip install opencv-python-headless)"
_SCALE = 3  # grid cells per pixel side in the traced grid


@dataclass(frozen=True)
class Piece:
    """One 8-connected piece of a mask: its outer ring and its holes' rings, each a float64 array (K, 2) of (x, y)
    pixel-corner coordinates (K >= 4, or >= 3 when simplified; the last vertex joins the first; outer rings
    counterclockwise on screen, holes clockwise)."""

    outer: np.ndarray
    holes: tuple[np.ndarray, ...]


def mask_pieces(mask: np.ndarray, tolerance: float = 0.0) -> list[Piece]:
    """The pieces of a mask with their holes, in OpenCV's order.

    mask: bool, or integer with 0 = background and anything else = object, [H, W].
    tolerance: 0 (default) keeps every corner of the outline, which then rasterises back to exactly `mask`; above 0,
        each ring is simplified (Douglas-Peucker, `cv2.approxPolyDP`) to within this many pixels, and a hole whose
        ring collapses is dropped.
    Raises ValueError for a mask that is not 2-D or a negative tolerance; ImportError (with the install command)
    without OpenCV. Works on the mask's bounding box, traced at 9 times its pixels (one byte each).
    """
    cv2 = _cv2()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask: expected a 2-D array [H, W], got shape {tuple(mask.shape)}.")
    if tolerance < 0:
        raise ValueError(f"tolerance: expected a number of pixels >= 0, got {tolerance}.")
    rows, columns = np.nonzero(mask)
    if rows.size == 0:
        return []
    top, left = int(rows.min()), int(columns.min())
    crop = mask[top : rows.max() + 1, left : columns.max() + 1] != 0
    height, width = crop.shape
    grid = np.zeros((_SCALE * height + 1, _SCALE * width + 1), np.uint8)
    grid[:-1:_SCALE, :-1:_SCALE] = crop  # each pixel's top-left cell, grown below to its 4 x 4 block
    grid = cv2.dilate(grid, np.ones((_SCALE + 1, _SCALE + 1), np.uint8), anchor=(_SCALE, _SCALE))
    contours, hierarchy = cv2.findContours(grid, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    offset = np.array([left, top], np.float64)
    rings = [_ring(contour, offset, tolerance, cv2) for contour in contours]
    pieces = []
    for index, (_, _, first_child, parent) in enumerate(hierarchy[0]):
        if parent != -1 or rings[index] is None:
            continue
        holes, child = [], first_child
        while child != -1:
            if rings[child] is not None:
                holes.append(rings[child])
            child = hierarchy[0][child][0]
        pieces.append(Piece(rings[index], tuple(holes)))
    return pieces


def mask_to_polygons(mask: np.ndarray, tolerance: float = 0.0) -> list[np.ndarray]:
    """One polygon per piece of a mask, its holes joined in by zero-width cuts (see the module's docstring).

    mask: bool, or integer with 0 = background and anything else = object, [H, W].
    tolerance: as in `mask_pieces` (0 keeps the exact outline).
    Returns a list (empty for an empty mask) of float64 arrays (K, 2), K >= 4 (>= 3 simplified), of (x, y) vertices
    in pixel-corner coordinates: x in [0, W], y in [0, H], integers (also when simplified: vertices are kept, never
    moved). Filling them with the even-odd rule at the pixels' centres, each on its own and the results united (as
    pycocotools does), gives back the mask when tolerance is 0.
    """
    return [bridge_holes(piece.outer, piece.holes) for piece in mask_pieces(mask, tolerance)]


def bridge_holes(outer: np.ndarray, holes: tuple[np.ndarray, ...] | list[np.ndarray]) -> np.ndarray:
    """One ring (K, 2) from an outer ring and its holes' rings. Each hole in turn is joined, from its top-left vertex,
    to the nearest vertex of the rings joined so far (the outer ring and the earlier holes); the ring then runs from
    that vertex once around the hole and back. Takes time in proportion to (number of holes) x (vertices)."""
    rings = [np.asarray(outer, np.float64)] + [np.asarray(hole, np.float64) for hole in holes]
    points = np.concatenate(rings)
    starts = np.cumsum([0] + [len(ring) for ring in rings])
    xs, ys = np.ascontiguousarray(points[:, 0]), np.ascontiguousarray(points[:, 1])
    attached: dict[int, list[tuple[int, int]]] = {}  # vertex (index in points) -> the holes entered from it
    for number, hole in enumerate(rings[1:], start=1):
        first = int(np.lexsort((hole[:, 0], hole[:, 1]))[0])  # top-left: rings above and to the left are joined
        end, (x, y) = starts[number], hole[first]
        distances = np.square(xs[:end] - x) + np.square(ys[:end] - y)
        attached.setdefault(int(np.argmin(distances)), []).append((number, first))
    order: list[int] = []
    stack: list[tuple] = [(0, 0, 0, len(rings[0]))]  # (ring, first vertex, step, steps) or (vertex,)
    while stack:
        item = stack.pop()
        if len(item) == 1:  # back at the vertex a hole was entered from
            order.append(item[0])
            continue
        number, first, step, steps = item
        if step == steps:
            continue
        vertex = int(starts[number] + (first + step) % len(rings[number]))
        order.append(vertex)
        stack.append((number, first, step + 1, steps))
        if step < len(rings[number]):  # not the closing return to a hole's first vertex
            for hole, at in reversed(attached.get(vertex, [])):
                stack.append((vertex,))
                stack.append((hole, at, 0, len(rings[hole]) + 1))
    ring = points[order]
    return ring[np.any(ring != np.roll(ring, 1, axis=0), axis=1)]  # a cut of length 0 repeats a vertex


def flat(polygon: np.ndarray) -> list[float]:
    """A polygon (K, 2) as COCO writes it: [x1, y1, x2, y2, ...]."""
    return [float(v) for v in np.asarray(polygon, np.float64).reshape(-1)]


def _ring(contour: np.ndarray, offset: np.ndarray, tolerance: float, cv2) -> np.ndarray | None:
    """A traced contour (grid cells) -> the ring in pixel corners, or None when it has collapsed below 3 vertices."""
    points = np.rint(contour.reshape(-1, 2) / _SCALE)  # cells cut off at concave corners round to the corner
    points = _drop_repeats_and_straight(points)
    if tolerance > 0 and len(points) > 3:
        simplified = cv2.approxPolyDP(points.astype(np.float32).reshape(-1, 1, 2), tolerance, True)
        points = _drop_repeats_and_straight(simplified.reshape(-1, 2).astype(np.float64))
    if len(points) < 3:
        return None
    return points + offset


def _drop_repeats_and_straight(points: np.ndarray) -> np.ndarray:
    """Removes vertices equal to the previous one, then those in the middle of a straight run (cyclically)."""
    while len(points) > 2:
        before = points[np.arange(-1, len(points) - 1)] - points
        repeated = (before[:, 0] == 0) & (before[:, 1] == 0)
        if repeated.any():
            points = points[~repeated]
            continue
        after = np.roll(before, -1, axis=0) * -1  # next - this
        cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
        straight = (cross == 0) & ((before * after).sum(1) < 0)
        if not straight.any():
            break
        points = points[~straight]
    return points


def check_available() -> None:
    """Raises ImportError with the install command when OpenCV is missing."""
    _cv2()


def _cv2():
    try:
        import cv2
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return cv2
