"""`python -m benchmarks.learning_camvid` end to end on CamVid with a couple of steps of everything (tiny, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from benchmarks.learning_camvid import ROWS, main, parse_args
from benchmarks.tiny_diffews import score_copy_baseline
from tests.fixtures_data import CAMVID, needs_camvid
from tests.training_runs import index_cache  # noqa: F401  (autouse fixtures)
from train.data import Episode
from train.metrics import FewShotSegmentationMetric

SHIPPED = Path(__file__).resolve().parents[1] / "examples" / "tiny-camvid-pipeline"

pytestmark = needs_camvid


def conv_in_ref(folder) -> torch.Tensor:
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))["conv_in_ref.weight"]


def test_two_steps_of_everything_write_the_tables_and_pipelines(tmp_path):
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["--data-root", str(CAMVID), "--output-dir", str(out), "--resolution", "32", "--vae-steps", "2",
                     "--steps", "2", "--episodes", "4", "--eval-batch-size", "4", "--export-pipeline",
                     str(tmp_path / "export")]) == 0
    finally:
        torch.set_num_threads(threads)

    results = json.loads((out / "results.json").read_text())
    assert set(results["rows"]) == set(ROWS)
    for row in ROWS:
        for split, classes in (("seen", 8), ("novel", 3)):
            scores = results["rows"][row][split]
            assert scores["episodes"] == 4
            assert 0 <= scores["miou"] <= 100 and 0 <= scores["fb_iou"] <= 100
            assert len(scores["per_class"]) <= classes
    assert set(results["rows"]["diffews"]["novel"]["per_class"]) <= {"Sky", "Pavement", "Car"}
    assert results["config"]["steps"] == 2 and results["vae"]["steps"] == 2
    markdown = (out / "results.md").read_text()
    assert "| DiffewS (tiny, trained here) |" in markdown and results["command"] in markdown

    # The support-free model never saw a support: conv_in_ref got no gradient (only AdamW's weight decay moved it).
    initial = conv_in_ref(out / "init")
    assert torch.allclose(conv_in_ref(out / "query_only"), initial, rtol=1e-4, atol=0)
    assert (conv_in_ref(out / "diffews") - initial).abs().max() > 1e-4
    assert sorted(p.name for p in (tmp_path / "export" / "unet").iterdir() if p.suffix != ".py") == [
        "config.json", "diffusion_pytorch_model.safetensors"]


def test_copy_baseline_scores_a_query_that_is_its_support_perfectly():
    mask = np.zeros((36, 48), dtype=np.uint8)
    mask[10:20, 5:30] = 1
    image = Image.new("RGB", (48, 36))
    episode = Episode(image, mask, [image], [mask], class_id=3, query_key="q", support_keys=["s"])
    metric = FewShotSegmentationMetric(num_classes=11)
    score_copy_baseline([[episode]], metric, resolution=32)
    scores = metric.compute()
    assert scores["miou"] == pytest.approx(100.0) and scores["fb_iou"] == pytest.approx(100.0)


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        parse_args(["--data-root", "d", "--output-dir", "o", "--resolution", "40"])
    with pytest.raises(SystemExit):
        parse_args(["--data-root", "d", "--output-dir", "o", "--steps", "0"])
    args = parse_args(["--data-root", "d", "--output-dir", "o"])
    assert (args.resolution, args.max_shots, args.shots, args.episodes, args.fold) == (64, 1, 1, 300, 0)


def test_shipped_tiny_camvid_pipeline_segments_the_class_its_support_shows():
    from pipeline_diffews import DiffewSPipeline
    from train.data import build_source

    pipe = DiffewSPipeline.from_pretrained(SHIPPED)
    pipe.set_progress_bar_config(disable=True)
    source = build_source("camvid", CAMVID, "val", None, "test")
    support, query = "0016E5_07959", "0016E5_07961"  # two val frames of one street, both with road, building, tree
    predictions = {}
    for class_id in (1, 3):  # Building, Road
        out = pipe(source.load_image(query), support_images=[source.load_image(support)],
                   support_masks=[source.load_mask(support, class_id) == 1])
        predictions[class_id] = out.masks[0]
        assert out.masks[0].shape == (360, 480)

    def iou(a, b):
        return (a & b).sum() / max((a | b).sum(), 1)

    road, building = (source.load_mask(query, c) == 1 for c in (3, 1))
    assert iou(predictions[3], road) > 0.8 and iou(predictions[3], building) < 0.1
    assert iou(predictions[1], building) > 0.45 and iou(predictions[1], road) < 0.1
