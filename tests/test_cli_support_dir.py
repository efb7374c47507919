"""`diffews segment --support-dir DIR`: an example set as the demo exports it gives what its shots given one by one
give; a folder that is not such a set is a one-line error."""

from __future__ import annotations

import shutil

import numpy as np
import PIL.Image
import pytest

from pipeline_diffews.cli import main
from pipeline_diffews.inputs import InputError, find_support_pairs
from tests.cli_data import random_image, write_images, write_support


def segment(model, inputs, output, *shots) -> int:
    return main(["segment", "--model", str(model), "--input", str(inputs), "--output", str(output), "--no-progress",
                 "--batch-size", "2", *map(str, shots)])


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_support_dir_equals_the_shots_one_by_one(saved_pipeline, tmp_path):
    examples = tmp_path / "examples"
    pairs = [write_support(examples, name, seed) for name, seed in (("shot2", 1), ("shot10", 2), ("shot1", 3))]
    jpeg = examples / "shot2.png"  # the common `_mask` suffix with any image extension
    PIL.Image.open(jpeg).save(examples / "shot2.jpg", quality=95)
    jpeg.unlink()
    pairs[0] = (examples / "shot2.jpg", pairs[0][1])
    (examples / "notes.txt").write_text("not an example")
    images = write_images(tmp_path / "images", corrupt=False)

    assert segment(saved_pipeline, images, tmp_path / "from_dir", "--support-dir", examples) == 0
    one_by_one = []
    for image, mask in (pairs[2], pairs[0], pairs[1]):  # natural order of the names: shot1, shot2, shot10
        one_by_one += ["--support", image, "--support-mask", mask]
    assert segment(saved_pipeline, images, tmp_path / "one_by_one", *one_by_one) == 0

    written = files(tmp_path / "from_dir")
    assert len(written) == 5 and written == files(tmp_path / "one_by_one")
    assert any(np.asarray(PIL.Image.open(tmp_path / "from_dir" / name)).any() for name in written)


def test_support_dir_then_more_shots(saved_pipeline, tmp_path, capsys):
    examples = tmp_path / "examples"
    write_support(examples, "a", 1)
    extra = write_support(tmp_path / "more", "b", 2)
    images = write_images(tmp_path / "images", corrupt=False)
    assert segment(saved_pipeline, images, tmp_path / "out", "--support-dir", examples, "--support", extra[0],
                   "--support-mask", extra[1]) == 0
    assert "2 shot(s)" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("empty", "no examples in it (expected image + mask pairs: NAME.png and NAME_mask.png)"),
    ("missing", "no such folder"),
    ("no_mask", "lonely.png has no mask (expected lonely_mask.png beside it)"),
    ("no_image", "orphan_mask.png is a mask without its image"),
    ("two_images", "a.jpg and a.png are two files for one example"),
])
def test_support_dir_errors(saved_pipeline, tmp_path, capsys, case, message):
    examples = tmp_path / "examples"
    examples.mkdir()
    if case != "empty":
        write_support(examples, "a", 1)
    if case == "missing":
        shutil.rmtree(examples)
    elif case == "no_mask":
        random_image(8, 8, 0).save(examples / "lonely.png")
    elif case == "no_image":
        PIL.Image.fromarray(np.zeros((8, 8), np.uint8)).save(examples / "orphan_mask.png")
    elif case == "two_images":
        random_image(48, 40, 0).save(examples / "a.jpg")
    with pytest.raises(InputError) as error:
        find_support_pairs(examples)
    assert message in str(error.value)

    images = write_images(tmp_path / "images", corrupt=False)
    assert segment(saved_pipeline, images, tmp_path / "out", "--support-dir", examples) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --support-dir") and message in err


def test_no_examples_at_all(saved_pipeline, tmp_path, capsys):
    images = write_images(tmp_path / "images", corrupt=False)
    assert segment(saved_pipeline, images, tmp_path / "out") == 2
    assert "No examples: give --support IMAGE --support-mask MASK (repeatable) or --support-dir DIR" in \
        capsys.readouterr().err


def test_unzipped_download_suggests_its_examples_folder(saved_pipeline, tmp_path, capsys):
    root = tmp_path / "diffews_masks"  # the demo's zip, unzipped: masks/, images/, examples/, annotations.json
    write_support(root / "examples", "example_1", 1)
    (root / "images").mkdir()
    (root / "masks").mkdir()
    random_image(48, 40, 2).save(root / "images" / "a.png")
    PIL.Image.fromarray(np.zeros((40, 48), np.uint8)).save(root / "masks" / "a.png")
    (root / "annotations.json").write_text("{}")
    with pytest.raises(InputError, match=rf"no examples in it .* Did you mean --support-dir {root / 'examples'}\?"):
        find_support_pairs(root)

    images = write_images(tmp_path / "images", corrupt=False)
    assert segment(saved_pipeline, images, tmp_path / "out", "--support-dir", root) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(f"Did you mean --support-dir {root / 'examples'}?")
    assert segment(saved_pipeline, images, tmp_path / "out", "--support-dir", root / "examples") == 0


@pytest.mark.parametrize("case", ["all background", "wrong size"])
def test_support_errors_name_the_file(saved_pipeline, tmp_path, capsys, case):
    examples = tmp_path / "examples"
    write_support(examples, "a", 1)
    image, mask = write_support(examples, "b", 2)
    if case == "all background":
        PIL.Image.fromarray(np.zeros((40, 48), np.uint8)).save(mask)
        message = f"{mask} is all background"
    else:
        PIL.Image.fromarray(np.full((10, 12), 255, np.uint8)).save(mask)
        message = f"{mask} is 12x10 (WxH) but {image} is 48x40"
    images = write_images(tmp_path / "images", corrupt=False)
    assert segment(saved_pipeline, images, tmp_path / "out", "--support-dir", examples) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "support_masks" not in err
