"""`diffews segment` with a label-map support: index PNGs with the support's palette, class colours, classes.json."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest

from pipeline_diffews.cli import main
from pipeline_diffews.official import load_pipeline
from tests.cli_data import random_image, within

PALETTE = [0, 0, 0, 200, 30, 30, 30, 200, 30, 30, 30, 200] + [0] * 744
SIZES = {"a.png": (40, 30), "b.png": (28, 36)}  # name -> (width, height)


@pytest.fixture
def label_support(tmp_path):
    """A 48x40 support image and a palette PNG with classes 1, 2 and 3 and an ignored (255) strip."""
    labels = np.zeros((40, 48), np.uint8)
    labels[:15, :15], labels[20:, 25:], labels[:8, 30:], labels[36:, :6] = 1, 2, 3, 255
    mask = PIL.Image.fromarray(labels, mode="L")
    mask.putpalette(PALETTE)
    image_path, mask_path = tmp_path / "support.jpg", tmp_path / "labels.png"
    random_image(48, 40, seed=5).save(image_path)
    mask.save(mask_path)
    return image_path, mask_path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (name, (width, height)) in enumerate(SIZES.items()):
        random_image(width, height, seed=i).save(folder / name)
    return folder


def segment(model, support, inputs, output, *extra) -> int:
    image, mask = support
    return main(["segment", "--model", str(model), "--support", str(image), "--support-mask", str(mask),
                 "--input", str(inputs), "--output", str(output), "--no-progress", *extra])


def test_palette_support_round_trip(saved_pipeline, label_support, images, tmp_path):
    output = tmp_path / "out"
    assert segment(saved_pipeline, label_support, images, output, "--overlay", "--classes", "road,car,sign") == 0

    table = json.loads((output / "classes.json").read_text())
    assert table == {
        "0": {"name": "background", "color": [0, 0, 0]},
        "1": {"name": "road", "color": [200, 30, 30]},
        "2": {"name": "car", "color": [30, 200, 30]},
        "3": {"name": "sign", "color": [30, 30, 200]},
    }
    queries = [PIL.Image.open(images / name).convert("RGB") for name in SIZES]
    support_image, support_mask = (PIL.Image.open(path) for path in label_support)
    expected = load_pipeline(str(saved_pipeline))(queries, support_images=[support_image], support_masks=[support_mask],
                                                  batch_size=4)  # the command's default batch size
    for (name, size), query, expected_labels in zip(SIZES.items(), queries, expected.label_maps):
        with PIL.Image.open(output / name) as written:
            assert written.mode == "P" and written.size == size and written.getpalette()[:12] == PALETTE[:12]
            labels = np.asarray(written)
        np.testing.assert_array_equal(labels, expected_labels)
        assert (labels > 0).any()
        with PIL.Image.open(output / "overlays" / name) as tinted:
            pixels, original = np.asarray(tinted.convert("RGB"), np.float32), np.asarray(query, np.float32)
        np.testing.assert_allclose(pixels[labels == 0], original[labels == 0])
        for class_id in np.unique(labels[labels > 0]):
            color = np.asarray(PALETTE[3 * class_id : 3 * class_id + 3], np.float32)
            region = labels == class_id
            interior = region & ~within(labels, 2)  # inside the 2-px outline: the tint (these colours contrast with
            blended = np.round(0.5 * original[interior] + 0.5 * color)  # the random images' grey mean)
            np.testing.assert_allclose(pixels[interior], blended, atol=1)
            assert (pixels[region & within(labels, 2) & ~within(labels, 1)] == color).all()  # the outline
            assert (pixels[region & within(labels, 1)] == 255).all()  # its light outer line


def test_unnamed_classes_and_forced_label_map(saved_pipeline, images, tmp_path):
    """A grayscale index PNG with one class is read as a label map with --multiclass; names default to null."""
    labels = np.zeros((40, 48), np.uint8)
    labels[5:25, 10:30] = 4
    random_image(48, 40, seed=9).save(tmp_path / "support.png")
    PIL.Image.fromarray(labels, mode="L").save(tmp_path / "index.png")
    support = (tmp_path / "support.png", tmp_path / "index.png")
    assert segment(saved_pipeline, support, images / "a.png", tmp_path / "out", "--multiclass") == 0
    table = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert list(table) == ["0", "4"] and table["4"]["name"] is None and table["4"]["color"] == [0, 0, 128]  # PASCAL VOC colour 4
    with PIL.Image.open(tmp_path / "out" / "a.png") as written:
        assert written.mode == "P" and set(np.unique(np.asarray(written))) <= {0, 4}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--classes", "road,car"], "--classes names no class 3"),
        (["--classes", "road,,sign"], "non-empty names"),
        (["--classes", "1=road,x=car"], "ID=NAME"),
    ],
)
def test_bad_class_names(saved_pipeline, label_support, images, tmp_path, capsys, extra, message):
    try:
        code = segment(saved_pipeline, label_support, images, tmp_path / "out", *extra)
    except SystemExit as exit_:  # argparse rejects the value
        code = exit_.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out" / "a.png").exists()


def test_binary_mask_output_unchanged(saved_pipeline, images, tmp_path):
    mask = np.zeros((40, 48), np.uint8)
    mask[5:25, 10:30] = 255
    random_image(48, 40, seed=9).save(tmp_path / "support.png")
    PIL.Image.fromarray(mask, mode="L").save(tmp_path / "mask.png")
    assert segment(saved_pipeline, (tmp_path / "support.png", tmp_path / "mask.png"), images, tmp_path / "out") == 0
    assert not (tmp_path / "out" / "classes.json").exists()
    with PIL.Image.open(tmp_path / "out" / "a.png") as written:
        assert written.mode == "L" and set(np.unique(np.asarray(written))) <= {0, 255}


@pytest.mark.parametrize("values, extra, label_map", [
    ((0, 4), [], True),  # a grey PNG of class ids: a label map by the rule, no switch needed
    ((0, 2, 7), [], True),
    ((0, 1), [], False),  # one id 1: a 0/1 binary mask
    ((0, 1), ["--multiclass"], True),  # ... unless forced
    ((0, 255), [], False),  # white on black
])
def test_one_rule_decides_what_a_mask_file_is(saved_pipeline, images, tmp_path, values, extra, label_map):
    labels = np.zeros((40, 48), np.uint8)
    for i, value in enumerate(values[1:]):
        labels[5 + 10 * i : 15 + 10 * i, 10:30] = value
    random_image(48, 40, seed=9).save(tmp_path / "support.png")
    PIL.Image.fromarray(labels, mode="L").save(tmp_path / "mask.png")
    support = (tmp_path / "support.png", tmp_path / "mask.png")
    assert segment(saved_pipeline, support, images / "a.png", tmp_path / "out", *extra) == 0
    with PIL.Image.open(tmp_path / "out" / "a.png") as written:
        assert written.mode == ("P" if label_map else "L")
    assert (tmp_path / "out" / "classes.json").exists() == label_map
    if label_map:
        assert list(json.loads((tmp_path / "out" / "classes.json").read_text())) == ["0", *map(str, values[1:])]
