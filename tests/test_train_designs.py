"""Every design the paper compares trains a few steps with `train/train.py`, saves, loads back (the installed class
and remote code) and segments with one and several shots; designs trained alike give different outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from pipeline_diffews import DiffewSPipeline
from pipeline_diffews.design_diffews import PAPER_DESIGNS
from tests.tiny_models import RESOLUTION, random_box_mask, random_image, tiny_design_pipeline
from tests.training_runs import run_in_process, train_argv
from tests.training_runs import single_thread  # noqa: F401  (autouse fixture)
from train.train import main as train_main

RNG = np.random.default_rng(11)
QUERY = random_image(RNG, 40, 52)
SHOTS = [(random_image(RNG, 48, 40), random_box_mask(RNG, 48, 40)) for _ in range(3)]
OUTPUTS: dict[str, np.ndarray] = {}  # the trained designs' 3-shot probabilities, compared across designs


def segment(pipe, shots: int) -> np.ndarray:
    images, masks = zip(*SHOTS[:shots])
    out = pipe(QUERY, support_images=list(images), support_masks=list(masks), num_inference_steps=None,
               generator=torch.Generator().manual_seed(0))
    assert out.masks[0].shape == (40, 52) and 0 <= out.probabilities[0].min() <= out.probabilities[0].max() <= 1
    return out.probabilities[0]


@pytest.mark.parametrize("name", list(PAPER_DESIGNS))
def test_each_design_trains_saves_loads_and_segments(name, tmp_path):
    design, betas = PAPER_DESIGNS[name]
    tiny_design_pipeline(design, beta_range=betas, num_inference_steps=2).save_pretrained(tmp_path / "start")
    argv = train_argv(tmp_path / "start", tmp_path / "trained", dataset="synthetic", data_root=None, fold=None,
                      max_steps=2, batch_size=2,
                      gradient_accumulation_steps=1, max_shots=2, resolution=RESOLUTION, learning_rate=1e-4,
                      dataloader_num_workers=0, report_to="none", seed=5)
    assert run_in_process(train_main, argv) == 0
    trained = DiffewSPipeline.from_pretrained(tmp_path / "trained")
    trained.set_progress_bar_config(disable=True)
    assert trained.design == design
    start = DiffewSPipeline.from_pretrained(tmp_path / "start")
    moved = [(a - b).abs().max() for a, b in zip(trained.unet.parameters(), start.unet.parameters())]
    assert max(moved) > 0  # the training changed the weights
    one, three = segment(trained, 1), segment(trained, 3)
    assert np.abs(one - three).max() > 1e-6  # the extra shots are read
    remote = DiffusionPipeline.from_pretrained(tmp_path / "trained", trust_remote_code=True)
    remote.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(segment(remote, 3), three, atol=1e-5)
    OUTPUTS[name] = three
    others = [other for key, other in OUTPUTS.items() if key != name]
    assert all(np.abs(three - other).max() > 1e-4 for other in others)
