"""The shipped demo model segments the shipped demo examples as `examples/tiny-fewshot-pipeline/README.md` says."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
import torch

from tests.fixtures_data import ROOT
from benchmarks.learning_synthetic import score_examples
from pipeline_diffews import DiffewSPipeline
from tests.training_runs import single_thread  # noqa: F401  (autouse fixture)

MODEL = ROOT / "examples" / "tiny-fewshot-pipeline"
EXAMPLES = ROOT / "examples"


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
