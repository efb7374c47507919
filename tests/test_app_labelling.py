"""The demo as a labelling tool: correct a result, add it as an example (the cached support grows by that shot), and
download the masks, the example set and the annotation files (COCO RLE and polygons, YOLO); a session never loses its
work (confirmed masks stay, changed examples keep the added ones, the images are the session's own copies, a saved set
opens again)."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import PIL.Image
import pytest

import app
import demo_utils
from tests.test_app import editor_value, page_inputs, write_image, write_mask
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


PAINTED = (slice(10, 30), slice(20, 60))  # where the example of `segmented` is painted
ADD_OUTPUTS = ("session", "overlays", "heatmaps", "mask_files", "status", "set_line", "download", "unsaved",
               "pending", "correction", "note")


def segmented(files, queries=("query_a", "query_b"), mask_file=None, class_names=""):  # noqa: F811
    """A session that segmented `queries` (keys of `files`, or paths) with one painted example (or its mask file)."""
    return page_segment(None, example_inputs(files, queries, mask_file), class_names)[0]


def example_inputs(files, queries=("query_a", "query_b"), mask_file=None, painted=PAINTED):  # noqa: F811
    """`page_inputs` of one example painted over `painted` (or its mask file) and the images `queries`."""
    value = editor_value(files["support"], painted)
    return page_inputs([value], [files[mask_file]] if mask_file else [], [files.get(q, q) for q in queries])


def page_segment(session, inputs: list, class_names: str = ""):
    """The Segment button in `session` with `page_inputs`: (session, overlays, heatmaps, mask files, status)."""
    tabs = app.EXAMPLE_TABS
    return app._page_segment(session, None, inputs[:tabs], inputs[tabs : 2 * tabs], *inputs[2 * tabs :], class_names)


def added(session, value: dict, threshold: float = 0.25) -> dict:
    """Add as example with the correction editor's `value`: the outputs, by name."""
    return dict(zip(ADD_OUTPUTS, app.add_example(session, value, "relative", threshold)))


def unchanged(outputs: dict, *but: str) -> bool:
    """Whether every output but those named leaves the page as it was."""
    return all(value == gr.skip() for name, value in outputs.items() if name not in but)


def downloaded(session, folder):
    """The Download button: the zip, extracted into `folder`. Returns (the session, the zip's member names)."""
    session, path, unsaved, status = app.download_zip(session)
    assert unsaved == "" and status == gr.skip() and session.saved
    with zipfile.ZipFile(path) as archive:
        archive.extractall(folder)
        return session, set(archive.namelist())


def corrected(value: dict, add: tuple[slice, slice], erase: tuple[slice, slice], color: str) -> dict:
    """The correction editor's value after a brush stroke over `add` and an eraser stroke over `erase`."""
    layer = value["layers"][0].copy()
    layer[add] = (*demo_utils.hex_to_rgb(color), 128)
    layer[erase] = 0
    return {**value, "layers": [layer]}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks."""
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_a_corrected_result_joins_the_example_set_and_the_others_are_segmented_again(url, files, encodes):
    session = segmented(files)
    assert encodes == [(1, None)] and session.examples.num_shots == 1
    session, value, cleared, note = app.correct_result(session, 0)
    assert cleared is None and "Correcting **a.png**" in note
    np.testing.assert_array_equal(value["background"], np.asarray(session.queries[0]))
    np.testing.assert_array_equal(value["layers"][0][:90, :120, 3] > 0, session.result.masks[0])  # the result's mask

    fixed = corrected(value, (slice(0, 30), slice(0, 40)), (slice(60, 90), slice(80, 120)), demo_utils.CLASS_COLORS[0])
    out = added(session, fixed)
    session, status, set_line = out["session"], out["status"], out["set_line"]
    expected = session.result.masks[0].copy()
    assert encodes[1][0] == 1 and encodes[1][1] is not None and encodes[1][1].num_shots == 1  # one new shot's pass
    assert len(encodes) == 2
    assert "Added a.png as example 2" in status and "the other 1 image not yet confirmed again" in status
    assert "**2** examples" in set_line and "2 shots cached" in set_line and "Adding the last one took" in set_line
    assert session.examples.support.num_shots == 2 and session.examples.names == ["example_1", "example_2"]
    # The corrected image keeps its corrected mask; the other image is what both examples give.
    np.testing.assert_array_equal(expected[:30, :40], True)
    np.testing.assert_array_equal(expected[60:, 80:], False)
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(out["mask_files"][0])) > 0, expected)
    both = app._PIPE(session.queries[1], support_images=session.examples.images,
                     support_masks=session.examples.masks, threshold_mode="relative", threshold=0.25)
    np.testing.assert_array_equal(session.result.masks[1], both.masks[0])
    assert len(out["overlays"]) == len(out["heatmaps"]) == 2 and out["download"]["interactive"]
    assert out["unsaved"] and not session.saved  # the page warns before leaving

    # Segment again with the same painted example: the grown set is used as it is (no support pass).
    session, *_, status = page_segment(session, example_inputs(files, ["query_b"]))
    assert "Examples: 2" in status and "reused from the cache" in status and len(encodes) == 2


def test_a_confirmed_mask_stays_that_images_mask(url, files, tmp_path):
    session = segmented(files)
    session, value, _, _ = app.correct_result(session, 1)  # correct b, then a (the page moves on to it)
    out = added(session, corrected(value, (slice(0, 10), slice(0, 20)), (slice(0, 0), slice(0, 0)), "#ff00ff"))
    confirmed_b = out["session"].result.labels(1).copy()
    fixed = corrected(out["pending"], (slice(0, 30), slice(0, 40)), (slice(60, 90), slice(80, 120)), "#ff00ff")
    session = added(out["session"], fixed)["session"]
    confirmed_a = session.result.labels(0).copy()
    assert session.confirmed == [True, True]
    assert iou(session.result.labels(1) > 0, confirmed_b > 0) == 1.0  # not predicted again by the second addition

    # Segment again: nothing left to predict, the confirmed masks stay.
    session, *_, status = page_segment(session, example_inputs(files))
    assert "Every image has a confirmed mask (2 images): nothing to predict." in status
    assert iou(session.result.labels(0) > 0, confirmed_a > 0) == 1.0
    assert iou(session.result.labels(1) > 0, confirmed_b > 0) == 1.0

    # Another gallery: only its new image is predicted; b, confirmed and left out of it, stays in the results.
    square = write_image(tmp_path / "c.png", 64, 64, seed=4)
    session, overlays, _, mask_files, status = page_segment(session, example_inputs(files, ["query_a", square]))
    assert session.names == ["a.png", "c.png", "b.jpg"] and session.confirmed == [True, False, True]
    assert "Segmented 1 image" in status and "Kept the confirmed masks of 2 images." in status
    assert overlays[0][1].endswith("(confirmed)") and not overlays[1][1].endswith("(confirmed)")

    session, _ = downloaded(session, tmp_path / "zip")
    for name, mask in [("a", confirmed_a), ("b", confirmed_b)]:
        written = np.asarray(PIL.Image.open(tmp_path / "zip" / "masks" / f"{name}.png")) > 0
        assert iou(written, mask > 0) == 1.0
    coco = json.loads((tmp_path / "zip" / "annotations.json").read_text())
    assert {image["file_name"]: image["confirmed"] for image in coco["images"]} == {
        "a.png": True, "c.png": False, "b.jpg": True}
    by_id = {image["id"]: image["confirmed"] for image in coco["images"]}
    assert all(a["attributes"]["confirmed"] == by_id[a["image_id"]] for a in coco["annotations"])


def test_changing_the_examples_keeps_the_added_ones(url, files):
    session = segmented(files)
    session, value, _, _ = app.correct_result(session, 0)
    session = added(session, value)["session"]
    stray = example_inputs(files)
    stray[0]["layers"][0][70:73, 0:3] = (255, 0, 255, 128)  # one stray stroke in the example tab
    session, *_, status = page_segment(session, stray)
    assert session.examples.num_shots == 2 and session.examples.names == ["example_1", "example_2"]
    assert "the set now holds them and still the 1 example added from corrected results" in status
    assert "Examples: 2" in status and session.examples.masks[0][70:73, 0:3].all()
    np.testing.assert_array_equal(np.asarray(session.examples.images[1]), np.asarray(session.queries[0]))


def test_add_as_example_moves_on_and_a_repeat_says_so(url, files):
    session = segmented(files)
    session, value, _, _ = app.correct_result(session, 0)
    out = added(session, value)
    assert out["correction"] is None and "Correcting **b.jpg**" in out["note"]  # the next result, to be corrected
    np.testing.assert_array_equal(out["pending"]["background"], np.asarray(session.queries[1]))
    out = added(out["session"], out["pending"])
    assert out["pending"] is None and out["correction"] is None and "Every result is confirmed" in out["note"]

    session, value, _, note = app.correct_result(out["session"], 0)
    assert "(confirmed: it is example_2 of the example set)" in note
    out = added(session, value)
    assert out["note"] == "⚠️ a.png is already in the example set (example_2): click another result."
    assert unchanged(out, "note", "pending") and out["pending"] is None  # the correction editor stays as it is
    assert session.examples.num_shots == 3


def test_a_mistake_shows_in_one_place_and_leaves_the_rest_of_the_page(url, files, tmp_path):
    small = write_mask(tmp_path / "small.png", 48, 40)
    inputs = page_inputs([editor_value(files["support"], None)], [small], [files["query_a"]])
    outputs = app.run_segment(None, None, *inputs, "")
    assert outputs[4] == ("⚠️ The mask file of example 1 is 48x40 pixels but its image is 96x80: a mask must have "
                          "the size of its image.")
    assert [o for i, o in enumerate(outputs) if i != 4] == [gr.skip()] * 7

    with pytest.warns(UserWarning, match="a mask must have the size of its image"):
        outputs = app.load_mask_file(editor_value(files["support"], None), small, None, number=1)
    assert outputs == (None, gr.skip(), gr.skip(), gr.skip()) and app._show(outputs[0]) == gr.skip()

    out = added(demo_utils.Session(), editor_value(files["support"], None))
    assert out["note"] == "⚠️ Click a result first, correct its mask, then add it as an example."
    assert unchanged(out, "note", "pending")


def test_the_download_holds_every_image_after_the_upload_cache_is_cleared(url, files, tmp_path):
    uploads = tmp_path / "uploads"  # Gradio's upload cache, cleared an hour after the upload
    uploads.mkdir()
    queries = [shutil.copy(files[q], uploads) for q in ("query_a", "query_b")]
    uploaded = {Path(q).name: Path(q).read_bytes() for q in queries}
    session = segmented(files, queries)
    shutil.rmtree(uploads)
    session, *_, status = page_segment(session, example_inputs(files, queries))  # the gallery's files are gone
    assert "Segmented 2 images" in status
    session, names = downloaded(session, tmp_path / "zip")
    assert {f"images/{n}" for n in uploaded} <= names
    assert {n: (tmp_path / "zip" / "images" / n).read_bytes() for n in uploaded} == uploaded


def test_open_a_saved_set_and_go_on_labelling(url, files, tmp_path, encodes):
    session = segmented(files)
    session, value, _, _ = app.correct_result(session, 0)
    session = added(session, value)["session"]
    _, path, _, _ = app.download_zip(session)
    encodes.clear()
    reopened, set_line, names, note, download, unsaved = app.open_saved_set(None, path)  # after a reload
    assert note.startswith("Opened diffews_masks.zip: 2 examples, encoded in ") and encodes == [(2, None)]
    assert "**2** examples" in set_line and "opened from diffews_masks.zip" in set_line
    assert "2 shots cached" in set_line
    assert download["interactive"] and unsaved == ""
    assert reopened.examples.names == session.examples.names and reopened.examples.num_given == 0
    for before, after in zip(session.examples.images, reopened.examples.images):
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
    for before, after in zip(session.examples.masks, reopened.examples.masks):
        np.testing.assert_array_equal(before, after)
    # The example tabs are empty after a reload: Segment uses the opened set, its cache built once.
    reopened, *_, status = page_segment(reopened, page_inputs([], [], [files["query_b"]]))
    assert "Examples: 2" in status and "reused from the cache" in status and len(encodes) == 1

    pairs = tmp_path / "pairs.zip"  # any zip of NAME.png + NAME_mask.png pairs, as --support-dir reads
    with zipfile.ZipFile(pairs, "w") as archive:
        archive.write(files["support"], "set/cat.png")
        archive.write(write_mask(tmp_path / "mask.png", 96, 80), "set/cat_mask.png")
    reopened, *_, note, _, _ = app.open_saved_set(reopened, str(pairs))
    assert reopened.examples.names == ["cat"] and "Opened pairs.zip: 1 example" in note

    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.write(files["support"], "cat.png")
    outputs = app.open_saved_set(reopened, str(tmp_path / "other.zip"))
    assert outputs[3] == ("⚠️ other.zip has no example pairs: open a zip this page downloaded, or one folder of "
                          "NAME.png + NAME_mask.png pairs.")
    assert [o for i, o in enumerate(outputs) if i != 3] == [gr.skip()] * 5
    with zipfile.ZipFile(tmp_path / "other.zip", "a") as archive:
        archive.write(files["support"], "dog_mask.png")
    assert app.open_saved_set(reopened, str(tmp_path / "other.zip"))[3] == (
        "⚠️ other.zip: cat.png has no mask (expected cat_mask.png beside it).")


def test_the_page_and_the_zip_name_the_mask_files_alike(url, files, tmp_path):
    session, _, _, mask_files, _ = page_segment(None, example_inputs(files))
    session, names = downloaded(session, tmp_path / "zip")
    assert [Path(p).name for p in mask_files] == ["a.png", "b.png"]
    assert {f"masks/{Path(p).name}" for p in mask_files} == {n for n in names if n.startswith("masks/")}
    for path in mask_files:
        assert Path(path).read_bytes() == (tmp_path / "zip" / "masks" / Path(path).name).read_bytes()


def test_the_example_set_has_a_limit_and_a_correction_needs_a_result(url, files, monkeypatch):
    monkeypatch.setattr(app, "MAX_SHOTS", 1)
    session = segmented(files)
    session, value, _, _ = app.correct_result(session, 0)
    assert "holds 1 examples, the most it may hold" in added(session, value)["note"]


def test_a_failed_addition_leaves_the_example_set_as_it_was(url, files, encodes):
    session = segmented(files)
    support, masks = session.examples.support, [m.copy() for m in session.result.masks]
    session, value, _, _ = app.correct_result(session, 0)
    assert "threshold must be in" in added(session, value, threshold=2.0)["note"]
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
    assert "1 brush colour beyond the 2 classes of the example set" in added(session, third)["note"]
    fixed = corrected(value, (slice(0, 10), slice(0, 20)), (slice(40, 50), slice(60, 70)), demo_utils.CLASS_COLORS[1])
    session = added(session, fixed)["session"]
    shot = session.examples.masks[-1]
    assert (shot[:10, :20] == 3).all() and (shot[40:, 60:] == 0).all()
    # The corrected image's class probabilities are its corrected label map, like its probability map.
    np.testing.assert_array_equal(session.result.class_probabilities[1], np.stack([shot == 1, shot == 3]))
    assert session.examples.support.num_shots == 2
    assert [(count, extended.num_shots if extended else None) for count, extended in encodes] == [(1, None), (1, 1)]


def test_the_download_holds_masks_examples_and_coco(url, files, tmp_path):
    session = segmented(files)
    session, value, _, _ = app.correct_result(session, 1)
    session = added(session, value)["session"]
    _check_zip(app.download_zip(session)[1], session, tmp_path, binary=True)

    square = write_image(tmp_path / "c.png", 64, 64, seed=4)
    session = segmented(files, queries=("query_a", square), mask_file="labels", class_names="grass, x, sky")
    path = app.download_zip(session)[1]
    categories = _check_zip(path, session, tmp_path / "several", binary=False)
    reopened, _, class_names, *_ = app.open_saved_set(None, path)  # the classes, their names and colours come back
    assert class_names == "1: grass, 3: sky" and reopened.examples.multiclass
    assert reopened.examples.palette == session.examples.palette
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
    categories = {c["id"]: c["name"] for c in data["categories"]}
    _check_polygons_and_yolo(folder, session, categories)
    return categories


def _check_polygons_and_yolo(folder, session, categories: dict[int, str]) -> None:
    """The download's other formats: COCO polygons that fill back to each result, and a YOLO segmentation dataset
    (data.yaml naming the categories in order, one labels file per image, a line per piece of each class)."""
    import yaml

    from pipeline_diffews.coco import masks_from_coco

    polygons = json.loads((folder / "annotations_polygons.json").read_text())
    assert [image["confirmed"] for image in polygons["images"]] == session.confirmed
    filled = masks_from_coco(polygons)
    names = yaml.safe_load((folder / "data.yaml").read_text())["names"]
    assert names == dict(enumerate(categories.values()))
    for index, name in enumerate(session.names):
        labels = session.result.labels(index)
        np.testing.assert_array_equal(filled[name], labels)
        lines = (folder / "labels" / f"{Path(name).stem}.txt").read_text().splitlines()
        assert {int(line.split()[0]) for line in lines} == {
            list(categories).index(k) for k in demo_utils.class_ids(labels)}
        for line in lines:
            coordinates = [float(v) for v in line.split()[1:]]
            assert len(coordinates) >= 6 and len(coordinates) % 2 == 0
            assert 0 <= min(coordinates) <= max(coordinates) <= 1
