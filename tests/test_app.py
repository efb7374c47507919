"""The Gradio demo (`app.py`): the `/segment` endpoint through gradio_client, the page's handler, errors, start-up."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import PIL.Image
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import app
import demo_utils
from pipeline_diffews.official import load_pipeline

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_app(pipeline_folder: Path):
    """Builds the demo on a saved pipeline folder and serves it on a free local port. Yields the URL."""
    demo = app.build_demo(load_pipeline(str(pipeline_folder), device="cpu"))
    _, url, _ = app.launch(demo, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()


def write_image(path: Path, width: int, height: int, seed: int = 0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)
    return str(path)


def write_mask(path: Path, width: int, height: int, box=(0.25, 0.25, 0.75, 0.75)) -> str:
    mask = np.zeros((height, width), np.uint8)
    x0, y0, x1, y1 = box
    mask[int(y0 * height) : int(y1 * height), int(x0 * width) : int(x1 * width)] = 255
    PIL.Image.fromarray(mask).save(path)
    return str(path)


@pytest.fixture(scope="module")
def url(saved_pipeline):
    with running_app(saved_pipeline) as address:
        yield address


@pytest.fixture(scope="module")
def client(url):
    return Client(url, verbose=False)


@pytest.fixture
def files(tmp_path):
    """A support image (96x80) with its mask, and two queries of other sizes (120x90, 70x50)."""
    return {
        "support": write_image(tmp_path / "support.png", 96, 80, seed=1),
        "mask": write_mask(tmp_path / "support_mask.png", 96, 80),
        "query_a": write_image(tmp_path / "a.png", 120, 90, seed=2),
        "query_b": write_image(tmp_path / "b.jpg", 70, 50, seed=3),
    }


def call_segment(client, support, mask, queries, api_name="/segment", **kwargs):
    """One support image with its mask, the queries: the outputs of the endpoint `api_name`."""
    return client.predict(
        support_images=[handle_file(support)],
        support_masks=[handle_file(mask)],
        queries=[handle_file(q) for q in queries],
        api_name=api_name,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------- /segment


def test_segment_endpoint_serves_png_masks_at_each_query_size(url, files):
    raw_client = Client(url, verbose=False, download_files=False)
    masks, probabilities, status = call_segment(
        raw_client, files["support"], files["mask"], [files["query_a"], files["query_b"]],
        threshold_mode="relative", threshold=0.25,
    )
    assert len(masks) == len(probabilities) == 2
    assert "Segmented 2 images" in status
    for mask_file, probability_file, size, stem in zip(masks, probabilities, [(120, 90), (70, 50)], ["a", "b"]):
        assert mask_file["orig_name"] == f"{stem}_mask.png"
        response = httpx.get(mask_file["url"])
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        mask = PIL.Image.open(io.BytesIO(response.content))
        assert (mask.format, mask.mode, mask.size) == ("PNG", "L", size)
        values = np.asarray(mask)
        assert set(np.unique(values)) <= {0, 255}
        assert values.max() == 255  # relative mode always keeps the most likely pixel
        probability = PIL.Image.open(io.BytesIO(httpx.get(probability_file["url"]).content))
        assert (probability.mode, probability.size) == ("L", size)


def test_absolute_threshold_of_one_gives_empty_masks(client, files):
    masks, _, _ = call_segment(client, files["support"], files["mask"], [files["query_a"]],
                               threshold_mode="absolute", threshold=1.0)
    mask = PIL.Image.open(masks[0])
    assert mask.size == (120, 90)
    assert not np.asarray(mask).any()


def test_same_supports_are_served_from_the_cache(client, tmp_path, files):
    support = write_image(tmp_path / "fresh_support.png", 64, 48, seed=11)
    mask = write_mask(tmp_path / "fresh_mask.png", 64, 48, box=(0.1, 0.2, 0.6, 0.9))
    first = call_segment(client, support, mask, [files["query_a"]])[2]
    second = call_segment(client, support, mask, [files["query_b"], files["query_a"]])[2]
    assert "example features computed" in first
    assert "example features reused from the cache" in second


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty_mask", "mask of example 1 is empty"),
        ("wrong_size_mask", "a mask must have the size of its image"),
        ("text_query", "is not an image"),
        ("no_query", "Add at least one image to segment"),
    ],
)
def test_segment_endpoint_reports_user_errors(client, tmp_path, files, case, message):
    mask, queries = files["mask"], [files["query_a"]]
    if case == "empty_mask":
        mask = write_mask(tmp_path / "empty.png", 96, 80, box=(0, 0, 0, 0))
    elif case == "wrong_size_mask":
        mask = write_mask(tmp_path / "small.png", 48, 40)
    elif case == "text_query":
        (tmp_path / "notes.png").write_text("not an image")
        queries = [str(tmp_path / "notes.png")]
    elif case == "no_query":
        queries = []
    with pytest.raises(AppError, match=message):
        call_segment(client, files["support"], mask, queries)


# ---------------------------------------------------------------------------------------------- the page's handler


def editor_value(image_path: str, stroke: tuple[slice, slice] | None) -> dict:
    """What gr.ImageEditor(type="numpy", image_mode="RGBA") passes: background, layers, composite."""
    background = np.asarray(PIL.Image.open(image_path).convert("RGBA"))
    layer = np.zeros_like(background)
    if stroke is not None:
        layer[stroke] = (255, 0, 102, 255)
    return {"background": background, "layers": [layer], "composite": background}


def page_inputs(editors, mask_files, queries, mode="relative", threshold=0.25):
    editors = list(editors) + [None] * (app.EXAMPLE_TABS - len(editors))
    mask_files = list(mask_files) + [None] * (app.EXAMPLE_TABS - len(mask_files))
    return [*editors, *mask_files, [(q, None) for q in queries], mode, threshold]


def test_page_segments_with_painted_supports(url, files):
    painted = editor_value(files["support"], (slice(10, 30), slice(20, 60)))
    inputs = page_inputs([painted], [], [files["query_a"], files["query_b"]])
    overlays, heatmaps, mask_paths, status = app.segment_page(*inputs)
    assert [o[0].size for o in overlays] == [(120, 90), (70, 50)]
    assert [h[0].size for h in heatmaps] == [(120, 90), (70, 50)]
    assert [PIL.Image.open(p).size for p in mask_paths] == [(120, 90), (70, 50)]
    assert f"mask area {100 * 20 * 40 / (96 * 80):.1f}%" in status


def test_page_mask_file_replaces_painted_strokes(url, files):
    painted = editor_value(files["support"], (slice(0, 8), slice(0, 8)))
    status = app.segment_page(*page_inputs([painted], [files["mask"]], [files["query_a"]]))[3]
    assert "mask area 25.0%" in status


@pytest.mark.parametrize(
    "editors, mask_files, queries, message",
    [
        ("unpainted", [], ["query_a"], "Example 1 has no mask"),
        ("none", [], ["query_a"], "Add at least one example image"),
        ("painted", [], [], "Add at least one image to segment"),
        ("none", ["mask"], ["query_a"], "has a mask file but no image"),
    ],
)
def test_page_reports_user_errors(url, files, editors, mask_files, queries, message):
    values = {
        "unpainted": [editor_value(files["support"], None)],
        "painted": [editor_value(files["support"], (slice(10, 30), slice(20, 60)))],
        "none": [],
    }[editors]
    with pytest.raises(gr.Error, match=message):
        app.segment_page(*page_inputs(values, [files[m] for m in mask_files], [files[q] for q in queries]))


def test_mask_upload_is_checked_against_its_image(url, files, tmp_path):
    editor = editor_value(files["support"], None)
    with pytest.raises(gr.Error, match="a mask must have the size of its image"):
        app.check_mask_file(editor, write_mask(tmp_path / "small.png", 48, 40), number=2)
    with pytest.raises(gr.Error, match="Upload example image 2 first"):
        app.check_mask_file(None, files["mask"], number=2)


# ---------------------------------------------------------------------------------------------- inputs and outputs


def test_editor_layer_alpha_is_the_mask(files):
    value = editor_value(files["support"], (slice(5, 15), slice(30, 40)))
    value["layers"][0][20:25, 0:5] = (0, 0, 0, 1)  # faint strokes count too
    image, mask = demo_utils.support_from_editor(value, 1)
    assert image.mode == "RGB" and image.size == (96, 80)
    assert mask.sum() == 10 * 10 + 5 * 5
    assert demo_utils.support_from_editor({"background": None, "layers": [], "composite": None}, 1) is None


@pytest.mark.parametrize("mode", ["L", "1", "RGB", "RGBA", "P"])
def test_mask_files_in_any_mode(tmp_path, mode):
    mask = np.zeros((20, 30), bool)
    mask[5:10, 10:20] = True
    if mode == "RGBA":
        rgba = np.zeros((20, 30, 4), np.uint8)
        rgba[mask] = (255, 0, 0, 200)
        image = PIL.Image.fromarray(rgba, "RGBA")
    elif mode == "P":
        image = PIL.Image.fromarray(mask.astype(np.uint8) * 3, "L").convert("P")
    else:
        image = PIL.Image.fromarray(mask.astype(np.uint8) * 255, "L").convert(mode)
    image.save(tmp_path / "mask.png")
    np.testing.assert_array_equal(demo_utils.read_mask(tmp_path / "mask.png", (30, 20), "mask"), mask)


def test_support_cache_is_keyed_by_pixels_and_masks_and_evicts_old_entries():
    image = PIL.Image.new("RGB", (8, 8), "red")
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    key = demo_utils.support_key([image], [mask], 64)
    assert key == demo_utils.support_key([image.copy()], [mask.copy()], 64)
    assert key != demo_utils.support_key([image], [~mask], 64)
    assert key != demo_utils.support_key([image], [mask], 128)
    cache = demo_utils.SupportCache(max_items=2)
    for name in "abc":
        cache.put(name, name)
    assert cache.get("a") is None and cache.get("c") == "c" and len(cache) == 2


def test_examples_are_complete_and_their_layers_are_the_masks():
    sets = app._examples()
    assert [s["name"] for s in sets] == ["balloons", "fish", "oranges"]
    for example in sets:
        values = app._example_values(example)
        assert len(values) == app.EXAMPLE_TABS
        for value, support in zip((v for v in values if v is not None), example["supports"]):
            background, [layer] = value["background"], value["layers"]
            mask = np.asarray(PIL.Image.open(support.with_name(f"{support.stem}_mask.png")))
            # the layer starts at the image's top-left corner and spans at least the editor's empty canvas
            assert background.shape[:2] == mask.shape and layer.shape[0] >= mask.shape[0]
            np.testing.assert_array_equal(layer[: mask.shape[0], : mask.shape[1], 3] > 0, mask >= 128)
            assert not layer[mask.shape[0] :, :, 3].any() and not layer[:, mask.shape[1] :, 3].any()
            inside = layer[: mask.shape[0], : mask.shape[1], 3][mask >= 128]
            assert (inside < 255).mean() > 0.5  # see-through paint (an opaque border)
            assert mask.any()
        assert all(Path(q).is_file() for q in example["queries"])
    assert "CC0" in (ROOT / "examples" / "README.md").read_text()


def test_a_small_image_gets_a_layer_as_large_as_the_empty_canvas():
    mask = np.zeros((20, 30), bool)
    mask[5:10, 10:20] = True
    value = demo_utils.editor_value(PIL.Image.new("RGB", (30, 20), "white"), mask)
    layer = value["layers"][0]
    assert layer.shape == (*demo_utils.EDITOR_CANVAS[::-1], 4)
    image, labels = demo_utils.support_from_editor(value, 1)  # an unedited layer is read back as it was given
    np.testing.assert_array_equal(labels, mask)


def test_a_brush_colour_beyond_a_loaded_label_maps_classes_paints_a_new_class():
    labels = np.zeros((20, 30), np.uint8)
    labels[0:5, 0:10], labels[10:15, 0:10] = 1, 3
    value = demo_utils.editor_value(PIL.Image.new("RGB", (30, 20), "white"), labels, [1, 3])
    value["layers"][0][15:20, 20:30] = (*demo_utils.hex_to_rgb(demo_utils.CLASS_COLORS[2]), 128)  # a third colour
    _, read = demo_utils.support_from_editor(value, 1, ids=[1, 3])
    labels[15:20, 20:30] = 4  # the next id after the largest
    np.testing.assert_array_equal(read, labels)


# ---------------------------------------------------------------------------------------------- start-up


def test_the_header_names_the_model_and_its_design(url, saved_pipeline):
    line = f"Model: **{saved_pipeline.name}**, design: kv_fusion + concat, white_foreground target, oi2m (DiffewS)."
    assert app.model_line(app._PIPE) == line
    assert app.model_line(app._PIPE, "incontext").startswith("Model: **incontext**, design: ")
    assert line in httpx.get(f"{url}config").text  # in the page


def test_model_comes_from_the_flag_then_the_environment_then_the_default(monkeypatch):
    monkeypatch.delenv(app.MODEL_ENV, raising=False)
    assert app.parse_args([]).model == app.DEFAULT_MODEL_ID == "incontext"
    monkeypatch.setenv(app.MODEL_ENV, "/models/diffews")
    assert app.parse_args([]).model == "/models/diffews"
    assert app.parse_args(["--model", "other/repo", "--port", "7000"]).model == "other/repo"


def test_gpu_decorator_is_a_no_op_without_spaces():
    if app.spaces is not None:
        pytest.skip("the spaces package is installed")
    def fn():
        return None

    assert app.gpu(duration=10)(fn) is fn


@pytest.mark.parametrize("model", ["absolute", "examples/no-such-model"])
def test_a_model_that_cannot_be_loaded_ends_with_one_line(tmp_path, model):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    missing = str(tmp_path / "no_such_model") if model == "absolute" else model
    done = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--model", missing],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Could not load the DiffewS model '{missing}'")
    assert "no such folder" in last and "incontext" in last and "internet" not in last  # a typo, not the network
    assert "Pass --model" in last


def test_the_help_names_the_official_models(capsys):
    with pytest.raises(SystemExit):
        app.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "incontext" in help_text and "coco-fold0" in help_text and "coco-fold3" in help_text
