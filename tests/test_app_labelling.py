"""The demo as a labelling tool: correct a result, add it as an example (the cached support grows by that shot), and
download the masks, the example set and a COCO file."""

from __future__ import annotations

import json
import zipfile

import gradio as gr
import numpy as np
import PIL.Image
import pytest

import app
import demo_utils
from tests.test_app import editor_value, page_inputs, write_image
from tests.test_app_multiclass import files, url  # noqa: F401 (fixtures: a served tiny pipeline, its files)


@pytest.fixture
def encodes(monkeypatch):
    """Every encode_support call of the served pipeline: (number of images, the support it extends)."""
    calls = []
    encode = app._PIPE.encode_support

    def recording(images, masks, *args, **kwargs):
        calls.append((len(images), kwargs.get("extend")))
        return encode(images, masks, *args, **kwargs)

    monkeypatch.setattr(app._PIPE, "encode_support", recording)
    return calls


def segmented(files, queries=("query_a", "query_b"), mask_file=None, class_names=""):  # noqa: F811
    """A session that segmented `queries` (keys of `files`, or paths) with one painted example (or its mask file)."""
    painted = editor_value(files["support"], (slice(10, 30), slice(20, 60)))
    inputs = page_inputs([painted], [files[mask_file]] if mask_file else [], [files.get(q, q) for q in queries])
    return page_segment(None, inputs, class_names)[0]


def page_segment(session, inputs: list, class_names: str = ""):
    """The Segment button in `session` with `page_inputs`: (session, overlays, heatmaps, mask files, status)."""
    tabs = app.EXAMPLE_TABS
    return app._page_segment(session, None, inputs[:tabs], inputs[tabs : 2 * tabs], *inputs[2 * tabs :], class_names)


def corrected(value: dict, add: tuple[slice, slice], erase: tuple[slice, slice], color: str) -> dict:
    """The correction editor's value after a brush stroke over `add` and an eraser stroke over `erase`."""
    layer = value["layers"][0].copy()
    layer[add] = (*demo_utils.hex_to_rgb(color), 128)
    layer[erase] = 0
    return {**value, "layers": [layer]}


def test_a_corrected_result_joins_the_example_set_and_the_others_are_segmented_again(url, files, encodes):
    session = segmented(files)
    assert encodes == [(1, None)] and session.examples.num_shots == 1
    session, value, cleared, note = app.correct_result(session, 0)
    assert cleared is None and "Correcting **a.png**" in note
    np.testing.assert_array_equal(value["background"], np.asarray(session.queries[0]))
    np.testing.assert_array_equal(value["layers"][0][:90, :120, 3] > 0, session.result.masks[0])  # the result's mask

    fixed = corrected(value, (slice(0, 30), slice(0, 40)), (slice(60, 90), slice(80, 120)), demo_utils.CLASS_COLORS[0])
    session, overlays, heatmaps, mask_files, status, set_line, download, _ = app.add_example(
        session, fixed, "relative", 0.25
    )
    expected = session.result.masks[0].copy()
    assert encodes[1][0] == 1 and encodes[1][1] is not None and encodes[1][1].num_shots == 1  # one new shot's pass
    assert len(encodes) == 2
    assert "Added a.png as example 2" in status and "the other 1 image again" in status
    assert "**2** examples" in set_line and "2 shots cached" in set_line and "Adding the last one took" in set_line
    assert session.examples.support.num_shots == 2 and session.examples.names == ["example_1", "example_2"]
    # The corrected image keeps its corrected mask; the other image is what both examples give.
    np.testing.assert_array_equal(expected[:30, :40], True)
    np.testing.assert_array_equal(expected[60:, 80:], False)
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(mask_files[0])) > 0, expected)
    both = app._PIPE(session.queries[1], support_images=session.examples.images,
                     support_masks=session.examples.masks, threshold_mode="relative", threshold=0.25)
    np.testing.assert_array_equal(session.result.masks[1], both.masks[0])
    assert len(overlays) == len(heatmaps) == 2 and download["value"].endswith(".zip")

    # Segment again with the same painted example: the grown set is used as it is (no support pass).
    painted = editor_value(files["support"], (slice(10, 30), slice(20, 60)))
    inputs = page_inputs([painted], [], [files["query_b"]])
    session, *_, status = page_segment(session, inputs)
    assert "Examples: 2" in status and "reused from the cache" in status and len(encodes) == 2

    # Other examples in the editors: a new set, and the page says the added example was left out.
    painted = editor_value(files["support"], (slice(10, 40), slice(20, 60)))
    inputs = page_inputs([painted], [], [files["query_b"]])
    session, *_, status = page_segment(session, inputs)
    assert "Examples: 1" in status and "the 1 example added from corrected results was left out" in status


def test_the_example_set_has_a_limit_and_a_correction_needs_a_result(url, files, monkeypatch):
    monkeypatch.setattr(app, "MAX_SHOTS", 1)
    session = segmented(files)
    session, value, _, _ = app.correct_result(session, 0)
    with pytest.raises(gr.Error, match="holds 1 examples, the most it may hold"):
        app.add_example(session, value, "relative", 0.25)
    with pytest.raises(gr.Error, match="Click a result first"):
        app.add_example(demo_utils.Session(), value, "relative", 0.25)


def test_a_failed_addition_leaves_the_example_set_as_it_was(url, files, encodes):
    session = segmented(files)
    support, masks = session.examples.support, [m.copy() for m in session.result.masks]
    session, value, _, _ = app.correct_result(session, 0)
    with pytest.raises(gr.Error, match="threshold must be in"):
        app.add_example(session, value, "relative", 2.0)
    assert session.examples.num_shots == 1 and session.examples.support is support and len(encodes) == 1
    for before, after in zip(masks, session.result.masks):
        np.testing.assert_array_equal(before, after)


def test_a_several_class_result_is_corrected_one_brush_colour_per_class(url, files, encodes):
    session = segmented(files, mask_file="labels", class_names="1: grass, 3: sky")
    assert session.examples.multiclass and session.result.class_ids == [1, 3]
    session, value, _, note = app.correct_result(session, 1)
    assert "one brush colour per class" in note
    layer = value["layers"][0][:50, :70]
    labels = session.result.label_maps[1]
    for rank, class_id in enumerate([1, 3]):  # class 3 is painted in the second brush colour
        colour = np.all(layer[..., :3] == demo_utils.hex_to_rgb(demo_utils.CLASS_COLORS[rank]), axis=-1)
        np.testing.assert_array_equal(colour & (layer[..., 3] > 0), labels == class_id)
    third = corrected(value, (slice(0, 10), slice(0, 20)), (slice(40, 50), slice(60, 70)), demo_utils.CLASS_COLORS[2])
    with pytest.raises(gr.Error, match="1 brush colour beyond the 2 classes of the example set"):
        app.add_example(session, third, "relative", 0.25)
    fixed = corrected(value, (slice(0, 10), slice(0, 20)), (slice(40, 50), slice(60, 70)), demo_utils.CLASS_COLORS[1])
    session, *_ = app.add_example(session, fixed, "relative", 0.25)
    added = session.examples.masks[-1]
    assert (added[:10, :20] == 3).all() and (added[40:, 60:] == 0).all()
    # The corrected image's class probabilities are its corrected label map, like its probability map.
    np.testing.assert_array_equal(session.result.class_probabilities[1], np.stack([added == 1, added == 3]))
    assert session.examples.support.num_shots == 2
    assert [(count, extended.num_shots if extended else None) for count, extended in encodes] == [(1, None), (1, 1)]


def test_the_download_holds_masks_examples_and_coco(url, files, tmp_path):
    session = segmented(files)
    session, value, _, _ = app.correct_result(session, 1)
    session, *_, download, _ = app.add_example(session, value, "relative", 0.25)
    _check_zip(download["value"], session, tmp_path, binary=True)

    square = write_image(tmp_path / "c.png", 64, 64, seed=4)
    session = segmented(files, queries=("query_a", square), mask_file="labels", class_names="grass, x, sky")
    download = app._download(session)
    categories = _check_zip(download["value"], session, tmp_path / "several", binary=False)
    assert categories == {1: "grass", 3: "sky"}


def _check_zip(path, session, folder, binary: bool) -> dict[int, str]:
    """Reads the download back: masks at each image's size equal to the results, images, the example set in the
    layout `diffews segment --support-dir` reads, and COCO annotations that pycocotools decodes to the same masks.
    Returns the COCO categories {id: name}."""
    from pycocotools.coco import COCO

    from pipeline_diffews.inputs import find_support_pairs

    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        archive.extractall(folder)
    stems = [name.rsplit(".", 1)[0] for name in session.names]
    assert {f"masks/{s}.png" for s in stems} | {f"images/{n}" for n in session.names} <= names
    assert {f"examples/{n}.png" for n in session.examples.names} | {
        f"examples/{n}_mask.png" for n in session.examples.names} <= names
    coco = COCO(str(folder / "annotations.json"))
    by_name = {image["file_name"]: image["id"] for image in coco.dataset["images"]}
    for index, (name, stem) in enumerate(zip(session.names, stems)):
        mask = PIL.Image.open(folder / "masks" / f"{stem}.png")
        assert mask.size == session.queries[index].size and mask.mode == ("L" if binary else "P")
        labels = session.result.labels(index)
        values = np.asarray(mask)
        np.testing.assert_array_equal(values > 0 if binary else values, labels > 0 if binary else labels)
        if binary:
            assert set(np.unique(values)) <= {0, 255}
        decoded = np.zeros_like(labels)
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=[by_name[name]])):
            decoded[coco.annToMask(annotation) > 0] = annotation["category_id"]
        np.testing.assert_array_equal(decoded, labels)
        assert PIL.Image.open(folder / "images" / name).size == session.queries[index].size
    for name, mask in zip(session.examples.names, session.examples.masks):
        written = np.asarray(PIL.Image.open(folder / "examples" / f"{name}_mask.png"))
        np.testing.assert_array_equal(written > 0 if binary else written, mask)
    pairs = find_support_pairs(folder / "examples")  # what `diffews segment --support-dir` reads, in the set's order
    assert [(image.name, mask.name) for image, mask in pairs] == [
        (f"{n}.png", f"{n}_mask.png") for n in session.examples.names
    ]
    data = json.loads((folder / "annotations.json").read_text())
    return {c["id"]: c["name"] for c in data["categories"]}
