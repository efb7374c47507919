"""`train/evaluate.py` scores HSNet's episodes: the same sequence from one process and from `accelerate launch` with
two CPU processes (each scores a shard of the one sequence drawn before sharding), with the authors' 8-bit mask rule
by default, on a synthetic PASCAL-5i tree with split files of HSNet's form."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline_diffews import DiffewSPipeline
from tests.fixtures_data import make_voc, shuffle_hsnet_pascal_splits
from tests.test_reference_episodes import hsnet_pascal, keep_numpy_global_state  # noqa: F401  (autouse fixture)
from tests.tiny_models import RESOLUTION
from tests.training_runs import launch_two_processes, run_evaluate
from tests.training_runs import single_thread  # noqa: F401  (autouse fixture)
from train.data import build_source

FOLD, SHOTS, EPISODES = 2, 2, 5


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return shuffle_hsnet_pascal_splits(make_voc(tmp_path_factory.mktemp("voc"), hsnet_splits=True, aug=True), seed=3)


def evaluate_argv(pretrained, voc_root, output, *extra) -> list[str]:
    return ["--cpu", "--pretrained", str(pretrained), "--dataset", "pascal5i", "--data-root", str(voc_root),
            "--fold", str(FOLD), "--shots", str(SHOTS), "--episodes", str(EPISODES), "--resolution", str(RESOLUTION),
            "--num-workers", "0", "--output", str(output), *extra]


def miou_by_hand(pipe, voc_root, episodes, precision: str) -> float:
    """HSNet's mIoU of the saved episodes with the pipeline's masks of `precision`, over the fold's 5 classes."""
    source = build_source("pascal5i", voc_root, "val", FOLD, "test")
    inter = {c: 0 for c in source.class_ids}
    union = dict(inter)
    for record in episodes:
        c = record["class_id"]
        pred = pipe(source.load_image(record["query"]),
                    support_images=[source.load_image(k) for k in record["supports"]],
                    support_masks=[source.load_mask(k, c) == 1 for k in record["supports"]],
                    processing_resolution=RESOLUTION, match_input_resolution=False,
                    threshold_precision=precision).masks[0]
        truth = torch.nn.functional.interpolate(torch.from_numpy(source.load_mask(record["query"], c))[None, None]
                                                .float(), size=(RESOLUTION, RESOLUTION))[0, 0].numpy()
        valid = truth != 255
        inter[c] += np.sum(pred & (truth == 1) & valid)
        union[c] += np.sum((pred | (truth == 1)) & valid)
    return float(np.mean([100 * inter[c] / max(union[c], 1) for c in inter]))


def test_one_and_two_processes_score_hsnets_episodes(saved_pipeline, voc_root, tmp_path):
    one = evaluate_argv(saved_pipeline, voc_root, tmp_path / "one.json", "--save-episodes", str(tmp_path / "one_ep.json"))
    assert run_evaluate(one) == 0
    two = evaluate_argv(saved_pipeline, voc_root, tmp_path / "two.json", "--save-episodes", str(tmp_path / "two_ep.json"))
    result = launch_two_processes("evaluate.py", two)
    assert result.returncode == 0, result.stderr[-3000:]

    episodes_one, episodes_two = (json.loads((tmp_path / f"{n}_ep.json").read_text()) for n in ("one", "two"))
    want = hsnet_pascal(voc_root / "splits" / "pascal" / "val" / f"fold{FOLD}.txt", SHOTS, episodes=EPISODES)
    assert [(r["class_id"], r["query"], tuple(r["supports"])) for r in episodes_one] == want
    assert episodes_two == episodes_one and [r["index"] for r in episodes_two] == list(range(EPISODES))

    results_one, results_two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (results_one["processes"], results_two["processes"]) == (1, 2)
    for key in ("miou", "fb_iou", "per_class", "episodes"):
        assert results_two[key] == pytest.approx(results_one[key], abs=1e-9), key
    assert len(results_one["per_class"]) == 5  # every class of the fold, 0 for a class without an episode
    assert results_one["miou"] == pytest.approx(np.mean(list(results_one["per_class"].values())))
    assert results_one["episode_protocol"] == "hsnet" and results_one["episode_reference"] == "HSNet data/pascal.py"

    # The default masks are the authors' 8-bit rule's.
    assert results_one["threshold_precision"] == "8bit"
    pipe = DiffewSPipeline.from_pretrained(saved_pipeline)
    pipe.set_progress_bar_config(disable=True)
    assert results_one["miou"] == pytest.approx(miou_by_hand(pipe, voc_root, episodes_one, "8bit"), abs=1e-9)


def test_full_precision_threshold_is_an_option(saved_pipeline, voc_root, tmp_path):
    argv = evaluate_argv(saved_pipeline, voc_root, tmp_path / "full.json", "--threshold-precision", "full",
                         "--save-episodes", str(tmp_path / "episodes.json"))
    argv[argv.index("--episodes") + 1] = "2"
    assert run_evaluate(argv) == 0
    results = json.loads((tmp_path / "full.json").read_text())
    assert results["threshold_precision"] == "full" and results["episodes"] == 2
    pipe = DiffewSPipeline.from_pretrained(saved_pipeline)
    pipe.set_progress_bar_config(disable=True)
    episodes = json.loads((tmp_path / "episodes.json").read_text())
    assert results["miou"] == pytest.approx(miou_by_hand(pipe, voc_root, episodes, "full"), abs=1e-9)
