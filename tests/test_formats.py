"""Masks as polygons, COCO polygons and YOLO labels: what is written fills back to the masks.

COCO polygons are filled by pycocotools (`frPyObjects`, `decode`, `merge`); YOLO lines, scaled back by the image's size,
by the same pycocotools rasteriser (the pixels whose centre lies inside) and by ultralytics' own (`polygon2mask`:
coordinates truncated to integers, `cv2.fillPoly`, which also fills the pixels the outline passes through).

On the shipped examples' masks (`examples/*/support_1_mask.png`, `examples/*/truth/query_*.png`, 9 masks, each one
piece) the IoU of the masks filled back:

| mask | COCO polygons | YOLO, centres inside | YOLO, ultralytics' polygon2mask |
|---|---:|---:|---:|
| balloons/support_1_mask | 1.0 | 1.0 | 0.9784 |
| balloons/truth/query_1 | 1.0 | 1.0 | 0.9807 |
| balloons/truth/query_2 | 1.0 | 1.0 | 0.9813 |
| fish/support_1_mask | 1.0 | 1.0 | 0.9779 |
| fish/truth/query_1 | 1.0 | 1.0 | 0.9829 |
| fish/truth/query_2 | 1.0 | 1.0 | 0.9813 |
| oranges/support_1_mask | 1.0 | 1.0 | 0.9832 |
| oranges/truth/query_1 | 1.0 | 1.0 | 0.9824 |
| oranges/truth/query_2 | 1.0 | 1.0 | 0.9830 |

ultralytics' rasteriser at the image's own size adds the row and column its outline passes through on the far sides
(no pixel is lost): a one-pixel band, under 2.3% of these objects' area; it trains on masks 4 times smaller, where the
band is a quarter of a pixel.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import yaml
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline_diffews.coco import coco_dataset, masks_from_coco
from pipeline_diffews.formats import COCO_POLYGONS_FILE, annotation_files
from pipeline_diffews.polygons import flat, mask_pieces, mask_to_polygons
from pipeline_diffews.yolo import label_lines, label_path, yolo_dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE_MASKS = sorted([*EXAMPLES.glob("*/support_*_mask.png"), *EXAMPLES.glob("*/truth/*.png")])
# IoU of ultralytics' fill of the YOLO lines per example mask, as in the module's docstring (the others are 1.0)
EXPECTED_IOU = {
    "balloons/support_1_mask": 0.9784, "balloons/truth/query_1": 0.9807, "balloons/truth/query_2": 0.9813,
    "fish/support_1_mask": 0.9779, "fish/truth/query_1": 0.9829, "fish/truth/query_2": 0.9813,
    "oranges/support_1_mask": 0.9832, "oranges/truth/query_1": 0.9824, "oranges/truth/query_2": 0.9830,
}


def fill(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """pycocotools' fill of flat polygons (pixel-corner coordinates), united: bool [H, W]."""
    if not polygons:
        return np.zeros((height, width), bool)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))).astype(bool)


def yolo_polygons(text: str, height: int, width: int) -> list[tuple[int, np.ndarray]]:
    """A labels file -> (class index, polygon (K, 2) in pixels) per line."""
    lines = []
    for line in text.splitlines():
        index, *values = line.split()
        lines.append((int(index), np.array(values, np.float64).reshape(-1, 2) * [width, height]))
    return lines


def ultralytics_fill(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """What ultralytics' `polygon2mask` makes of the polygons at the image's size (int32 truncation, cv2.fillPoly)."""
    import cv2

    mask = np.zeros((height, width), np.uint8)
    for polygon in polygons:
        cv2.fillPoly(mask, [polygon.astype(np.int32)], 1)
    return mask.astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def shoelace(ring: np.ndarray) -> float:
    """The signed area of a ring (K, 2) of (x, y) points."""
    x, y = ring.T
    return float(0.5 * (x * np.roll(y, -1) - np.roll(x, -1) * y).sum())


def mask_from(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows])


CASES = {
    "hole": mask_from(["......", ".####.", ".#..#.", ".#..#.", ".####.", "......"]),
    "two pieces": mask_from(["##....", "##....", "......", "...###", "...#..", "......"]),
    "touching the border": mask_from(["######", "#....#", "#.##.#", "#.##.#", "#....#", "######"]),
    "one pixel": mask_from([".....", ".....", "..#..", "....."]),
    "corners touching": mask_from(["#...", ".#..", "..##", "..##"]),
    "empty": mask_from(["....", "...."]),
}


@pytest.mark.parametrize("name", CASES)
def test_polygons_fill_back_to_the_mask(name):
    mask = CASES[name]
    height, width = mask.shape
    polygons = mask_to_polygons(mask)
    np.testing.assert_array_equal(fill([flat(p) for p in polygons], height, width), mask)
    for polygon in polygons:
        assert polygon.dtype == np.float64 and polygon.shape[1] == 2 and len(polygon) >= 4
        assert np.array_equal(polygon, np.round(polygon))  # pixel corners
        assert polygon[:, 0].min() >= 0 and polygon[:, 0].max() <= width
        assert polygon[:, 1].min() >= 0 and polygon[:, 1].max() <= height


def test_pieces_holes_and_their_outlines():
    assert mask_pieces(CASES["empty"]) == []
    (piece,) = mask_pieces(CASES["one pixel"])
    assert sorted(map(tuple, piece.outer.tolist())) == [(2, 2), (2, 3), (3, 2), (3, 3)] and piece.holes == ()

    (piece,) = mask_pieces(CASES["hole"])
    assert sorted(map(tuple, piece.outer.tolist())) == [(1, 1), (1, 5), (5, 1), (5, 5)]
    (hole,) = piece.holes
    assert sorted(map(tuple, hole.tolist())) == [(2, 2), (2, 4), (4, 2), (4, 4)]
    # outer rings counterclockwise on screen (y down: a negative shoelace area), holes clockwise
    assert (shoelace(piece.outer), shoelace(hole)) == (-16, 4)
    (polygon,) = mask_to_polygons(CASES["hole"])  # one ring: the hole entered and left along one cut
    assert len(polygon) == 4 + 4 + 2

    pieces = mask_pieces(CASES["touching the border"])  # a frame, and the block in its hole: two pieces
    assert len(pieces) == 2 and sorted(len(p.holes) for p in pieces) == [0, 1]
    assert len(mask_pieces(CASES["two pieces"])) == 2
    assert len(mask_pieces(CASES["corners touching"])) == 1  # 8-connected, as OpenCV traces


def test_many_holes_fill_back_exactly_and_in_good_time():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:400, :400]
    mask = ((yy - 200) ** 2 + (xx - 200) ** 2 < 180**2) & ~(rng.random((400, 400)) < 0.01)  # about 1000 holes
    start = time.perf_counter()
    (piece,) = mask_pieces(mask)
    polygons = mask_to_polygons(mask)
    assert len(piece.holes) > 800 and time.perf_counter() - start < 10
    np.testing.assert_array_equal(fill([flat(p) for p in polygons], 400, 400), mask)


def test_random_masks_fill_back_exactly():
    rng = np.random.default_rng(0)
    for _ in range(100):
        height, width = rng.integers(1, 40, 2)
        mask = rng.random((height, width)) < rng.random()
        np.testing.assert_array_equal(fill([flat(p) for p in mask_to_polygons(mask)], height, width), mask)


def test_tolerance_simplifies_and_stays_close():
    yy, xx = np.mgrid[:80, :80]
    disc = (yy - 40) ** 2 + (xx - 40) ** 2 < 30**2
    (exact,) = mask_to_polygons(disc)
    (simple,) = mask_to_polygons(disc, tolerance=1.0)
    assert len(simple) < len(exact) / 2
    assert iou(fill([flat(simple)], 80, 80), disc) > 0.98
    with pytest.raises(ValueError, match="tolerance: expected a number of pixels >= 0"):
        mask_to_polygons(disc, tolerance=-1)
    with pytest.raises(ValueError, match=r"mask: expected a 2-D array \[H, W\], got shape \(2, 2, 3\)"):
        mask_to_polygons(np.zeros((2, 2, 3)))


@pytest.mark.parametrize("path", EXAMPLE_MASKS, ids=lambda p: p.relative_to(EXAMPLES).with_suffix("").as_posix())
def test_shipped_examples_round_trip(path):
    mask = np.asarray(PIL.Image.open(path).convert("L")) >= 128
    height, width = mask.shape
    files = annotation_files([("x.png", mask)], [(1, "object")], ["coco-polygons", "yolo"])

    coco = masks_from_coco(json.loads(files[COCO_POLYGONS_FILE]))["x.png"] > 0
    lines = yolo_polygons(files["labels/x.txt"].decode(), height, width)
    yolo = fill([flat(polygon) for _, polygon in lines], height, width)
    ultralytics = ultralytics_fill([polygon for _, polygon in lines], height, width)

    assert iou(coco, mask) == 1.0 and iou(yolo, mask) == 1.0
    expected = EXPECTED_IOU[path.relative_to(EXAMPLES).with_suffix("").as_posix()]
    assert iou(ultralytics, mask) == pytest.approx(expected, abs=5e-5) and expected >= 0.975
    assert not (mask & ~ultralytics).any()  # ultralytics' fill only adds the band along the outline


def test_coco_polygons_read_back_by_pycocotools(tmp_path):
    labels = np.zeros((20, 24), np.uint8)
    labels[2:12, 2:12] = 1
    labels[5:8, 5:8] = 0  # a hole
    labels[14:18, 3:6] = 1  # a second piece of class 1
    labels[0:10, 15:24] = 2  # class 2 touching the border
    labels[19, 23] = 255  # ignored
    data = coco_dataset([("a.png", labels)], [(1, "cat"), (2, "dog")], segmentation="polygons")
    rle = coco_dataset([("a.png", labels)], [(1, "cat"), (2, "dog")])
    (tmp_path / "a.json").write_text(json.dumps(data))
    coco = COCO(str(tmp_path / "a.json"))
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=1))
    assert [a["category_id"] for a in annotations] == [1, 2]
    assert [len(a["segmentation"]) for a in annotations] == [2, 1]  # one polygon per piece
    for annotation, same in zip(annotations, rle["annotations"]):
        np.testing.assert_array_equal(coco.annToMask(annotation).astype(bool), labels == annotation["category_id"])
        assert (annotation["area"], annotation["bbox"]) == (same["area"], same["bbox"])
    np.testing.assert_array_equal(masks_from_coco(data)["a.png"], np.where(labels == 255, 0, labels))
    with pytest.raises(ValueError, match=r"segmentation: expected one of \('rle', 'polygons'\), got 'mesh'"):
        coco_dataset([("a.png", labels)], [(1, "cat"), (2, "dog")], segmentation="mesh")


def test_yolo_dataset_lines_indices_and_yaml():
    labels = np.zeros((10, 20), np.uint8)
    labels[0:4, 0:5] = 7  # the first category listed: index 0
    labels[6:10, 10:20] = 3
    labels[0:2, 15:17] = 3  # a second piece of class 3: its own line
    files = yolo_dataset([("a.jpg", labels), ("day1/b.png", np.zeros((4, 4), np.uint8))], [(7, "car"), (3, "road")])
    assert sorted(files) == ["data.yaml", "labels/a.txt", "labels/day1/b.txt"]
    assert files["labels/day1/b.txt"] == ""  # nothing found: a background image
    lines = files["labels/a.txt"].splitlines()
    assert sorted(line.split()[0] for line in lines) == ["0", "1", "1"]
    car = next(line for line in lines if line.startswith("0 "))
    assert sorted(zip(*[iter(map(float, car.split()[1:]))] * 2)) == [(0, 0), (0, 0.4), (0.25, 0), (0.25, 0.4)]
    for _, polygon in yolo_polygons(files["labels/a.txt"], 10, 20):
        assert polygon.min() >= 0 and polygon[:, 0].max() <= 20 and polygon[:, 1].max() <= 10
    data = yaml.safe_load(files["data.yaml"])
    assert data == {"train": "images", "val": "images", "names": {0: "car", 1: "road"}}

    with pytest.raises(ValueError, match=r"a.jpg: class id 3 has no YOLO index \(the categories are \[7\]\)"):
        yolo_dataset([("a.jpg", labels)], [(7, "car")])
    with pytest.raises(ValueError, match="a class id is listed twice"):
        yolo_dataset([], [(7, "car"), (7, "auto")])
    with pytest.raises(ValueError, match="a.jpg and a.png would share labels/a.txt: give the images different names"):
        yolo_dataset([("a.jpg", labels), ("a.png", labels)], [(7, "car"), (3, "road")])


def test_label_path_follows_ultralytics():
    assert label_path("images/a.jpg") == "labels/a.txt"
    assert label_path("images/day1/b.PNG") == "labels/day1/b.txt"
    assert label_path("images/sub/images/c.png") == "images/sub/labels/c.txt"  # the last images/ folder
    with pytest.raises(ValueError, match="expected a path under images/"):
        label_path("photos/a.jpg")


def test_annotation_files_errors_and_missing_opencv(monkeypatch):
    labels = np.ones((3, 3), np.uint8)
    with pytest.raises(ValueError, match="formats: 'voc' is not one of"):
        annotation_files([("a.png", labels)], [(1, "x")], ["voc"])
    assert sorted(annotation_files([("a.png", labels)], [(1, "x")], ["coco"])) == ["annotations.json"]
    monkeypatch.setitem(sys.modules, "cv2", None)  # import fails as when not installed
    with pytest.raises(ImportError, match=r"pip install 'pipeline-diffews\[formats\]'"):
        annotation_files([("a.png", labels)], [(1, "x")], ["yolo"])
    with pytest.raises(ImportError, match="opencv-python-headless"):
        label_lines(labels, {1: 0})
