"""`diffews segment --format coco`: OUTPUT/annotations.json read back by pycocotools gives the written mask PNGs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from pycocotools.coco import COCO

from pipeline_diffews.cli import main
from pipeline_diffews.coco import coco_dataset, masks_from_coco
from tests.cli_data import GOOD_IMAGES, random_image, write_images, write_support


def segment(model, support, inputs, output, *extra) -> int:
    image, mask = support
    return main(["segment", "--model", str(model), "--support", str(image), "--support-mask", str(mask),
                 "--input", str(inputs), "--output", str(output), "--no-progress", "--format", "coco", *extra])


def written_masks(output: Path, names) -> dict[str, np.ndarray]:
    return {name: np.asarray(PIL.Image.open(output / Path(name).with_suffix(".png"))) for name in names}


def test_binary_masks_round_trip_through_pycocotools(saved_pipeline, tmp_path):
    images = write_images(tmp_path / "images", corrupt=False)
    output = tmp_path / "out"
    assert segment(saved_pipeline, write_support(tmp_path / "support"), images, output, "--classes", "cat",
                   "--threshold", "0.5") == 0

    coco = COCO(str(output / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cat"]
    files = {image["file_name"]: image for image in coco.loadImgs(coco.getImgIds())}
    assert sorted(files) == sorted(GOOD_IMAGES)
    masks = written_masks(output, GOOD_IMAGES)
    assert any(m.any() for m in masks.values()) and not all(m.all() for m in masks.values())
    for name, expected in masks.items():
        image = files[name]
        assert (image["width"], image["height"]) == GOOD_IMAGES[name]
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert len(annotations) == (1 if expected.any() else 0)  # one per image and class present
        decoded = np.zeros_like(expected, dtype=bool)
        for annotation in annotations:
            assert annotation["iscrowd"] == 0 and annotation["category_id"] == 1
            assert annotation["area"] == (expected > 0).sum()
            decoded |= coco.annToMask(annotation).astype(bool)
        np.testing.assert_array_equal(decoded, expected > 0)


def test_label_maps_round_trip_with_class_names(saved_pipeline, tmp_path):
    labels = np.zeros((40, 48), np.uint8)
    labels[:15, :15], labels[20:, 25:], labels[:8, 30:] = 1, 2, 3
    random_image(48, 40, seed=5).save(tmp_path / "support.jpg")
    PIL.Image.fromarray(labels).save(tmp_path / "labels.png")  # grey ids: a label map by the rule, no --multiclass
    images = write_images(tmp_path / "images", corrupt=False)
    output = tmp_path / "out"
    assert segment(saved_pipeline, (tmp_path / "support.jpg", tmp_path / "labels.png"), images, output,
                   "--classes", "road,car,sign") == 0

    data = json.loads((output / "annotations.json").read_text())
    assert data["categories"] == [{"id": 1, "name": "road"}, {"id": 2, "name": "car"}, {"id": 3, "name": "sign"}]
    coco = COCO(str(output / "annotations.json"))
    masks = written_masks(output, GOOD_IMAGES)
    assert len({v for m in masks.values() for v in np.unique(m)} - {0}) >= 2  # several classes were found
    decoded = masks_from_coco(data)
    for image in coco.loadImgs(coco.getImgIds()):
        expected = masks[image["file_name"]]
        np.testing.assert_array_equal(decoded[image["file_name"]], expected)
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert sorted(a["category_id"] for a in annotations) == sorted(set(np.unique(expected)) - {0})
        for annotation in annotations:
            np.testing.assert_array_equal(coco.annToMask(annotation).astype(bool),
                                          expected == annotation["category_id"])
            x, y, w, h = annotation["bbox"]
            rows, cols = np.nonzero(expected == annotation["category_id"])
            assert (x, y, w, h) == (cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)


def test_coco_dataset_errors_and_ignored_pixels():
    labels = np.array([[0, 1, 255], [2, 2, 1]], np.uint8)
    data = coco_dataset([("a.png", labels)], [(1, "x"), (2, "y")])
    assert [a["category_id"] for a in data["annotations"]] == [1, 2]
    np.testing.assert_array_equal(masks_from_coco(data)["a.png"], np.where(labels == 255, 0, labels))
    with pytest.raises(ValueError, match="a.png: class id 2 is not among the categories"):
        coco_dataset([("a.png", labels)], [(1, "x")])
    with pytest.raises(ValueError, match="class ids must be integers in 1..254"):
        coco_dataset([], [(0, "background")])
    with pytest.raises(ValueError, match="integer array"):
        coco_dataset([("f.png", labels.astype(float))], [(1, "x")])


def test_classes_for_binary_masks_name_one_object(saved_pipeline, tmp_path, capsys):
    images = write_images(tmp_path / "images", corrupt=False)
    code = segment(saved_pipeline, write_support(tmp_path / "support"), images, tmp_path / "out", "--classes",
                   "cat,dog")
    assert code == 2 and "--classes names 2 class(es) but the support masks are binary" in capsys.readouterr().err


def test_without_pycocotools_coco_output_says_what_to_install(saved_pipeline, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # import fails as when not installed
    images = write_images(tmp_path / "images", corrupt=False)
    assert segment(saved_pipeline, write_support(tmp_path / "support"), images, tmp_path / "out") == 2
    assert "pip install 'pipeline-diffews[coco]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
