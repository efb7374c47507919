"""The Label Studio backend's parts without Label Studio: the labelling config, RLE and polygons both ways, the example
set's bookkeeping (with a real tiny pipeline) and the HTTP replies to bad input. `tests/test_label_studio.py` runs
it against a real Label Studio."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.label_studio_app import require_label_studio
from tests.tiny_models import random_box_mask, random_image, tiny_pipeline
from tests.training_runs import free_port

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="quality" toName="image"><Choice value="good"/></Choices>
  <BrushLabels name="tag" toName="image"><Label value="scratch"/><Label value="dent"/></BrushLabels>
  <PolygonLabels name="outline" toName="image"><Label value="dent"/><Label value="rust"/></PolygonLabels>
</View>"""


@pytest.fixture
def sdk():
    """Label Studio's SDK, for the tests of its RLE."""
    try:
        import label_studio_sdk.converter.brush  # noqa: F401
    except ImportError:
        require_label_studio("label-studio-sdk is not installed here: pip install -e '.[label-studio]'")


def config():
    from pipeline_diffews.label_studio.config import parse_label_config

    return parse_label_config(CONFIG)


# -- the labelling config --


def test_config_controls_and_labels():
    parsed = config()
    assert [(c.name, c.type, c.to_name, c.data_key) for c in parsed.controls] == [
        ("tag", "brushlabels", "image", "image"), ("outline", "polygonlabels", "image", "image")]
    assert parsed.labels == ["scratch", "dent", "rust"]  # a label in two controls is one class
    assert parsed.data_keys == ["image"]


@pytest.mark.parametrize("xml, words", [
    ('<View><Image name="image" value="$image"/><Choices name="c" toName="image"><Choice value="a"/></Choices>'
     "</View>", "no BrushLabels or PolygonLabels control"),
    ("<View><Image", "not valid XML"),
    ("", "no labelling config"),
    ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image"/></View>', "has no <Label"),
    ('<View><Image name="a" value="$a"/><Image name="b" value="$b"/><BrushLabels name="x" toName="a"><Label '
     'value="1"/></BrushLabels><BrushLabels name="y" toName="b"><Label value="2"/></BrushLabels></View>',
     "several images"),
])
def test_config_errors_are_one_line(xml, words):
    from pipeline_diffews.label_studio.config import LabelConfigError, parse_label_config

    with pytest.raises(LabelConfigError) as error:
        parse_label_config(xml)
    assert words in str(error.value) and "\n" not in str(error.value)


# -- regions --


def test_rle_round_trip_through_label_studio_sdk(sdk):
    from label_studio_sdk.converter.brush import decode_rle

    from pipeline_diffews.label_studio.regions import mask_to_rle, rle_to_mask

    rng = np.random.default_rng(0)
    for height, width in [(1, 1), (37, 53), (300, 211)]:
        mask = rng.random((height, width)) > 0.7
        rle = mask_to_rle(mask)
        assert (rle_to_mask(rle, width, height) == mask).all()
        rgba = np.asarray(decode_rle(rle), np.uint8).reshape(height, width, 4)  # as Label Studio's editor reads it
        assert (rgba == (mask * 255).astype(np.uint8)[:, :, None]).all()
    with pytest.raises(ValueError, match="not 10 x 10 x 4"):
        rle_to_mask(mask_to_rle(np.ones((5, 5), bool)), 10, 10)


def region(kind: str, label: str, value: dict, size=(64, 48), name=None) -> dict:
    return {"id": f"r-{label}", "from_name": name or ("tag" if kind == "brushlabels" else "outline"),
            "to_name": "image", "type": kind, "original_width": size[0], "original_height": size[1],
            "value": {**value, kind: [label]}}


def test_annotation_masks_unite_brushes_and_polygons_per_label(sdk):
    from pipeline_diffews.label_studio.regions import annotation_masks, mask_to_rle

    left, right = np.zeros((48, 64), bool), np.zeros((48, 64), bool)
    left[10:20, 5:15], right[30:40, 40:60] = True, True
    square = [[50.0, 0.0], [75.0, 0.0], [75.0, 25.0], [50.0, 25.0]]  # x 32..48, y 0..12 (corners, in pixels)
    result = [
        region("brushlabels", "scratch", {"format": "rle", "rle": mask_to_rle(left)}),
        region("brushlabels", "dent", {"format": "rle", "rle": mask_to_rle(right)}),
        region("polygonlabels", "dent", {"points": square, "closed": True}),
        region("brushlabels", "scratch", {"format": "rle", "rle": mask_to_rle(np.zeros((48, 64), bool))}),
        region("polygonlabels", "scratch", {"points": square, "closed": True}),  # not a label of "outline"
        {"from_name": "quality", "to_name": "image", "type": "choices", "value": {"choices": ["good"]}},
    ]
    read = annotation_masks(result, config())
    assert list(read.masks) == ["scratch", "dent"] and read.size == (64, 48)
    assert (read.masks["scratch"] == left).all()
    polygon = read.masks["dent"] & ~right
    assert polygon[0:12, 32:48].all() and polygon.sum() <= 13 * 17  # PIL fills the outline's pixels too
    assert [p.split(":", 1)[1].strip() for p in read.problems] == [
        "the mask is empty", "none of its labels is a label of 'outline'"]


def test_prediction_results_read_back(sdk):
    from pipeline_diffews.label_studio.regions import annotation_masks, prediction_results

    mask = np.zeros((48, 64), bool)
    mask[5:25, 10:30], mask[30:45, 40:60] = True, True
    results = prediction_results({"dent": mask, "scratch": np.zeros_like(mask)}, {"dent": 0.75}, config())
    assert [(r["from_name"], r["type"]) for r in results] == [
        ("tag", "brushlabels"), ("outline", "polygonlabels"), ("outline", "polygonlabels")]  # two pieces
    assert all(r["score"] == 0.75 and r["original_width"] == 64 and r["original_height"] == 48 for r in results)
    assert len({r["id"] for r in results}) == 3
    brush = annotation_masks(results[:1], config()).masks["dent"]
    assert (brush == mask).all()
    polygons = annotation_masks(results[1:], config()).masks["dent"]
    assert (polygons & mask).sum() / (polygons | mask).sum() > 0.85


# -- the example set --


class CountingPipeline:
    """The tiny pipeline, counting its support passes (one per encoded shot and label)."""

    def __init__(self):
        self.pipe = tiny_pipeline()
        self.pipe.set_progress_bar_config(disable=True)
        self.encoded = 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def encode_support(self, images, masks, **kwargs):
        self.encoded += 1
        return self.pipe.encode_support(images, masks, **kwargs)


def shot(seed: int, labels=("scratch",), size=(80, 64)):
    rng = np.random.default_rng(seed)
    image = random_image(rng, size[1], size[0])
    return image, {label: random_box_mask(rng, size[1], size[0]) for label in labels}


def joined_caches(support) -> list:
    return [{name: (k, v) for name, (k, v) in cache.layers.items()} for cache in support.class_key_values]


def same_support(a, b) -> bool:
    if a.class_names != b.class_names or a.num_shots != b.num_shots:
        return False
    return all(torch.equal(x[n][j], y[n][j]) for x, y in zip(joined_caches(a), joined_caches(b)) for n in x
               for j in (0, 1))


def test_example_set_grows_replaces_and_removes_shots():
    from pipeline_diffews.label_studio.examples import ExampleSet

    shots = {1: shot(1), 2: shot(2, ("scratch", "dent")), 3: shot(3, ("dent",))}
    images = {f"img{key}": image for key, (image, _) in shots.items()}
    pipe = CountingPipeline()
    examples = ExampleSet(pipe, "tiny", lambda url, task: images[url], labels=["scratch", "dent"])
    assert examples.model_version == "tiny-0shots" and examples.support() is None

    for key in (1, 2):
        assert examples.put(key, 10 + key, f"img{key}", shots[key][1])
    assert examples.encode_pending() == [] and pipe.encoded == 2
    two = examples.model_version
    assert two.startswith("tiny-2shots-")

    def chain(keys):  # the pipeline's own growing support, one shot at a time
        support = None
        for key in keys:
            support = pipe.pipe.encode_support(images[f"img{key}"], shots[key][1], multiclass=True, extend=support)
        return support

    assert same_support(examples.support(), chain([1, 2]))
    assert examples.put(3, 13, "img3", shots[3][1])
    examples.encode_pending()
    assert pipe.encoded == 3  # only the new shot went through the support pass
    three = examples.model_version
    assert three.startswith("tiny-3shots-") and three != two
    assert same_support(examples.support(), chain([1, 2, 3]))

    assert not examples.put(3, 13, "img3", {k: v.copy() for k, v in shots[3][1].items()})  # saved again, unchanged
    assert examples.model_version == three and examples.encode_pending() == [] and pipe.encoded == 3

    shots[2] = (shots[2][0], {"dent": shot(20)[1]["scratch"]})  # annotation 2 changed: its shot is replaced
    examples.put(2, 12, "img2", shots[2][1])
    examples.encode_pending()
    assert pipe.encoded == 4 and examples.model_version not in (two, three)
    assert same_support(examples.support(), chain([1, 2, 3]))

    assert examples.remove([3, 99]) == 1 and pipe.encoded == 4  # a deletion: no support pass
    assert same_support(examples.support(), chain([1, 2]))
    again = ExampleSet(pipe, "tiny", lambda url, task: images[url], labels=["scratch", "dent"])  # after a restart
    for key in (2, 1):
        again.put(key, 10 + key, f"img{key}", shots[key][1])
    assert again.model_version == examples.model_version
    assert again.adopt(examples) == 2 and again.encode_pending() == [] and pipe.encoded == 4  # read again: no pass
    assert same_support(again.support(), examples.support())
    assert examples.remove_tasks([11]) == 1 and examples.model_version.startswith("tiny-1shot-")


def test_each_label_uses_its_most_recent_shots():
    from pipeline_diffews.label_studio.examples import ExampleSet

    shots = {key: shot(key, ("scratch",) if key != 2 else ("scratch", "dent")) for key in range(1, 5)}
    images = {f"img{key}": image for key, (image, _) in shots.items()}
    pipe = CountingPipeline()
    examples = ExampleSet(pipe, "tiny", lambda url, task: images[url], labels=["scratch", "dent"], max_shots=2)

    def chain(keys, label):
        support = None
        for key in keys:
            masks = {label: shots[key][1][label]}
            support = pipe.pipe.encode_support(images[f"img{key}"], masks, multiclass=True, extend=support)
        return support.class_key_values[0]

    for key in shots:
        examples.put(key, key, f"img{key}", shots[key][1])
    examples.encode_pending()
    # scratch: shots 3 and 4; dent: shot 2 (its only shot); shot 1 is in no window and was never encoded
    assert [s.annotation_id for s in examples.in_use()] == [2, 3, 4] and pipe.encoded == 3
    assert examples.model_version.startswith("tiny-3shots-")
    support = examples.support()
    assert support.class_names == ["scratch", "dent"] and support.num_shots == 3
    for joined, reference in [(support.class_key_values[0], chain([3, 4], "scratch")),
                              (support.class_key_values[1], chain([2], "dent"))]:
        assert joined.num_shots == reference.num_shots
        assert all(torch.equal(joined.layers[n][j], reference.layers[n][j]) for n in joined.layers for j in (0, 1))

    examples.remove([4])  # shot 2 (in use for dent: it has its caches) comes into scratch's window
    examples.encode_pending()
    assert [s.annotation_id for s in examples.in_use()] == [2, 3] and pipe.encoded == 3
    examples.remove([3])  # shot 1 comes into use: encoded from its kept masks
    examples.encode_pending()
    assert [s.annotation_id for s in examples.in_use()] == [1, 2] and pipe.encoded == 4
    assert examples.support().num_shots == 2 and examples.model_version.startswith("tiny-2shots-")

    examples.put(5, 5, "img3", shots[3][1])  # shot 1 falls out of use: its caches are released
    examples.encode_pending()
    assert pipe.encoded == 5 and examples.shots[0].caches is None
    examples.remove([5])  # and back: encoded again
    examples.encode_pending()
    assert pipe.encoded == 6 and [s.annotation_id for s in examples.in_use()] == [1, 2]


def test_example_set_leaves_out_a_shot_whose_image_cannot_be_read():
    from pipeline_diffews.label_studio.client import ImageReadError
    from pipeline_diffews.label_studio.examples import ExampleSet

    def read(url, task):
        if url == "broken":
            raise ImageReadError("image broken: not a readable image")
        return shot(1)[0]

    examples = ExampleSet(CountingPipeline(), "tiny", read)
    examples.put(1, 1, "good", shot(1)[1])
    examples.put(2, 2, "broken", shot(2)[1])
    assert examples.encode_pending() == ["annotation 2 (task 2) left out: image broken: not a readable image"]
    assert examples.model_version.startswith("tiny-1shot-") and examples.support().num_shots == 1


# -- HTTP replies to bad input --


@pytest.fixture
def unreachable_app():
    """The backend's app, for a Label Studio that is not running."""
    from fastapi.testclient import TestClient

    from pipeline_diffews.label_studio.backend import Backend
    from pipeline_diffews.label_studio.client import LabelStudioClient
    from pipeline_diffews.label_studio.server import create_app

    backend = Backend(CountingPipeline(), LabelStudioClient(f"http://127.0.0.1:{free_port()}", "key"), "tiny")
    with TestClient(create_app(backend)) as client:
        yield client
    backend.close()


def test_bad_input_gets_an_error_reply_and_the_server_goes_on(unreachable_app, caplog):
    replies = [
        unreachable_app.post("/setup", json={"project": "1.1700000000", "schema": CONFIG}),
        unreachable_app.post("/setup", json={"project": "1.1700000000", "schema": "<View><Image name='i' "
                                             "value='$i'/></View>"}),
        unreachable_app.post("/predict", content=b"not json", headers={"content-type": "application/json"}),
        unreachable_app.post("/predict", json={"tasks": "nothing", "project": "1.1"}),
        unreachable_app.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "/x.png"}}], "project": "1.1",
                                               "label_config": CONFIG}),
    ]
    assert [r.status_code for r in replies] == [502, 400, 400, 400, 502]
    messages = [r.json()["error"] for r in replies]
    assert "cannot reach" in messages[0] and "LABEL_STUDIO_URL" in messages[0]
    assert "no BrushLabels or PolygonLabels control" in messages[1]
    assert "not JSON" in messages[2] and "must be a list of tasks" in messages[3]
    assert all("\n" not in m for m in messages)
    assert unreachable_app.get("/health").json()["status"] == "UP"
    webhook = unreachable_app.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1}})
    assert webhook.status_code == 200 and webhook.json()["status"] == "queued"  # answered before the work fails
    assert unreachable_app.post("/webhook", json={"action": "LABEL_LINK_CREATED", "project": {"id": 1}}).json()[
        "status"] == "ignored"
    assert unreachable_app.post("/train", json={"project": "1.1700000000"}).json() == {"status": "queued"}
    assert not [r for r in caplog.records if r.exc_info]  # no traceback: every failure was one line


# -- the command --


@pytest.mark.parametrize("argv, words", [
    (["--threshold", "2"], "--threshold must be in [0, 1], got 2.0"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    ([], "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"),
    (["--label-studio-url", "http://127.0.0.1:1", "--api-key", "k", "--model", "no/such/folder/here"],
     "--model no/such/folder/here"),
])
def test_command_usage_errors_are_one_line(argv, words, monkeypatch, caplog, sdk):
    from pipeline_diffews.cli import main

    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    model = [] if "--model" in argv else ["--model", "examples/tiny-fewshot-pipeline"]
    assert main(["label-studio", *model, *argv]) == 2
    # the command's own lines (a worker thread of an earlier test's backend may still log beside them)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and r.module == "command"]
    assert len(errors) == 1 and words in errors[0] and "\n" not in errors[0]


def test_a_model_whose_design_cannot_cache_a_support_is_refused_in_one_line(tmp_path, caplog, sdk):
    from pipeline_diffews.cli import main
    from pipeline_diffews.design_diffews import DiffewSDesign
    from tests.tiny_models import tiny_design_pipeline

    tiny_design_pipeline(DiffewSDesign(interaction="qkv_fusion")).save_pretrained(tmp_path / "qkv")
    argv = ["label-studio", "--model", str(tmp_path / "qkv"), "--label-studio-url", "http://127.0.0.1:1", "--api-key", "k"]
    assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "qkv_fusion" in errors[0] and "cannot cache a support" in errors[0]


def test_model_versions_name_the_settings_that_change_predictions():
    from pipeline_diffews.cli import build_parser
    from pipeline_diffews.label_studio.command import model_name

    def name(*argv):
        return model_name(build_parser().parse_args(["label-studio", *argv]))

    assert name("--model", "incontext") == "incontext"
    assert name("--model", "runs/my-model/") == "my-model"
    assert name("--model", "user/repo", "--processing-resolution", "768", "--threshold", "0.4",
                "--threshold-mode", "absolute") == "repo-r768-t0.4-absolute"


# -- reading images --


def test_images_are_read_from_data_uris_and_other_servers_without_the_key(tmp_path):
    import base64
    import http.server
    import io
    import threading

    import PIL.Image

    from pipeline_diffews.label_studio.client import ImageReadError, LabelStudioClient

    png = io.BytesIO()
    PIL.Image.new("RGB", (7, 5), (200, 10, 10)).save(png, format="PNG")
    seen = []

    class Server(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.headers.get("Authorization"))
            found = self.path == "/photo.png"
            self.send_response(200 if found else 404)
            self.end_headers()
            self.wfile.write(png.getvalue() if found else b"no such file")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    other = f"http://127.0.0.1:{server.server_port}"
    client = LabelStudioClient(f"http://127.0.0.1:{free_port()}", "secret-key")
    try:
        image = client.read_image("data:image/png;base64," + base64.b64encode(png.getvalue()).decode())
        assert image.size == (7, 5) and image.mode == "RGB"
        assert client.read_image(f"{other}/photo.png").getpixel((0, 0)) == (200, 10, 10)
        assert seen == [None]  # the key goes to Label Studio only
        with pytest.raises(ImageReadError, match="answered 404"):
            client.read_image(f"{other}/missing.png")
        with pytest.raises(ImageReadError, match="not a readable image"):
            client.read_image("data:image/png;base64,bm90IGFuIGltYWdl")
        with pytest.raises(ImageReadError, match="cannot reach"):
            client.read_image("/data/upload/1/a.png")  # Label Studio is not running
    finally:
        server.shutdown()
        client.close()
