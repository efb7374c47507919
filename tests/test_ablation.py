"""`python -m benchmarks.ablation` end to end on three designs, two training steps each, with tiny components.

Each design is trained by `train/train.py` from the same saved pipeline (adapted to the design by the training
script), saved, loaded back (also as remote code), scored at 1 and 5 shots by `train/evaluate.py`, and the page is
written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import torch

from benchmarks.ablation import DIFFEWS, main
from pipeline_diffews import DiffewSPipeline
from pipeline_diffews.design_diffews import PAPER_DESIGNS
from tests.tiny_models import RESOLUTION, random_box_mask, random_image, save_tiny_pipeline, tiny_image_encoder
from tests.training_runs import single_thread  # noqa: F401  (autouse fixture)

DESIGNS = [DIFFEWS, "qkv_fusion+concat", "tokenized_cross_attention+attention_mask"]


def test_ablation_runner_trains_saves_loads_and_scores_each_design(tmp_path):
    init = save_tiny_pipeline(tmp_path / "init")
    encoder, processor = tiny_image_encoder()
    encoder.save_pretrained(tmp_path / "clip" / "image_encoder")
    processor.save_pretrained(tmp_path / "clip" / "feature_extractor")  # found beside the encoder's folder
    out, results_file, page = tmp_path / "runs", tmp_path / "ablation.json", tmp_path / "ablation.md"
    code = main(["--pretrained", str(init), "--image-encoder", str(tmp_path / "clip" / "image_encoder"),
                 "--output-dir", str(out), "--output", str(results_file), "--page", str(page),
                 "--designs", *DESIGNS, "--steps", "2", "--batch-size", "2", "--episodes", "3",
                 "--eval-batch-size", "3", "--resolution", str(RESOLUTION), "--no-thresholds"])
    assert code == 0
    results = json.loads(results_file.read_text())
    assert list(results["designs"]) == DESIGNS
    for name, record in results["designs"].items():
        assert set(record["cells"]) >= {"1-shot", "5-shot", "5-shot sampled"}
        for cell in record["cells"].values():
            assert 0 <= cell["miou"] <= 100 and cell["episodes"] == 3 and cell["wall_s"] > 0
        assert record["training"]["wall_s"] > 0 and "--max-steps 2" in record["train_command"]
    assert "--support-token-sampling" in results["designs"][DIFFEWS]["evaluate_command"]
    assert "1-shot, second draw" in results["designs"][DIFFEWS]["cells"]
    # Paths relative to the repository root, never this machine's absolute ones.
    assert not re.search(r'(^|[\s"=])' + re.escape(str(tmp_path)), results_file.read_text())

    text = page.read_text()
    for heading in ("Figure 2", "Figure 3", "Figure 4", "Table 3", "Table 4", "Table 5", "orderings"):
        assert heading in text
    assert "46.64" in text and "not run" in text  # the paper's KV fusion value; the designs left out

    # Every trained folder runs its own design with no argument, with 1 and several shots.
    rng = np.random.default_rng(0)
    images = [random_image(rng, 64, 80) for _ in range(3)]
    masks = [random_box_mask(rng, 64, 80) for _ in range(3)]
    outputs = {}
    for name in DESIGNS:
        folder = out / name.replace(":", "_").replace("+", "_")
        pipe = DiffewSPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        assert pipe.design == PAPER_DESIGNS[name][0]
        one = pipe(images[0], support_images=images[1:2], support_masks=masks[1:2])
        several = pipe(images[0], support_images=images[1:], support_masks=masks[1:])
        assert one.masks[0].shape == several.masks[0].shape == (64, 80)
        outputs[name] = several.probabilities[0]
    tokenized = DiffewSPipeline.from_pretrained(out / "tokenized_cross_attention_attention_mask")
    assert tokenized.image_encoder is not None and tokenized.feature_extractor is not None
    # Two designs trained alike from the same weights segment differently.
    assert np.abs(outputs[DIFFEWS] - outputs["qkv_fusion+concat"]).max() > 1e-4

    # The tokenized design's folder loads as remote code where the package cannot be imported.
    folder = out / "tokenized_cross_attention_attention_mask"
    np.savez(tmp_path / "inputs.npz", query=np.asarray(images[0]), support=np.asarray(images[1]), mask=masks[1])
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        class BlockPackage(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "pipeline_diffews":
                    raise ImportError("pipeline_diffews is not installed here")
        sys.meta_path.insert(0, BlockPackage())
        import numpy as np
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe).__module__.startswith("diffusers_modules"), type(pipe).__module__
        assert pipe.design.interaction == "tokenized_cross_attention", pipe.design
        data = np.load({str(tmp_path / "inputs.npz")!r})
        out = pipe(data["query"], support_images=[data["support"]], support_masks=[data["mask"]])
        np.save({str(tmp_path / "remote.npy")!r}, out.probabilities[0])
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    local = tokenized(images[0], support_images=images[1:2], support_masks=masks[1:2]).probabilities[0]
    np.testing.assert_allclose(np.load(tmp_path / "remote.npy"), local, atol=1e-5)
    assert torch.get_num_threads() == 1
