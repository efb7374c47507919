"""The shipped demo model segments the shipped demo examples as `examples/tiny-fewshot-pipeline/README.md` says."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re

import numpy as np
import pytest
import torch

from tests.fixtures_data import ROOT
from benchmarks.learning_synthetic import example_sets, score_examples
from pipeline_diffews import DiffewSPipeline
from tests.training_runs import single_thread  # noqa: F401  (autouse fixture)

MODEL = ROOT / "examples" / "tiny-fewshot-pipeline"
EXAMPLES = ROOT / "examples"
MULTI_SHOT_RESULTS = ROOT / "benchmarks" / "results" / "fewshot_multishot.json"


@pytest.fixture(scope="module")
def pipe():
    pipe = DiffewSPipeline.from_pretrained(MODEL, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stated_minimum_iou() -> float:
    """The per-example IoU the model's README promises ("IoU >= 0.xx on every example")."""
    match = re.search(r"IoU >= (0\.\d+) on every example", (MODEL / "README.md").read_text())
    assert match, "the README states the examples' minimum IoU"
    return float(match.group(1))


def test_the_shipped_model_is_small_safetensors_at_the_demo_resolution(pipe):
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 2 and not any(p.suffix in (".bin", ".pt", ".ckpt", ".pth") for p in files)
    assert sum(p.stat().st_size for p in weights) < 20e6
    assert pipe.config.processing_resolution == 64
    assert "Apache-2.0" in (MODEL / "README.md").read_text()


def test_the_shipped_model_segments_every_shipped_example(pipe):
    scores = score_examples(pipe, EXAMPLES)
    assert set(scores) == {"balloons", "fish", "oranges"} and all(len(q) == 2 for q in scores.values())
    minimum = stated_minimum_iou()
    for name, queries in scores.items():
        for query, iou in queries.items():
            assert iou >= minimum, f"{name}/{query}: IoU {iou:.3f} < {minimum}"


def make_examples_module():
    spec = importlib.util.spec_from_file_location("make_examples", EXAMPLES / "make_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def test_the_support_decides_what_is_segmented(pipe):
    # One support image, two masks: its red balloon, then its blue one. The same query gives the red balloon, then
    # the blue one (the true masks come from the scenes' label maps, as make_examples.py draws them).
    make = make_examples_module()
    scenes = make.example_sets()["balloons"]
    support, query = scenes["supports"][0], scenes["queries"][0]
    for kind in (make.RED_BALLOON, make.BLUE_BALLOON):
        predicted = pipe(query.image(), support_images=[support.image()], support_masks=[support.labels == kind],
                         output_type="np").masks[0]
        for other in (make.RED_BALLOON, make.BLUE_BALLOON):
            truth = query.labels == other
            iou = np.logical_and(predicted, truth).sum() / np.logical_or(predicted, truth).sum()
            assert (iou >= 0.5) if other == kind else (iou < 0.1), (kind, other, iou)


def test_the_recorded_figures_are_the_shipped_weights_and_five_shots_score_above_one():
    # The held-out 1- and 5-shot scores (300 episodes each, about a minute of CPU) are recorded, not rerun here: the
    # record names the shipped UNet by its hash, so new weights without new figures fail here.
    record = json.loads(MULTI_SHOT_RESULTS.read_text())["shipped"]
    weights = MODEL / "unet" / "diffusion_pytorch_model.safetensors"
    assert record["unet_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    config = json.loads((MODEL / "model_index.json").read_text())
    assert (config["threshold"], config["threshold_mode"]) == (record["threshold"], record["threshold_mode"])
    held_out = record["held_out"]
    assert held_out["1-shot"]["episodes"] == held_out["5-shot"]["episodes"] == 300
    assert held_out["5-shot"]["miou"] >= held_out["1-shot"]["miou"]
    assert min(iou for queries in record["examples"].values() for iou in queries.values()) >= stated_minimum_iou()


@torch.no_grad()
def test_a_second_example_keeps_every_example_segmented(pipe):
    # The demo's loop: a corrected result added as an example. Each query segmented with its set's support plus the
    # set's other query and its true mask still reaches the README's minimum.
    minimum = stated_minimum_iou()
    for name, example in example_sets(EXAMPLES).items():
        for i, (query_name, image, truth) in enumerate(example["queries"]):
            others = [(im, t) for j, (_, im, t) in enumerate(example["queries"]) if j != i]
            supports = example["supports"] + others
            predicted = pipe(image, support_images=[im for im, _ in supports], support_masks=[m for _, m in supports],
                             output_type="np").masks[0]
            iou = np.logical_and(predicted, truth).sum() / np.logical_or(predicted, truth).sum()
            assert iou >= minimum, f"{name}/{query_name} with {len(supports)} supports: IoU {iou:.3f} < {minimum}"
