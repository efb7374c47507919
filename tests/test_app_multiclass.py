"""Several classes in the demo: brush colours and palette masks -> label maps, `/segment_classes`, the legend."""

from __future__ import annotations

import io
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import PIL.Image
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

import app
import demo_utils
from tests.test_app import call_segment, page_inputs, running_app, write_image

PALETTE = [0, 0, 0, 10, 200, 30, 250, 20, 20, 40, 40, 240] + [128] * (768 - 12)  # index 1 green, 2 red, 3 blue


def write_label_map(path, labels: np.ndarray, palette=PALETTE) -> str:
    """A palette ("P") PNG of the uint8 label map [H, W]."""
    image = PIL.Image.fromarray(labels.astype(np.uint8), "L").convert("P")
    image.putpalette(palette)
    image.save(path)
    return str(path)


def two_classes(height: int, width: int, first: int = 1, second: int = 3) -> np.ndarray:
    """Label map [H, W]: class `first` in the top-left quarter, `second` in the bottom-right one, a 255 strip."""
    labels = np.zeros((height, width), np.uint8)
    labels[: height // 2, : width // 2] = first
    labels[height // 2 :, width // 2 :] = second
    labels[:, -2:] = 255
    return labels


def painted_editor(image_path: str, strokes: dict[str, tuple[slice, slice]]) -> dict:
    """A gr.ImageEditor value with one stroke per brush colour ("#rrggbb" -> region); stroke edges anti-aliased."""
    background = np.asarray(PIL.Image.open(image_path).convert("RGBA"))
    layer = np.zeros_like(background)
    for color, (rows, cols) in strokes.items():
        layer[rows, cols] = (*demo_utils.hex_to_rgb(color), 255)
        layer[rows.start - 1, cols] = (*demo_utils.hex_to_rgb(color), 90)  # a faint edge row above the stroke
    return {"background": background, "layers": [layer], "composite": background}


@pytest.fixture(scope="module")
def url(saved_pipeline):
    with running_app(saved_pipeline) as address:
        yield address


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multiclass")
    return {
        "support": write_image(folder / "support.png", 96, 80, seed=1),
        "labels": write_label_map(folder / "labels.png", two_classes(80, 96)),
        "query_a": write_image(folder / "a.png", 120, 90, seed=2),
        "query_b": write_image(folder / "b.jpg", 70, 50, seed=3),
    }


def call_classes(client, support, labels, queries, **kwargs):
    return call_segment(client, support, labels, queries, api_name="/segment_classes", **kwargs)


# ---------------------------------------------------------------------------------------------- /segment_classes


def test_segment_classes_serves_index_pngs_and_a_legend(url, files):
    client = Client(url, verbose=False, download_files=False)
    label_files, probability_files, legend, status = call_classes(
        client, files["support"], files["labels"], [files["query_a"], files["query_b"]],
        class_names="1: grass, 3: sky", threshold_mode="relative", threshold=0.0,
    )
    assert legend == [
        {"id": 1, "name": "grass", "color": "#0ac81e"},
        {"id": 3, "name": "sky", "color": "#2828f0"},
    ]
    assert "Segmented 2 images" in status and "grass (id 1" in status and "sky (id 3" in status
    assert "<" not in status and "*" not in status  # plain text
    assert [f["orig_name"] for f in label_files] == ["a_labels.png", "b_labels.png"]
    assert [[Path(f["path"]).name for f in group] for group in probability_files] == [  # per query, per class
        ["a_class1_probability.png", "a_class3_probability.png"],
        ["b_class1_probability.png", "b_class3_probability.png"],
    ]
    probability_files = [f for group in probability_files for f in group]
    fetch = lambda f: PIL.Image.open(  # noqa: E731
        io.BytesIO(httpx.get(f.get("url") or f"{url}gradio_api/file={f['path']}").content)
    )
    for q, size in enumerate([(120, 90), (70, 50)]):
        labels = fetch(label_files[q])
        assert (labels.mode, labels.size) == ("P", size)
        assert labels.getpalette()[:12] == PALETTE[:12]  # the support's palette
        labels = np.asarray(labels)
        probabilities = [np.asarray(fetch(f), np.int16) for f in probability_files[2 * q : 2 * q + 2]]
        assert all(p.shape == labels.shape for p in probabilities)
        assert set(np.unique(labels)) <= {1, 3}  # threshold 0: every pixel with a probability > 0 gets a class
        # The files hold what the pipeline computes for these supports (encoded once, as the demo does).
        query = PIL.Image.open(files[["query_a", "query_b"][q]]).convert("RGB")
        support = app._PIPE.encode_support([PIL.Image.open(files["support"]).convert("RGB")],
                                           [np.asarray(PIL.Image.open(files["labels"]))])
        out = app._PIPE(query, support=support, threshold_mode="relative", threshold=0.0)
        assert out.class_ids == [1, 3]
        np.testing.assert_array_equal(labels, out.label_maps[0])
        for probability, expected in zip(probabilities, out.class_probabilities[0]):
            assert np.abs(probability - expected * 255).max() <= 0.5 + 1e-3


def test_segment_classes_caches_the_class_supports(url, files, tmp_path):
    client = Client(url, verbose=False)
    labels = write_label_map(tmp_path / "fresh.png", two_classes(80, 96, first=2, second=5))
    first = call_classes(client, files["support"], labels, [files["query_b"]], class_names="")
    second = call_classes(client, files["support"], labels, [files["query_b"]], class_names="")
    assert "example features computed" in first[3] and "reused from the cache" in second[3]
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(first[0][0])), np.asarray(PIL.Image.open(second[0][0])))
    assert [entry["name"] for entry in second[2]] == ["class 2", "class 5"]


def test_a_plain_mask_is_class_one_and_absolute_one_gives_background(url, files, tmp_path):
    client = Client(url, verbose=False)
    mask = np.zeros((80, 96), np.uint8)
    mask[20:60, 24:72] = 255
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    label_files, probability_files, legend, _ = call_classes(
        client, files["support"], str(tmp_path / "mask.png"), [files["query_a"]],
        threshold_mode="absolute", threshold=1.0,
    )
    assert [entry["id"] for entry in legend] == [1] and [len(group) for group in probability_files] == [1]
    labels = PIL.Image.open(label_files[0])
    assert labels.mode == "P" and labels.size == (120, 90) and not np.asarray(labels).any()


@pytest.mark.parametrize(
    "case, message",
    [("wrong_size", "a mask must have the size of its image"), ("background_only", "mask of example 1 is empty")],
)
def test_segment_classes_reports_user_errors(url, files, tmp_path, case, message):
    client = Client(url, verbose=False)
    labels = two_classes(40, 48) if case == "wrong_size" else np.zeros((80, 96), np.uint8)
    with pytest.raises(AppError, match=message):
        call_classes(client, files["support"], write_label_map(tmp_path / "labels.png", labels), [files["query_a"]])


# ---------------------------------------------------------------------------------------------- the page


def test_page_paints_two_classes_in_two_brush_colours(url, files):
    first, second = demo_utils.CLASS_COLORS[:2]
    editor = painted_editor(files["support"],
                            {first: (slice(10, 30), slice(10, 40)), second: (slice(45, 70), slice(50, 90))})
    second_only = painted_editor(files["query_b"], {second: (slice(5, 20), slice(30, 60))})  # no class 1 here
    overlays, heatmaps, label_paths, status = app.segment_page(
        *page_inputs([editor, second_only], [], [files["query_a"], files["query_b"]], "relative", 0.25), "road, car"
    )
    assert "Examples: 2" in status and "**road** (id 1" in status and "**car** (id 2" in status
    assert f'<span style="color:{first}">' in status and f'<span style="color:{second}">' in status
    for (overlay, caption), path, size in zip(overlays, label_paths, [(120, 90), (70, 50)]):
        labels = PIL.Image.open(path)
        assert labels.mode == "P" and labels.size == overlay.size == size
        assert caption.split(": ", 1)[1].startswith("road ") and ", car " in caption
        labels, rgb = np.asarray(labels), np.asarray(overlay)
        for class_id in demo_utils.class_ids(labels):  # each class present is outlined in its brush colour
            outline = np.all(rgb == demo_utils.hex_to_rgb(demo_utils.CLASS_COLORS[class_id - 1]), axis=-1)
            assert outline[labels == class_id].any() and not outline[labels == 0].any()
    assert len(heatmaps) == 2


def test_page_with_one_brush_colour_stays_one_class(url, files):
    editor = painted_editor(files["support"], {demo_utils.CLASS_COLORS[1]: (slice(10, 30), slice(20, 60))})
    _, _, mask_paths, status = app.segment_page(*page_inputs([editor], [], [files["query_a"]]))
    mask = PIL.Image.open(mask_paths[0])
    assert mask.mode == "L" and set(np.unique(np.asarray(mask))) <= {0, 255}
    assert "Classes:" not in status


def test_page_reads_a_palette_mask_file_as_classes(url, files):
    editor = painted_editor(files["support"], {})
    status = app.segment_page(*page_inputs([editor], [files["labels"]], [files["query_b"]]))[3]
    assert '<span style="color:#0ac81e">■</span> **class 1**' in status and "**class 3** (id 3" in status


def test_page_error_names_the_example(url, files):
    with pytest.raises(gr.Error, match="Example 1 has no mask"):
        app.segment_page(*page_inputs([painted_editor(files["support"], {})], [], [files["query_a"]]))


# ---------------------------------------------------------------------------------------------- inputs and outputs


def test_brush_colours_become_class_ids():
    layer = np.zeros((12, 12, 4), np.uint8)
    layer[1:5, 1:5] = (*demo_utils.hex_to_rgb(demo_utils.CLASS_COLORS[0]), 255)
    layer[6:11, 6:11] = (*demo_utils.hex_to_rgb(demo_utils.CLASS_COLORS[2]), 255)
    layer[5, 6:11] = (255, 140, 0, 60)  # a faint edge, nearest to colour 6 (orange): not a class, it joins colour 3
    layer[0, 0] = (120, 0, 120, 1)  # a faint dark stroke edge, nearest to colour 1
    labels = demo_utils.label_map_from_layers([layer], (12, 12))
    assert demo_utils.class_ids(labels) == [1, 3]
    assert (labels[1:5, 1:5] == 1).all() and (labels[5:11, 6:11] == 3).all() and labels[0, 0] == 1
    assert (labels > 0).sum() == 16 + 30 + 1


@pytest.mark.parametrize(
    "kind, ids, expected",
    [
        ("palette", (2, 7), [0, 2, 7]),
        ("grey_ids", (1, 4), [0, 1, 4, 255]),
        ("white_on_black", (1, 1), [0, 1]),
        ("rgba", (1, 1), [0, 1]),
    ],
)
def test_mask_files_as_label_maps(tmp_path, kind, ids, expected):
    values = np.zeros((10, 16), np.uint8)
    values[2:5, 2:8], values[6:9, 8:14] = ids
    if kind == "palette":
        write_label_map(tmp_path / "m.png", values)
    elif kind == "grey_ids":
        values[0] = 255
        PIL.Image.fromarray(values, "L").save(tmp_path / "m.png")
    elif kind == "white_on_black":
        PIL.Image.fromarray((values > 0).astype(np.uint8) * 255, "L").save(tmp_path / "m.png")
    else:
        rgba = np.zeros((10, 16, 4), np.uint8)
        rgba[values > 0] = (255, 0, 0, 200)
        PIL.Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    labels = demo_utils.read_label_map(tmp_path / "m.png", (16, 10), "mask")
    assert labels.dtype == np.uint8 and sorted(np.unique(labels).tolist()) == expected
    assert demo_utils.file_palette(tmp_path / "m.png") == (PALETTE if kind == "palette" else None)
    with pytest.raises(demo_utils.InputError, match="16x10 pixels but its image is 8x10"):
        demo_utils.read_label_map(tmp_path / "m.png", (8, 10), "mask")


def test_class_names_and_palettes():
    assert demo_utils.parse_class_names("road, car,, person", [1, 2, 3]) == {1: "road", 2: "car", 3: "person"}
    assert demo_utils.parse_class_names("1: road\n8: car", [1, 8]) == {1: "road", 8: "car"}
    with pytest.raises(demo_utils.InputError, match="class id in 1..254"):
        demo_utils.parse_class_names("x: road", [1])
    colors = demo_utils.class_colors([1, 2, 20])
    assert colors[1] == demo_utils.OVERLAY_RGB and colors[2] == demo_utils.hex_to_rgb(demo_utils.CLASS_COLORS[1])
    assert len(set(colors.values())) == 3
    palette = demo_utils.output_palette(colors)
    assert len(palette) == 768 and palette[:3] == [0, 0, 0] and palette[60:63] == list(colors[20])
    assert demo_utils.class_colors([2], PALETTE) == {2: (250, 20, 20)}


def test_support_key_tells_label_maps_from_masks():
    image = PIL.Image.new("RGB", (8, 8), "red")
    labels = np.zeros((8, 8), np.uint8)
    labels[2:4, 2:4], labels[5:7, 5:7] = 1, 2
    other = labels.copy()
    other[5:7, 5:7] = 3
    key = demo_utils.support_key([image], [labels], 64)
    assert key != demo_utils.support_key([image], [other], 64)
    assert key != demo_utils.support_key([image], [labels > 0], 64)


def test_an_index_mask_upload_is_checked_as_classes(url, files, tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr(app.gr, "Info", shown.append)
    labels = two_classes(80, 96, first=1, second=4)
    PIL.Image.fromarray(labels, "L").save(tmp_path / "ids.png")  # a grey PNG of class ids
    app.check_mask_file(painted_editor(files["support"], {}), str(tmp_path / "ids.png"), number=1)
    assert shown and "2 classes: ids 1, 4" in shown[0]
