"""Training on generated episodes: `train/train.py --dataset synthetic` learns; `python -m
benchmarks.learning_synthetic` runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.learning_synthetic import ROWS, main, parse_args, score_examples, synthetic_pixels
from benchmarks.learning_synthetic import train_argv as benchmark_train_argv
from pipeline_diffews import DiffewSPipeline
from tests.fixtures_data import CAMVID, ROOT
from tests.tiny_models import save_tiny_pipeline
from tests.training_runs import run_train, train_argv
from tests.training_runs import single_thread  # noqa: F401  (autouse fixture)
from train.data import TrainingEpisodes, build_source
from train.episode_batch import EpisodeCollator, diffews_loss, encode_episodes

RESOLUTION = 32


@torch.no_grad()
def held_out_batch_loss(folder) -> float:
    """Mean loss of the pipeline in `folder` on 2 fixed batches of training-kind episodes it was not trained on."""
    pipe = DiffewSPipeline.from_pretrained(folder, dtype=torch.float32)
    source = build_source("synthetic", None, "train", None, "train", seed=0, size=RESOLUTION)
    episodes = TrainingEpisodes(source, max_shots=1, batch_size=8, seed=12345, num_steps=2)
    collate = EpisodeCollator(RESOLUTION)
    losses = [diffews_loss(pipe.unet.eval(), encode_episodes(pipe.vae, collate(episodes.batch(s))), 1).item()
              for s in range(2)]
    return float(np.mean(losses))


def test_a_short_run_on_generated_episodes_lowers_the_loss(tmp_path):
    init = save_tiny_pipeline(tmp_path / "init")
    out = tmp_path / "trained"
    argv = train_argv(init, out, dataset="synthetic", data_root=None, fold=None, max_steps=20, batch_size=2,
                      learning_rate=3e-3, resolution=RESOLUTION, source_option=f"size={RESOLUTION}", seed=0)
    assert "--data-root" not in argv
    assert run_train(argv) == 0
    before, after = held_out_batch_loss(init), held_out_batch_loss(out)
    assert after < 0.8 * before, (before, after)


def test_two_steps_of_everything_write_the_tables(tmp_path):
    out = tmp_path / "run"
    camvid = ["--camvid-root", str(CAMVID), "--camvid-steps", "2"] if CAMVID.is_dir() else []
    threads = torch.get_num_threads()
    try:
        assert main(["--output-dir", str(out), "--resolution", "32", "--vae-steps", "2", "--vae-scenes", "8",
                     "--steps", "2", "--episodes", "4", "--eval-batch-size", "4", "--shots", "1", "2",
                     "--jobs", "1", *camvid]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads((out / "results.json").read_text())
    assert set(results["synthetic"]["held_out"]) == {"1-shot", "2-shot"}
    for scores in [*results["synthetic"]["held_out"].values(), results["synthetic"]["seen"]["1-shot"]]:
        assert set(scores) == set(ROWS)
        assert all(s["episodes"] == 4 and 0 <= s["miou"] <= 100 for s in scores.values())
    # Every demo example set is scored, each query once, IoU in [0, 1].
    assert set(results["examples"]) == {"balloons", "fish", "oranges"}
    assert all(0 <= iou <= 1 for queries in results["examples"].values() for iou in queries.values())
    assert results["command"] in (out / "results.md").read_text()
    if camvid:  # scored before fine-tuning, after the CamVid-only fine-tune, and after the mixed one
        rows = {"pretrained", "camvid_finetuned", "camvid_finetuned_mixed", "query_only_camvid_finetuned_mixed"}
        assert rows <= set(results["camvid"])
        assert all(results["camvid"][r][s]["episodes"] == 4 for r in rows for s in ("seen", "novel"))
        assert "50% generated episodes mixed in" in (out / "results.md").read_text()
        assert (out / "camvid_finetuned_mixed" / "model_index.json").is_file()


def test_vae_pixels_hold_scenes_and_every_kind_mask():
    pixels = synthetic_pixels(4, 32, seed=0)
    assert pixels.images.shape == (4, 3, 32, 32) and pixels.images.min() >= -1 and pixels.images.max() <= 1
    assert len(pixels.masks) == len(pixels.class_ids) >= 4 * 4  # the target and >= 3 distractor kinds per scene
    assert set(pixels.masks.unique().tolist()) <= {-1.0, 1.0}


def test_a_pipeline_that_ignores_the_support_scores_low_on_the_examples(tmp_path):
    pipe = DiffewSPipeline.from_pretrained(save_tiny_pipeline(tmp_path / "random"), dtype=torch.float32)
    scores = score_examples(pipe, ROOT / "examples")
    assert sum(len(q) for q in scores.values()) == 6
    assert max(iou for q in scores.values() for iou in q.values()) < 0.7


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        parse_args(["--output-dir", "o", "--resolution", "40"])
    with pytest.raises(SystemExit):
        parse_args(["--output-dir", "o", "--shots", "0"])
    args = parse_args(["--output-dir", "o"])
    assert (args.resolution, args.shots, args.episodes, args.camvid_root) == (64, [1, 5], 300, None)
    assert args.camvid_mix_share == 0.5
    mixed = benchmark_train_argv(args, "p", "o", 4, "camvid", args.camvid_mix_share)
    assert mixed[mixed.index("--mix-dataset") + 1] == "synthetic" and mixed[mixed.index("--mix-share") + 1] == "0.5"
    assert "--mix-dataset" not in benchmark_train_argv(args, "p", "o", 4, "camvid")
    with pytest.raises(SystemExit):
        parse_args(["--output-dir", "o", "--camvid-mix-share", "1"])
