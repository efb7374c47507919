"""The design options of `init_from_sd` and `train/train.py`: each builds or adapts the pipeline it names, saves the
design with it, and refuses what the paper does not define in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from pipeline_diffews import DiffewSPipeline, init_from_sd
from pipeline_diffews.checkpoints import CheckpointError
from pipeline_diffews.design_diffews import DiffewSDesign
from tests.tiny_models import RESOLUTION, random_box_mask, random_image, tiny_design_pipeline, tiny_image_encoder
from tests.training_runs import run_in_process
from tests.training_runs import single_thread  # noqa: F401  (autouse fixture)
from train.train import main as train_main

TOKENIZED = "tokenized_cross_attention"


@pytest.fixture(scope="module")
def image_encoder_dir(tmp_path_factory):
    """A saved tiny CLIP image encoder, its processor in a `feature_extractor/` beside it."""
    folder = tmp_path_factory.mktemp("clip")
    encoder, processor = tiny_image_encoder()
    encoder.save_pretrained(folder / "image_encoder")
    processor.save_pretrained(folder / "feature_extractor")
    return folder / "image_encoder"


def segment(pipe, shots: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = [random_image(rng, 48, 64) for _ in range(shots + 1)]
    masks = [random_box_mask(rng, 48, 64) for _ in range(shots)]
    out = pipe(images[0], support_images=images[1:], support_masks=masks, processing_resolution=RESOLUTION,
               num_inference_steps=2 if pipe.design.is_multistep else None)
    assert out.masks[0].shape == (48, 64)
    return out.probabilities[0]


def test_init_from_sd_mi2m_with_the_papers_second_beta_range(tmp_path, sd_base):
    argv = ["--base", str(sd_base), "--output", str(tmp_path / "out"), "--generation", "mi2m",
            "--beta-start", "0.0272", "--beta-end", "0.384"]
    assert init_from_sd.main(argv) == 0
    pipe = DiffewSPipeline.from_pretrained(tmp_path / "out")
    assert pipe.design == DiffewSDesign(generation="mi2m")
    assert (pipe.scheduler.config.beta_start, pipe.scheduler.config.beta_end) == (0.0272, 0.384)
    stock = UNet2DConditionModel.from_pretrained(sd_base, subfolder="unet")
    torch.testing.assert_close(pipe.unet.conv_in_ref.weight, stock.conv_in.weight.repeat(1, 2, 1, 1) / 2)
    assert json.loads((tmp_path / "out" / "unet" / "config.json").read_text())["design"]["generation"] == "mi2m"


def test_init_from_sd_mn2m_with_multiplication(tmp_path, sd_base):
    argv = ["--base", str(sd_base), "--output", str(tmp_path / "out"), "--generation", "mn2m",
            "--mask-injection", "multiply"]
    assert init_from_sd.main(argv) == 0
    pipe = DiffewSPipeline.from_pretrained(tmp_path / "out")
    stock = UNet2DConditionModel.from_pretrained(sd_base, subfolder="unet")
    torch.testing.assert_close(pipe.unet.conv_in_ref.weight, stock.conv_in.weight)  # 4 channels: a copy
    torch.testing.assert_close(pipe.unet.conv_in.weight, stock.conv_in.weight.repeat(1, 2, 1, 1) / 2)  # Marigold
    # SD's own schedule by default
    assert (pipe.scheduler.config.beta_start, pipe.scheduler.config.beta_end) == (0.00085, 0.012)


def test_init_from_sd_tokenized_interaction_with_an_image_encoder(tmp_path, sd_base, image_encoder_dir):
    argv = ["--base", str(sd_base), "--output", str(tmp_path / "out"), "--interaction", TOKENIZED,
            "--mask-injection", "attention_mask", "--image-encoder", str(image_encoder_dir)]
    assert init_from_sd.main(argv) == 0
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["image_encoder"][1] == "CLIPVisionModelWithProjection" and index["feature_extractor"][0]
    pipe = DiffewSPipeline.from_pretrained(tmp_path / "out")
    assert pipe.design == DiffewSDesign(TOKENIZED, "attention_mask")
    assert not hasattr(pipe.unet, "conv_in_ref")
    torch.testing.assert_close(pipe.unet.support_token_proj.weight, torch.eye(32))  # 32 -> 32: the identity
    pipe.set_progress_bar_config(disable=True)
    segment(pipe, 2)


@pytest.mark.parametrize("options, words", [
    (["--interaction", TOKENIZED], "--image-encoder"),
    (["--interaction", TOKENIZED, "--mask-injection", "multiply_latent", "--image-encoder", "IMAGE_ENCODER"],
     "multiply_latent"),
    (["--image-encoder", "IMAGE_ENCODER"], "tokenized_cross_attention interaction only"),
    (["--beta-start", "0.1"], "oi2m"),
    (["--generation", "mi2m", "--beta-start", "0.5", "--beta-end", "0.1"], "beta_start <= beta_end"),
])
def test_init_from_sd_refuses_in_one_line(tmp_path, sd_base, image_encoder_dir, capsys, options, words):
    options = [str(image_encoder_dir) if o == "IMAGE_ENCODER" else o for o in options]
    assert init_from_sd.main(["--base", str(sd_base), "--output", str(tmp_path / "o"), *options]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and words in error and error.count("\n") == 1
    assert not (tmp_path / "o").exists()


def train_argv(pretrained, output_dir, *options) -> list[str]:
    return ["--pretrained", str(pretrained), "--output-dir", str(output_dir), "--dataset", "synthetic",
            "--max-steps", "1", "--batch-size", "1", "--gradient-accumulation-steps", "1", "--max-shots", "2",
            "--resolution", str(RESOLUTION), "--learning-rate", "1e-4", "--dataloader-num-workers", "0",
            "--report-to", "none", "--cpu", *options]


def test_training_adapts_a_tokenized_pipeline_to_kv_fusion_changing_that_choice_only(tmp_path):
    start = tiny_design_pipeline(DiffewSDesign(TOKENIZED, "attention_mask", "real_foreground"))
    start.save_pretrained(tmp_path / "start")
    assert run_in_process(train_main, train_argv(tmp_path / "start", tmp_path / "kv", "--interaction", "kv_fusion")) == 0
    pipe = DiffewSPipeline.from_pretrained(tmp_path / "kv")
    assert pipe.design == DiffewSDesign("kv_fusion", "attention_mask", "real_foreground")
    assert pipe.image_encoder is None and pipe.unet.conv_in_ref.in_channels == 4
    index = json.loads((tmp_path / "kv" / "model_index.json").read_text())
    assert index["image_encoder"] == [None, None]
    # weights both designs have come from the start (then one step of training moves them a little)
    shared = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    before, after = start.unet.state_dict()[shared], pipe.unet.state_dict()[shared]
    assert 0 < (after - before).abs().max() < 0.01
    pipe.set_progress_bar_config(disable=True)
    segment(pipe, 1)
    segment(pipe, 3)


def test_training_a_default_pipeline_as_mi2m_saves_the_scheduler(tmp_path, saved_pipeline):
    argv = train_argv(saved_pipeline, tmp_path / "mi2m", "--generation", "mi2m", "--beta-start", "0.0272",
                      "--beta-end", "0.384")
    assert run_in_process(train_main, argv) == 0
    pipe = DiffewSPipeline.from_pretrained(tmp_path / "mi2m")
    assert pipe.design == DiffewSDesign(generation="mi2m")
    assert (pipe.scheduler.config.beta_start, pipe.scheduler.config.beta_end) == (0.0272, 0.384)
    pipe.set_progress_bar_config(disable=True)
    segment(pipe, 2)


def test_training_refuses_an_undefined_design(tmp_path):
    start = tiny_design_pipeline(DiffewSDesign(TOKENIZED))
    start.save_pretrained(tmp_path / "start")
    with pytest.raises(CheckpointError, match="multiply_latent"):
        run_in_process(train_main, train_argv(tmp_path / "start", tmp_path / "o", "--mask-injection", "multiply_latent"))
