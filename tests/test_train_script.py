"""`train/train.py` end to end on CamVid with tiny components (one CPU process): resume, checkpoints, uploads, NaN."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline_diffews import DiffewSPipeline
from tests.fixtures_data import needs_camvid
from tests.training_runs import TRAIN_RESOLUTION, max_difference, run_train, train_argv, unet_weights
from tests.training_runs import index_cache, single_thread  # noqa: F401  (autouse fixtures)
from train.checkpointing import CheckpointUploader, list_checkpoints, resolve_resume, rotate_checkpoints
from train.train import NonFiniteLossError, parse_args

pytestmark = needs_camvid


def test_defaults_are_the_authors_recipe():
    args = parse_args(["--pretrained", "p", "--dataset", "camvid", "--data-root", "d", "--output-dir", "o"])
    assert (args.learning_rate, args.lr_end, args.weight_decay) == (1e-5, 1e-7, 1e-2)
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon, args.max_grad_norm) == (0.9, 0.999, 1e-8, 1.0)
    assert (args.batch_size, args.gradient_accumulation_steps, args.resolution) == (1, 4, 512)
    assert args.mixed_precision == "no"  # fp16 is the default only where a GPU is present
    assert (args.max_shots, args.checkpointing_steps, args.seed, args.latent_sampling) == (2, 2000, 42, "mean")
    args = parse_args(["--pretrained", "p", "--dataset", "lvis92i", "--data-root", "d", "--output-dir", "o",
                       "--source-option", "min_images=6", "--source-option", "crowd=ignore"])
    assert args.source_option == [("min_images", 6), ("crowd", "ignore")]
    with pytest.raises(SystemExit):
        parse_args(["--pretrained", "p", "--dataset", "nope", "--data-root", "d", "--output-dir", "o"])


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(saved_pipeline, tmp_path):
    # 4 steps of 2 accumulated micro-batches, 1..2 shots, sampled latents: every source of randomness takes part.
    # At 32 x 32, which the saved pipeline then uses by default.
    flags = dict(max_steps=4, gradient_accumulation_steps=2, max_shots=2, latent_sampling="sample", resolution=32,
                 checkpointing_steps=1, checkpoints_total_limit=1, dataloader_num_workers=1)
    whole, parts = tmp_path / "whole", tmp_path / "parts"

    # Uninterrupted, pushing to an unreachable Hub: every upload fails, training goes on, no local file is deleted.
    assert run_train(train_argv(saved_pipeline, whole, push_to_hub="someone/diffews-test", **flags)) == 1
    assert [step for step, _ in list_checkpoints(whole)] == [1, 2, 3, 4]
    assert (whole / "README.md").is_file() and (whole / "model_index.json").is_file()

    # Interrupted after 2 steps, then resumed from the latest checkpoint.
    assert run_train(train_argv(saved_pipeline, parts, stop_after_steps=2, **flags)) == 0
    assert not (parts / "model_index.json").exists()  # no final pipeline for an unfinished run
    saved = json.loads((parts / "checkpoint-2" / "diffews_training.json").read_text())
    assert saved["step"] == 2 and saved["args"]["max_steps"] == 4
    assert run_train(train_argv(saved_pipeline, parts, resume="latest", **flags)) == 0

    assert [step for step, _ in list_checkpoints(parts)] == [4]  # rotation keeps the last one
    resumed, uninterrupted = unet_weights(parts), unet_weights(whole)
    assert max_difference(resumed, uninterrupted) == 0.0
    assert max_difference(resumed, unet_weights(saved_pipeline)) > 0  # it did train
    config = json.loads((parts / "model_index.json").read_text())
    assert config["processing_resolution"] == 32 != TRAIN_RESOLUTION

    trained = DiffewSPipeline.from_pretrained(parts)  # a working pipeline folder
    image = np.zeros((40, 50, 3), np.uint8)
    mask = np.zeros((40, 50), bool)
    mask[10:20, 10:30] = True
    assert trained(image, support_images=[image], support_masks=[mask]).masks[0].shape == (40, 50)


def test_non_finite_loss_stops_before_updating_the_weights(saved_pipeline, tmp_path):
    # A huge learning rate overflows the weights at step 1: the loss of step 2 is NaN.
    argv = train_argv(saved_pipeline, tmp_path / "run", max_steps=3, learning_rate=1e30, checkpointing_steps=1)
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        run_train(argv)
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [1]


def test_rotation_keeps_checkpoints_whose_upload_failed(tmp_path):
    for step in (1, 2, 3):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "weights").write_text(str(step))
    uploader = CheckpointUploader("someone/diffews-test")  # HF_HUB_OFFLINE=1: creating the repository fails
    for step in (1, 2, 3):
        uploader.submit(tmp_path / f"checkpoint-{step}")
    failures = uploader.wait()
    assert len(failures) == 3 and not uploader.uploaded(tmp_path / "checkpoint-1")
    assert rotate_checkpoints(tmp_path, keep=1, uploader=uploader) == []
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1, 2, 3]
    assert rotate_checkpoints(tmp_path, keep=2) == [tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"]
    assert resolve_resume("latest", tmp_path) == (3, tmp_path / "checkpoint-3")
    assert resolve_resume("latest", tmp_path / "empty") is None
    with pytest.raises(ValueError, match="--resume"):
        resolve_resume(str(tmp_path / "weights"), tmp_path)
