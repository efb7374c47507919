"""Two CPU processes (`accelerate launch --multi_gpu --num_processes 2 ... --cpu`, gloo) train and evaluate on
disjoint episodes: the numbers match one process."""

from __future__ import annotations

import json

import pytest

from tests.fixtures_data import CAMVID, needs_camvid
from tests.tiny_models import RESOLUTION
from tests.training_runs import (
    distance,
    launch_two_processes,
    run_evaluate,
    run_train,
    train_argv,
    unet_weights,
)
from tests.training_runs import single_thread  # noqa: F401  (autouse fixtures)

pytestmark = needs_camvid


@pytest.fixture
def cache_env(tmp_path_factory, monkeypatch):
    folder = str(tmp_path_factory.getbasetemp() / "diffews_index")
    monkeypatch.setenv("DIFFEWS_CACHE_DIR", folder)
    return {"DIFFEWS_CACHE_DIR": folder}


def test_two_processes_train_on_disjoint_episodes(saved_pipeline, tmp_path, cache_env):
    # Step s of a 2-process run with batch 1 trains on slots (s, 0) and (s, 1) of the episode stream, one per
    # process, averaged by DDP: exactly the episodes of a 1-process run with batch 2.
    flags = dict(max_steps=2, learning_rate=1e-3)
    result = launch_two_processes("train.py", train_argv(saved_pipeline, tmp_path / "two", batch_size=1, **flags),
                                  cache_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 steps of 1 x 1 x 2 episodes" in result.stderr

    assert run_train(train_argv(saved_pipeline, tmp_path / "batch2", batch_size=2, **flags)) == 0
    assert run_train(train_argv(saved_pipeline, tmp_path / "batch1", batch_size=1, **flags)) == 0
    two, batch2, batch1 = (unet_weights(tmp_path / name) for name in ("two", "batch2", "batch1"))
    # Had both processes trained on the same slot, the run would match the batch-1 run instead.
    assert distance(two, batch2) < 0.01 * distance(two, batch1)


def test_two_processes_evaluate_like_one(saved_pipeline, tmp_path, cache_env):
    # 5 episodes on 2 processes: shards of 3 and 2, nothing padded or counted twice.
    argv = ["--cpu", "--pretrained", str(saved_pipeline), "--dataset", "camvid", "--data-root", str(CAMVID),
            "--fold", "1", "--shots", "2", "--episodes", "5", "--resolution", str(RESOLUTION), "--num-workers", "0"]
    result = launch_two_processes("evaluate.py", argv + ["--output", str(tmp_path / "two.json")], cache_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("mIoU") == 1  # only the main process prints the table

    assert run_evaluate(argv + ["--output", str(tmp_path / "one.json")]) == 0
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["episodes"] == one["episodes"] == 5
    for key in ("miou", "fb_iou", "per_class", "shots", "fold"):
        assert two[key] == one[key], key
