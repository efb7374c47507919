"""What `push_to_hub` uploads loads through diffusers' own Hub download path where the package cannot be imported.

The saved folder is served by stand-ins for the three Hub calls diffusers makes (`model_info`, `snapshot_download`,
`hf_hub_download`), which keep one snapshot folder as the Hub's cache does. `DiffusionPipeline.from_pretrained(repo,
trust_remote_code=True)` then runs `DiffusionPipeline.download` (with its `allow_patterns`) and
`get_cached_module_file` (which fetches the modules the pipeline file imports relatively), in a fresh interpreter
that cannot import `pipeline_diffews`: with the installed diffusers, and with the lowest the requirements allow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.tiny_models import save_tiny_pipeline, tiny_pipeline

LOWEST_DIFFUSERS = "0.40.0"  # requirements.txt: diffusers>=0.40
HELPER_MODULES = ["device_speedups.py", "image_processor_diffews.py"]

RNG = np.random.default_rng(9)
SUPPORT = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)
MASK = np.zeros((48, 64), dtype=bool)
MASK[8:30, 12:44] = True
LABELS = np.zeros((48, 64), dtype=np.uint8)
LABELS[:20, :30], LABELS[28:, 34:] = 1, 2
QUERIES = np.stack([RNG.integers(0, 256, (40, 52, 3), dtype=np.uint8) for _ in range(2)])

# Run in the fresh interpreter: argv = served folder, work folder, extra sys.path entry ("" for none).
LOADER = r'''
import fnmatch, importlib.abc, json, os, shutil, sys, types
from pathlib import Path

served, work, extra_path = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
if extra_path:
    sys.path.insert(0, extra_path)


class BlockPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pipeline_diffews":
            raise ImportError("pipeline_diffews is not installed here")


sys.meta_path.insert(0, BlockPackage())
import numpy as np
import diffusers
import diffusers.pipelines.pipeline_loading_utils as loading_utils
import diffusers.pipelines.pipeline_utils as pipeline_utils
import diffusers.utils.dynamic_modules_utils as dynamic_modules_utils
from diffusers import DiffusionPipeline

REPO, SHA = "someone/diffews-remote", "0123456789abcdef0123456789abcdef01234567"
snapshot = work / "hub" / "snapshots" / SHA  # one folder, as the Hub cache keeps a revision's files
files = sorted(p.relative_to(served).as_posix() for p in served.rglob("*") if p.is_file())
fetched = {"hf_hub_download": [], "snapshot_download": []}


def _copy(name):
    target = snapshot / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(served / name, target)
    return str(target)


def model_info(repo_id, *args, **kwargs):
    assert repo_id == REPO, repo_id
    return types.SimpleNamespace(sha=SHA, siblings=[types.SimpleNamespace(rfilename=f) for f in files])


def hf_hub_download(repo_id, filename, *args, subfolder=None, **kwargs):
    assert repo_id == REPO, repo_id
    name = f"{subfolder}/{filename}" if subfolder else filename
    if name not in files:
        raise FileNotFoundError(f"{name} is not in {REPO}")
    fetched["hf_hub_download"].append(name)
    return _copy(name)


def snapshot_download(repo_id, *args, allow_patterns=None, ignore_patterns=None, **kwargs):
    assert repo_id == REPO, repo_id
    for name in files:
        if allow_patterns is not None and not any(fnmatch.fnmatch(name, p) for p in allow_patterns):
            continue
        if ignore_patterns and any(fnmatch.fnmatch(name, p) for p in ignore_patterns):
            continue
        fetched["snapshot_download"].append(name)
        _copy(name)
    return str(snapshot)


for module in (pipeline_utils, loading_utils, dynamic_modules_utils):  # where diffusers looks them up
    for name, replacement in (("model_info", model_info), ("hf_hub_download", hf_hub_download),
                              ("snapshot_download", snapshot_download)):
        if hasattr(module, name):
            setattr(module, name, replacement)
if hasattr(pipeline_utils, "_resolve_revision"):  # newer diffusers pin the revision first: here the one commit
    pipeline_utils._resolve_revision = lambda repo, revision=None, **kwargs: revision

pipe = DiffusionPipeline.from_pretrained(REPO, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
assert type(pipe).__module__.startswith("diffusers_modules"), type(pipe).__module__
assert type(pipe.unet).__module__.startswith("diffusers_modules"), type(pipe.unet).__module__
data = np.load(work / "inputs.npz")
one = pipe(list(data["queries"]), support_images=[data["support"]], support_masks=[data["mask"]], batch_size=2)
classes = pipe(list(data["queries"]), support_images=[data["support"]], support_masks=[data["labels"]])
np.savez(work / "outputs.npz", masks=np.stack(one.masks), probabilities=np.stack(one.probabilities),
         label_maps=np.stack(classes.label_maps), class_probabilities=np.stack(classes.class_probabilities))
(work / "report.json").write_text(json.dumps({"version": diffusers.__version__, "file": diffusers.__file__,
                                              "pipeline_module": type(pipe).__module__, **fetched}))
'''


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The folder `push_to_hub` uploads (`save_pretrained` of the tiny pipeline)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("hub_repo"))


@pytest.fixture(scope="module")
def expected():
    pipe = tiny_pipeline()
    one = pipe(list(QUERIES), support_images=[SUPPORT], support_masks=[MASK], batch_size=2)
    classes = pipe(list(QUERIES), support_images=[SUPPORT], support_masks=[LABELS])
    return {"masks": np.stack(one.masks), "probabilities": np.stack(one.probabilities),
            "label_maps": np.stack(classes.label_maps), "class_probabilities": np.stack(classes.class_probabilities)}


@pytest.fixture(scope="module")
def lowest_diffusers(request) -> Path:
    """diffusers at the lowest version the requirements allow, installed once into pytest's cache folder."""
    target = Path(request.config.cache.mkdir(f"diffusers-{LOWEST_DIFFUSERS}"))
    if not (target / "diffusers" / "__init__.py").is_file():
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
             f"diffusers=={LOWEST_DIFFUSERS}"],
            capture_output=True, text=True, timeout=300,
        )
        if result.returncode != 0:
            pytest.fail(
                f"Could not install diffusers=={LOWEST_DIFFUSERS} from the package registry, needed to check that "
                f"saved pipelines load with the lowest diffusers the requirements allow:\n{result.stderr[-2000:]}"
            )
    return target


def _load_through_hub(served: Path, work: Path, extra_path: str = "") -> dict:
    work.mkdir()
    np.savez(work / "inputs.npz", queries=QUERIES, support=SUPPORT, mask=MASK, labels=LABELS)
    (work / "loader.py").write_text(LOADER)
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_HOME": str(work / "hf_home"),
           "HF_MODULES_CACHE": str(work / "modules"), "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, str(work / "loader.py"), str(served), str(work), extra_path],
                            cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((work / "report.json").read_text())


def _assert_outputs_equal(work: Path, expected: dict) -> None:
    outputs = np.load(work / "outputs.npz")
    np.testing.assert_allclose(outputs["probabilities"], expected["probabilities"], atol=1e-6)
    np.testing.assert_allclose(outputs["class_probabilities"], expected["class_probabilities"], atol=1e-6)
    np.testing.assert_array_equal(outputs["masks"], expected["masks"])
    np.testing.assert_array_equal(outputs["label_maps"], expected["label_maps"])


def _assert_fetched_by_diffusers(report: dict) -> None:
    # the pipeline file and the modules it imports relatively come through `get_cached_module_file`, the UNet's code
    # and the weights through `DiffusionPipeline.download`'s snapshot
    assert set(HELPER_MODULES) <= set(report["hf_hub_download"]), report
    assert not set(HELPER_MODULES) & set(report["snapshot_download"]), report
    assert {"pipeline_diffews.py", "unet/unet_diffews.py", "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors"} <= set(report["hf_hub_download"] + report["snapshot_download"])


def test_hub_download_with_installed_diffusers(served, expected, tmp_path):
    import diffusers

    report = _load_through_hub(served, tmp_path / "work")
    assert report["version"] == diffusers.__version__
    _assert_fetched_by_diffusers(report)
    _assert_outputs_equal(tmp_path / "work", expected)


def test_hub_download_with_lowest_diffusers(served, expected, lowest_diffusers, tmp_path):
    report = _load_through_hub(served, tmp_path / "work", str(lowest_diffusers))
    assert report["version"] == LOWEST_DIFFUSERS and report["file"].startswith(str(lowest_diffusers)), report
    _assert_fetched_by_diffusers(report)
    _assert_outputs_equal(tmp_path / "work", expected)
