"""The one mask rule (binary mask or label map) and the one reader of mask files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_diffews import DiffewSImageProcessor, load_mask, read_support_set

is_label_map = DiffewSImageProcessor.is_label_map


def _values(*values) -> np.ndarray:
    array = np.zeros((8, 8), np.uint8)
    for i, value in enumerate(values):
        array[i] = value
    return array


@pytest.mark.parametrize("mode", ["L", "I", "I;16"])
def test_single_channel_images_of_small_ids_are_label_maps(mode):
    def image(array):
        converted = Image.fromarray(array.astype({"L": np.uint8, "I": np.int32, "I;16": np.uint16}[mode]))
        assert converted.mode == mode
        return converted

    assert is_label_map(image(_values(1, 2)))  # several ids
    assert is_label_map(image(_values(3)))  # one id other than 1
    assert is_label_map(image(_values(1, 31, 255)))  # 255 is ignored, not an id
    assert not is_label_map(image(_values(1)))  # 0/1 mask
    assert not is_label_map(image(_values(255)))  # 0/255 mask
    assert not is_label_map(image(_values(60, 200, 255)))  # soft 0-255 mask: brightness, not ids


def test_the_rule_is_the_same_for_arrays_tensors_and_images():
    for array, expected in [(_values(1, 2), True), (_values(5), True), (_values(1), False), (_values(255), False),
                            (_values(30, 130), False)]:
        assert is_label_map(array) == is_label_map(torch.from_numpy(array)) == is_label_map(Image.fromarray(array)) == expected
    palette = Image.fromarray(_values(200)).convert("P")  # palette indices are ids whatever their value
    assert is_label_map(palette) and is_label_map({"cat": _values(255)})
    for binary in (_values(1).astype(bool), _values(1).astype(np.float32), Image.fromarray(_values(255)).convert("1"),
                   Image.fromarray(np.dstack([_values(2, 3)] * 3)), Image.fromarray(_values(2, 3)).convert("LA")):
        assert not is_label_map(binary)


def test_grey_label_map_png_reads_as_classes(tmp_path):
    """A grey PNG of class ids (as annotation tools write) is a label map; before the rule it was all background."""
    labels = np.zeros((48, 64), np.uint8)
    labels[:20, :20], labels[25:, 30:], labels[:4] = 1, 2, 255
    Image.fromarray(labels, "L").save(tmp_path / "labels.png")
    image = np.zeros((48, 64, 3), np.uint8)
    support = read_support_set([image], [load_mask(tmp_path / "labels.png")])
    assert support.is_multiclass and support.class_ids == [1, 2] and support.shots == [[0], [0]]
    np.testing.assert_array_equal(support.masks[1][0], labels == 2)
    binary = read_support_set([image], [Image.fromarray((labels == 1).astype(np.uint8) * 255)])
    assert not binary.is_multiclass and binary.class_ids is None and binary.num_shots == 1
    np.testing.assert_array_equal(binary.masks[0][0], labels == 1)


def test_load_mask_keeps_the_mode_and_applies_exif(tmp_path):
    labels = np.zeros((6, 10), np.uint8)
    labels[:, :3] = 2
    indexed = Image.fromarray(labels).convert("P")
    indexed.putpalette(DiffewSImageProcessor.default_palette())
    indexed.save(tmp_path / "p.png")
    loaded = load_mask(tmp_path / "p.png")
    assert loaded.mode == "P" and loaded.getpalette() == indexed.getpalette()
    np.testing.assert_array_equal(np.asarray(loaded), labels)
    for mode in ("L", "RGBA"):
        Image.fromarray(labels * 100).convert(mode).save(tmp_path / f"{mode}.png")
        assert load_mask(tmp_path / f"{mode}.png").mode == mode

    stored = Image.fromarray(labels * 100).transpose(Image.Transpose.ROTATE_90)  # what a camera wrote
    exif = stored.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    stored.save(tmp_path / "rotated.png", exif=exif.tobytes())
    np.testing.assert_array_equal(np.asarray(load_mask(tmp_path / "rotated.png")), labels * 100)


def test_load_mask_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="missing.png"):
        load_mask(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        load_mask(tmp_path / "broken.png")


def test_default_palette_is_the_voc_colour_map():
    palette = DiffewSImageProcessor.default_palette()
    assert len(palette) == 768
    assert palette[:15] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128]
