"""The Label Studio ML backend against a real Label Studio (installed from PyPI into its own cached environment, see
`tests/label_studio_app.py`), as a person uses it: a project with brush and polygon labels, images imported,
annotations submitted, the backend connected in the project's settings, predictions retrieved from the data manager
and read back through Label Studio's API.

The predicted brush masks, decoded by Label Studio's SDK, equal the pipeline's own masks for the same examples and
images (dict supports {label: mask}, one class per label); each new, changed or deleted annotation changes the model
version and the predictions; a restarted backend (with a personal access token this time) predicts the same.
"""

from __future__ import annotations

import shutil
import time

import httpx
import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest

from pipeline_diffews import load_pipeline
from pipeline_diffews.label_studio.backend import Settings
from tests.browser import FEWSHOT_MODEL
from tests.label_studio_app import (
    TOKEN,
    label_studio_venv,
    require_label_studio,
    running_backend,
    running_label_studio,
)
from tests.training_runs import free_port

EXAMPLES = FEWSHOT_MODEL.parent
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="balloon" background="#e41a1c"/><Label value="fish" background="#377eb8"/>
  </BrushLabels>
  <PolygonLabels name="outline" toName="image">
    <Label value="balloon" background="#e41a1c"/><Label value="fish" background="#377eb8"/>
  </PolygonLabels>
</View>"""
IMAGES = ["balloons/support_1.png", "balloons/query_1.png", "balloons/query_2.png", "fish/support_1.png",
          "fish/query_1.png", "fish/query_2.png"]
QUERIES = ["balloons/query_2.png", "fish/query_2.png"]


def sdk_brush():
    try:
        from label_studio_sdk.converter import brush
    except ImportError:
        require_label_studio("label-studio-sdk is not installed here: pip install -e '.[label-studio]'")
    return brush


@pytest.fixture(scope="module")
def label_studio(request, tmp_path_factory):
    """Label Studio, installed (the first time) and started; the times go to the terminal."""
    sdk_brush()
    start = time.perf_counter()
    venv = label_studio_venv(request.config.cache.mkdir("label-studio-1.23.2") / "venv")
    ready = time.perf_counter()
    with running_label_studio(venv, tmp_path_factory.mktemp("label_studio_data")) as api:
        plugins = request.config.pluginmanager
        reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"\nLabel Studio: environment ready in {ready - start:.0f} s, started in "
                                    f"{time.perf_counter() - ready:.0f} s")
        yield api


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline(str(FEWSHOT_MODEL), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_mask(path: str) -> np.ndarray:
    return np.asarray(PIL.Image.open(EXAMPLES / path).convert("L")) >= 128


def brush_region(mask: np.ndarray, label: str) -> dict:
    """A brush region as Label Studio's editor saves it (RLE by Label Studio's SDK)."""
    height, width = mask.shape
    rle = [int(v) for v in sdk_brush().mask2rle(mask.astype(np.uint8) * 255)]
    return {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": width,
            "original_height": height, "image_rotation": 0,
            "value": {"format": "rle", "rle": rle, "brushlabels": [label]}}


def polygon_region(points_percent: list, size: tuple[int, int], label: str) -> dict:
    return {"from_name": "outline", "to_name": "image", "type": "polygonlabels", "original_width": size[0],
            "original_height": size[1], "image_rotation": 0,
            "value": {"points": points_percent, "closed": True, "polygonlabels": [label]}}


def fill(points_percent: list, size: tuple[int, int]) -> np.ndarray:
    image = PIL.Image.new("1", size)
    corners = [(x * size[0] / 100, y * size[1] / 100) for x, y in points_percent]
    PIL.ImageDraw.Draw(image).polygon(corners, fill=1)
    return np.asarray(image, dtype=bool)


def decoded(prediction: dict) -> tuple[dict, dict]:
    """{label: brush mask} decoded by Label Studio's SDK and {label: filled polygons} of a prediction."""
    brushes, polygons = {}, {}
    for region in prediction["result"]:
        width, height = region["original_width"], region["original_height"]
        value = region["value"]
        if region["type"] == "brushlabels":
            pixels = np.asarray(sdk_brush().decode_rle(value["rle"]), np.uint8).reshape(height, width, 4)
            (label,) = value["brushlabels"]
            assert label not in brushes, f"two brush regions of {label}"
            brushes[label] = pixels[:, :, 3] >= 128
        else:
            (label,) = value["polygonlabels"]
            assert value["closed"] and all(0 <= c <= 100 for point in value["points"] for c in point)
            area = fill(value["points"], (width, height))
            polygons[label] = polygons[label] | area if label in polygons else area
    return brushes, polygons


def expected(pipe, shots: list[tuple[str, dict]]) -> tuple[dict[str, dict], dict[str, dict]]:
    """{query: {label: mask}} of the pipeline itself with the shots (image, {label: mask}) as dict supports: grown
    one shot at a time (`encode_support(..., extend=)`, the backend's path), and all at once in one call (whose
    support pass shares VAE batches with the queries, so a few pixels at the threshold may differ)."""
    images = [PIL.Image.open(EXAMPLES / image).convert("RGB") for image, _ in shots]
    queries = [PIL.Image.open(EXAMPLES / query).convert("RGB") for query in QUERIES]
    support = None
    for image, (_, masks) in zip(images, shots):
        support = pipe.encode_support(image, masks, multiclass=True, extend=support)
    batch = Settings().batch_size  # the backend's UNet batches (batches change float rounding)
    grown = pipe(queries, support=support, output_type="np", batch_size=batch)
    at_once = pipe(queries, support_images=images, support_masks=[masks for _, masks in shots], output_type="np",
                   batch_size=batch)
    return tuple(
        {query: {name: out.label_maps[i] == class_id for class_id, name in zip(out.class_ids, out.class_names)
                 if (out.label_maps[i] == class_id).any()}
         for i, query in enumerate(QUERIES)}
        for out in (grown, at_once)
    )


def check_predictions(label_studio, tasks: dict, version: str | None, want: tuple[dict, dict]) -> str:
    """Reads the predictions of QUERIES back from Label Studio: one per task of one model version (`version` when
    given), whose decoded brush masks equal the pipeline's (`expected`; all at once: within 0.1% of the pixels), and
    whose polygons follow them. Returns the version."""
    grown, at_once = want
    versions = set()
    for query in QUERIES:
        latest = max(label_studio.predictions(tasks[query]), key=lambda p: p["id"])
        if version is not None:
            assert latest["model_version"] == version
        versions.add(latest["model_version"])
        brushes, polygons = decoded(latest)
        assert brushes.keys() == grown[query].keys(), (query, brushes.keys(), grown[query].keys())
        for label, mask in grown[query].items():
            differ = int((brushes[label] != mask).sum())
            assert differ == 0, f"{query}, {label}: {differ} of {mask.sum()} pixels differ from the pipeline's mask"
            assert (brushes[label] != at_once[query].get(label, False)).mean() < 1e-3, (query, label)
            iou = (polygons[label] & mask).sum() / (polygons[label] | mask).sum()
            assert iou > 0.8, f"{query}, {label}: the polygons cover the mask with IoU {iou:.2f}"
        assert 0 < latest["score"] <= 1
    assert len(versions) == 1, versions
    return versions.pop()


def test_round_trip(label_studio, pipe, tmp_path):
    project = label_studio.create_project("Balloons and fish", CONFIG)
    files = []
    for image in IMAGES:  # one file name per image, as a person's folder has
        files.append(tmp_path / image.replace("/", "_"))
        shutil.copy(EXAMPLES / image, files[-1])
    by_name = label_studio.import_images(project, files)
    tasks = {image: by_name[image.replace("/", "_")] for image in IMAGES}

    # Two annotations before the backend is connected: it reads them from the project's export.
    balloon, fish = read_mask("balloons/support_1_mask.png"), read_mask("fish/support_1_mask.png")
    label_studio.annotate(tasks["balloons/support_1.png"], [brush_region(balloon, "balloon")])
    label_studio.annotate(tasks["fish/support_1.png"], [brush_region(fish, "fish")])
    shots = [("balloons/support_1.png", {"balloon": balloon}), ("fish/support_1.png", {"fish": fish})]

    port, log = free_port(), tmp_path / "backend.log"
    with running_backend(FEWSHOT_MODEL, label_studio.url, TOKEN, log, port) as backend:
        label_studio.connect_backend(project, backend)
        label_studio.retrieve_predictions(project, [tasks[q] for q in QUERIES])
        two_shots = check_predictions(label_studio, tasks, None, expected(pipe, shots))
        assert two_shots.startswith(f"{FEWSHOT_MODEL.name}-2shots-")

        # A third annotation: the webhook adds its shot; the version changes and so do the predictions.
        truth = read_mask("balloons/truth/query_1.png")
        third = label_studio.annotate(tasks["balloons/query_1.png"], [brush_region(truth, "balloon")])
        label_studio.retrieve_predictions(project, [tasks[q] for q in QUERIES])
        three_shots = check_predictions(label_studio, tasks, None,
                                        expected(pipe, [*shots, ("balloons/query_1.png", {"balloon": truth})]))
        assert three_shots.startswith(f"{FEWSHOT_MODEL.name}-3shots-") and three_shots != two_shots

        # The annotation changed to a polygon: its shot is replaced.
        size = truth.shape[::-1]
        points = [[20.0, 15.0], [55.0, 10.0], [60.0, 60.0], [25.0, 70.0]]
        label_studio.update_annotation(third, [polygon_region(points, size, "balloon")])
        label_studio.retrieve_predictions(project, [tasks[q] for q in QUERIES])
        polygon_shot = ("balloons/query_1.png", {"balloon": fill(points, size)})
        replaced = check_predictions(label_studio, tasks, None, expected(pipe, [*shots, polygon_shot]))
        assert replaced.startswith(f"{FEWSHOT_MODEL.name}-3shots-") and replaced not in (two_shots, three_shots)

        # The annotation deleted: back to the two shots and their version.
        label_studio.delete_annotation(third)
        setup = {"project": f"{project}.0", "schema": CONFIG}
        assert httpx.post(f"{backend}/setup", json=setup, timeout=30).json() == {"model_version": two_shots}

        # A task imported with its annotation (no annotation event, only TASKS_CREATED) is an example too.
        url = next(t["data"]["image"] for t in label_studio.tasks(project) if t["id"] == tasks["balloons/query_1.png"])
        label_studio.import_tasks(project, [{"data": {"image": url}, "annotations": [
            {"result": [brush_region(truth[:, ::-1], "balloon")]}]}])
        imported = httpx.post(f"{backend}/setup", json=setup, timeout=30).json()["model_version"]
        assert imported.startswith(f"{FEWSHOT_MODEL.name}-3shots-") and imported not in (three_shots, replaced)
        label_studio.retrieve_predictions(project, [tasks[q] for q in QUERIES])
        want = expected(pipe, [*shots, ("balloons/query_1.png", {"balloon": truth[:, ::-1]})])
        assert check_predictions(label_studio, tasks, imported, want) == imported
    assert "Traceback" not in log.read_text()

    # A restarted backend (a personal access token this time) reads the examples again and predicts the same.
    for query in QUERIES:
        label_studio.delete_predictions(tasks[query])
    token = label_studio.personal_access_token()
    with running_backend(FEWSHOT_MODEL, label_studio.url, token, log, port):
        label_studio.retrieve_predictions(project, [tasks[q] for q in QUERIES])
        check_predictions(label_studio, tasks, imported, want)
    assert "Traceback" not in log.read_text()


def test_bad_input_gets_one_line_and_an_error_reply(label_studio, pipe, tmp_path, caplog):
    from fastapi.testclient import TestClient

    from pipeline_diffews.label_studio.backend import Backend
    from pipeline_diffews.label_studio.client import LabelStudioClient
    from pipeline_diffews.label_studio.server import create_app

    project = label_studio.create_project("Bad input", CONFIG)
    shutil.copy(EXAMPLES / "balloons/support_1.png", tmp_path / "good.png")
    label_studio.import_images(project, [tmp_path / "good.png"])
    label_studio.import_tasks(project, [{"data": {"image": f"/data/upload/{project}/missing.png"}},
                                        {"data": {"image": "data:image/png;base64,bm90IGFuIGltYWdl"}}])
    good, missing, garbage = sorted(label_studio.tasks(project), key=lambda task: task["id"])
    balloon = read_mask("balloons/support_1_mask.png")
    label_studio.annotate(good["id"], [brush_region(np.zeros_like(balloon), "balloon")])  # an empty mask
    label_studio.annotate(good["id"], [brush_region(balloon, "balloon")])

    def app(token: str):
        backend = Backend(pipe, LabelStudioClient(label_studio.url, token), FEWSHOT_MODEL.name)
        return TestClient(create_app(backend)), backend

    setup = {"project": f"{project}.0", "schema": CONFIG}
    client, backend = app(TOKEN)
    with client:
        version = client.post("/setup", json=setup).json()["model_version"]
        assert version.startswith(f"{FEWSHOT_MODEL.name}-1shot-")  # the empty mask is no example
        assert any("the mask is empty" in r.getMessage() for r in caplog.records)

        def predict(*tasks):
            return client.post("/predict", json={"tasks": list(tasks), "project": f"{project}.0",
                                                 "label_config": CONFIG})

        empty = label_studio.create_project("No annotation yet", CONFIG)
        label_studio.import_images(empty, [tmp_path / "good.png"])
        (task,) = label_studio.tasks(empty)
        nothing = client.post("/predict", json={"tasks": [task], "project": f"{empty}.0", "label_config": CONFIG})
        assert nothing.json() == {"results": [{"result": [], "score": 0.0,
                                               "model_version": f"{FEWSHOT_MODEL.name}-0shots"}]}

        lost = predict(missing)
        assert lost.status_code == 422 and f"image /data/upload/{project}/missing.png: " in lost.json()["error"]
        some = predict(good, garbage)
        assert some.status_code == 200
        results = some.json()["results"]
        assert results[0]["result"] and results[1] == {"result": [], "score": 0.0, "model_version": version}
        assert any(f"task {garbage['id']}" in r.getMessage() and "not a readable image" in r.getMessage()
                   for r in caplog.records)
    backend.close()

    for token, words in [("0" * 40, "refused the API key (401)"), ("a.b.c", "refused the personal access token")]:
        client, backend = app(token)
        with client:
            refused = client.post("/setup", json=setup)
        backend.close()
        assert refused.status_code == 502 and words in refused.json()["error"], refused.json()
    assert not [r for r in caplog.records if r.exc_info]  # no traceback: every failure was one line
