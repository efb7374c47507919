"""`train/evaluate.py`: the HSNet protocol on real CamVid episodes with the tiny pipeline, JSON, table, model card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from pipeline_diffews import DiffewSPipeline
from tests.fixtures_data import CAMVID, needs_camvid
from tests.tiny_models import RESOLUTION
from tests.training_runs import run_evaluate
from tests.training_runs import index_cache, single_thread  # noqa: F401  (autouse fixtures)
from train.data import EvaluationEpisodes, build_source
from train.evaluate import resize_ground_truth
from train.model_card import update_model_card

pytestmark = needs_camvid


def evaluate_argv(pretrained, output, *extra) -> list[str]:
    return ["--cpu", "--pretrained", str(pretrained), "--dataset", "camvid", "--data-root", str(CAMVID),
            "--fold", "0", "--shots", "1", "--episodes", "5", "--resolution", str(RESOLUTION),
            "--num-workers", "0", "--output", str(output), *extra]


def pooled_miou_by_hand(pipe, fold: int, shots: int, episodes: int) -> tuple[float, int]:
    """HSNet's numbers written out: per class sum(intersection) / max(sum(union), 1) at 64 x 64, then the mean over
    all the fold's classes (a class without an episode counts 0)."""
    source = build_source("camvid", CAMVID, "val", fold, "test")
    inter, union = {c: 0 for c in source.class_ids}, {c: 0 for c in source.class_ids}
    for episode in EvaluationEpisodes(source, shots=shots, num_episodes=episodes, seed=0):
        pred = pipe(episode.query_image, support_images=episode.support_images, support_masks=episode.support_masks,
                    processing_resolution=RESOLUTION, match_input_resolution=False).masks[0]
        truth = np.asarray(torch.nn.functional.interpolate(
            torch.from_numpy(episode.query_mask)[None, None].float(), size=(RESOLUTION, RESOLUTION))[0, 0])
        valid = truth != 255
        c = episode.class_id
        inter[c] = inter.get(c, 0) + np.sum(pred & (truth == 1) & valid)
        union[c] = union.get(c, 0) + np.sum((pred | (truth == 1)) & valid)
    return float(np.mean([100 * inter[c] / max(union[c], 1) for c in inter])), len(inter)


def test_evaluate_defaults_record_the_protocol_and_mask_rule(saved_pipeline, tmp_path):
    output = tmp_path / "results.json"
    assert run_evaluate(evaluate_argv(saved_pipeline, output, "--episodes", "2")) == 0
    results = json.loads(output.read_text())
    assert results["episode_protocol"] == "hsnet" and results["threshold_precision"] == "8bit"
    assert results["episode_reference"] == "HSNet data/coco.py"  # CamVid: HSNet's COCO-20i loop
    assert set(results["per_class"]) == {"Sky", "Pavement", "Car"}  # every fold class, 0 without an episode


def test_evaluate_writes_the_hsnet_numbers(saved_pipeline, tmp_path, capsys):
    output = tmp_path / "results.json"
    assert run_evaluate(evaluate_argv(saved_pipeline, output)) == 0
    results = json.loads(output.read_text())
    assert {"miou", "fb_iou", "per_class", "episodes", "shots", "fold"} <= results.keys()
    assert (results["episodes"], results["shots"], results["fold"]) == (5, 1, 0)
    assert set(results["per_class"]) <= {"Sky", "Pavement", "Car"}  # fold 0's test classes
    assert all(0 <= v <= 100 for v in results["per_class"].values()) and 0 <= results["fb_iou"] <= 100
    assert results["miou"] == pytest.approx(np.mean(list(results["per_class"].values())))

    pipe = DiffewSPipeline.from_pretrained(saved_pipeline)
    pipe.set_progress_bar_config(disable=True)
    miou, classes = pooled_miou_by_hand(pipe, fold=0, shots=1, episodes=5)
    assert results["miou"] == pytest.approx(miou, abs=1e-9) and len(results["per_class"]) == classes

    table = capsys.readouterr().out
    assert "CamVid fold 0, 1-shot, 5 episodes" in table and "mIoU" in table and "FB-IoU" in table


def test_ground_truth_is_nearest_resized_and_keeps_ignore_pixels():
    mask = np.zeros((4, 6), np.uint8)
    mask[:2, :3] = 1
    mask[3, 5] = 255
    resized = resize_ground_truth(mask, 8)
    assert resized.shape == (8, 8) and set(np.unique(resized)) == {0, 1, 255}
    expected = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None].float(), size=(8, 8))[0, 0]
    np.testing.assert_array_equal(resized, expected.numpy().astype(np.uint8))


def test_update_model_card_adds_and_replaces_model_index_entries(saved_pipeline, tmp_path):
    folder = tmp_path / "pipeline"
    DiffewSPipeline.from_pretrained(saved_pipeline).save_pretrained(folder)
    base = {"dataset": "coco20i", "fold": 0, "split": "val", "shots": 1, "miou": 47.712, "fb_iou": 70.1}
    update_model_card(folder, base, model_name="diffews-coco-fold0", pipe=None)
    update_model_card(folder, {**base, "shots": 5, "miou": 52.0, "fb_iou": 72.0})
    update_model_card(folder, {**base, "miou": 48.0})  # same setting again: replaces, never duplicates
    card = ModelCard.load(folder / "README.md")
    results = {(r.metric_type, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert results == {("mean_iou", "mIoU 1-shot"): 48.0, ("fb_iou", "FB-IoU 1-shot"): 70.1,
                       ("mean_iou", "mIoU 5-shot"): 52.0, ("fb_iou", "FB-IoU 5-shot"): 72.0}
    assert card.data.model_name == "diffews-coco-fold0"
    assert {r.dataset_name for r in card.data.eval_results} == {"COCO-20i"}
    assert {r.dataset_config for r in card.data.eval_results} == {"fold 0"}
    assert "model-index" in (folder / "README.md").read_text()


def test_original_resolution_and_model_card_update(saved_pipeline, tmp_path):
    folder = tmp_path / "pipeline"
    DiffewSPipeline.from_pretrained(saved_pipeline).save_pretrained(folder)
    output = tmp_path / "original.json"
    argv = evaluate_argv(folder, output, "--episodes", "2", "--update-model-card")
    argv[argv.index("--resolution") + 1] = "original"  # scored at each query's own size (480 x 360)
    assert run_evaluate(argv) == 0
    results = json.loads(output.read_text())
    assert results["resolution"] == "original" and results["episodes"] == 2
    card = ModelCard.load(folder / "README.md")
    assert card.data.model_name == "pipeline" and card.data.license == "other"
    assert {r.dataset_name for r in card.data.eval_results} == {"CamVid"}
    assert {r.metric_value for r in card.data.eval_results} == {round(results["miou"], 2), round(results["fb_iou"], 2)}
