"""`diffews segment --format coco-polygons` and `--format yolo`: the annotations fill back to the written mask PNGs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import yaml
from pycocotools.coco import COCO

from pipeline_diffews.cli import main
from tests.cli_data import GOOD_IMAGES, random_image, write_images, write_support
from tests.test_formats import fill, yolo_polygons


def segment(model, support, inputs, output, *extra) -> int:
    image, mask = support
    return main(["segment", "--model", str(model), "--support", str(image), "--support-mask", str(mask),
                 "--input", str(inputs), "--output", str(output), "--no-progress", *map(str, extra)])


def written_masks(output: Path) -> dict[str, np.ndarray]:
    """relative input path -> the mask PNG written for it (bool for binary masks, else the class ids)."""
    masks = {}
    for name in GOOD_IMAGES:
        with PIL.Image.open(output / Path(name).with_suffix(".png")) as image:
            masks[name] = np.asarray(image) if image.mode == "P" else np.asarray(image) >= 128
    return masks


def test_coco_polygons_fill_back_to_the_masks(saved_pipeline, tmp_path):
    images = write_images(tmp_path / "images", corrupt=False)
    output = tmp_path / "out"
    assert segment(saved_pipeline, write_support(tmp_path / "support"), images, output, "--format", "coco-polygons",
                   "--classes", "cat", "--threshold", "0.5") == 0
    assert not (output / "annotations.json").exists()
    coco = COCO(str(output / "annotations_polygons.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cat"]
    masks = written_masks(output)
    assert any(m.any() for m in masks.values()) and not all(m.all() for m in masks.values())
    for image in coco.loadImgs(coco.getImgIds()):
        expected = masks[image["file_name"]]
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert len(annotations) == (1 if expected.any() else 0)
        for annotation in annotations:
            assert isinstance(annotation["segmentation"], list) and annotation["area"] == expected.sum()
            np.testing.assert_array_equal(coco.annToMask(annotation).astype(bool), expected)


def test_yolo_dataset_of_label_maps(saved_pipeline, tmp_path, capsys):
    labels = np.zeros((40, 48), np.uint8)
    labels[:15, :15], labels[20:, 25:], labels[:8, 30:] = 1, 2, 3
    random_image(48, 40, seed=5).save(tmp_path / "support.jpg")
    PIL.Image.fromarray(labels).save(tmp_path / "labels.png")
    images = write_images(tmp_path / "images", corrupt=False)
    output = tmp_path / "out"
    assert segment(saved_pipeline, (tmp_path / "support.jpg", tmp_path / "labels.png"), images, output,
                   "--format", "yolo", "--classes", "road,car,sign") == 0

    root = output / "yolo"
    data = yaml.safe_load((root / "data.yaml").read_text())
    assert data == {"train": "images", "val": "images", "names": {0: "road", 1: "car", 2: "sign"}}
    masks = written_masks(output)
    assert len({v for m in masks.values() for v in np.unique(m)} - {0}) >= 2  # several classes were found
    for name, expected in masks.items():
        copy = root / "images" / name
        assert copy.read_bytes() == (images / name).read_bytes()
        height, width = expected.shape
        filled = np.zeros_like(expected)
        text = (root / "labels" / Path(name).with_suffix(".txt")).read_text()
        for index, polygon in yolo_polygons(text, height, width):
            assert 0 <= polygon.min() and polygon[:, 0].max() <= width and polygon[:, 1].max() <= height
            filled[fill([polygon.reshape(-1).tolist()], height, width)] = index + 1  # index k is class k + 1 here
        np.testing.assert_array_equal(filled, expected)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == sorted(
        ["data.yaml"] + [f"images/{n}" for n in GOOD_IMAGES]
        + [f"labels/{Path(n).with_suffix('.txt').as_posix()}" for n in GOOD_IMAGES])

    # Again: the dataset is rewritten in place, and the copies stay where they are
    assert segment(saved_pipeline, (tmp_path / "support.jpg", tmp_path / "labels.png"), images, output,
                   "--format", "yolo", "--classes", "road,car,sign", "--resume") == 0
    assert "skipped 5 already written, 0 failed" in capsys.readouterr().out
    assert (root / "images" / "a.jpg").read_bytes() == (images / "a.jpg").read_bytes()
    assert not [p for p in root.rglob(".*")]  # no temporary files left


def test_yolo_without_opencv_says_what_to_install(saved_pipeline, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)
    images = write_images(tmp_path / "images", corrupt=False)
    assert segment(saved_pipeline, write_support(tmp_path / "support"), images, tmp_path / "out",
                   "--format", "yolo") == 2
    assert "pip install 'pipeline-diffews[formats]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_coco_output_is_unchanged_by_the_new_formats(saved_pipeline, tmp_path):
    images = write_images(tmp_path / "images", corrupt=False)
    output = tmp_path / "out"
    assert segment(saved_pipeline, write_support(tmp_path / "support"), images, output, "--format", "coco") == 0
    text = (output / "annotations.json").read_text()
    assert text.startswith('{\n  "info": {') and text.endswith("}\n")  # indented, as before
    assert all(isinstance(a["segmentation"], dict) for a in json.loads(text)["annotations"])
    assert sorted(os.listdir(output)) == ["a.png", "annotations.json", "b.png", "nested"]
