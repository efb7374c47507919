"""`train/evaluate.py --multiclass`: K-class episodes on a CamVid-format tree, the pooled mIoU, the JSON results."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.fixtures_data import write_jpeg, write_png
from train import evaluate
from train.data import MulticlassEpisodes, build_source, collate_episodes
from train.data.episodes import draw_multiclass_specs, label_map, load_multiclass_episode
from train.evaluate import merge_class_masks
from train.metrics import SemanticSegmentationIoU

H, W = 24, 32
SKY, BUILDING, PAVEMENT, CAR, UNLABELLED = 0, 1, 4, 8, 11  # fold 0 tests Sky, Pavement and Car


def camvid_labels(index: int) -> np.ndarray:
    """CamVid ids [H, W]: sky on top, building, pavement below; a car in even images only; an unlabelled strip."""
    labels = np.full((H, W), BUILDING, np.uint8)
    labels[: 6 + index % 3] = SKY
    labels[16:] = PAVEMENT
    if index % 2 == 0:
        labels[12:20, 4 + index : 14 + index] = CAR
    labels[:, -2:] = UNLABELLED
    return labels


@pytest.fixture(scope="module")
def camvid(tmp_path_factory):
    """A CamVid tree (val split, 6 images) in the real format: JPEG images, 8-bit label PNGs."""
    root = tmp_path_factory.mktemp("camvid")
    for i in range(6):
        write_jpeg(root / "val" / "images" / f"f{i:03d}.jpg", W, H, seed=i)
        write_png(root / "val" / "labels" / f"f{i:03d}.png", camvid_labels(i))
    return root


@pytest.fixture(scope="module")
def source(camvid):
    return build_source("camvid", camvid, "val", 0, "test", index_cache=False)


def test_confusion_matrix_iou_matches_a_hand_computed_case():
    metric = SemanticSegmentationIoU(num_labels=4)  # background, classes 1..3; class 3 never appears
    metric.update(np.array([[1, 1, 0, 2], [2, 1, 2, 1]]), np.array([[0, 1, 1, 2], [255, 1, 2, 2]], np.uint8))
    metric.update(np.array([[0, 0], [0, 2]]), np.zeros((2, 2), np.uint8))  # class 2 absent, predicted: a false positive
    scores = metric.compute()
    # class 1: TP 2, FP 2, FN 1; class 2: TP 2, FP 1 (second image), FN 1; background: TP 3, FP 1, FN 2.
    assert scores["iou"][:3] == pytest.approx([50.0, 40.0, 50.0])
    assert math.isnan(scores["iou"][3])  # empty union: left out of the mean
    assert scores["miou"] == pytest.approx(45.0) and scores["background_iou"] == pytest.approx(50.0)
    assert scores["images"] == 2
    with pytest.raises(ValueError, match="outside 0..3"):
        metric.update(np.array([[4]]), np.array([[0]], np.uint8))
    with pytest.raises(ValueError, match="same shape|one shape"):
        metric.update(np.zeros((2, 2)), np.zeros((2, 3), np.uint8))


def test_one_class_masks_merge_by_the_pipelines_rule():
    masks = np.array([[[1, 1, 0, 0]], [[0, 1, 1, 0]]], bool)  # [K=2, H=1, W=4]
    probabilities = np.array([[[0.9, 0.4, 0.8, 0.9]], [[0.1, 0.6, 0.5, 0.9]]], np.float32)
    # pixel 1: both masks hold, class 7 likelier; pixel 2: only class 7's mask holds although class 3 is likelier.
    np.testing.assert_array_equal(merge_class_masks(masks, probabilities, [3, 7]), [[3, 7, 7, 0]])


def test_episode_label_maps_hold_the_folds_classes(source, camvid):
    assert [source.class_names[c] for c in source.class_ids] == ["Sky", "Pavement", "Car"]
    labels = label_map(source, "f000", list(source.class_ids))
    raw = camvid_labels(0)
    expected = np.select([raw == SKY, raw == PAVEMENT, raw == CAR, raw == UNLABELLED], [1, 2, 3, 255], 0)
    np.testing.assert_array_equal(labels, expected)

    episodes = draw_multiclass_specs(source, shots=1, num_episodes=None, seed=0)
    assert sorted(q for q, _ in episodes) == [f"f{i:03d}" for i in range(6)]  # every image once as the query
    assert all(q not in s and len(s) == 1 for q, s in episodes)
    assert episodes == draw_multiclass_specs(source, 1, None, 0) and len(draw_multiclass_specs(source, 2, 9, 0)) == 9
    # A support without a car: the query's car pixels are background in that episode.
    episode = load_multiclass_episode(source, "f000", ["f001"])
    assert episode.shown == [1, 2]
    assert not (episode.query_labels == 3).any() and (episode.query_labels[raw == CAR] == 0).all()
    assert load_multiclass_episode(source, "f000", ["f002"]).shown == [1, 2, 3]


def test_multiclass_episodes_are_a_shardable_dataset(source):
    episodes = MulticlassEpisodes(source, shots=2, num_episodes=5, seed=0)
    assert episodes.specs == draw_multiclass_specs(source, 2, 5, 0) and len(episodes) == 5
    query, supports = episodes.specs[3]
    episode, reference = episodes[3], load_multiclass_episode(source, query, supports)
    assert (episode.query_key, episode.support_keys, episode.shots) == (query, list(supports), 2)
    np.testing.assert_array_equal(episode.query_labels, reference.query_labels)
    shards = [episodes.shard(rank, 2) for rank in range(2)]
    assert [list(s.indices) for s in shards] == [[0, 2, 4], [1, 3]]
    loader = torch.utils.data.DataLoader(shards[1], batch_size=1, collate_fn=collate_episodes)
    assert [batch[0].query_key for batch in loader] == [episodes.specs[1][0], episodes.specs[3][0]]
    with pytest.raises(ValueError, match="shots must be an integer"):
        MulticlassEpisodes(source, shots=0)
    with pytest.raises(ValueError, match="needs more than 6"):
        MulticlassEpisodes(source, shots=6)


def test_multiclass_run_writes_json(saved_pipeline, camvid, tmp_path, capsys):
    output = tmp_path / "results.json"
    evaluate.main([
        "--multiclass", "--pretrained", str(saved_pipeline), "--dataset", "camvid", "--data-root", str(camvid),
        "--fold", "0", "--shots", "2", "--episodes", "3", "--resolution", "64", "--cpu",
        "--source-option", "index_cache=false", "--output", str(output),
    ])
    results = json.loads(output.read_text())
    assert results["mode"] == "multiclass" and results["episodes"] == 3 and results["shots"] == 2
    assert list(results["per_class"]) == ["Sky", "Pavement", "Car"]
    assert 2 <= results["classes_per_episode"] <= 3
    assert 0 <= results["miou"] <= 100 and 0 <= results["single_class_calls"]["miou"] <= 100
    cost = results["seconds_per_query"]
    assert cost["one_multiclass_call"] > 0 and cost["single_class_calls"] > 0
    assert cost["speedup"] == pytest.approx(cost["single_class_calls"] / cost["one_multiclass_call"])
    table = capsys.readouterr().out
    assert "K-class call" in table and "K one-class" in table and "s / query" in table


def test_multiclass_refuses_options_it_does_not_honour(saved_pipeline, camvid, tmp_path):
    with pytest.raises(ValueError, match="does not support --save-episodes"):
        evaluate.main([
            "--multiclass", "--pretrained", str(saved_pipeline), "--dataset", "camvid", "--data-root", str(camvid),
            "--shots", "1", "--save-episodes", str(tmp_path / "episodes.json"),
        ])
